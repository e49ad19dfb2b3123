"""NextScaleGenerator (VAR): sizes, the block-causal schedule, training and sampling on the digits,
checkpoints, errors, the digits recipe through the CLI and the ImageNet 256 recipes (parsed only)."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import arzoo
from arzoo.cli import run as arzoo_run
from arzoo.data import ImageDataModule
from arzoo.generators import NextScaleGenerator, filter_logits_var, generator_config
from arzoo.tokenizers import MultiScaleVQTokenizer, VQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = dict(depth=1, embed_dim=32, num_heads=2, warmup_steps=0)
OFFICIAL_PARAMS = {"d16": 310_283_520, "d20": 600_917_136, "d24": 1_033_399_360, "d30": 2_010_020_356}
VAR_VQVAE_SIZES = dict(vocab_size=4096, codebook_dim=32, patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])


@pytest.fixture(scope="module")
def msvq_path(tmp_path_factory) -> Path:
    """An (untrained) 16x16 multi-scale VQ tokenizer checkpoint: 1x1, 2x2, 4x4 maps (21 tokens), 32 codes of width 8."""
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(image_size=16, vocab_size=32, z_channels=8, ch=32, ch_mult=[1, 1, 1],
                                num_res_blocks=1, patch_nums=[1, 2, 4], codebook_init=0.02)
    return save_tokenizer_checkpoint(tok, tmp_path_factory.mktemp("tok") / "msvq.ckpt")


def _fit(model, tmp_path: Path, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=16))
    return trainer


# ---- sizes, schedule, mask --------------------------------------------------------------------------


def test_official_sizes_on_the_meta_device():
    assert {"var-d16", "var-d20", "var-d24", "var-d30", "var-tiny"} <= set(arzoo.list_generators())
    with torch.device("meta"):
        for size, count in OFFICIAL_PARAMS.items():
            model = arzoo.create_generator(f"var-{size}")
            assert model.num_params() == count, size
            assert model.num_steps == 10 and model.num_tokens == 680 and model.paradigm == "next-scale"
            depth = model.net.depth
            assert model.net.C == 64 * depth and model.net.num_heads == depth
            assert model.net.config.drop_path_rate == 0.1 * depth / 24
        tiny = arzoo.create_generator("var-tiny", **VAR_VQVAE_SIZES, num_classes=10)
    assert tiny.net.depth == 4 and tiny.net.C == 128 and tiny.patch_nums == tuple(VAR_VQVAE_SIZES["patch_nums"])


def test_schedule_and_block_causal_mask():
    model = NextScaleGenerator(vocab_size=16, codebook_dim=4, patch_nums=[1, 2, 3], **TINY_NET)
    assert [s.tolist() for s in model.schedule] == [[0], [1, 2, 3, 4], list(range(5, 14))]
    scale = torch.tensor([0] + [1] * 4 + [2] * 9)
    assert torch.equal(model.mask, scale[:, None] >= scale[None, :])  # own scale and coarser ones
    assert torch.equal(model.net.attn_bias_for_masking[0, 0] == 0, model.mask)
    assert torch.equal(model.net.lvl_1L[0], scale)

    # the logits of scales <= k do not depend on the inputs of scales > k
    model.eval()
    inputs, labels = torch.randn(2, 13, 4), torch.tensor([1, 2])
    logits = model(inputs, labels, model.mask)
    changed = inputs.clone()
    changed[:, 4:] += 1.0  # the input of scale 2 (positions 5..13, i.e. input rows 4..12)
    again = model(changed, labels, model.mask)
    torch.testing.assert_close(again[:, :5], logits[:, :5], atol=0, rtol=0)
    assert not torch.allclose(again[:, 5:], logits[:, 5:])


def test_cached_sampling_steps_equal_teacher_forcing(msvq_path):
    """The KV-cached scale-by-scale logits of generate() are the teacher-forced logits of its tokens."""
    torch.manual_seed(0)
    model = NextScaleGenerator(tokenizer_path=str(msvq_path), **TINY_NET).eval()
    recorded = []
    original = model.logits_to_tokens
    model.logits_to_tokens = lambda lg, state: recorded.append(lg.clone()) or original(lg, state)
    tokens = model.generate([3, 5], generator=torch.Generator().manual_seed(0))
    del model.logits_to_tokens
    logits = model.teacher_forcing(tokens, torch.tensor([3, 5]))
    torch.testing.assert_close(torch.cat(recorded, dim=1), logits, atol=1e-5, rtol=1e-5)
    # teacher_inputs: every scale's input (all but the first) from the tokens
    assert model.teacher_inputs(tokens).shape == (2, model.num_tokens - model.first_l, model.codebook_dim)


def test_var_filters():
    logits = torch.tensor([[3.0, 1.0, 3.0, 2.0, -1.0]])
    assert torch.equal(filter_logits_var(logits), logits)  # top_k None, top_p 1.0: off
    top2 = filter_logits_var(logits, top_k=2)  # ties with the threshold survive
    assert torch.isinf(top2).tolist() == [[False, True, False, True, True]]
    top3 = filter_logits_var(logits, top_k=3)
    assert torch.isinf(top3).tolist() == [[False, True, False, False, True]]
    # top-p in VAR's sense: drop the ascending prefix whose cumulative probability is <= 1 - top_p
    probs = logits.softmax(-1)[0]
    kept = filter_logits_var(logits, top_p=0.9)
    tail = probs.sort().values.cumsum(0)
    assert (~torch.isinf(kept)).sum().item() == (tail > 1 - 0.9).sum().item()
    assert not torch.isinf(filter_logits_var(logits, top_p=1e-6)).all()  # the best token always stays
    assert filter_logits_var(logits, top_k=1).isfinite().sum().item() == 2  # both tied maxima
    # (B, l, V) rows are filtered independently, as upstream filters its (B, l, V) logits
    rows = torch.randn(2, 3, 7)
    assert torch.equal(filter_logits_var(rows, top_k=3, top_p=0.8)[1, 2], filter_logits_var(rows[1, 2], 3, 0.8))


# ---- training, sampling, checkpoints ----------------------------------------------------------------


def test_trains_samples_and_reloads(msvq_path, tmp_path):
    torch.manual_seed(0)
    model = NextScaleGenerator(tokenizer_path=str(msvq_path), lr=3e-3, ema_decay=0.5, init_adaln_gamma=1e-3,
                               **TINY_NET)
    assert (model.vocab_size, model.patch_nums, model.codebook_dim) == (32, (1, 2, 4), 8)
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    tokens, labels = model.tokenize(images), torch.arange(8)
    model.eval()
    before = model.token_loss(model.teacher_forcing(tokens, labels), tokens).item()
    trainer = _fit(model, tmp_path, steps=10)
    model.eval()
    after = model.token_loss(model.teacher_forcing(tokens, labels), tokens).item()
    assert after < before
    live, ema = dict(model.net.named_parameters()), dict(model.ema.module.named_parameters())
    assert any(not torch.equal(live[k], ema[k]) for k in live)

    draw = lambda seed, **kw: model.generate([1, 2, 3], generator=torch.Generator().manual_seed(seed), **kw)
    assert draw(0, cfg=2.0).shape == (3, 21)
    assert torch.equal(draw(0, top_k=8, top_p=0.9), draw(0, top_k=8, top_p=0.9))
    assert model.generate([4], greedy=True).shape == (1, 21)
    images = model.sample_images([0, 9], cfg=3.0, top_k=16, generator=torch.Generator().manual_seed(1))
    assert images.shape == (2, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    model.more_smooth = True  # Gumbel-softmax codes: the image is decoded from the smooth f_hat
    state = model.run_sampling([0, 9], cfg=3.0, generator=torch.Generator().manual_seed(1))
    smooth = model.decode_state(state)
    assert smooth.shape == (2, 3, 16, 16) and state.carry["f_hat"].shape == (2, 8, 4, 4)
    with pytest.raises(ValueError, match="more_smooth .* cannot be combined with greedy"):
        model.generate([1], greedy=True)
    model.more_smooth = False
    labels = model.sample_random_labels(64, torch.Generator().manual_seed(0))
    assert labels.shape == (64,) and 0 <= labels.min() and labels.max() < 10 and len(labels.unique()) > 5

    path = tmp_path / "var.ckpt"
    trainer.save_checkpoint(path)
    loaded = arzoo.Generator.load_from_checkpoint(path)
    assert type(loaded) is NextScaleGenerator and loaded.paradigm == "next-scale"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(draw(5), loaded.generate([1, 2, 3], generator=torch.Generator().manual_seed(5)))


def test_weight_decay_groups_follow_var():
    model = NextScaleGenerator(vocab_size=16, codebook_dim=4, patch_nums=[1, 2], **TINY_NET)
    decay, no_decay = model.configure_optimizers()["optimizer"].param_groups
    names = {id(p): n for n, p in model.net.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} >= {"pos_start", "pos_1LC", "lvl_embed.weight",
                                                          "blocks.0.attn.scale_mul_1H11", "head.bias"}
    assert {names[id(p)] for p in decay["params"]} >= {"class_emb.weight", "word_embed.weight", "head.weight"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_label_smoothing_loss():
    model = NextScaleGenerator(vocab_size=16, codebook_dim=4, patch_nums=[1, 2], label_smoothing=0.1, **TINY_NET)
    logits, targets = torch.randn(2, 5, 16), torch.randint(0, 16, (2, 5))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(model.token_loss(logits, targets), expected)


# ---- errors a user can cause ------------------------------------------------------------------------


def test_tokenizers_that_do_not_fit(msvq_path, tmp_path):
    vq = VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                     decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
    vq_path = save_tokenizer_checkpoint(vq, tmp_path / "vq.ckpt")
    with pytest.raises(TypeError, match="needs a multi-scale tokenizer.*holds a VQTokenizer"):
        NextScaleGenerator(tokenizer_path=str(vq_path), **TINY_NET)
    with pytest.raises(TypeError, match="needs a multi-scale tokenizer"):
        NextScaleGenerator(tokenizer_spec=vq.spec(), **TINY_NET)
    with pytest.raises(ValueError, match=r"patch_nums \[1, 2, 3, 4\], but the tokenizer \(.*msvq.ckpt\) has "
                                         r"patch_nums \[1, 2, 4\]"):
        NextScaleGenerator(tokenizer_path=str(msvq_path), patch_nums=[1, 2, 3, 4], **TINY_NET)
    with pytest.raises(ValueError, match=r"codebook_dim 32, but the tokenizer \(.*msvq.ckpt\) has codebook_dim 8"):
        NextScaleGenerator(tokenizer_path=str(msvq_path), codebook_dim=32, **TINY_NET)
    with pytest.raises(ValueError, match="vocab_size 4096, but the tokenizer .*msvq.ckpt.* has vocab_size 32"):
        NextScaleGenerator(tokenizer_path=str(msvq_path), vocab_size=4096, **TINY_NET)
    with pytest.raises(ValueError, match="needs a tokenizer_path, or explicit vocab_size, patch_nums and "
                                         "codebook_dim.*missing: codebook_dim"):
        NextScaleGenerator(vocab_size=16, patch_nums=[1, 2], **TINY_NET)
    with pytest.raises(ValueError, match="at least 2 scales"):
        NextScaleGenerator(vocab_size=16, patch_nums=[4], codebook_dim=4, **TINY_NET)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        NextScaleGenerator(vocab_size=16, patch_nums=[1, 2], codebook_dim=4, label_smoothing=1.0, **TINY_NET)
    without = NextScaleGenerator(vocab_size=16, patch_nums=[1, 2], codebook_dim=4, **TINY_NET)
    with pytest.raises(RuntimeError, match="has no tokenizer"):
        without.generate([1])


# ---- the command line: fit the digits recipes, then `arzoo sample` ----------------------------------


@pytest.fixture
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])


def test_digits_recipe_fit_and_sample_command(tmp_path, monkeypatch, capsys, _plain_argv):
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1", "--data.init_args.batch_size", "8"]
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/tokenizer_msvq.yaml"), *quick])
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/next_scale.yaml"), *quick, "--model.init_args.depth", "1",
          "--model.init_args.embed_dim", "32", "--model.init_args.num_heads", "2"])
    ckpt = tmp_path / "runs/digits/next_scale/last.ckpt"
    assert ckpt.is_file() and (tmp_path / "runs/digits/next_scale/version_0/samples.png").is_file()
    metrics = (tmp_path / "runs/digits/next_scale/version_0/metrics.csv").read_text()
    assert "val/loss" in metrics and "val/unigram_loss" in metrics
    arzoo_run(["sample", "--ckpt_path", str(ckpt), "--num", "10", "--cfg", "2.0", "--top_k", "10", "--top_p", "0.9",
          "--seed", "0", "--out", "grid.png"])
    out = capsys.readouterr().out
    assert "wrote 10 samples (next-scale, 7 forward passes each)" in out
    assert (tmp_path / "grid.png").is_file()
    arzoo_run(["sample", "--ckpt_path", str(ckpt), "--num", "2", "--options", '{"greedy": true}', "--out", "g.png"])
    with pytest.raises(ValueError, match=r"options \['bogus'\] are not arguments of NextScaleGenerator.generate"):
        arzoo_run(["sample", "--ckpt_path", str(ckpt), "--num", "2", "--options", '{"bogus": 1}', "--out", "g.png"])


# ---- ImageNet 256 recipes: parsed and built on the meta device (nothing trains) ---------------------

RECIPES = ROOT / "recipes/imagenet256"
# VAR's README commands (batch, epochs, tblr, alng, wpe) per size
README = {"d16": (768, 200, 1e-4, 1e-3, 0.1), "d20": (768, 250, 1e-4, 1e-3, 0.1),
          "d24": (768, 350, 8e-5, 1e-4, 0.01), "d30": (1024, 350, 8e-5, 1e-5, 0.01)}
_PARSED: dict[str, dict] = {}


def _parsed(size: str, capsys) -> dict:
    if size not in _PARSED:
        with pytest.raises(SystemExit) as exit_info:
            arzoo_run(["fit", "--config", str(RECIPES / f"var_{size}.yaml"), "--print_config"])
        assert exit_info.value.code == 0
        _PARSED[size] = yaml.safe_load(capsys.readouterr().out)
    return _PARSED[size]


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMS))
def test_imagenet_recipe_parses_and_builds_the_official_size(size, tmp_path, monkeypatch, capsys, _plain_argv):
    monkeypatch.chdir(tmp_path)
    config = _parsed(size, capsys)
    model, trainer, data = config["model"], config["trainer"], config["data"]
    assert model["class_path"] == "arzoo.generators.NextScaleGenerator"
    assert trainer["precision"] == "bf16-mixed" and trainer["strategy"] == "ddp"
    assert trainer["gradient_clip_val"] == 2.0  # --tclip
    args = model["init_args"]
    assert args["tokenizer_path"] == "checkpoints/var_vqvae.ckpt"
    assert args["vocab_size"] is None and args["patch_nums"] is None and args["codebook_dim"] is None
    batch, epochs, tblr, alng, wpe = README[size]
    assert trainer["max_epochs"] == epochs
    assert data["init_args"]["batch_size"] * 8 == batch and data["init_args"]["hflip"] is False
    assert args["lr"] == pytest.approx(tblr * batch / 256) and list(args["betas"]) == [0.9, 0.95]
    assert args["weight_decay"] == 0.05 and args["label_smoothing"] == 0.0 and args["ema_decay"] == 0.0
    assert args["init_adaln_gamma"] == alng and args["min_lr_ratio"] == wpe
    assert args["warmup_steps"] == round(epochs / 50 * -(-1_281_167 // batch))
    assert args["num_classes"] == 1000 and args["class_dropout_prob"] == 0.1
    registered = generator_config(f"var-{size}")[1]
    for key in ("depth", "embed_dim", "num_heads", "drop_path_rate", "attn_l2_norm", "shared_aln"):
        assert args[key] == registered[key], key
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == f"runs/imagenet256/var_{size}"
    assert trainer["logger"]["init_args"]["name"] == f"var_{size}"
    init_args = dict(args, tokenizer_path=None, **VAR_VQVAE_SIZES)
    with torch.device("meta"):
        built = NextScaleGenerator(**init_args)
    assert built.num_params() == OFFICIAL_PARAMS[size] and built.ema is None
