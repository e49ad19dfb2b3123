"""LlamaGen generation parity through the generic `RasterGenerator` (not a hand-written replay).

`load_raster_generator` puts the fixture's official weights into a `RasterGenerator`; its
`generate()` (BaseGenerator's loop, CFG as one doubled batch, `sampling.py`'s filters and seeded
multinomial draws) must reproduce upstream's `generate()` token for token, and its training path
(`drop_labels`, `teacher_forcing`, `token_loss`) upstream's training forward. Everything is read
from the fixture (gpt.pt), so another fixture made by the same generator must pass as well.
Tolerances (fixture README / SPEC section 7): tokens exact, logits atol = rtol = 1e-5.
"""

from __future__ import annotations

import pytest
import torch

from arzoo.generators.raster import RasterGenerator
from arzoo.interop.llamagen import load_raster_generator
from conftest import load_parity

pytestmark = pytest.mark.parity

ATOL = RTOL = 1e-5
RUNS = ("greedy", "sampled", "greedy_cfg_interval")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("llamagen", "gpt.pt")


@pytest.fixture()
def gen(fixture: dict) -> RasterGenerator:
    """A fresh generator per test (tests set cfg_interval / train mode on it)."""
    return load_raster_generator(fixture["state_dict"], config=fixture["config"])


def test_architecture_from_official_config(fixture: dict, gen: RasterGenerator) -> None:
    config = fixture["config"]
    assert not gen.training and gen.tokenizer is None
    assert gen.num_classes == gen.net.num_classes == config["num_classes"]
    assert gen.class_dropout_prob == config["class_dropout_prob"]
    assert gen.vocab_size == config["vocab_size"] and gen.num_tokens == config["block_size"]
    assert gen.net.n_layer == config["n_layer"] and gen.net.dim == config["dim"]
    for key, expected in fixture["state_dict"].items():
        got = gen.net.state_dict()[key]
        assert got.dtype == torch.float32 and torch.equal(got, expected), key
    # the generator owns copies: the fixture's tensors are not aliased
    assert all(
        gen.net.state_dict()[k].data_ptr() != v.data_ptr() for k, v in fixture["state_dict"].items()
    )


@pytest.mark.parametrize("run", RUNS)
def test_generate_matches_official(fixture: dict, gen: RasterGenerator, run: str, monkeypatch) -> None:
    official = fixture[f"{run}_kwargs"]
    # Upstream doubles the batch only when cfg_scale > 1, arzoo whenever cfg != 1: the same for these runs.
    assert official["cfg_scale"] > 1.0
    gen.cfg_interval = official["cfg_interval"]

    recorded: list[torch.Tensor] = []
    original = gen.logits_to_tokens

    def recording(logits_BlV, state):
        recorded.append(logits_BlV.detach().clone())
        return original(logits_BlV, state)

    monkeypatch.setattr(gen, "logits_to_tokens", recording)
    rng = torch.Generator().manual_seed(fixture[f"{run}_seed"])
    tokens = gen.generate(
        fixture["gen_cond_idx"],
        cfg=official["cfg_scale"],
        temperature=official["temperature"],
        # top_k=1 is a multinomial draw on a one-hot distribution upstream (RNG consumed): not greedy
        top_k=None if official["top_k"] == 0 else official["top_k"],
        top_p=official["top_p"],
        greedy=not official["sample_logits"],
        generator=rng,
    )

    expected_logits = fixture[f"{run}_step_logits"]
    assert len(recorded) == len(expected_logits) == gen.num_steps
    for step, (got, expected) in enumerate(zip(recorded, expected_logits)):
        assert got.shape == (expected.shape[0], 1, expected.shape[1]) and got.dtype == torch.float32
        torch.testing.assert_close(got[:, 0], expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step}: {m}")
    expected_tokens = fixture[run]
    assert tokens.shape == expected_tokens.shape
    assert torch.equal(tokens.to(expected_tokens.dtype), expected_tokens)


def test_training_loss_matches_official(fixture: dict, gen: RasterGenerator) -> None:
    config = fixture["config"]
    for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate"):
        assert config[name] == 0.0  # from the config: label dropout is the only randomness
    cond_idx, idx = fixture["cond_idx"], fixture["idx"]
    gen.train()
    torch.manual_seed(fixture["train_seed"])
    labels = gen.drop_labels(cond_idx)
    assert torch.equal(labels == gen.num_classes, fixture["train_drop_ids"])
    assert torch.equal(labels[~fixture["train_drop_ids"]], cond_idx[~fixture["train_drop_ids"]])

    logits = gen.teacher_forcing(idx, labels)
    torch.testing.assert_close(logits, fixture["logits_train"], atol=ATOL, rtol=RTOL)
    loss = gen.token_loss(logits, idx[:, gen.prediction_order])
    torch.testing.assert_close(loss, fixture["loss_train"], atol=ATOL, rtol=RTOL)
    loss.backward()  # the training path is differentiable end to end
    assert gen.net.output.weight.grad is not None


@torch.no_grad()
def test_eval_logits_match_official(fixture: dict, gen: RasterGenerator) -> None:
    logits = gen.net(fixture["idx"], fixture["cond_idx"])
    torch.testing.assert_close(logits, fixture["logits"], atol=ATOL, rtol=RTOL)


def test_load_from_official_checkpoint_file(fixture: dict, gen: RasterGenerator, tmp_path) -> None:
    path = tmp_path / "0000001.pt"
    torch.save({"model": {k: v.clone() for k, v in fixture["state_dict"].items()}, "steps": 1}, path)
    loaded = load_raster_generator(str(path), config=fixture["config"], cfg_interval=3)
    assert isinstance(loaded, RasterGenerator) and not loaded.training and loaded.cfg_interval == 3
    ours, expected = loaded.net.state_dict(), gen.net.state_dict()
    assert list(ours) == list(expected)
    for key in expected:
        assert ours[key].dtype == torch.float32 and torch.equal(ours[key], expected[key]), key
    assert all(not t.is_meta for t in loaded.state_dict().values())
    assert loaded.device.type == "cpu" and loaded.train_token_counts.device.type == "cpu"

    wrong = {**fixture["config"], "n_layer": fixture["config"]["n_layer"] + 1}
    with pytest.raises(ValueError, match="does not fit RasterTransformer.*missing"):
        load_raster_generator(path, config=wrong)
    with pytest.raises(ValueError, match="either config= .* or preset="):
        load_raster_generator(path, config=fixture["config"], preset="GPT-B")
