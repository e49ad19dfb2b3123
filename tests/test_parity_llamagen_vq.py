"""LlamaGen VQ tokenizer parity: our VQTokenizer reproduces the official `VQModel` fixture (vq.pt).

Tolerances are those of the fixture README / SPEC section 7: indices exact, z_pre 1e-5, quant 1e-6,
reconstructions 1e-4 (thread-count noise measured there was up to 7.6e-6).
"""

from __future__ import annotations

import copy

import pytest
import torch

from arzoo.interop.llamagen import VQ_PRESETS, load_vq_tokenizer, vq_kwargs_from_official
from arzoo.tokenizers.vq import VQTokenizer
from conftest import load_parity

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("llamagen", "vq.pt")


@pytest.fixture(scope="module")
def model(fixture: dict) -> VQTokenizer:
    return load_vq_tokenizer(fixture["state_dict"], **vq_kwargs_from_official(fixture["config"])).eval()


def _grid_indices(fixture: dict, model: VQTokenizer) -> torch.Tensor:
    """The fixture's (B, h*w) raster-order indices as our (B, h, w) token map."""
    (h, w), = model.scales
    return fixture["indices"].reshape(-1, h, w)


def test_config_maps_to_fixture_geometry(fixture: dict, model: VQTokenizer) -> None:
    config = fixture["config"]
    assert model.downsample == config["downsample"]
    assert model.scales == ((config["grid_size"], config["grid_size"]),)
    assert model.vocab_size == config["codebook_size"] and model.codebook_dim == config["codebook_embed_dim"]
    assert len(model.state_dict()) == len(fixture["state_dict"])


@torch.no_grad()
def test_encode_matches_official(fixture: dict, model: VQTokenizer) -> None:
    images = fixture["images"]
    z_pre = model.features(images)
    torch.testing.assert_close(z_pre, fixture["z_pre"], atol=1e-5, rtol=0)
    quant, indices, _ = model.quantize_features(z_pre)
    torch.testing.assert_close(quant, fixture["quant"], atol=1e-6, rtol=0)
    expected = _grid_indices(fixture, model)
    assert indices.dtype == torch.int64 and torch.equal(indices, expected)
    (tokens,) = model.encode(images)
    assert tokens.dtype == torch.int64 and torch.equal(tokens, expected)


@torch.no_grad()
def test_decode_matches_official(fixture: dict, model: VQTokenizer) -> None:
    indices = _grid_indices(fixture, model)
    # Upstream `decode_code` does not clamp: compare the raw decoder output.
    recon = model.decode_latent(model.embed(indices))
    torch.testing.assert_close(recon, fixture["recon"], atol=1e-4, rtol=0)
    torch.testing.assert_close(model.decode([indices]), recon.clamp(-1, 1), atol=0, rtol=0)
    recon_from_quant = model.decode_latent(fixture["quant"])
    torch.testing.assert_close(recon_from_quant, fixture["recon_from_quant"], atol=1e-4, rtol=0)


def test_train_losses_match_official(fixture: dict, model: VQTokenizer) -> None:
    trained = copy.deepcopy(model).train()  # the usage register moves in training mode
    _, _, losses = trained.quantize_features(trained.features(fixture["images"]))
    expected = fixture["train_losses"]
    for name in ("vq_loss", "commit_loss", "entropy_loss"):
        torch.testing.assert_close(getattr(losses, name).detach(), expected[name], rtol=1e-5, atol=1e-7)
    assert losses.codebook_usage == expected["codebook_usage"]
    # The original model's register is untouched (eval mode never writes it).
    torch.testing.assert_close(model.quantize.codebook_used, fixture["state_dict"]["quantize.codebook_used"])


@pytest.mark.parametrize("preset", ["VQ-16", "VQ-8"])
def test_official_preset_keys_and_shapes(fixture: dict, preset: str) -> None:
    official = fixture["official_key_shapes"][preset]
    with torch.device("meta"):
        tokenizer = VQTokenizer(**VQ_PRESETS[preset])
    ours = {k: list(v.shape) for k, v in tokenizer.state_dict().items()}
    assert ours == {k: list(v) for k, v in official.items()}
    assert list(ours) == list(official)  # same order as upstream, too
