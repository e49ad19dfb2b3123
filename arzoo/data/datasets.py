"""Map-style datasets that yield `{"image": (3, S, S) in [-1, 1], "label": int}` items.

`ImageDataset` decodes lazily and returns None for a file it cannot read; `collate_images` drops
those and lists their names under "skipped", so one bad file costs one sample, not an epoch.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

NO_LABEL = -1


HIGH_BIT_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image in RGB mode; 16/32-bit greyscale is scaled down to 8 bits first (PIL's own
    conversion clips it, which turns most 16-bit pictures white)."""
    if image.mode in HIGH_BIT_DEPTH_MODES:
        array = np.asarray(image, dtype=np.float64)
        peak = array.max(initial=0.0)
        if peak > 255:
            array = array / (257.0 if peak <= 65535 else peak / 255.0)
        image = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


def pil_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """RGB, shorter side resized to `image_size` (bicubic), centre crop, to (3, S, S) in [-1, 1]."""
    image = to_rgb(image)
    w, h = image.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    image = image.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


def maybe_flip(image_3HW: torch.Tensor, hflip: bool) -> torch.Tensor:
    """Random horizontal flip with probability 1/2 when enabled (worker RNG is seeded by Lightning)."""
    if hflip and torch.rand(()) < 0.5:
        return image_3HW.flip(-1)
    return image_3HW


class TensorImageDataset(torch.utils.data.Dataset):
    """Pre-processed images held in memory (the embedded digits)."""

    def __init__(self, images_N3HW: torch.Tensor, labels_N: torch.Tensor, hflip: bool = False) -> None:
        self.images = images_N3HW
        self.labels = labels_N
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": maybe_flip(self.images[index], self.hflip), "label": int(self.labels[index])}


class ImageDataset(torch.utils.data.Dataset):
    """An HF `datasets.Dataset` whose image column is read undecoded and decoded here, skipping bad files."""

    def __init__(
        self, table: Any, image_column: str, label_column: str | None, image_size: int, hflip: bool = False
    ) -> None:
        import datasets

        self.table = table.cast_column(image_column, datasets.Image(decode=False))
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = image_size
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_row(self.table[index], self.image_column, self.label_column, self.image_size, self.hflip,
                          f"row {index}")


def decode_row(
    row: dict[str, Any], image_column: str, label_column: str | None, image_size: int, hflip: bool, where: str
) -> dict[str, Any]:
    """One undecoded table row -> `{"image", "label"}`, or `{"skipped": name (why)}` when it cannot be read."""
    ref = row[image_column]
    name = ref.get("path") or where
    try:
        image = Image.open(io.BytesIO(ref["bytes"]) if ref.get("bytes") else ref["path"])
        image.load()
        tensor = pil_to_tensor(image, image_size)
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        return {"skipped": f"{name} ({type(err).__name__}: {err})"}
    label = row[label_column] if label_column else NO_LABEL
    return {"image": maybe_flip(tensor, hflip), "label": int(label)}


def collate_images(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack readable items; names of unreadable ones go to batch["skipped"]."""
    good = [item for item in items if "image" in item]
    skipped = [item["skipped"] for item in items if "skipped" in item]
    if good:
        images = torch.stack([item["image"] for item in good])
        labels = torch.tensor([item["label"] for item in good], dtype=torch.long)
    else:
        images, labels = torch.empty(0), torch.empty(0, dtype=torch.long)
    return {"image": images, "label": labels, "skipped": skipped}
