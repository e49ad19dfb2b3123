"""Where images come from: the embedded digits, an HF hub dataset, or a local image folder.

Every source is read into a `datasets.Dataset` (or, for digits, plain tensors) with an image
column and an optional integer label column. Decoding is left to `ImageDataset`, so that one
unreadable file is skipped instead of stopping an epoch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

SOURCE_HELP = "'digits' (embedded), 'hf:<dataset name>' or 'folder:<path>'"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class SourceSpec:
    """A parsed `source` string."""

    kind: str  # "digits" | "hf" | "folder"
    target: str = ""  # dataset name or folder path


def parse_source(source: str) -> SourceSpec:
    """Parse `digits`, `hf:<name>` or `folder:<path>`; anything else is a clear error."""
    if not isinstance(source, str):
        raise ValueError(f"data source must be a string, got {source!r}; expected {SOURCE_HELP}")
    if source == "digits":
        return SourceSpec("digits")
    kind, sep, target = source.partition(":")
    if sep and kind in ("hf", "folder"):
        if not target:
            raise ValueError(f"data source {source!r} names no {'dataset' if kind == 'hf' else 'folder'}")
        return SourceSpec(kind, target)
    raise ValueError(f"unknown data source {source!r}; expected {SOURCE_HELP}")


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 handwritten digits as uint8 (N, 8, 8) images in 0..255 and int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 17 grey levels (0..16), ink bright on black; scaled to the full 8-bit range.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def seeded_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A fixed, seeded (train, val) split of range(n)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(round(n * val_fraction)))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def find_columns(features: Any) -> tuple[str, str | None]:
    """The first Image column and the first ClassLabel (or int `label`) column of a dataset."""
    import datasets

    image_col = next((name for name, f in features.items() if isinstance(f, datasets.Image)), None)
    if image_col is None:
        raise ValueError(f"the dataset has no image column; its columns are {list(features)}")
    label_col = next((name for name, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if label_col is None and "label" in features:
        label_col = "label"
    return image_col, label_col


def load_folder(path: str, streaming: bool = False) -> "Any":
    """A local image folder (class = sub-folder) through `datasets`' imagefolder builder (optionally streamed)."""
    import datasets

    root = Path(path).expanduser()
    if root.is_file():
        raise NotADirectoryError(
            f"image folder {str(root)!r} (from source 'folder:{path}') is a file; give the folder that holds "
            f"one sub-folder of images per class"
        )
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist (from source 'folder:{path}')")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.rglob("*") if p.is_file()):
        raise ValueError(
            f"image folder {str(root)!r} contains no images (looked for {', '.join(sorted(IMAGE_SUFFIXES))} "
            f"files, in sub-folders per class)"
        )
    return datasets.load_dataset("imagefolder", data_dir=str(root), streaming=streaming)


def folder_label_note(path: str) -> str | None:
    """Why a local image folder gives no class labels, when that is because it has one class sub-folder."""
    root = Path(path).expanduser()
    subfolders = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    loose = root.is_dir() and any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir())
    if len(subfolders) == 1 and not loose:
        return (
            f"image folder {str(root)!r} has a single class sub-folder ({subfolders[0]!r}), so its images carry "
            f"no class labels; a class-conditional generator needs one sub-folder per class (at least two)"
        )
    return None


def load_hub(name: str, streaming: bool = False) -> "Any":
    """A dataset from the HF hub (or the local HF cache when offline), optionally streamed."""
    import datasets

    try:
        return datasets.load_dataset(name, streaming=streaming)
    except Exception as err:  # the hub raises many types: connection, missing repo, offline mode
        raise RuntimeError(
            f"could not load HF dataset {name!r} ({type(err).__name__}: {err}). It needs network access to "
            f"the hub or a copy in the HF cache; offline, use source 'folder:<path>' or 'digits'"
        ) from err
