"""The embedded digits classifier: a small CNN trained once on arzoo's digits training split, cached.

It is the `digits` feature network of `GenerativeMetrics`: its penultimate activations (128-d) are
the FID / precision-recall features, its logits give the Inception Score and the classifier
accuracy of class-conditional samples. Training is seeded and single-threaded, so two trainings
with the same settings give bit-identical weights; the result is cached on disk keyed by a hash
of everything that determines it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# Bump when the architecture or the training procedure changes: it is part of the cache key.
CLASSIFIER_VERSION = 1
NET_SIZE = 32  # the network always sees 32x32 (the digits are 8x8 upscaled; 32 keeps stroke detail)


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Everything that determines the trained weights (hashed into the cache file name)."""

    image_size: int = 32
    width: int = 32
    num_features: int = 128
    epochs: int = 12
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 2  # random translation (pixels at 32x32) as augmentation
    seed: int = 0
    val_fraction: float = 0.1  # ImageDataModule's defaults: the held-out split is its val split
    split_seed: int = 0

    def key(self) -> str:
        """Short hash of the config and the classifier version."""
        payload = json.dumps({"version": CLASSIFIER_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


class DigitsClassifier(nn.Module):
    """CNN on (B, 3, S, S) images in [-1, 1]: `forward` gives (features (B, d), logits (B, 10))."""

    def __init__(self, image_size: int = 32, width: int = 32, num_features: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4 pixels, got {image_size}")
        self.image_size = image_size
        self.num_features = num_features  # torchmetrics reads this attribute
        self.num_classes = num_classes
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 4, stride=2, padding=1), nn.ReLU(),  # 16x16
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(2 * w, 4 * w, 4, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(4 * w * 16, num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(num_features, num_classes)

    def prepare(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Resize to the network's 32x32 (antialiased bilinear) when the images have another size."""
        if images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            raise ValueError(f"expected images (B, 3, H, W), got shape {tuple(images_B3HW.shape)}")
        x = images_B3HW.float()
        if x.shape[-2:] != (NET_SIZE, NET_SIZE):
            x = F.interpolate(x, size=(NET_SIZE, NET_SIZE), mode="bilinear", align_corners=False, antialias=True)
        return x

    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(self.prepare(images_B3HW))
        return features, self.head(features)


@contextmanager
def _single_thread() -> Iterator[None]:
    """One intra-op thread: CPU reductions then run in a fixed order, so training is bit-reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digits_splits(config: DigitsClassifierConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (images, labels) of ImageDataModule's digits train and val ("test") splits at config.image_size."""
    from arzoo.data import ImageDataModule  # lazy: PIL/sklearn only when training

    dm = ImageDataModule(
        source="digits", image_size=config.image_size, val_fraction=config.val_fraction, split_seed=config.split_seed
    )
    dm.setup()
    out = {}
    for name, ds in (("train", dm.train_set), ("test", dm.val_set)):
        out[name] = (ds.images, ds.labels)  # TensorImageDataset: the tensors themselves (no flip)
    return out


@torch.no_grad()
def classifier_accuracy(
    model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    """Fraction of `images` whose argmax logit equals `labels`."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        _, logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size].to(logits.device)).sum())
    return correct / max(1, len(images))


def _shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by a random offset in [-max_shift, max_shift]^2, padding with the background (-1)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # -1 is the black background
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    cols = (dx[:, None] + torch.arange(w)[None]).view(b, 1, 1, w).expand(b, 3, h + 2 * max_shift, w)
    rows = (dy[:, None] + torch.arange(h)[None]).view(b, 1, h, 1).expand(b, 3, h, w)
    tall = padded.gather(3, cols)  # (b, 3, h + 2m, w): the chosen columns
    return tall.gather(2, rows)


def train_digits_classifier(config: DigitsClassifierConfig) -> tuple[DigitsClassifier, dict[str, Any]]:
    """Train from scratch (seeded, single-threaded); returns the model (eval mode) and its info."""
    start = time.perf_counter()
    splits = digits_splits(config)
    train_x, train_y = splits["train"]
    test_x, test_y = splits["test"]
    with _single_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # parameter init
        model = DigitsClassifier(config.image_size, config.width, config.num_features)
        gen = torch.Generator().manual_seed(config.seed)
        # Network-size inputs once, so augmentation and training run at 32x32 whatever image_size is.
        train_x = model.prepare(train_x)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = (len(train_x) + config.batch_size - 1) // config.batch_size
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch, pct_start=0.2
        )
        model.train()
        for _ in range(config.epochs):
            order = torch.randperm(len(train_x), generator=gen)
            for i in range(steps_per_epoch):
                idx = order[i * config.batch_size : (i + 1) * config.batch_size]
                x = _shift(train_x[idx], config.max_shift, gen)
                _, logits = model(x)
                loss = F.cross_entropy(logits, train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        test_accuracy = classifier_accuracy(model, test_x, test_y)
    info = {
        "test_accuracy": test_accuracy,
        "num_test": len(test_x),
        "num_train": len(train_x),
        "train_seconds": time.perf_counter() - start,
        "torch_version": str(torch.__version__),
    }
    return model, info


def default_cache_dir() -> Path:
    """`$ARZOO_CACHE`, else `$XDG_CACHE_HOME/arzoo`, else `~/.cache/arzoo`."""
    if os.environ.get("ARZOO_CACHE"):
        return Path(os.environ["ARZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "arzoo"


def cache_path(config: DigitsClassifierConfig, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the classifier for `config` is (or will be) cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"digits_classifier_{config.image_size}_{config.key()}.pt"


def _save_atomic(payload: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(file: Path, explicit: bool) -> dict[str, Any] | None:
    """The saved payload; an unreadable cache file is retrained (warned), an unreadable given file is an error."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or not {"state_dict", "info", "config"} <= payload.keys():
            raise ValueError(f"expected a dict with state_dict, info and config, got {type(payload).__name__}")
        return payload
    except Exception as err:  # unpickling, truncation, wrong format: all mean "not a usable classifier file"
        if explicit:
            raise ValueError(f"cannot read the digits classifier file {file}: {type(err).__name__}: {err}") from err
        warnings.warn(f"ignoring unreadable cached digits classifier {file} ({type(err).__name__}); retraining")
        return None


def load_digits_classifier(
    image_size: int = 32,
    cache_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    retrain: bool = False,
    **config_overrides: Any,
) -> tuple[DigitsClassifier, dict[str, Any]]:
    """The cached classifier for `image_size` (trained and cached on first use), in eval mode, and its info.

    `path` reads (or writes) that exact file instead of the cache; info holds test_accuracy,
    train_seconds, path, trained_now (whether this call trained it) and the config.
    """
    config = DigitsClassifierConfig(image_size=image_size, **config_overrides)
    file = Path(path) if path is not None else cache_path(config, cache_dir)
    payload = _read(file, explicit=path is not None) if file.is_file() and not retrain else None
    if payload is not None:
        saved = payload.get("config", {})
        if saved != asdict(config):
            raise ValueError(
                f"digits classifier file {file} was trained with config {saved}, but {asdict(config)} was asked for; "
                "delete the file or pass matching settings"
            )
        model = DigitsClassifier(config.image_size, config.width, config.num_features)
        model.load_state_dict(payload["state_dict"])
        model.eval()
        return model, {**payload["info"], "path": str(file), "trained_now": False, "config": saved}
    model, info = train_digits_classifier(config)
    payload = {"state_dict": model.state_dict(), "info": info, "config": asdict(config), "version": CLASSIFIER_VERSION}
    _save_atomic(payload, file)
    return model, {**info, "path": str(file), "trained_now": True, "config": asdict(config)}
