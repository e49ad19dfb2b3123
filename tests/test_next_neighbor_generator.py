"""NextNeighborGenerator (NAR): schedule, mask, heads, KV cache, cfg_interval, sizes, training, checkpoints.

Parity with the official code is tests/test_parity_nar.py; this file checks arzoo's own contract.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image

import arzoo
from arzoo.cli import run as arzoo_run
from arzoo.data import ImageDataModule
from arzoo.generators import NextNeighborGenerator, RasterGenerator
from arzoo.generators.base import BaseGenerator
from arzoo.generators.next_neighbor import NeighborTransformer, combine_heads, neighbor_plan
from arzoo.nn.llama import swiglu_hidden_dim
from arzoo.tokenizers import MultiScaleVQTokenizer, VQTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = dict(dim=32, n_layer=1, n_head=2, multiple_of=32, warmup_steps=0)
NO_TOKENIZER = dict(vocab_size=32, grid_size=4, **TINY_NET)
# SPEC section 6 (c2i, vocab 16384, 1000 classes, one extra block)
OFFICIAL_PARAMS = {
    "nar-b": 130_551_552,
    "nar-m": 295_453_696,
    "nar-l": 372_536_320,
    "nar-xl": 815_991_040,
    "nar-xxl": 1_464_454_656,
}


def _save_tokenizer(tokenizer, path: Path) -> Path:
    torch.save({"hyper_parameters": {"tokenizer": tokenizer.spec()},
                "state_dict": {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()}}, path)  # fmt: skip
    return path


@pytest.fixture(scope="module")
def vq_path(tmp_path_factory) -> Path:
    """An (untrained) 16x16 -> 4x4 VQ tokenizer checkpoint with 32 codes."""
    torch.manual_seed(0)
    tok = VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                      decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)  # fmt: skip
    return _save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "vq.ckpt")


# ---- sizes ------------------------------------------------------------------------------------


def test_named_sizes_on_the_meta_device():
    assert set(OFFICIAL_PARAMS) | {"nar-tiny"} <= set(arzoo.list_generators())
    with torch.device("meta"):
        for name, count in OFFICIAL_PARAMS.items():
            model = arzoo.create_generator(name)
            assert isinstance(model, NextNeighborGenerator) and model.num_params() == count, name
            assert model.num_steps == 31 and model.net.extra_layers == 1  # 2g - 1 for 16x16
            # SPEC's formula: (C+1)D + 3VD + 2D + (n_layer+1)(4D^2 + 3DF + 2D)
            d, n, f = model.net.dim, model.net.n_layer, swiglu_hidden_dim(model.net.dim, 256)
            assert count == 1001 * d + 3 * 16384 * d + 2 * d + (n + 1) * (4 * d * d + 3 * d * f + 2 * d)
            raster = arzoo.create_generator(name.replace("nar", "raster")) if name != "nar-m" else None
            if raster is not None:  # NAR-X = GPT-X + one block + the second head
                assert count - raster.num_params() == 4 * d * d + 3 * d * f + 2 * d + 16384 * d + d
    tiny = arzoo.create_generator("nar-tiny", vocab_size=64, grid_size=8, extra_layers=2)
    assert len(tiny.net.layers) == 6 and tiny.num_steps == 15


# ---- schedule, mask, routing --------------------------------------------------------------------


@pytest.mark.parametrize("g", [1, 3, 5])
def test_schedule_mask_and_head_routing(g):
    model = NextNeighborGenerator(**{**NO_TOKENIZER, "grid_size": g})
    assert model.num_steps == 2 * g - 1
    for t, cells in enumerate(model.schedule):
        rows, cols = cells // g, cells % g
        assert torch.equal(rows + cols, torch.full_like(cells, t)) and torch.equal(rows, rows.sort().values)
    # the proximity rule is block-causal over diagonals: BaseGenerator's default mask for this schedule
    assert torch.equal(model.mask, BaseGenerator.visibility_mask(model))
    plan = neighbor_plan(g)
    assert plan is neighbor_plan(g) and plan is model.net.plan  # built once per grid size
    for cell in range(g * g):  # right head of the left neighbour, below head of the upper one
        r, c = divmod(cell, g)
        assert plan.from_left[cell] == (1 + cell - 1 if c else (0 if cell == 0 else -1))
        assert plan.from_above[cell] == (1 + cell - g if r else (0 if cell == 0 else -1))


def test_combine_heads_averages_logits():
    right, below = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    out = combine_heads(right, below, torch.tensor([0, 1, -1]), torch.tensor([0, -1, 2]))
    torch.testing.assert_close(out[:, 0], (right[:, 0] + below[:, 0]) / 2, atol=0, rtol=0)
    assert torch.equal(out[:, 1], right[:, 1]) and torch.equal(out[:, 2], below[:, 2])


@pytest.mark.parametrize("extra_layers", [0, 2])
@torch.no_grad()
def test_any_extra_layer_count_decodes_as_it_trains(extra_layers):
    torch.manual_seed(0)
    net = NeighborTransformer(dim=32, n_layer=2, n_head=2, vocab_size=16, num_classes=3, grid_size=3,
                              multiple_of=32, extra_layers=extra_layers, class_dropout_prob=0.1).eval()  # fmt: skip
    assert len(net.layers) == 2 + extra_layers and len(net.state_dict()) == 6 + 7 * (2 + extra_layers)
    torch.nn.init.normal_(net.output.weight, std=0.02)  # the right head starts at zero otherwise
    tokens, labels = torch.randint(0, 16, (2, 9)), torch.tensor([0, 3])  # 3 = the null class
    full = net.neighbor_logits(*net(tokens, labels))
    net.setup_cache(2)
    cached = torch.empty_like(full)
    for step, cells in enumerate(net.plan.diagonals):
        cached[:, cells] = net.decode_diagonal(labels if step == 0 else tokens[:, net.plan.diagonals[step - 1]], step)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


# ---- generation: KV cache, per-grid tensors, cfg_interval ------------------------------------------


def test_kv_cache_writes_each_diagonal_once_and_step_tensors_are_reused(monkeypatch):
    torch.manual_seed(0)
    model = NextNeighborGenerator(**{**NO_TOKENIZER, "grid_size": 5})
    slots: list[list[int]] = []
    heads = model.net.heads
    monkeypatch.setattr(model.net, "heads", lambda x, f, m, pos: slots.append(pos.tolist()) or heads(x, f, m, pos))
    misses = neighbor_plan.cache_info().misses
    first = model.generate([1, 2], cfg=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    step_tensors = model.net._device_plans[torch.device("cpu")]
    again = model.generate([1, 2], cfg=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(first, again) and first.shape == (2, 25)
    assert model.net._device_plans[torch.device("cpu")] is step_tensors  # slots, RoPE rows, masks: built once
    assert neighbor_plan.cache_info().misses == misses
    one_run = slots[: model.num_steps]
    assert len(slots) == 2 * model.num_steps and [len(s) for s in one_run] == [1, 1, 2, 3, 4, 5, 4, 3, 2]
    written = [s for step in one_run for s in step]
    last_cell = 24  # the last diagonal is produced, never fed
    assert sorted(written) == list(range(1 + last_cell)) and len(set(written)) == len(written)
    assert model.net.causal_mask is None  # caches freed after sampling


def test_cfg_interval_counts_tokens_not_steps():
    nar = NextNeighborGenerator(cfg_interval=4, **NO_TOKENIZER)
    raster = RasterGenerator(cfg_interval=4, **NO_TOKENIZER)
    guided = lambda gen: [gen.cfg_scale(step, 3.0) != 1.0 for step in range(gen.num_steps)]  # noqa: E731
    # NAR: 1, 2 (=3 tokens), 3 (=6 > 4: off from here) -> 6 guided tokens in 3 steps
    assert guided(nar) == [True, True, True, False, False, False, False]
    assert guided(raster) == [True] * 6 + [False] * 10  # LlamaGen: tokens 0 .. cfg_interval + 1
    nar.cfg_interval = -1
    assert all(guided(nar))


# ---- training, sampling, checkpoints -------------------------------------------------------------


def test_trains_samples_and_reloads(vq_path, tmp_path):
    torch.manual_seed(0)
    model = NextNeighborGenerator(tokenizer_path=str(vq_path), lr=3e-3, extra_layers=2, **TINY_NET)
    assert model.hparams.extra_layers == 2 and len(model.net.layers) == 3
    tokens = model.tokenize(torch.rand(8, 3, 16, 16) * 2 - 1)
    labels = torch.arange(8)
    model.eval()
    before = model.token_loss(model.teacher_forcing(tokens, labels), tokens[:, model.prediction_order]).item()
    trainer = L.Trainer(max_steps=25, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(model.train(), ImageDataModule(image_size=16, batch_size=32))
    model.eval()
    after = model.token_loss(model.teacher_forcing(tokens, labels), tokens[:, model.prediction_order]).item()
    assert after < before

    images = model.sample_images([0, 3, 9], cfg=2.0, top_k=8, generator=torch.Generator().manual_seed(1))
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1

    path = tmp_path / "nar.ckpt"
    trainer.save_checkpoint(path)
    loaded = arzoo.Generator.load_from_checkpoint(path)
    assert type(loaded) is NextNeighborGenerator and loaded.net.extra_layers == 2
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    draw = lambda gen: gen.generate([4, 5], cfg=1.5, top_k=4, generator=torch.Generator().manual_seed(3))  # noqa: E731
    assert torch.equal(draw(model), draw(loaded))


# ---- errors a user can cause ------------------------------------------------------------------


def test_clear_errors(vq_path, tmp_path):
    with pytest.raises(ValueError, match="extra_layers .*medusa_attention_num.* >= 0, got -1"):
        NextNeighborGenerator(extra_layers=-1, **NO_TOKENIZER)
    msvq = MultiScaleVQTokenizer(image_size=16, vocab_size=32, z_channels=32, ch=32, ch_mult=[1, 1, 1],
                                 num_res_blocks=1, patch_nums=[1, 2, 4])  # fmt: skip
    with pytest.raises(ValueError, match=r"single square token grid.*\(1, 1\), \(2, 2\), \(4, 4\)"):
        NextNeighborGenerator(tokenizer_path=str(_save_tokenizer(msvq, tmp_path / "msvq.ckpt")), **TINY_NET)
    model = NextNeighborGenerator(**NO_TOKENIZER)
    with pytest.raises(ValueError, match=r"full 4x4 grid: tokens \(B, 16\)"):
        model.net(torch.zeros(2, 15, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="no KV cache"):
        model.net.decode_diagonal(torch.zeros(2, dtype=torch.long), 0)
    model.net.setup_cache(2)
    with pytest.raises(ValueError, match=r"step 2 feeds diagonal 1: tokens of shape \(2, 2\), got \(2, 3\)"):
        model.net.decode_diagonal(torch.zeros(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="step 7 is outside the 7 steps"):
        model.net.decode_diagonal(torch.zeros(2, 3, dtype=torch.long), 7)
    assert not hasattr(model.net, "decode_step")  # NAR's network shares LlamaGen's trunk, not raster decoding


# ---- the digits recipe through the command line ---------------------------------------------------


def test_digits_recipe_fit_and_sample_command(vq_path, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["arzoo"])
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1", "--data.init_args.image_size", "16",
             "--model.init_args.tokenizer_path", str(vq_path), "--model.init_args.dim", "32",
             "--model.init_args.n_layer", "1", "--model.init_args.n_head", "2"]  # fmt: skip
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/next_neighbor.yaml"), *quick])
    ckpt = tmp_path / "runs/digits/next_neighbor/last.ckpt"
    assert ckpt.is_file() and (tmp_path / "runs/digits/next_neighbor/version_0/samples.png").is_file()
    metrics = (tmp_path / "runs/digits/next_neighbor/version_0/metrics.csv").read_text()
    assert "val/loss" in metrics and "val/unigram_loss" in metrics
    arzoo_run(["sample", "--ckpt_path", str(ckpt), "--num", "20", "--cfg", "2.0", "--top_k", "10", "--seed", "0",
          "--out", "grid.png"])  # fmt: skip
    assert "wrote 20 samples" in capsys.readouterr().out
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.size[1] > 4 * grid.size[0]  # ten rows (one per class) of two samples
