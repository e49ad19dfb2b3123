"""BaseGenerator + RasterGenerator: a new paradigm by subclassing, training, sampling, checkpoints, errors."""

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
from arzoo.generators import RasterGenerator
from arzoo.tokenizers import MultiScaleVQTokenizer, VQTokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = dict(dim=32, n_layer=1, n_head=2, multiple_of=32, warmup_steps=0)


def _save_tokenizer(tokenizer, path: Path) -> Path:
    torch.save({"hyper_parameters": {"tokenizer": tokenizer.spec()},
                "state_dict": {f"tokenizer.{k}": v for k, v in tokenizer.state_dict().items()}}, path)
    return path


@pytest.fixture(scope="module")
def vq_path(tmp_path_factory) -> Path:
    """An (untrained) 16x16 -> 4x4 VQ tokenizer checkpoint with 32 codes."""
    torch.manual_seed(0)
    tok = VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                      decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
    return _save_tokenizer(tok, tmp_path_factory.mktemp("tok") / "vq.ckpt")


# ---- a new paradigm in a few lines: the raster family in column-major order ----------------------


class ColumnMajorRaster(RasterGenerator):
    """Raster generation, but down each column first: only the schedule changes."""

    paradigm = "column-major"

    def build_schedule(self) -> list[torch.Tensor]:
        g = self.grid_size
        return [torch.tensor([r * g + c]) for c in range(g) for r in range(g)]


def _fit(model, tmp_path: Path, steps: int) -> L.Trainer:
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        limit_val_batches=0)
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=32))
    return trainer


