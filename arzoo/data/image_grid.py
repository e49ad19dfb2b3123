"""Image grids as image files (PNG, JPEG, ... by extension; no torchvision needed)."""

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


# file extension -> PIL format: the bytes written are what the name says
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}


def check_image_path(path: str | Path, what: str = "out") -> tuple[Path, str]:
    """(path, PIL format) of an image file to write, refused up front when it cannot be written.

    The parent folder is created when missing; an empty name, a folder, an unknown extension or a
    folder that cannot be written is a clear error before any work is done.
    """
    if not str(path).strip():
        raise ValueError(f"{what} is empty; give an image file name such as samples.png")
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder; give an image file name such as {path / 'samples.png'}")
    image_format = IMAGE_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(
            f"{what} {str(path)!r} has extension {path.suffix or '(none)'!r}; expected one of "
            f"{', '.join(sorted(IMAGE_FORMATS))} (the file format follows the extension)"
        )
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise NotADirectoryError(f"{what} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"{what} {str(path)!r}: folder {str(parent)!r} cannot be created ({err.strerror or err})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {str(path)!r}: folder {str(parent)!r} is not writable")
    return path, image_format


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_image_grid(images_NCHW: torch.Tensor, path: str | Path, nrow: int = 8, upscale: int = 1) -> Path:
    """Write `make_grid(images)` in the format of the file's extension, atomically (a reader never sees half a file)."""
    path, image_format = check_image_path(path, what="image file")
    grid = make_grid(images_NCHW, nrow)
    picture = Image.fromarray(rearrange(grid, "c h w -> h w c").numpy())
    if upscale > 1:
        picture = picture.resize((picture.width * upscale, picture.height * upscale), Image.Resampling.NEAREST)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        picture.save(tmp, format=image_format)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a grid is as readable as any file the user writes
        os.replace(tmp, path)
    except OSError as err:
        raise OSError(f"could not write {str(path)!r}: {err.strerror or err}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
