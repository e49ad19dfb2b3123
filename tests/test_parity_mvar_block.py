"""M-VAR parity: `Mamba2` and `MVARBlock` reproduce the official OliverRensu/MVAR fixture (mvar.pt).

Everything is read from the fixture (config, weights, inputs, expected outputs). Tolerances are the
fixture README's: `mamba_unit.output` atol 1e-5; logits atol 1e-5, rtol 1e-4. The full-model logits
are produced by composing `MVARBlock`s with a minimal VAR embedding and head written here from the
fixture's state dict (VAR's embedding/head, SPEC section 1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arzoo.nn.mamba import Mamba2
from arzoo.nn.mvar import MVARBlock, intra_scale_mask
from conftest import load_parity

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

MAMBA_ATOL = 1e-5
LOGITS_ATOL, LOGITS_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("mvar", "mvar.pt")


def _sub(state_dict: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _mamba_from(fixture: dict) -> Mamba2:
    cfg = fixture["config"]["mamba"]
    mamba = Mamba2(
        cfg["d_model"], d_state=cfg["d_state"], d_conv=cfg["d_conv"], expand=cfg["expand"],
        headdim=cfg["headdim"], ngroups=cfg["ngroups"], chunk_size=cfg["chunk_size"],
        norm_before_gate=cfg["norm_before_gate"], bias=cfg["bias"], conv_bias=cfg["conv_bias"],
        D_has_hdim=cfg["D_has_hdim"],
    )
    unit = fixture["mamba_unit"]
    mamba.load_state_dict(_sub(fixture["state_dict"], unit["param_prefix"]), strict=True)
    return mamba.eval()


def _blocks_from(fixture: dict) -> list[MVARBlock]:
    cfg = fixture["config"]
    blocks = []
    for i in range(cfg["depth"]):
        block = MVARBlock(
            cfg["embed_dim"], cfg["num_heads"], cfg["patch_nums"], mlp_ratio=cfg["mlp_ratio"],
            norm_eps=cfg["norm_eps"], attn_l2_norm=cfg["attn_l2_norm"],
            mamba_kwargs={k: cfg["mamba"][k] for k in ("d_state", "d_conv", "expand", "headdim", "ngroups")},
        )
        block.load_state_dict(_sub(fixture["state_dict"], f"blocks.{i}."), strict=True)
        blocks.append(block.train())  # train(): the fixture's logits are the train-mode graph
    return blocks


def test_mamba_state_dict_layout(fixture: dict) -> None:
    mamba = _mamba_from(fixture)
    expected = _sub(fixture["state_dict"], fixture["mamba_unit"]["param_prefix"])
    assert {k: tuple(v.shape) for k, v in mamba.state_dict().items()} == {
        k: tuple(v.shape) for k, v in expected.items()
    }


@pytest.mark.parametrize("chunk_size", [None, 8, 1])
def test_mamba_unit(fixture: dict, chunk_size: int | None) -> None:
    unit = fixture["mamba_unit"]
    mamba = _mamba_from(fixture)
    with torch.no_grad():
        out = mamba(unit["input"], chunk_size=chunk_size)
    torch.testing.assert_close(out, unit["output"], atol=MAMBA_ATOL, rtol=0)


def test_mamba_unit_in_pieces_and_steps(fixture: dict) -> None:
    """Carrying the state across pieces (one per scale, then token by token) gives the same output."""
    unit = fixture["mamba_unit"]
    mamba = _mamba_from(fixture)
    lens = [p * p for p in fixture["config"]["patch_nums"]]
    with torch.no_grad():
        outs, state, start = [], None, 0
        for n in lens:
            out, state = mamba(unit["input"][:, start:start + n], state=state, return_state=True)
            outs.append(out)
            start += n
        torch.testing.assert_close(torch.cat(outs, 1), unit["output"], atol=MAMBA_ATOL, rtol=0)
        outs, state = [], None
        for t in range(unit["input"].shape[1]):
            out, state = mamba.step(unit["input"][:, t:t + 1], state)
            outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), unit["output"], atol=MAMBA_ATOL, rtol=0)


def test_block_diagonal_mask(fixture: dict) -> None:
    mask = intra_scale_mask(fixture["config"]["patch_nums"])
    assert mask.dtype == torch.bool
    assert torch.equal(mask, fixture["attn_allowed"])
    assert torch.equal(mask, fixture["state_dict"]["attn_bias_for_masking"][0, 0] == 0)


def test_blocks_load_strictly(fixture: dict) -> None:
    for i, block in enumerate(_blocks_from(fixture)):
        assert set(block.state_dict()) == set(_sub(fixture["state_dict"], f"blocks.{i}."))
        assert block.attn.patch_nums.tolist() == [p * p for p in fixture["config"]["patch_nums"]]


def _embed(sd: dict, cfg: dict, label_B: torch.Tensor, x_BLCv: torch.Tensor):
    """VAR's teacher-forcing input: [cond + pos_start ; word_embed(x)] + (lvl_embed + pos)."""
    cond = F.embedding(label_B, sd["class_emb.weight"])
    batch = label_B.shape[0]
    sos = cond.unsqueeze(1).expand(batch, cfg["first_l"], -1) + sd["pos_start"].expand(batch, cfg["first_l"], -1)
    x = torch.cat((sos, F.linear(x_BLCv, sd["word_embed.weight"], sd["word_embed.bias"])), dim=1)
    lvl_pos = F.embedding(sd["lvl_1L"], sd["lvl_embed.weight"]) + sd["pos_1LC"]
    return x + lvl_pos, cond, lvl_pos


