"""A folder with truncated, non-image and unusual-mode files trains anyway; bad files are skipped, counted, logged."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arzoo.cli import ArzooTrainer
from arzoo.data import ImageDataModule
from arzoo.data.datasets import pil_to_tensor
from arzoo.tokenizers import TokenizerModule, VQTokenizer

UNREADABLE = ["cat/not_an_image.png", "dog/truncated.png", "dog/empty.jpg"]


def _messy_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    (root / "cat/not_an_image.png").write_text("this is text, not a PNG")
    good = (root / "dog/0.png").read_bytes()
    (root / "dog/truncated.png").write_bytes(good[: len(good) // 2])
    (root / "dog/empty.jpg").write_bytes(b"")
    # valid pictures in unusual modes: converted, not skipped
    Image.new("CMYK", (24, 24), (0, 255, 0, 0)).save(root / "cat/cmyk.jpg")
    Image.new("P", (24, 24), 3).save(root / "cat/palette.png")
    Image.new("LA", (24, 24), (128, 200)).save(root / "dog/grey_alpha.png")
    Image.new("RGBA", (24, 24), (10, 20, 30, 40)).save(root / "dog/rgba.png")
    ramp = np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)
    Image.fromarray(ramp).save(root / "dog/sixteen_bit.png")
    (root / "cat/readme.txt").write_text("not an image file name: ignored")


def test_fit_on_a_messy_folder_skips_and_counts_bad_files(tmp_path, caplog):
    _messy_folder(tmp_path / "data")
    torch.manual_seed(0)
    tokenizer = VQTokenizer(image_size=16, codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 1],
                            decoder_ch_mult=[1, 1], z_channels=32, ch=32, num_res_blocks=1)
    # 24 image files: 18 train (3 whole batches of 6, so every file is read in one epoch) + 6 val
    data = ImageDataModule(source=f"folder:{tmp_path / 'data'}", image_size=16, batch_size=6, val_fraction=0.25)
    trainer = ArzooTrainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                           enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                           default_root_dir=tmp_path)
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="skipping unreadable image") as record:
        trainer.fit(TokenizerModule(tokenizer), data)
    assert trainer.global_step > 0
    assert data.num_skipped == len(UNREADABLE)
    reported = " ".join(str(w.message) for w in record)
    assert all(Path(name).name in reported for name in UNREADABLE)
    assert f"{len(UNREADABLE)} unreadable image(s) were skipped during fit" in caplog.text


def test_sixteen_bit_images_keep_their_contrast(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    with Image.open(tmp_path / "ramp.png") as image:
        assert image.mode.startswith("I")
        pixels = pil_to_tensor(image, 32)
    assert pixels.min() < -0.9 and pixels.max() > 0.9 and abs(pixels.mean().item()) < 0.05  # not clipped to white
