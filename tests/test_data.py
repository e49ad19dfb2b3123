"""ImageDataModule: the embedded digits, local image folders (with bad files) and source errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arzoo.data import ImageDataModule, make_grid, save_image_grid


def test_digits_split_is_fixed_and_disjoint():
    a, b = ImageDataModule(image_size=16), ImageDataModule(image_size=16)
    a.setup(), b.setup()
    assert len(a.train_set) + len(a.val_set) == 1797
    assert torch.equal(a.val_set.images, b.val_set.images)
    train = {tuple(x.flatten().tolist()) for x in a.train_set.images[:200]}
    assert not any(tuple(x.flatten().tolist()) in train for x in a.val_set.images)
    batch = next(iter(a.train_dataloader()))
    assert batch["image"].shape == (64, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert batch["label"].dtype == torch.long and set(batch["label"].tolist()) <= set(range(10))
    assert a.num_classes == 10


def test_digits_flip_only_in_training():
    dm = ImageDataModule(image_size=16, hflip=True)
    dm.setup()
    torch.manual_seed(0)
    flipped = sum(not torch.equal(dm.train_set[0]["image"], dm.train_set.images[0]) for _ in range(40))
    assert 5 < flipped < 35
    assert all(torch.equal(dm.val_set[0]["image"], dm.val_set.images[0]) for _ in range(10))


def _write_folder(root: Path, per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i}.png")


def _corrupt(root: Path) -> None:
    (root / "cat" / "not_an_image.png").write_bytes(b"this is text, not a PNG")
    good = (root / "dog" / "0.png").read_bytes()
    (root / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("CMYK", (30, 30)).save(root / "dog" / "cmyk.jpg")  # unusual mode: must be converted, not skipped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_skips_unreadable_images(tmp_path, num_workers):
    _write_folder(tmp_path)
    _corrupt(tmp_path)
    dm = ImageDataModule(source=f"folder:{tmp_path}", image_size=16, batch_size=4, val_fraction=0.2,
                         num_workers=num_workers)
    dm.setup()
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    seen = 0
    with pytest.warns(UserWarning, match="skipping unreadable image") as record:
        for _ in range(2):  # two epochs: each bad file is reported once only
            for loader in (dm.train_dataloader(), dm.val_dataloader()):
                for batch in loader:
                    batch = dm.on_before_batch_transfer(batch, 0)
                    assert "skipped" not in batch
                    assert batch["image"].shape[1:] == (3, 16, 16)
                    seen += len(batch["image"])
    assert dm.num_skipped == 2
    assert len([w for w in record if "skipping unreadable image" in str(w.message)]) == 2
    assert seen > 0


def test_folder_with_no_images_is_a_clear_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no pictures here")
    dm = ImageDataModule(source=f"folder:{tmp_path}")
    with pytest.raises(ValueError, match=f"{tmp_path}.*contains no images"):
        dm.setup()


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ImageDataModule(source=f"folder:{tmp_path / 'does-not-exist'}").setup()


@pytest.mark.parametrize("source", ["mnist", "hf", "folder:", "imagenet:train", ""])
def test_unknown_source_is_a_clear_error(source):
    with pytest.raises(ValueError, match="source"):
        ImageDataModule(source=source)


def test_hub_dataset_offline_is_a_clear_error():
    dm = ImageDataModule(source="hf:someone/not-cached-anywhere")
    with pytest.raises(RuntimeError, match="not-cached-anywhere.*offline"):
        dm.setup()


def test_grid_layout_and_png(tmp_path):
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, 3, 4, 4)
    grid = make_grid(images, nrow=2, padding=1)
    assert grid.shape == (3, 3 * 5 + 1, 2 * 5 + 1) and grid.dtype == torch.uint8
    path = save_image_grid(images, tmp_path / "g.png", nrow=2)
    with Image.open(path) as png:
        assert png.size == (2 * 6 + 2, 3 * 6 + 2)  # default padding 2
