"""The "does it use its context?" diagnostic: held-out loss by step and the context gain, for every paradigm."""

from __future__ import annotations


import pytest
import torch

from arzoo.generators import (
    MambaScaleGenerator,
    MaskedHierarchicalGenerator,
    NextNeighborGenerator,
    NextScaleGenerator,
    RandomOrderGenerator,
    RasterGenerator,
)
from conftest import save_tiny_msvq

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = dict(vocab_size=32, grid_size=4, dim=32, n_layer=1, n_head=2, multiple_of=32, warmup_steps=0)
SCALES = dict(depth=2, embed_dim=32, num_heads=2, warmup_steps=0)


@pytest.fixture(scope="module")
def msvq_path(tmp_path_factory) -> str:
    return str(save_tiny_msvq(tmp_path_factory.mktemp("tok"), [1, 2, 3, 4]))


def _build(name: str, msvq_path: str) -> torch.nn.Module:
    if name == "raster":
        return RasterGenerator(**GRID)
    if name == "next-neighbor":
        return NextNeighborGenerator(**GRID)
    if name == "random-order":
        return RandomOrderGenerator(**GRID)
    if name == "next-scale":
        return NextScaleGenerator(tokenizer_path=msvq_path, **SCALES)
    if name == "m-var":
        return MambaScaleGenerator(tokenizer_path=msvq_path, mamba_d_state=16, mamba_headdim=16, **SCALES)
    stage = int(name[-1])
    return MaskedHierarchicalGenerator(tokenizer_path=msvq_path, stage=stage, n_layers_train=1, **SCALES)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Noise on every network weight: the zero-initialised heads would make every logit equal."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


PARADIGMS = ["raster", "next-neighbor", "random-order", "next-scale", "m-var", "hmar-stage1", "hmar-stage2"]


@pytest.mark.parametrize("name", PARADIGMS)
def test_every_paradigm_reports_loss_by_step_and_a_context_gain(name, msvq_path):
    torch.manual_seed(0)
    model = _perturbed(_build(name, msvq_path))
    tokens = torch.randint(0, model.vocab_size, (6, model.num_tokens))
    labels = torch.arange(6) % model.num_classes
    out = model.context_diagnostic(tokens, labels)
    parts = min(4, model.num_steps)
    scored = range(1 if name == "hmar-stage2" else 0, parts)  # stage 2 never predicts the first scale
    assert set(out) == {f"loss_q{p + 1}" for p in scored} | {"context_gain"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in out.values()), out
    assert out["context_gain"].abs() > 1e-4  # a random network reads its context
    again = model.context_diagnostic(tokens, labels)  # drawn orders / masks come from a fixed generator
    assert all(torch.equal(out[k], again[k]) for k in out)


def test_loss_by_step_is_the_mean_of_the_position_losses_of_those_steps():
    torch.manual_seed(0)
    model = _perturbed(RasterGenerator(**GRID))  # 16 steps -> quarters of 4 steps, one token each
    tokens, labels = torch.randint(0, 32, (3, 16)), torch.tensor([0, 1, 2])
    ce_BN = model.position_losses(tokens, labels)
    out = model.context_diagnostic(tokens, labels)
    for q in range(4):
        torch.testing.assert_close(out[f"loss_q{q + 1}"], ce_BN[:, 4 * q : 4 * q + 4].mean())
    torch.testing.assert_close(ce_BN.mean(), model.sequence_loss(tokens, labels))


@pytest.mark.parametrize("name", ["raster", "next-neighbor", "random-order"])
def test_a_network_blind_to_its_tokens_has_zero_context_gain(name, msvq_path):
    """Zero token embeddings: the network sees the class and the positions only, as a model that learned
    to ignore its context would; the diagnostic must say 0 where the training loss cannot tell."""
    torch.manual_seed(0)
    model = _perturbed(_build(name, msvq_path))
    with torch.no_grad():
        model.net.tok_embeddings.weight.zero_()
    tokens = torch.randint(0, 32, (5, 16))
    out = model.context_diagnostic(tokens, torch.arange(5))
    assert out["context_gain"].abs() < 1e-5


def test_a_next_scale_network_blind_to_its_inputs_has_zero_context_gain(msvq_path):
    torch.manual_seed(0)
    model = _perturbed(_build("next-scale", msvq_path))
    with torch.no_grad():
        model.net.word_embed.weight.zero_()
    tokens = torch.randint(0, 32, (5, model.num_tokens))
    assert model.context_diagnostic(tokens, torch.arange(5))["context_gain"].abs() < 1e-5

