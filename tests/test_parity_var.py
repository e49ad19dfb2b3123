"""VAR transformer and sampler parity through the generic `NextScaleGenerator` (not a hand-written replay).

`load_var_generator` puts the fixture's official weights into a `NextScaleGenerator` with the
fixture's VQVAE as its tokenizer; its training path (`step_inputs`, `drop_labels`, `forward`,
`token_loss`) must reproduce upstream's `VAR.forward` and trainer loss, and `generate()` /
`run_sampling()` + `decode_state()` (BaseGenerator's loop, VAR's guidance, filters, Gumbel mode and seeded draws)
upstream's `autoregressive_infer_cfg`. Everything is read from the fixtures (var.pt, vqvae.pt), so
another fixture set made by the same generator must pass as well. Tolerances: fixture README.
"""

from __future__ import annotations

import pytest
import torch

from arzoo.generators.next_scale import NextScaleGenerator
from arzoo.interop.var import load_var_generator, load_vqvae, var_config_from_state_dict, vqvae_kwargs_from_official
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint
from conftest import load_parity

pytestmark = pytest.mark.parity

RUNS = ("greedy", "sampled", "sampled_random_labels", "smooth")


@pytest.fixture(scope="module")
def fixture() -> dict:
    return load_parity("var", "var.pt")


@pytest.fixture(scope="module")
def tokenizer():
    vq = load_parity("var", "vqvae.pt")
    return load_vqvae(vq["state_dict"], **vqvae_kwargs_from_official(vq["config"], vq["ddconfig"]))


def _generator(fixture: dict, tokenizer, **config_changes) -> NextScaleGenerator:
    config = {**fixture["config"], **config_changes}
    return load_var_generator(fixture["state_dict"], config=config, tokenizer=tokenizer)


@pytest.fixture()
def gen(fixture: dict, tokenizer) -> NextScaleGenerator:
    """A fresh generator per test (tests change more_smooth / train mode on it)."""
    return _generator(fixture, tokenizer)


def test_architecture_and_buffers_from_official_files(fixture: dict, gen: NextScaleGenerator) -> None:
    config = fixture["config"]
    assert not gen.training and gen.paradigm == "next-scale"
    assert gen.num_classes == config["num_classes"] and gen.class_dropout_prob == config["cond_drop_rate"]
    assert gen.patch_nums == tuple(config["patch_nums"]) and gen.num_steps == len(config["patch_nums"])
    assert gen.num_tokens == fixture["logits"].shape[1] and gen.vocab_size == fixture["logits"].shape[2]
    state = gen.net.state_dict()
    assert list(state) == list(fixture["state_dict"])  # same keys, same (official) order
    for key, expected in fixture["state_dict"].items():
        assert state[key].dtype == expected.dtype and torch.equal(state[key], expected), key
    assert torch.equal(gen.net.attn_bias_for_masking, fixture["attn_bias_for_masking"])
    assert torch.equal(gen.net.lvl_1L, fixture["lvl_1L"])
    # the generator's boolean visibility mask is the official additive one
    assert torch.equal(fixture["attn_bias_for_masking"][0, 0] == 0, gen.mask)
    assert all(state[k].data_ptr() != v.data_ptr() for k, v in fixture["state_dict"].items())


