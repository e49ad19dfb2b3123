"""M-VAR parity through `MambaScaleGenerator`, VAR's paradigm on M-VAR's network (not a hand-written replay).

`load_mvar_generator` puts the fixture's official weights (OliverRensu/MVAR, mvar.pt) into a
`MambaScaleGenerator`; its teacher-forced path must reproduce upstream's train-mode `MVAR.forward`
and uniform-weight loss, and `generate()` (BaseGenerator's loop, VAR's guidance and filters, each
block's Mamba2 state carried from scale to scale) upstream's `autoregressive_infer_cfg`, which
re-runs Mamba over the whole prefix at every scale.

The fixture ships no VQVAE weights, only its quantiser (`vq_quantizer_state`: codebook and the
phi convs). Sampled ids and f_hat depend on nothing else, so the tokenizer here is a
`MultiScaleVQTokenizer` with the fixture's vocabulary / codebook width / patch_nums / phi sharing, a
small untrained encoder and decoder, and the fixture's quantiser weights. Everything is read from
the fixture. Tolerances: fixture README (logits atol 1e-5, rtol 1e-4; greedy tokens exact).
"""

from __future__ import annotations

import pytest
import torch

from arzoo.generators.next_scale_mamba import MambaScaleGenerator, MVARTransformer
from arzoo.generators.state import SamplingState
from arzoo.interop.mvar import load_mvar_generator, mamba_kwargs_from_state_dict, mvar_config_from_state_dict
from arzoo.interop.var import load_var_generator
from arzoo.tokenizers import MultiScaleVQTokenizer
from conftest import load_parity, parity_msvq_tokenizer

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

LOGITS_ATOL, LOGITS_RTOL = 1e-5, 1e-4
OFFICIAL_KEYS = (
    "num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate", "drop_path_rate",
    "norm_eps", "shared_aln", "cond_drop_rate", "attn_l2_norm", "patch_nums",
)  # fmt: skip


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("mvar", "mvar.pt")


def _official_config(fixture: dict) -> dict:
    """The fixture's `MVAR(...)` constructor arguments (its config also records other facts)."""
    return {k: fixture["config"][k] for k in OFFICIAL_KEYS}


@pytest.fixture(scope="module")
def tokenizer(fixture: dict) -> MultiScaleVQTokenizer:
    return parity_msvq_tokenizer(fixture)


@pytest.fixture()
def gen(fixture: dict, tokenizer) -> MambaScaleGenerator:
    """A fresh generator per test (tests switch train mode on it)."""
    return load_mvar_generator(fixture["state_dict"], config=_official_config(fixture), tokenizer=tokenizer)


def test_architecture_and_buffers_from_official_weights(fixture: dict, gen: MambaScaleGenerator) -> None:
    cfg = fixture["config"]
    assert isinstance(gen.net, MVARTransformer) and type(gen) is MambaScaleGenerator and not gen.training
    assert gen.patch_nums == tuple(cfg["patch_nums"]) and gen.num_tokens == cfg["L"]
    assert gen.vocab_size == cfg["vocab_size"] and gen.codebook_dim == cfg["Cvae"]
    state = gen.net.state_dict()
    assert list(state) == list(fixture["state_dict"])  # same keys, same (official) order
    for key, expected in fixture["state_dict"].items():
        assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key
    # the generator's visibility mask (and the buffer) is the block-diagonal intra-scale attention
    assert torch.equal(gen.mask, fixture["attn_allowed"])
    assert torch.equal(gen.net.attn_bias_for_masking[0, 0] == 0, fixture["attn_allowed"])
    mamba = gen.net.blocks[0].mamba
    assert (mamba.d_state, mamba.d_conv, mamba.expand, mamba.headdim) == tuple(
        cfg["mamba"][k] for k in ("d_state", "d_conv", "expand", "headdim")
    )


