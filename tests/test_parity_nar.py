"""NAR parity: `NeighborTransformer` / `NextNeighborGenerator` reproduce the official NAR fixture (nar.pt).

Everything is read from the fixture (config with the extra-layer count m, weights, inputs, expected
outputs), so another fixture made by the same generator must pass as well. Tolerances are those of
the fixture README / SPEC section 7: tokens exact, logits atol = rtol = 1e-5.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from arzoo.generators.next_neighbor import NeighborTransformer, NextNeighborGenerator
from arzoo.interop.nar import NAR_PRESETS, load_nar, load_next_neighbor_generator, nar_kwargs_from_official
from conftest import load_parity

pytestmark = pytest.mark.parity

ATOL = RTOL = 1e-5
RUNS = ("greedy", "sampled", "greedy_cfg_interval")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("nar", "nar.pt")


@pytest.fixture(scope="module")
def kwargs(fixture: dict) -> dict:
    return nar_kwargs_from_official(fixture["config"])


@pytest.fixture(scope="module")
def net(fixture: dict, kwargs: dict) -> NeighborTransformer:
    return load_nar(fixture["state_dict"], **kwargs)


@pytest.fixture()
def gen(fixture: dict) -> NextNeighborGenerator:
    """A fresh generator per test (tests set cfg_interval / train mode on it)."""
    return load_next_neighbor_generator(fixture["state_dict"], config=fixture["config"])


# ---- architecture and weights -------------------------------------------------------------------


def test_config_and_weights_load_strictly(fixture: dict, kwargs: dict, net: NeighborTransformer) -> None:
    config = fixture["config"]
    m = config.get("medusa_attention_num", 1)
    assert kwargs["extra_layers"] == m and net.extra_layers == m and net.n_layer == config["n_layer"]
    assert len(net.layers) == config["n_layer"] + m
    assert kwargs["grid_size"] ** 2 == config["block_size"] == fixture["grid_size"] ** 2
    assert list(net.state_dict()) == list(fixture["state_dict"])  # official keys, official order
    assert len(fixture["state_dict"]) == 6 + 7 * (config["n_layer"] + m)
    fresh = NeighborTransformer(**kwargs)
    fresh.load_state_dict(fixture["state_dict"], strict=True)
    assert torch.count_nonzero(fresh.output.weight) > 0  # loaded over the zero init


def test_fresh_init_zeroes_only_the_right_head(kwargs: dict) -> None:
    fresh = NeighborTransformer(**kwargs)
    assert torch.count_nonzero(fresh.output.weight) == 0
    assert torch.count_nonzero(fresh.medusa_output.weight) == fresh.medusa_output.weight.numel()


@pytest.mark.parametrize("preset", ["GPT-B", "GPT-L"])
def test_preset_keys_match_official(fixture: dict, preset: str) -> None:
    official = fixture["official_key_shapes"][preset]
    with torch.device("meta"):
        net = NeighborTransformer(**NAR_PRESETS[preset], vocab_size=16384, num_classes=1000, grid_size=16,
                                  extra_layers=1)  # fmt: skip
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert list(ours) == list(official)
    assert ours == {k: list(v) for k, v in official.items()}


def test_rope_table_is_official(fixture: dict, net: NeighborTransformer) -> None:
    assert torch.equal(net.freqs_cis, fixture["freqs_cis"])


# ---- masks and schedule ----------------------------------------------------------------------


def test_training_and_inference_masks(fixture: dict, net: NeighborTransformer, gen: NextNeighborGenerator) -> None:
    assert torch.equal(net.plan.seq_mask, fixture["train_mask"])
    assert torch.equal(gen.sequence_mask(gen.mask), fixture["train_mask"])  # from the (N, N) visibility mask
    assert torch.equal(net.plan.cache_mask, fixture["infer_mask"])
    gen.net.setup_cache(2)
    assert torch.equal(gen.net.causal_mask, fixture["infer_mask"])


def test_schedule_is_the_decode_order(fixture: dict, gen: NextNeighborGenerator) -> None:
    assert [s.tolist() for s in gen.schedule] == [list(map(int, s)) for s in fixture["decode_steps"]]
    assert gen.num_steps == 2 * fixture["grid_size"] - 1


# ---- forward ----------------------------------------------------------------------------------


@torch.no_grad()
def test_raw_head_logits_and_combined_logits(fixture: dict, net: NeighborTransformer) -> None:
    mask = fixture["train_mask"].expand(len(fixture["idx"]), -1, -1)[:, None]
    right, below = net(fixture["idx"], fixture["cond_idx"], mask=mask)
    assert right.dtype == below.dtype == torch.float32
    torch.testing.assert_close(right, fixture["logits_R_raw"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(below, fixture["logits_B_raw"], atol=ATOL, rtol=RTOL)
    combined = net.neighbor_logits(right, below)
    torch.testing.assert_close(combined, fixture["logits"], atol=ATOL, rtol=RTOL)
    default_right, default_below = net(fixture["idx"], fixture["cond_idx"])  # the proximity mask by default
    assert torch.equal(default_right, right) and torch.equal(default_below, below)


def test_training_logits_and_loss(fixture: dict, gen: NextNeighborGenerator) -> None:
    config = fixture["config"]
    for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate"):
        assert config[name] == 0.0  # label dropout is the only randomness
    cond_idx, idx = fixture["cond_idx"], fixture["idx"]
    gen.train()
    torch.manual_seed(fixture["train_seed"])
    labels = gen.drop_labels(cond_idx)
    assert torch.equal(labels == gen.num_classes, fixture["train_drop_ids"])

    logits = gen.teacher_forcing(idx, labels)  # prediction order (diagonals)
    order = gen.prediction_order
    torch.testing.assert_close(logits, fixture["logits_train"][:, order], atol=ATOL, rtol=RTOL)
    loss = gen.token_loss(logits, idx[:, order])
    torch.testing.assert_close(loss, fixture["loss_train"], atol=ATOL, rtol=RTOL)
    loss.backward()
    assert gen.net.output.weight.grad is not None and gen.net.medusa_output.weight.grad is not None


@torch.no_grad()
def test_kv_cached_diagonals_match_the_full_forward(fixture: dict, net: NeighborTransformer) -> None:
    labels, idx = fixture["cond_idx"], fixture["idx"]
    net.setup_cache(len(labels))
    try:
        got = torch.empty_like(fixture["logits"])
        for step, cells in enumerate(net.plan.diagonals):
            fed = labels if step == 0 else idx[:, net.plan.diagonals[step - 1]]
            got[:, cells] = net.decode_diagonal(fed, step)
    finally:
        net.clear_cache()
    torch.testing.assert_close(got, fixture["logits"], atol=ATOL, rtol=RTOL)


# ---- generation through the generic BaseGenerator loop ---------------------------------------


@pytest.mark.parametrize("run", RUNS)
def test_generate_matches_official(fixture: dict, gen: NextNeighborGenerator, run: str, monkeypatch) -> None:
    official = fixture[f"{run}_kwargs"]
    assert official["cfg_scale"] > 1.0  # upstream guides iff cfg_scale > 1, arzoo iff cfg != 1
    gen.cfg_interval = official["cfg_interval"]  # NAR's: counted in tokens

    recorded: list[torch.Tensor] = []
    original = gen.logits_to_tokens

    def recording(logits_BlV, state):
        recorded.append(logits_BlV.detach().clone())
        return original(logits_BlV, state)

    slots: list[list[int]] = []
    heads = gen.net.heads
    monkeypatch.setattr(gen, "logits_to_tokens", recording)
    monkeypatch.setattr(gen.net, "heads", lambda x, f, m, pos: slots.append(pos.tolist()) or heads(x, f, m, pos))
    tokens = gen.generate(
        fixture["gen_cond_idx"],
        cfg=official["cfg_scale"],
        temperature=official["temperature"],
        top_k=None if official["top_k"] == 0 else official["top_k"],  # top_k=1 is still a draw upstream
        top_p=official["top_p"],
        greedy=not official["sample_logits"],
        generator=torch.Generator().manual_seed(fixture[f"{run}_seed"]),
    )

    assert slots == [list(map(int, pos)) for pos in fixture[f"{run}_call_input_pos"]]
    expected_logits = fixture[f"{run}_step_logits"]
    assert len(recorded) == len(expected_logits) == gen.num_steps
    for step, (got, expected) in enumerate(zip(recorded, expected_logits)):
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"step {step}: {m}")
    expected_tokens = fixture[run]
    assert tokens.shape == expected_tokens.shape
    assert torch.equal(tokens.to(expected_tokens.dtype), expected_tokens)


# ---- checkpoint files -------------------------------------------------------------------------


@torch.no_grad()
def test_load_from_training_checkpoint_file(fixture: dict, kwargs: dict, tmp_path) -> None:
    """A DDP-style file (`{"model", "optimizer", "steps", "args": Namespace}`), `module.` prefixes,
    KV-cache buffers saved after generation and a `freqs_cis` entry."""
    state = {f"module.{k}": v.clone() for k, v in fixture["state_dict"].items()}
    for i in range(kwargs["n_layer"] + kwargs["extra_layers"]):
        for name in ("k_cache", "v_cache"):
            state[f"module.layers.{i}.attention.kv_cache.{name}"] = torch.zeros(2, 4, 24, 16)
    state["module.freqs_cis"] = fixture["freqs_cis"]
    path = tmp_path / "0001000.pt"
    torch.save({"model": state, "optimizer": {}, "steps": 1000, "args": argparse.Namespace(gpt_model="GPT-B")}, path)

    net = load_nar(path, **kwargs)
    assert not net.training
    torch.testing.assert_close(net.neighbor_logits(*net(fixture["idx"], fixture["cond_idx"])), fixture["logits"],
                               atol=ATOL, rtol=RTOL)  # fmt: skip
    loaded = load_next_neighbor_generator(str(path), config=fixture["config"], cfg_interval=3)
    assert isinstance(loaded, NextNeighborGenerator) and loaded.cfg_interval == 3 and not loaded.training
    assert all(not t.is_meta for t in loaded.state_dict().values())

    with pytest.raises(ValueError, match="does not fit NeighborTransformer.*missing"):
        load_nar(path, **{**kwargs, "extra_layers": kwargs["extra_layers"] + 1})
    with pytest.raises(ValueError, match="does not fit NeighborTransformer.*shape mismatch"):
        load_nar(path, preset="GPT-B")
    with pytest.raises(ValueError, match="either config= .* or preset="):
        load_next_neighbor_generator(path, config=fixture["config"], preset="GPT-B")
    with pytest.raises(ValueError, match="unknown NAR preset 'GPT-Q'"):
        load_nar(path, preset="GPT-Q")


def test_loaded_weights_do_not_alias_the_given_mapping(fixture: dict, kwargs: dict) -> None:
    net = load_nar(fixture["state_dict"], **kwargs)
    with torch.no_grad():
        net.medusa_norm.weight.add_(1.0)
    assert not torch.equal(net.medusa_norm.weight, fixture["state_dict"]["medusa_norm.weight"])
