"""HMAR parity through the generic `MaskedHierarchicalGenerator` (not a hand-written replay).

`load_hmar_generator` puts the fixture's official inference weights (NVlabs/HMAR, hmar.pt) into a
`MaskedHierarchicalGenerator`; its next-scale branch must reproduce upstream's stage-1
`NextScalePrediction.forward` and lognorm-weighted loss, its mask branch `MaskedPrediction.forward`
and masked loss, and `generate()` upstream's `HMAR.generate` step by step (every next-scale and
mask step's guided logits and draws, which positions were masked and which got fixed at which step).

The fixture ships only the VQ quantiser (codebook and phi convs); inputs, sampled ids and f_hat
depend on nothing else, so the tokenizer is a small `MultiScaleVQTokenizer` with the fixture's
quantiser weights. Everything is read from the fixture (ARZOO_PARITY_DIR may point at another one
made by the same generator). Tolerances: fixture README (logits atol 1e-5 rtol 1e-4, losses atol
1e-5, greedy tokens exact).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arzoo.generators.masked_hierarchical import (
    HMARTransformer,
    MaskedHierarchicalGenerator,
    stage1_key_to_inference,
    stage2_key_to_inference,
)
from arzoo.interop.hmar import hmar_config_from_state_dict, inference_state_dict_from_stages, load_hmar_generator
from arzoo.tokenizers import MultiScaleVQTokenizer
from conftest import load_parity, parity_msvq_tokenizer

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

LOGITS = dict(atol=1e-5, rtol=1e-4)
LOSS = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("hmar", "hmar.pt")


@pytest.fixture(scope="module")
def tokenizer(fixture: dict) -> MultiScaleVQTokenizer:
    return parity_msvq_tokenizer(fixture)


@pytest.fixture()
def gen(fixture: dict, tokenizer) -> MaskedHierarchicalGenerator:
    return load_hmar_generator(fixture["state_dict"], tokenizer=tokenizer)


def _tokens(fixture: dict) -> torch.Tensor:
    return torch.cat(fixture["train"]["gt_idx_Bl"], dim=1)


def _masked(fixture: dict) -> torch.Tensor:
    """(L - 1,) bool from the fixture's `idx_to_mask` (counted over the non-sos positions)."""
    masked = torch.zeros(fixture["config"]["L"] - 1, dtype=torch.bool)
    masked[fixture["train"]["idx_to_mask"]] = True
    return masked


def test_architecture_and_buffers_from_the_official_weights(fixture: dict, gen: MaskedHierarchicalGenerator) -> None:
    cfg = fixture["config"]
    assert isinstance(gen.net, HMARTransformer) and not gen.training and gen.paradigm == "masked-hierarchical"
    assert gen.patch_nums == tuple(cfg["patch_nums"]) and gen.num_tokens == cfg["L"]
    assert gen.vocab_size == cfg["vocab_size"] and gen.codebook_dim == cfg["Cvae"]
    assert len(gen.net.base_blocks) == cfg["n_base_blocks"] and len(gen.net.ns_blocks) == cfg["n_layers_train"]
    state = gen.net.state_dict()
    assert list(state) == list(fixture["state_dict"])  # same keys, same (official) order
    for key, expected in fixture["state_dict"].items():
        assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key
    assert torch.equal(gen.mask, fixture["attn_allowed"])  # block-diagonal: each scale sees itself
    assert torch.equal(gen.net.attn_bias_for_masking[0, 0] == 0, fixture["attn_allowed"])


def test_architecture_read_from_the_state_dict(fixture: dict) -> None:
    inferred = hmar_config_from_state_dict(fixture["state_dict"])
    for key in ("depth", "n_layers_train", "embed_dim", "num_heads", "mlp_ratio", "attn_l2_norm", "num_classes"):
        assert inferred[key] == fixture["config"][key], key
    assert inferred["patch_nums"] == list(fixture["config"]["patch_nums"])
    gen = load_hmar_generator(fixture["state_dict"])  # no tokenizer: logits only
    train = fixture["train"]
    logits = gen(train["x_BLCv_wo_first_l"], train["label_B"])
    torch.testing.assert_close(logits, train["logits_ns"], **LOGITS)
    with pytest.raises(ValueError, match="not an official HMAR inference state dict"):
        load_hmar_generator({k.replace("ns_head", "head"): v for k, v in fixture["state_dict"].items()})


def test_training_key_maps(fixture: dict) -> None:
    """The stage-1 / stage-2 -> inference key maps are upstream's (the fixture stores both)."""
    depth, n = fixture["config"]["depth"], fixture["config"]["n_layers_train"]
    for key, expected in fixture["nsp_key_to_hmar_key"].items():
        assert stage1_key_to_inference(key, depth, n) == expected, key
    for key, expected in fixture["mp_key_to_hmar_key"].items():
        assert stage2_key_to_inference(key, depth, n) == expected, key
    inv1 = {v: k for k, v in fixture["nsp_key_to_hmar_key"].items()}
    inv2 = {v: k for k, v in fixture["mp_key_to_hmar_key"].items()}
    state = fixture["state_dict"]
    stage1 = {inv1[k]: v for k, v in state.items() if k in inv1}
    stage2 = {inv2[k]: v for k, v in state.items() if k in inv2}
    merged = inference_state_dict_from_stages(stage1, stage2, depth, n)
    assert set(merged) == set(state) and all(torch.equal(merged[k], state[k]) for k in state)

    # stage 2 can start from an official stage-1 state dict: its mask branch is the next-scale one
    gen = load_hmar_generator(state)
    gen.load_stage1(stage1)
    for key, value in gen.net.state_dict().items():
        source = key.replace("mask_", "ns_") if key.startswith(("mask_blocks", "mask_head")) else key
        if key != "mask_embed.weight":
            assert torch.equal(value, state[source]), key


