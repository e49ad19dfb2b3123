"""LlamaGen GPT (c2i) parity: `RasterTransformer` reproduces the official `Transformer` fixture (gpt.pt).

Everything is read from the fixture (config, weights, inputs, expected outputs), so another fixture
made by the same generator must pass as well. Tolerances are those of the fixture README / SPEC
section 7: tokens exact, logits atol = rtol = 1e-5 (thread-count noise measured there: 1.7e-6).
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F

from arzoo.generators.raster import RasterTransformer
from arzoo.interop.llamagen import GPT_PRESETS, gpt_kwargs_from_official, load_gpt
from arzoo.nn.rope import rope_2d_table
from conftest import load_parity

pytestmark = pytest.mark.parity

ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("llamagen", "gpt.pt")


@pytest.fixture(scope="module")
def kwargs(fixture: dict) -> dict:
    return gpt_kwargs_from_official(fixture["config"])


@pytest.fixture(scope="module")
def model(fixture: dict, kwargs: dict) -> RasterTransformer:
    return load_gpt(fixture["state_dict"], **kwargs).eval()


def test_config_and_weights_load_strictly(fixture: dict, kwargs: dict) -> None:
    config = fixture["config"]
    assert kwargs["grid_size"] ** 2 == config["block_size"]
    net = RasterTransformer(**kwargs)
    net.load_state_dict(fixture["state_dict"], strict=True)  # official keys, unchanged
    assert list(net.state_dict()) == list(fixture["state_dict"])
    assert len(fixture["state_dict"]) == 4 + 7 * config["n_layer"]


def test_rope_table_is_official(fixture: dict, kwargs: dict, model: RasterTransformer) -> None:
    head_dim = kwargs["dim"] // kwargs["n_head"]
    table = rope_2d_table(kwargs["grid_size"], head_dim, kwargs["rope_base"], cls_token_num=1)
    assert table.dtype == torch.float32
    assert torch.equal(table, fixture["freqs_cis"])
    assert torch.equal(model.freqs_cis, fixture["freqs_cis"])
    assert torch.equal(model.rope_rows(kwargs["grid_size"] ** 2), fixture["freqs_cis"])


def test_default_init_matches_official(fixture: dict, kwargs: dict) -> None:
    """Same seed -> the official initial weights, bit for bit (same construction order and init).

    The fixture generator then added N(0, perturb_std^2) noise to every tensor, drawn after
    `torch.manual_seed(perturb_seed)` in sorted key order.
    """
    torch.manual_seed(fixture["init_seed"])
    net = RasterTransformer(**kwargs)
    assert torch.count_nonzero(net.output.weight) == 0
    state = net.state_dict()
    torch.manual_seed(fixture["perturb_seed"])
    for key in sorted(state):
        state[key] = state[key] + torch.randn_like(state[key]) * fixture["perturb_std"]
    for key, expected in fixture["state_dict"].items():
        assert torch.equal(state[key], expected), key


@torch.no_grad()
def test_eval_logits(fixture: dict, model: RasterTransformer) -> None:
    logits = model(fixture["idx"], fixture["cond_idx"])
    assert logits.dtype == torch.float32 and logits.shape == fixture["logits"].shape
    torch.testing.assert_close(logits, fixture["logits"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_train_logits_and_loss(fixture: dict, model: RasterTransformer) -> None:
    config = fixture["config"]
    labels, idx = fixture["cond_idx"], fixture["idx"]
    net = copy.deepcopy(model).train()
    # Upstream's label dropout: one torch.rand(B), the first RNG use of the training forward.
    torch.manual_seed(fixture["train_seed"])
    drop = torch.rand(labels.shape[0], device=labels.device) < config["class_dropout_prob"]
    assert torch.equal(drop, fixture["train_drop_ids"])
    dropped = torch.where(drop, config["num_classes"], labels)
    torch.manual_seed(fixture["train_seed"])
    assert torch.equal(net.drop_labels(labels), dropped)

    logits = net(idx[:, :-1], dropped)
    assert logits.shape == fixture["logits_train"].shape  # (B, N, V): position i predicts idx[:, i]
    torch.testing.assert_close(logits, fixture["logits_train"], atol=ATOL, rtol=RTOL)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx.reshape(-1))
    torch.testing.assert_close(loss, fixture["loss_train"], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_kv_cache_matches_full_forward(fixture: dict, model: RasterTransformer) -> None:
    labels, idx = fixture["cond_idx"], fixture["idx"]
    num_tokens = idx.shape[1]
    full = model(idx, labels)
    net = copy.deepcopy(model)
    net.setup_cache(labels.shape[0], 1 + num_tokens)
    assert net.max_seq_len % 8 == 0 and net.max_seq_len >= 1 + num_tokens
    steps = [net.prefill(labels)]
    for i in range(num_tokens):
        steps.append(net.decode_step(idx[:, i : i + 1], slot_pos=1 + i, cell=i))
    cached = torch.stack(steps, dim=1)
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cached, fixture["logits"], atol=ATOL, rtol=RTOL)


def _replay_greedy(model: RasterTransformer, fixture: dict, run: str) -> tuple[torch.Tensor, list]:
    """Upstream `generate()` with top_k=1 (argmax), written out with the network's cache API."""
    run_kwargs = fixture[f"{run}_kwargs"]
    assert run_kwargs["top_k"] == 1 and run_kwargs["temperature"] > 0
    labels = fixture["gen_cond_idx"]
    batch, num_new = labels.shape[0], fixture[run].shape[1]
    cfg_scale, cfg_interval = run_kwargs["cfg_scale"], run_kwargs["cfg_interval"]
    use_cfg = cfg_scale > 1.0
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)]) if use_cfg else labels

    def guide(logits: torch.Tensor, cfg_on: bool) -> torch.Tensor:
        if not use_cfg:
            return logits
        cond_logits, uncond_logits = logits.split(batch, dim=0)
        return uncond_logits + (cond_logits - uncond_logits) * cfg_scale if cfg_on else cond_logits

    net = copy.deepcopy(model)
    net.setup_cache(cond.shape[0], 1 + num_new)
    step_logits, tokens, slots = [guide(net.prefill(cond), True)], [], [[0]]
    tokens.append(step_logits[-1].argmax(dim=-1, keepdim=True))
    cfg_on = True
    for i in range(num_new - 1):
        if cfg_interval > -1 and i > cfg_interval:
            cfg_on = False
        x = torch.cat([tokens[-1], tokens[-1]]) if use_cfg else tokens[-1]
        step_logits.append(guide(net.decode_step(x, slot_pos=1 + i, cell=i), cfg_on))
        slots.append([1 + i])
        tokens.append(step_logits[-1].argmax(dim=-1, keepdim=True))
    assert slots == [list(map(int, pos)) for pos in fixture[f"{run}_call_input_pos"]]
    return torch.cat(tokens, dim=1).to(torch.int32), step_logits


