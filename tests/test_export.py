"""`arzoo export` writes safetensors + JSON config; `from_pretrained` reads them back to identical outputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import arzoo
from arzoo.cli import run as arzoo_run
from arzoo.data import ImageDataModule
from arzoo.generators import BaseGenerator, RasterGenerator
from arzoo.tokenizers import Tokenizer, VQTokenizer, load_tokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A tiny VQ tokenizer checkpoint and a raster generator (with EMA) trained 3 steps on it."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    tok = VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                      decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
    tok_path = save_tokenizer_checkpoint(tok, root / "vq.ckpt")
    model = RasterGenerator(tokenizer_path=str(tok_path), dim=32, n_layer=1, n_head=2, multiple_of=32,
                            warmup_steps=0, ema_decay=0.5, lr=1e-2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=16))
    trainer.save_checkpoint(root / "raster.ckpt")
    return {"tokenizer": tok_path, "generator": root / "raster.ckpt"}


def test_generator_round_trip_is_self_contained_and_identical(checkpoints, tmp_path, capsys):
    out = tmp_path / "export"
    arzoo_run(["export", "--ckpt_path", str(checkpoints["generator"]), "--out", str(out)])
    assert "exported generator arzoo.generators.raster.RasterGenerator" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "generator" and config["global_step"] == 3
    assert config["init_args"]["tokenizer_path"] is None and config["init_args"]["tokenizer_spec"]["class_path"]

    original = BaseGenerator.load_from_checkpoint(checkpoints["generator"]).eval()
    tokenizer_file = checkpoints["tokenizer"].read_bytes()
    checkpoints["tokenizer"].unlink()  # the export carries its tokenizer: the file is not needed
    try:
        loaded = arzoo.from_pretrained(out)
        assert type(loaded) is RasterGenerator and not loaded.training
        assert type(RasterGenerator.from_pretrained(out)) is RasterGenerator
    finally:
        checkpoints["tokenizer"].write_bytes(tokenizer_file)
    assert original.state_dict().keys() == loaded.state_dict().keys()
    for key, value in original.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    draw = lambda m, ema: m.sample_images([0, 5, 9], cfg=2.0, top_k=8, use_ema=ema,  # noqa: E731
                                          generator=torch.Generator().manual_seed(3))
    for ema in (True, False):
        assert torch.equal(draw(original, ema), draw(loaded, ema))
    tokens = original.tokenize(torch.rand(2, 3, 16, 16) * 2 - 1)
    labels = torch.tensor([1, 2])
    assert torch.equal(original.teacher_forcing(tokens, labels), loaded.teacher_forcing(tokens, labels))


def test_tokenizer_round_trip(checkpoints, tmp_path):
    out = tmp_path / "tok"
    arzoo_run(["export", "--ckpt_path", str(checkpoints["tokenizer"]), "--out", str(out)])
    original = load_tokenizer(checkpoints["tokenizer"])
    loaded = arzoo.from_pretrained(out)
    assert isinstance(loaded, Tokenizer) and type(loaded) is type(original) and not loaded.training
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    maps_a, maps_b = original.encode(images), loaded.encode(images)
    assert all(torch.equal(a, b) for a, b in zip(maps_a, maps_b))
    assert torch.equal(original.decode(maps_a), loaded.decode(maps_b))
    with pytest.raises(TypeError, match="holds a VQTokenizer, not a BaseGenerator"):
        BaseGenerator.from_pretrained(out)


def test_export_and_from_pretrained_errors(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json.*arzoo export"):
        arzoo.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="pretrained folder .*nowhere.* does not exist"):
        arzoo.from_pretrained(tmp_path / "nowhere")
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="neither an arzoo generator checkpoint .* nor a tokenizer checkpoint"):
        arzoo_run(["export", "--ckpt_path", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "x")])