def test_next_scale_branch_logits_and_lognorm_loss(fixture: dict, gen: MaskedHierarchicalGenerator) -> None:
    train, tokens = fixture["train"], _tokens(fixture)
    inputs = gen.teacher_inputs(tokens)  # upstream's idxBl_to_ns_input (VAR's teacher-forcing input)
    torch.testing.assert_close(inputs, train["x_BLCv_wo_first_l"], atol=1e-6, rtol=0)
    assert gen.stage == 2  # an inference checkpoint: both branches trained
    gen.stage = 1  # the next-scale branch's training forward and loss
    logits = gen.teacher_forcing(tokens, train["label_B"])
    torch.testing.assert_close(logits, train["logits_ns"], **LOGITS)
    torch.testing.assert_close(gen.loss_weights, train["loss_weight_lognorm"][0], atol=1e-7, rtol=0)
    loss = gen.token_loss(logits, tokens[:, gen.prediction_order])
    torch.testing.assert_close(loss, train["loss_ns"], **LOSS)


def test_mask_branch_logits_and_loss(fixture: dict, gen: MaskedHierarchicalGenerator) -> None:
    train, tokens = fixture["train"], _tokens(fixture)
    own = gen.own_scale_inputs(tokens)  # upstream's idxBl_to_mask_input
    torch.testing.assert_close(own, train["x_mask_wo_first_l"], atol=1e-6, rtol=0)
    x_ns, x_own = train["x_mp_input"].chunk(2)  # upstream's forward takes [x_ns; x_mask] as 2B rows
    masked = _masked(fixture)
    logits = gen.net.forward_mask(train["label_B"], x_ns, x_own, masked[None])
    torch.testing.assert_close(logits, train["logits_mask"], **LOGITS)
    gen.stage = 2
    loss = gen.token_loss(logits, tokens, loss_mask=F.pad(masked, (1, 0)))  # over the masked positions
    torch.testing.assert_close(loss, train["loss_mask"], **LOSS)


def test_greedy_generation_trace_step_by_step(fixture: dict, gen: MaskedHierarchicalGenerator) -> None:
    run = fixture["greedy"]
    state = gen.run_sampling(
        run["label_B"], cfg=1.0 + run["cfg"], top_k=run["top_k"], top_p=run["top_p"] or 1.0,
        generator=torch.Generator().manual_seed(run["g_seed"]), mask_schedule=run["mask_schedule"], trace=True,
    )  # fmt: skip
    assert torch.equal(state.conditional_tokens(), torch.cat(run["tokens"], dim=1))
    torch.testing.assert_close(state.carry["f_hat"], run["f_hat"], atol=1e-5, rtol=0)
    trace = state.carry["trace"]
    assert trace is not None and len(trace) == len(run["scales"])
    for mine, official in zip(trace, run["scales"]):
        si = official["si"]
        assert mine["si"] == si and mine["pn"] == official["pn"]
        assert torch.equal(mine["final_tokens"], official["final_tokens"]), f"scale {si}"
        assert torch.equal(mine["finalized_at_step"], official["finalized_at_step"]), f"scale {si}"
        assert [s["kind"] for s in mine["steps"]] == [s["kind"] for s in official["steps"]], f"scale {si}"
        for j, (step, expected) in enumerate(zip(mine["steps"], official["steps"])):
            assert set(step) == set(expected), f"scale {si} step {j}"
            for key, value in expected.items():
                if key == "kind":
                    continue
                where = f"scale {si} step {j} {key}"
                if value.is_floating_point():
                    torch.testing.assert_close(step[key], value, **LOGITS, msg=where)
                else:
                    assert torch.equal(step[key], value), where


def test_mask_steps_equal_the_teacher_forced_mask_branch(fixture: dict, gen: MaskedHierarchicalGenerator) -> None:
    """A mask step's conditional logits are the mask branch's forward on the same tokens and mask."""
    run = fixture["greedy"]
    trace = gen.run_sampling(run["label_B"], cfg=1.0, top_k=1, mask_schedule=run["mask_schedule"],
                             trace=True).carry["trace"]  # fmt: skip
    scale = next(s for s in trace if len(s["steps"]) > 2)
    si, step = scale["si"], scale["steps"][2]
    begin, end = gen.net.begin_ends[si]
    tokens = torch.zeros(len(run["label_B"]), gen.num_tokens, dtype=torch.long)
    for s in trace[:si]:
        b, e = gen.net.begin_ends[s["si"]]
        tokens[:, b:e] = s["final_tokens"]
    tokens[:, begin:end] = step["tokens_in"]
    masked = torch.zeros(len(tokens), gen.num_tokens - 1, dtype=torch.bool)
    masked[:, begin - 1 : end - 1].scatter_(1, step["idx_to_mask_in"], True)
    logits = gen.net.forward_mask(run["label_B"], gen.teacher_inputs(tokens), gen.own_scale_inputs(tokens), masked)
    torch.testing.assert_close(logits[:, begin:end], step["logits_cfg"], **LOGITS)


def test_seeded_sampling_soft(fixture: dict, gen: MaskedHierarchicalGenerator) -> None:
    """Soft fixture: equal only with upstream's multinomial call sequence (one per step over all rows)."""
    run = fixture["sampled_seeded"]
    tokens = gen.generate(
        run["label_B"], cfg=1.0 + run["cfg"], top_k=run["top_k"], top_p=run["top_p"] or 1.0,
        generator=torch.Generator().manual_seed(run["g_seed"]), mask_schedule=fixture["greedy"]["mask_schedule"],
    )  # fmt: skip
    assert torch.equal(tokens, torch.cat(run["tokens"], dim=1))