@pytest.mark.parametrize("run", ["greedy", "greedy_cfg_interval"])
@torch.no_grad()
def test_greedy_generation_replay(fixture: dict, model: RasterTransformer, run: str) -> None:
    tokens, step_logits = _replay_greedy(model, fixture, run)
    expected_logits = fixture[f"{run}_step_logits"]
    assert len(step_logits) == len(expected_logits)
    for got, expected in zip(step_logits, expected_logits):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    assert tokens.dtype == fixture[run].dtype and torch.equal(tokens, fixture[run])


@pytest.mark.parametrize("preset", ["GPT-B", "GPT-L"])
def test_preset_keys_match_official(fixture: dict, preset: str) -> None:
    official = fixture["official_key_shapes"][preset]
    with torch.device("meta"):
        net = RasterTransformer(**GPT_PRESETS[preset], vocab_size=16384, num_classes=1000, grid_size=16)
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == {k: list(v) for k, v in official.items()}
    assert list(ours) == list(official)


@torch.no_grad()
def test_load_gpt_from_training_checkpoint_file(fixture: dict, kwargs: dict, tmp_path) -> None:
    """A DDP-style checkpoint (`{"model", "optimizer", "steps", "args": Namespace}`), keys with a
    `module.` prefix, KV-cache buffers saved after generation and a `freqs_cis` entry."""
    state = {f"module.{k}": v.clone() for k, v in fixture["state_dict"].items()}
    for i in range(fixture["config"]["n_layer"]):
        for name in ("k_cache", "v_cache"):
            state[f"module.layers.{i}.attention.kv_cache.{name}"] = torch.zeros(2, 4, 24, 16)
    state["module.freqs_cis"] = fixture["freqs_cis"]
    path = tmp_path / "0001000.pt"
    torch.save(
        {"model": state, "optimizer": {}, "steps": 1000, "args": argparse.Namespace(gpt_model="GPT-B")}, path
    )
    net = load_gpt(path, **kwargs)
    assert not net.training
    logits = net(fixture["idx"], fixture["cond_idx"])
    torch.testing.assert_close(logits, fixture["logits"], atol=ATOL, rtol=RTOL)

    wrong = {**kwargs, "n_layer": kwargs["n_layer"] + 1}
    with pytest.raises(ValueError, match="does not fit RasterTransformer.*missing"):
        load_gpt(path, **wrong)
    with pytest.raises(ValueError, match="does not fit RasterTransformer.*shape mismatch"):
        load_gpt(path, preset="GPT-B")


def test_load_gpt_does_not_alias_the_given_mapping(fixture: dict, kwargs: dict) -> None:
    net = load_gpt(fixture["state_dict"], **kwargs)
    with torch.no_grad():
        net.norm.weight.add_(1.0)
    assert not torch.equal(net.norm.weight, fixture["state_dict"]["norm.weight"])
