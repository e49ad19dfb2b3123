"""Feature networks for FID / IS / precision-recall, chosen by name: `digits` or `inception`.

Every feature network takes images (B, 3, H, W) as float in [-1, 1] (arzoo's image convention)
and returns `(features (B, d), logits (B, C) or None)`; it has `num_features` (d), `num_classes`
(C, 0 without logits) and `class_logits` (True when the logits are the dataset's classes, so
the classifier accuracy of class-conditional samples makes sense).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS}"
FEATURE_NETS = ("digits", "inception")


class FeatureNet(nn.Module):
    """A frozen network mapping images in [-1, 1] to (features, logits-or-None)."""

    num_features: int
    num_classes: int
    class_logits: bool

    def __init__(self, name: str, net: nn.Module, num_features: int, num_classes: int, class_logits: bool) -> None:
        super().__init__()
        self.name = name
        self.net = net.eval().requires_grad_(False)
        self.num_features = num_features
        self.num_classes = num_classes
        self.class_logits = class_logits
        self.info: dict[str, Any] = {}

    def train(self, mode: bool = True) -> "FeatureNet":
        """Always in eval mode: a metric's features must not depend on the trainer's mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.net(images_B3HW)


class _InceptionAdapter(nn.Module):
    """[-1, 1] floats -> the uint8 [0, 255] images torch-fidelity's Inception expects -> (pool 2048, logits 1008)."""

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception

    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        uint8 = ((images_B3HW.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        # forward() returns only the first requested feature; this torchmetrics method returns all of
        # them from one pass (pool features and logits), so IS needs no second Inception pass.
        pool, logits = self.inception._torch_fidelity_forward(uint8)
        return pool.reshape(len(uint8), -1), logits.reshape(len(uint8), -1)


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `path` if given, else `$TORCH_HOME/hub/checkpoints/<file>`; never downloads."""
    if path is not None:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / INCEPTION_WEIGHTS
        if not file.is_file():
            raise FileNotFoundError(
                f"Inception weights not found at {file} (feature_path={str(path)!r}); expected the file "
                f"{INCEPTION_WEIGHTS} (download it once from {INCEPTION_URL}). arzoo never downloads at run time."
            )
        return file
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    file = folder / INCEPTION_WEIGHTS
    if not file.is_file():
        raise FileNotFoundError(
            f"Inception weights {INCEPTION_WEIGHTS} are missing: looked in {folder} ($TORCH_HOME/hub/checkpoints). "
            f"Download it once from {INCEPTION_URL} and put it there, or pass its location as feature_path. "
            "arzoo never downloads at run time; feature='digits' needs no download."
        )
    return file


def inception_feature_net(path: str | os.PathLike | None = None) -> FeatureNet:
    """torchmetrics/torch-fidelity's FID Inception (2048-d pool features, 1008 logits) from a local weights file."""
    weights = find_inception_weights(path)
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights),
        )
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"feature='inception' needs torch-fidelity ({err}); install it with `pip install 'arzoo[metrics]'` "
            "or `pip install torch-fidelity scipy`"
        ) from err
    net = FeatureNet("inception", _InceptionAdapter(inception), num_features=2048, num_classes=1008, class_logits=False)
    net.info = {"name": "inception", "num_features": 2048, "test_accuracy": None, "path": str(weights)}
    return net


def digits_feature_net(
    image_size: int = 32,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    **config_overrides: Any,
) -> FeatureNet:
    """The embedded digits classifier (trained on first use, then cached) as a feature network."""
    from arzoo.metrics.digits_classifier import load_digits_classifier

    model, info = load_digits_classifier(image_size, cache_dir=cache_dir, path=path, **config_overrides)
    net = FeatureNet("digits", model, model.num_features, model.num_classes, class_logits=True)
    net.info = {
        "name": "digits",
        "num_features": model.num_features,
        "test_accuracy": info["test_accuracy"],
        "num_test": info["num_test"],
        "train_seconds": info["train_seconds"],
        "trained_now": info["trained_now"],
        "path": info["path"],
    }
    return net


def build_feature_net(
    name: str | nn.Module,
    image_size: int = 32,
    path: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    **kwargs: Any,
) -> FeatureNet:
    """A feature network by name (`digits`, `inception`), or a FeatureNet passed through unchanged."""
    if isinstance(name, FeatureNet):
        return name
    if isinstance(name, nn.Module):
        raise TypeError(
            "a custom feature network must be an arzoo.metrics.FeatureNet (returning (features, logits)); "
            f"got {type(name).__name__}: wrap it as FeatureNet(name, net, num_features, num_classes, class_logits)"
        )
    if name == "digits":
        return digits_feature_net(image_size, path=path, cache_dir=cache_dir, **kwargs)
    if name == "inception":
        return inception_feature_net(path)
    raise ValueError(f"unknown feature network {name!r}; expected one of {FEATURE_NETS} or a FeatureNet")