def _head(sd: dict, cfg: dict, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    C = cfg["embed_dim"]
    scale, shift = F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"]).view(
        -1, 1, 2, C
    ).unbind(2)
    h = F.layer_norm(x, (C,), eps=cfg["norm_eps"]) * (scale + 1) + shift
    return F.linear(h, sd["head.weight"], sd["head.bias"])


def test_teacher_forced_logits(fixture: dict) -> None:
    cfg, sd, train = fixture["config"], fixture["state_dict"], fixture["train"]
    blocks = _blocks_from(fixture)
    with torch.no_grad():
        x, cond, _ = _embed(sd, cfg, train["label_B"], train["x_BLCv_wo_first_l"])
        mask = fixture["attn_allowed"]
        bias = sd["attn_bias_for_masking"]  # additive 0/-inf (1, 1, L, L), as VAR passes it
        x_default, x_mask, x_bias = x, x, x
        for block in blocks:
            x_default = block(x_default, cond)  # segments from patch_nums
            x_mask = block(x_mask, cond, attn_mask=mask)  # dense SDPA with the boolean mask
            x_bias = block(x_bias, cond, attn_mask=bias)
        logits = _head(sd, cfg, x_default, cond)
    torch.testing.assert_close(logits, train["logits"], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    for other in (x_mask, x_bias):
        torch.testing.assert_close(_head(sd, cfg, other, cond), train["logits"], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    gt = torch.cat(train["gt_idx_Bl"], dim=1)
    loss = F.cross_entropy(logits.flatten(0, 1), gt.flatten())
    torch.testing.assert_close(loss, train["loss_uniform_weight"], atol=1e-5, rtol=1e-5)


def test_scale_by_scale_equals_teacher_forced(fixture: dict) -> None:
    """Inference path: one scale at a time, attention inside the scale, Mamba state carried."""
    cfg, sd, train = fixture["config"], fixture["state_dict"], fixture["train"]
    blocks = [b.eval() for b in _blocks_from(fixture)]
    with torch.no_grad():
        x, cond, _ = _embed(sd, cfg, train["label_B"], train["x_BLCv_wo_first_l"])
        states = [None] * len(blocks)
        logits, start = [], 0
        for pn in cfg["patch_nums"]:
            h = x[:, start:start + pn * pn]
            for i, block in enumerate(blocks):
                h, states[i] = block.forward_scale(h, cond, states[i])
            logits.append(_head(sd, cfg, h, cond))
            start += pn * pn
    torch.testing.assert_close(torch.cat(logits, 1), train["logits"], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def test_block_variants_run(fixture: dict) -> None:
    """attn_l2_norm=False (released d12-d20 checkpoints): no scale_mul key, scale 0.25/sqrt(hd); a
    prefix of whole scales needs no mask; anything else asks for one."""
    cfg = fixture["config"]
    block = MVARBlock(cfg["embed_dim"], cfg["num_heads"], cfg["patch_nums"], attn_l2_norm=False)
    keys = set(_sub(fixture["state_dict"], "blocks.0."))
    assert set(block.state_dict()) == keys - {"attn.scale_mul_1H11"}
    assert block.attn.scale == 0.25 / (cfg["embed_dim"] // cfg["num_heads"]) ** 0.5
    x, cond = torch.randn(2, 5, cfg["embed_dim"]), torch.randn(2, cfg["embed_dim"])
    with torch.no_grad():
        y = block(x, cond)  # scales 1 and 2
        torch.testing.assert_close(block(x, cond, seq_lens=(1, 4)), y)
        torch.testing.assert_close(block(x, cond, attn_mask=intra_scale_mask(cfg["patch_nums"][:2])), y)
        with pytest.raises(ValueError, match="prefix"):
            block(x[:, :3], cond)