def test_architecture_read_from_the_state_dict(fixture: dict, tmp_path) -> None:
    """Without config=, the sizes are read from the checkpoint (the builder's defaults for the rest)."""
    inferred = var_config_from_state_dict(fixture["state_dict"])
    for key in ("num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "shared_aln", "attn_l2_norm",
                "patch_nums", "drop_path_rate", "norm_eps", "cond_drop_rate"):
        assert inferred[key] == fixture["config"][key], key
    path = tmp_path / "var_tiny.pth"  # a file, as the released var_d*.pth (a bare state dict)
    torch.save(fixture["state_dict"], path)
    gen = load_var_generator(path)
    assert gen.tokenizer is None and gen.codebook_dim == fixture["x_BLCv_wo_first_l"].shape[2]
    logits = gen(fixture["x_BLCv_wo_first_l"], fixture["label_B"], gen.mask)
    torch.testing.assert_close(logits, fixture["logits"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="does not fit NextScaleTransformer.*blocks.1"):
        load_var_generator(path, config={**fixture["config"], "depth": 1})


def test_tokenizer_from_a_checkpoint_file(fixture: dict, tokenizer, tmp_path) -> None:
    """The VQVAE converted once into an arzoo tokenizer checkpoint serves as tokenizer_path."""
    tok_path = save_tokenizer_checkpoint(tokenizer, tmp_path / "vqvae.ckpt")
    gen = load_var_generator(fixture["state_dict"], config=fixture["config"], tokenizer_path=str(tok_path))
    official = fixture["sampled"]
    tokens = gen.generate(official["label_B"], cfg=1.0 + official["cfg"], top_k=official["top_k"],
                          top_p=official["top_p"], generator=torch.Generator().manual_seed(official["g_seed"]))
    assert torch.equal(tokens, torch.cat(official["idx_list"], dim=1))


def test_teacher_forced_logits_and_loss(fixture: dict, gen: NextScaleGenerator) -> None:
    tokens, labels = fixture["gt_BL"], fixture["label_B"]
    inputs = gen.teacher_inputs(tokens)  # the tokenizer's next-scale inputs from the ground-truth ids
    torch.testing.assert_close(inputs, fixture["x_BLCv_wo_first_l"], atol=1e-5, rtol=0)
    logits = gen.teacher_forcing(tokens, labels)  # eval mode: no label dropout (upstream: cond_drop_rate 0)
    torch.testing.assert_close(logits, fixture["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(gen.prediction_order, torch.arange(gen.num_tokens))
    loss = gen.token_loss(logits, tokens[:, gen.prediction_order])
    torch.testing.assert_close(loss, fixture["train_loss"], atol=0, rtol=1e-5)


def test_training_forward_with_label_dropout(fixture: dict, tokenizer) -> None:
    """Upstream draws one torch.rand(B) from the global RNG per forward; arzoo's drop_labels the same.
    The fixture's network ran in eval mode (no drop path), so only the generator is put in training mode."""
    run = fixture["forward_cond_drop"]
    gen = _generator(fixture, tokenizer, cond_drop_rate=run["cond_drop_rate"])
    gen.train()
    gen.net.eval()
    torch.manual_seed(run["torch_seed"])
    labels = gen.drop_labels(fixture["label_B"])
    assert torch.equal(labels, run["effective_label_B"])
    logits = gen(fixture["x_BLCv_wo_first_l"], labels, gen.mask)
    torch.testing.assert_close(logits, run["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("run", RUNS)
def test_sampler_matches_official(fixture: dict, gen: NextScaleGenerator, run: str, monkeypatch) -> None:
    official = fixture[run]
    smooth = official["more_smooth"]
    gen.more_smooth = smooth
    recorded: list[torch.Tensor] = []
    drawn: list[torch.Tensor] = []
    original = gen.logits_to_tokens

    def recording(logits_BlV, state):
        recorded.append(logits_BlV.detach().clone())
        drawn.append(original(logits_BlV, state))
        return drawn[-1]

    monkeypatch.setattr(gen, "logits_to_tokens", recording)
    rng = torch.Generator().manual_seed(official["g_seed"])  # upstream re-seeds its own CPU generator
    if official["label_B_passed"] == "None":
        labels = gen.sample_random_labels(official["B"], rng)  # the sampler's first draw
    else:
        labels = official["label_B"]
    assert torch.equal(labels, official["label_B"])
    state = gen.run_sampling(
        labels,
        cfg=1.0 + official["cfg"],  # upstream's cfg is the extra weight t at the last scale; arzoo's 1 = off
        top_k=official["top_k"] or None,  # upstream: 0 = off; top_k=1 is still a multinomial draw
        top_p=official["top_p"] or 1.0,  # upstream: 0.0 = off
        generator=rng,
    )
    images = gen.decode_state(state)
    assert len(drawn) == len(official["idx_list"]) == gen.num_steps
    for step, (ids, expected) in enumerate(zip(drawn, official["idx_list"])):
        assert torch.equal(ids, expected), f"scale {step}"
    for step, (logits, expected) in enumerate(zip(recorded, official["logits_cfg"])):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5, msg=f"logits_cfg of scale {step}")
    tol = 5e-4 if smooth else 1e-5
    torch.testing.assert_close(state.carry["f_hat"], official["f_hat"], atol=tol, rtol=0)
    tol = 5e-4 if smooth else 1e-4
    torch.testing.assert_close((images + 1) * 0.5, official["img"], atol=tol, rtol=0)  # upstream returns [0, 1]


def test_generate_returns_the_drawn_ids(fixture: dict, gen: NextScaleGenerator) -> None:
    """`generate()` hands back the ids upstream drew, flat scale after scale, and decodes like upstream."""
    official = fixture["sampled"]
    tokens = gen.generate(official["label_B"], cfg=1.0 + official["cfg"], top_k=official["top_k"],
                          top_p=official["top_p"], generator=torch.Generator().manual_seed(official["g_seed"]))
    assert torch.equal(tokens, torch.cat(official["idx_list"], dim=1))
    images = gen.decode_tokens(tokens)  # the tokenizer's own decode of the ids = decode of the sampler's f_hat
    torch.testing.assert_close((images + 1) * 0.5, official["img"], atol=1e-4, rtol=0)