def test_architecture_read_from_the_state_dict(fixture: dict, tmp_path) -> None:
    """Without config=, the sizes are read from the checkpoint (the builder's defaults for the rest)."""
    inferred = mvar_config_from_state_dict(fixture["state_dict"])
    for key in ("num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "shared_aln", "attn_l2_norm",
                "norm_eps"):
        assert inferred[key] == fixture["config"][key], key
    assert list(inferred["patch_nums"]) == list(fixture["config"]["patch_nums"])
    mamba = {k: fixture["config"]["mamba"][k] for k in ("d_state", "d_conv", "expand", "headdim")}
    assert mamba_kwargs_from_state_dict(fixture["state_dict"]) == {f"mamba_{k}": v for k, v in mamba.items()}
    path = tmp_path / "mvar_tiny.pth"  # a file, as the released dXX.pth (a bare state dict)
    torch.save(fixture["state_dict"], path)
    gen = load_mvar_generator(path)
    train = fixture["train"]
    assert gen.tokenizer is None and gen.codebook_dim == train["x_BLCv_wo_first_l"].shape[2]
    logits = gen(train["x_BLCv_wo_first_l"], train["label_B"])
    torch.testing.assert_close(logits, train["logits"], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    with pytest.raises(ValueError, match="does not fit MVARTransformer.*blocks.1"):
        load_mvar_generator(path, config={**_official_config(fixture), "depth": 1})
    with pytest.raises(ValueError, match="M-VAR checkpoint.*load_mvar_generator"):
        load_var_generator(path)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_teacher_forced_logits_and_loss(fixture: dict, gen: MambaScaleGenerator, mode: str) -> None:
    """Upstream's train-mode graph (intra-scale attention, full-sequence Mamba). The fixture ran with
    drop path, dropout and label dropout 0, so arzoo's train and eval modes give the same logits."""
    train = fixture["train"]
    gen.train(mode == "train")
    tokens = torch.cat(train["gt_idx_Bl"], dim=1)
    inputs = gen.teacher_inputs(tokens)  # the tokenizer's next-scale inputs from the ground-truth ids
    torch.testing.assert_close(inputs, train["x_BLCv_wo_first_l"], atol=1e-5, rtol=0)
    logits = gen.net(train["label_B"], inputs)  # the network without label dropout
    torch.testing.assert_close(logits, train["logits"], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    # the dense paths: the generator's boolean mask, and the official additive buffer
    for mask in (gen.mask, gen.net.attn_bias_for_masking):
        dense = gen.net(train["label_B"], train["x_BLCv_wo_first_l"], attn_bias=mask)
        torch.testing.assert_close(dense, train["logits"], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)
    loss = gen.token_loss(logits, tokens[:, gen.prediction_order])  # VAR's uniform 1/L weights = the mean
    torch.testing.assert_close(loss, train["loss_uniform_weight"], atol=1e-5, rtol=1e-5)
    if mode == "eval":
        torch.testing.assert_close(gen.teacher_forcing(tokens, train["label_B"]), train["logits"],
                                   atol=LOGITS_ATOL, rtol=LOGITS_RTOL)  # fmt: skip


def _recorded_generate(gen: MambaScaleGenerator, monkeypatch, **kwargs) -> tuple[list, list, SamplingState]:
    recorded: list[torch.Tensor] = []
    drawn: list[torch.Tensor] = []
    original = gen.logits_to_tokens

    def recording(logits_BlV, state):
        recorded.append(logits_BlV.detach().clone())
        drawn.append(original(logits_BlV, state))
        return drawn[-1]

    monkeypatch.setattr(gen, "logits_to_tokens", recording)
    state = gen.run_sampling(**kwargs)
    return recorded, drawn, state


@pytest.mark.parametrize("how", ["greedy", "top_k=1 draw"])
def test_greedy_sampling_matches_official(fixture: dict, gen: MambaScaleGenerator, how: str, monkeypatch) -> None:
    """Upstream's `autoregressive_infer_cfg(top_k=1, top_p=0)`: ids exact, CFG-combined logits and
    f_hat to 1e-5. Upstream's top_k=1 still draws a multinomial; arzoo's greedy=True takes the argmax."""
    official = fixture["greedy"]
    assert official["top_k"] == 1 and not official["top_p"]
    extra = dict(greedy=True) if how == "greedy" else dict(top_k=1, generator=torch.Generator().manual_seed(
        official["g_seed"]))  # fmt: skip
    recorded, drawn, state = _recorded_generate(
        gen, monkeypatch, labels_B=official["label_B"], cfg=1.0 + official["cfg"], **extra
    )  # upstream's cfg is the extra weight t at the last scale; arzoo's 1 = off
    assert len(drawn) == len(official["tokens"]) == gen.num_steps
    for step, (ids, expected) in enumerate(zip(drawn, official["tokens"])):
        assert torch.equal(ids, expected), f"scale {step}"
    for step, (logits, expected) in enumerate(zip(recorded, official["logits_cfg"])):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=f"logits_cfg of scale {step}")
    torch.testing.assert_close(state.carry["f_hat"], official["f_hat"], atol=1e-5, rtol=0)


def test_seeded_sampling_matches_official(fixture: dict, gen: MambaScaleGenerator) -> None:
    """Soft fixture: top-k/top-p draws with upstream's generator (one multinomial per scale)."""
    official = fixture["sampled_seeded"]
    tokens = gen.generate(
        official["label_B"], cfg=1.0 + official["cfg"], top_k=official["top_k"] or None,
        top_p=official["top_p"] or 1.0, generator=torch.Generator().manual_seed(official["g_seed"]),
    )  # fmt: skip
    assert torch.equal(tokens, torch.cat(official["tokens"], dim=1))


def test_sampling_carries_mamba_state_not_the_prefix(fixture: dict, gen: MambaScaleGenerator, monkeypatch) -> None:
    """While sampling, every block's Mamba sees only the tokens of the current scale (its state carries
    the prefix), and the logits equal the teacher-forced ones of the drawn tokens."""
    lengths: list[int] = []
    for block in gen.net.blocks:
        original = block.mamba.forward

        def counting(u, *args, _original=original, **kwargs):
            lengths.append(u.shape[1])
            return _original(u, *args, **kwargs)

        monkeypatch.setattr(block.mamba, "forward", counting)
    official = fixture["greedy"]
    recorded, drawn, state = _recorded_generate(gen, monkeypatch, labels_B=official["label_B"], cfg=1.0, greedy=True)
    depth = len(gen.net.blocks)
    assert lengths == [pn * pn for pn in gen.patch_nums for _ in range(depth)]
    tokens = torch.cat(drawn, dim=1)
    logits = gen.teacher_forcing(tokens, official["label_B"])
    torch.testing.assert_close(torch.cat(recorded, dim=1), logits, atol=1e-5, rtol=1e-5)
