"""Image grids as PNG files (no torchvision needed)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from einops import rearrange
from PIL import Image


def make_grid(images_NCHW: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile N images in [-1, 1] into one (3, H', W') uint8 grid, `nrow` images per row."""
    if images_NCHW.ndim != 4 or images_NCHW.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images_NCHW.shape)}")
    images = images_NCHW.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    n = images.shape[0]
    ncol = max(1, min(nrow, n))
    nrows = -(-n // ncol)
    fill = int(round((pad_value + 1) * 127.5))
    blank = torch.full((nrows * ncol - n, *images.shape[1:]), fill, dtype=torch.uint8)
    images = torch.cat([images, blank])
    images = torch.nn.functional.pad(images, (padding, 0, padding, 0), value=fill)
    grid = rearrange(images, "(r c) ch h w -> ch (r h) (c w)", r=nrows, c=ncol)
    return torch.nn.functional.pad(grid, (0, padding, 0, padding), value=fill)


def save_image_grid(images_NCHW: torch.Tensor, path: str | Path, nrow: int = 8, upscale: int = 1) -> Path:
    """Write `make_grid(images)` as a PNG, atomically (a reader never sees half a file)."""
    grid = make_grid(images_NCHW, nrow)
    picture = Image.fromarray(rearrange(grid, "c h w -> h w c").numpy())
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        picture.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