def test_toy_paradigm_trains_samples_and_reloads(vq_path, tmp_path):
    torch.manual_seed(0)
    model = ColumnMajorRaster(tokenizer_path=str(vq_path), lr=3e-3, **TINY_NET)
    assert model.num_steps == 16 and model.prediction_order.tolist()[:5] == [0, 4, 8, 12, 1]
    tokens = model.tokenize(torch.rand(8, 3, 16, 16) * 2 - 1)
    labels = torch.arange(8)
    model.eval()
    before = model.token_loss(model.teacher_forcing(tokens, labels), tokens[:, model.prediction_order]).item()
    trainer = _fit(model, tmp_path, steps=30)
    model.eval()
    after = model.token_loss(model.teacher_forcing(tokens, labels), tokens[:, model.prediction_order]).item()
    assert after < before  # it learnt something about these token statistics

    cells = []
    decode_step = model.net.decode_step
    model.net.decode_step = lambda tok, slot_pos, cell: cells.append(cell) or decode_step(tok, slot_pos, cell)
    images = model.sample_images([0, 3, 9], cfg=2.0, top_k=8, generator=torch.Generator().manual_seed(1))
    del model.net.decode_step
    assert images.shape == (3, 3, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert cells == model.prediction_order[:-1].tolist()  # each token fed at its column-major cell

    path = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(path)
    vq_path_backup = vq_path.read_bytes()
    vq_path.unlink()  # the generator checkpoint carries its tokenizer: the tokenizer file is not needed
    try:
        loaded = arzoo.Generator.load_from_checkpoint(path)
    finally:
        vq_path.write_bytes(vq_path_backup)
    assert type(loaded) is ColumnMajorRaster and loaded.paradigm == "column-major"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(TypeError, match="holds a ColumnMajorRaster"):
        from arzoo.generators.base import BaseGenerator

        class Other(BaseGenerator):
            pass

        Other.load_from_checkpoint(path)


def test_seeded_sampling_and_guidance_batch(vq_path):
    model = RasterGenerator(tokenizer_path=str(vq_path), **TINY_NET)
    draw = lambda seed, **kw: model.generate([1, 2], top_k=16, generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    batches = []
    start = model.start_sampling
    model.start_sampling = lambda state: batches.append(len(state.labels)) or start(state)
    draw(0, cfg=1.0), draw(0, cfg=3.0)
    assert batches == [2, 4]  # guidance runs one doubled batch (conditional rows, then null-class rows)
    assert model.generate([1], greedy=True).shape == (1, 16)


def test_ema_weights_are_used_for_sampling(vq_path, tmp_path):
    model = RasterGenerator(tokenizer_path=str(vq_path), ema_decay=0.5, lr=1e-2, **TINY_NET)
    _fit(model, tmp_path, steps=3)
    live, ema = dict(model.net.named_parameters()), dict(model.ema.module.named_parameters())
    assert any(not torch.equal(live[k], ema[k]) for k in live)
    with model.sampling_weights(use_ema=True) as net:
        assert net is model.ema.module and model.net is model.ema.module
    assert model.net is not model.ema.module
    with model.sampling_weights(use_ema=False) as net:
        assert net is model.net


def test_registry_and_meta_device_sizes():
    names = arzoo.list_generators()
    assert {"raster-b", "raster-l", "raster-xl", "raster-xxl", "raster-3b", "raster-tiny"} <= set(names)
    expected = {"raster-b": 110_888_448, "raster-l": 342_910_976, "raster-xl": 774_699_520,
                "raster-xxl": 1_410_972_672, "raster-3b": 3_096_659_200}
    with torch.device("meta"):
        for name, count in expected.items():
            model = arzoo.create_generator(name)
            assert model.num_params() == count, name
            assert model.num_steps == 256
    with pytest.raises(KeyError, match="unknown generator 'raster-zz'.*raster-b"):
        arzoo.create_generator("raster-zz")
    small = arzoo.create_generator("raster-tiny", vocab_size=64, grid_size=8, n_layer=2)
    assert small.net.config.n_layer == 2 and small.num_tokens == 64


# ---- errors a user can cause ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels_B=[10]), "class id 10 is out of range.*num_classes=10"),
        (dict(labels_B=[-1]), "class id -1 is out of range"),
        (dict(labels_B=[1], top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(labels_B=[1], top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
        (dict(labels_B=[1], top_k=0), "top_k must be between 1 and the vocabulary size 32, got 0"),
        (dict(labels_B=[1], top_k=33), "top_k must be between 1 and the vocabulary size 32, got 33"),
        (dict(labels_B=[1], cfg=-0.5), "cfg must be >= 0"),
        (dict(labels_B=[1], temperature=0.0), "temperature must be > 0"),
        (dict(labels_B=[]), "at least one label"),
    ],
)
def test_bad_sampling_arguments(vq_path, kwargs, message):
    model = RasterGenerator(tokenizer_path=str(vq_path), **TINY_NET)
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


def test_tokenizer_that_is_missing_or_does_not_fit(vq_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        RasterGenerator(tokenizer_path=str(tmp_path / "nope.ckpt"), **TINY_NET)
    with pytest.raises(ValueError, match="vocab_size 64, but the tokenizer .*vq.ckpt.* has vocab_size 32"):
        RasterGenerator(tokenizer_path=str(vq_path), vocab_size=64, **TINY_NET)
    with pytest.raises(ValueError, match=r"token grid\(s\) \[\(8, 8\)\].*produces \[\(4, 4\)\]"):
        RasterGenerator(tokenizer_path=str(vq_path), grid_size=8, **TINY_NET)
    msvq = MultiScaleVQTokenizer(image_size=16, vocab_size=32, z_channels=32, ch=32, ch_mult=[1, 1, 1],
                                 num_res_blocks=1, patch_nums=[1, 2, 4])
    with pytest.raises(ValueError, match=r"single square token grid.*\(1, 1\), \(2, 2\), \(4, 4\)"):
        RasterGenerator(tokenizer_path=str(_save_tokenizer(msvq, tmp_path / "msvq.ckpt")), **TINY_NET)
    with pytest.raises(ValueError, match="needs a tokenizer_path, or explicit vocab_size"):
        RasterGenerator(**TINY_NET)


def test_unlabelled_data_is_a_clear_error(vq_path):
    model = RasterGenerator(tokenizer_path=str(vq_path), **TINY_NET)
    batch = {"image": torch.zeros(2, 3, 16, 16), "label": torch.tensor([-1, -1])}
    with pytest.raises(ValueError, match="no class labels"):
        model.training_step(batch, 0)


# ---- the command line: fit the digits recipes, then `arzoo sample` ------------------------------


@pytest.fixture
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])


def test_digits_recipe_fit_and_sample_command(tmp_path, monkeypatch, capsys, _plain_argv):
    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_steps", "2", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
             "--trainer.check_val_every_n_epoch", "1"]
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/tokenizer_vq.yaml"), *quick])
    arzoo_run(["fit", "--config", str(ROOT / "recipes/digits/raster.yaml"), *quick, "--model.init_args.dim", "32",
          "--model.init_args.n_layer", "1", "--model.init_args.n_head", "2"])
    ckpt = tmp_path / "runs/digits/raster/last.ckpt"
    assert ckpt.is_file() and (tmp_path / "runs/digits/raster/version_0/samples.png").is_file()
    metrics = (tmp_path / "runs/digits/raster/version_0/metrics.csv").read_text()
    assert "val/loss" in metrics and "val/unigram_loss" in metrics
    assert all(f"val/{k}" in metrics for k in ("context_gain", "loss_q1", "loss_q4"))  # the context diagnostic

    arzoo_run(["sample", "--ckpt_path", str(ckpt), "--num", "20", "--cfg", "2.0", "--top_k", "10", "--top_p", "0.9",
          "--seed", "0", "--out", "grid.png"])
    assert "wrote 20 samples" in capsys.readouterr().out
    with Image.open(tmp_path / "grid.png") as grid:
        width, height = grid.size
    assert height > 4 * width  # ten rows (one per class) of two samples
    with pytest.raises(ValueError, match="num must be a positive number of images, got 0"):
        arzoo_run(["sample", "--ckpt_path", str(ckpt), "--num", "0"])
    with pytest.raises(ValueError, match="class id 12 is out of range"):
        arzoo_run(["sample", "--ckpt_path", str(ckpt), "--labels", "[1, 12]"])
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        arzoo_run(["sample", "--ckpt_path", str(tmp_path / "missing.ckpt")])
