"""`GenerativeMetrics`: FID, Inception Score, precision/recall and classifier accuracy on one feature net.

The feature network runs once per batch; its features and logits are handed to torchmetrics'
`FrechetInceptionDistance` / `InceptionScore` through a pass-through `feature=` module. With a
custom module torchmetrics calls it on exactly what `update` receives (FID converts to uint8 only
for its built-in Inception, IS converts whenever `normalize=True`), so both run with
`normalize=False` and get the precomputed (B, d) features / (B, C) logits unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.utilities import dim_zero_cat

from arzoo.metrics.features import FeatureNet, build_feature_net


class _Precomputed(nn.Module):
    """The identity, with the `num_features` torchmetrics reads: metrics get features computed elsewhere."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (float64, clamped at 0) between rows of a and b."""
    a, b = a.double(), b.double()
    d2 = a.square().sum(1, keepdim=True) + b.square().sum(1)[None] - 2.0 * a @ b.T
    return d2.clamp_min_(0.0)


def _chunk_rows(n_cols: int, budget: int = 1 << 24) -> int:
    """Rows per chunk so a (rows, n_cols) float64 block stays around `budget` elements (128 MiB)."""
    return max(1, budget // max(1, n_cols))


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest other row (the k-NN ball of Kynkäänniemi et al.)."""
    n = len(features)
    if n <= k:
        raise ValueError(f"k-NN radii with nearest_k={k} need more than {k} samples, got {n}")
    out = []
    step = _chunk_rows(n)
    for start in range(0, n, step):
        d2 = _squared_distances(features[start : start + step], features)
        out.append(d2.topk(k + 1, dim=1, largest=False).values[:, -1])  # +1: the row itself is at distance 0
    return torch.cat(out)


def manifold_coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Fraction of `queries` inside at least one ball (centre in `manifold`, squared radius in `radii`)."""
    # Ties within float64 rounding count as inside: an exact copy of a point must be inside its ball.
    tol = 1e-10 * float(manifold.double().square().sum(1).max()) if len(manifold) else 0.0
    inside = []
    step = _chunk_rows(len(manifold))
    for start in range(0, len(queries), step):
        d2 = _squared_distances(queries[start : start + step], manifold)
        inside.append((d2 <= radii[None].double() + tol).any(dim=1))
    return torch.cat(inside).double().mean()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, nearest_k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real` features (N, d)."""
    precision = manifold_coverage(real, knn_radii(real, nearest_k), fake)
    recall = manifold_coverage(fake, knn_radii(fake, nearest_k), real)
    return float(precision), float(recall)


class PrecisionRecall(Metric):
    """k-NN precision/recall on features; keeps the real features across `reset()` unless told otherwise."""

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, nearest_k: int = 3, reset_real_features: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if nearest_k < 1:
            raise ValueError(f"nearest_k must be >= 1, got {nearest_k}")
        self.nearest_k = nearest_k
        self.reset_real_features = reset_real_features
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, real: bool) -> None:
        """Store (B, d) features of real or generated images."""
        (self.real_features if real else self.fake_features).append(features.detach().float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        p, r = precision_recall(real, fake, self.nearest_k)
        return torch.tensor(p), torch.tensor(r)

    def reset(self) -> None:
        """Forget generated features (and real ones when reset_real_features is True)."""
        real = list(self.real_features)
        super().reset()
        if not self.reset_real_features:
            self.real_features = real


class ClassAccuracy(Metric):
    """Fraction of images whose argmax logit is the label they were generated for."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits_BC: torch.Tensor, labels_B: torch.Tensor) -> None:
        self.correct += (logits_BC.argmax(-1) == labels_B.to(logits_BC.device)).sum()
        self.total += labels_B.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.double() / self.total.clamp_min(1)


class GenerativeMetrics:
    """FID, IS, precision/recall and classifier accuracy of generated images against a real set.

    Images are (B, 3, H, W) float in [-1, 1]. Real statistics survive `reset_fake()`, so several
    generators are scored against the same real set. `feature` is `digits` (the embedded digits
    classifier, trained and cached on first use), `inception` (torch-fidelity's FID Inception from a
    local weights file: `feature_path` or `$TORCH_HOME/hub/checkpoints`) or a `FeatureNet`.
    """

    def __init__(
        self,
        feature: str | FeatureNet = "digits",
        image_size: int = 32,
        num_classes: int = 10,
        device: str | torch.device = "cpu",
        feature_path: str | os.PathLike | None = None,
        nearest_k: int = 3,
        cache_dir: str | os.PathLike | None = None,
        is_splits: int = 10,
        seed: int = 0,
        batch_size: int = 256,
    ) -> None:
        self.device = torch.device(device)
        net = build_feature_net(feature, image_size=image_size, path=feature_path, cache_dir=cache_dir)
        self.net = net.to(self.device)
        self.num_classes = num_classes
        self.seed = seed
        self.batch_size = batch_size
        self.fid = FrechetInceptionDistance(
            feature=_Precomputed(self.net.num_features), reset_real_features=False, normalize=False
        ).to(self.device)
        self.inception_score: Metric | None = None
        if self.net.num_classes > 0:
            import warnings

            from torchmetrics.image.inception import InceptionScore

            with warnings.catch_warnings():  # "will save all extracted features": intended, logits are small
                warnings.filterwarnings("ignore", message=".*save all extracted features.*")
                self.inception_score = InceptionScore(
                    feature=_Precomputed(self.net.num_classes), splits=is_splits, normalize=False
                ).to(self.device)
        self.pr = PrecisionRecall(nearest_k, reset_real_features=False).to(self.device)
        # Classifier accuracy needs logits over the dataset's own classes (the digits net, not Inception).
        self.class_accuracy: ClassAccuracy | None = None
        if self.net.class_logits and num_classes > 0:
            if num_classes != self.net.num_classes:
                raise ValueError(
                    f"num_classes={num_classes} but the {self.net.name!r} classifier has {self.net.num_classes} classes"
                )
            self.class_accuracy = ClassAccuracy().to(self.device)

    @property
    def feature_info(self) -> dict[str, Any]:
        """name, num_features, test_accuracy (digits; None for inception), path of the weights, and more."""
        return dict(self.net.info)

    def _check(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(images_B3HW) or images_B3HW.ndim != 4 or images_B3HW.shape[1] != 3:
            shape = tuple(images_B3HW.shape) if torch.is_tensor(images_B3HW) else type(images_B3HW).__name__
            raise ValueError(f"expected images (B, 3, H, W), got {shape}")
        if not images_B3HW.is_floating_point():
            raise TypeError(
                f"expected float images in [-1, 1], got dtype {images_B3HW.dtype} (uint8? use x / 127.5 - 1)"
            )
        # All non-negative and above 2 is the [0, 255] convention; a decoder overshooting [-1, 1] (even a lot,
        # as random tokens can) is clamped instead: saved images are clamped too, so score what a user sees.
        if images_B3HW.numel() and float(images_B3HW.min()) >= 0.0 and float(images_B3HW.max()) > 2.0:
            raise ValueError(
                f"expected images in [-1, 1], got values in [{float(images_B3HW.min()):.3g}, "
                f"{float(images_B3HW.max()):.3g}] (images in [0, 255]? use x / 127.5 - 1)"
            )
        return images_B3HW.to(self.device).clamp(-1.0, 1.0)

    @torch.no_grad()
    def features(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features, logits) of the feature network for images in [-1, 1], in chunks of batch_size."""
        images = self._check(images_B3HW)
        feats, logits = [], []
        for start in range(0, len(images), self.batch_size):
            f, l = self.net(images[start : start + self.batch_size])
            feats.append(f.float())
            logits.append(l.float() if l is not None else None)
        if not feats:
            return images.new_zeros(0, self.net.num_features), None
        return torch.cat(feats), (torch.cat(logits) if logits[0] is not None else None)

    def update_real(self, images_B3HW: torch.Tensor) -> None:
        """Add real images (float in [-1, 1]) to the reference statistics."""
        feats, _ = self.features(images_B3HW)
        if len(feats):
            self.fid.update(feats, real=True)
            self.pr.update(feats, real=True)

    def update_fake(self, images_B3HW: torch.Tensor, labels_B: torch.Tensor | None = None) -> None:
        """Add generated images; `labels_B` (the classes they were generated for) feed the classifier accuracy."""
        feats, logits = self.features(images_B3HW)
        if not len(feats):
            return
        self.fid.update(feats, real=False)
        self.pr.update(feats, real=False)
        if self.inception_score is not None and logits is not None:
            self.inception_score.update(logits)
        if labels_B is not None and self.class_accuracy is not None:
            labels = torch.as_tensor(labels_B, dtype=torch.long, device=self.device).reshape(-1)
            if len(labels) != len(feats):
                raise ValueError(f"got {len(labels)} labels for {len(feats)} images")
            if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= self.net.num_classes):
                raise ValueError(
                    f"labels must be class ids in [0, {self.net.num_classes}), got {labels.unique().tolist()}"
                )
            self.class_accuracy.update(logits, labels)

    @property
    def num_real(self) -> int:
        """Real images seen (kept across reset_fake)."""
        return int(self.fid.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        """Generated images seen since the last reset_fake."""
        return int(self.fid.fake_features_num_samples)

    def compute(self) -> dict[str, Any]:
        """fid, is_mean, is_std, precision, recall, class_accuracy (None without labels), num_real, num_fake."""
        k = self.pr.nearest_k
        if self.num_real <= k or self.num_fake <= k:
            raise RuntimeError(
                f"need more than nearest_k={k} real and generated images (and >= 2 for FID); "
                f"got num_real={self.num_real}, num_fake={self.num_fake}"
            )
        out: dict[str, Any] = {"fid": float(self.fid.compute())}
        out["is_mean"] = out["is_std"] = None
        if self.inception_score is not None:
            # torchmetrics shuffles the logits with the global RNG before splitting: seed a forked RNG
            # so the score is reproducible and the caller's random stream is untouched.
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                is_mean, is_std = self.inception_score.compute()
            out["is_mean"], out["is_std"] = float(is_mean), float(is_std)
        precision, recall = self.pr.compute()
        out["precision"], out["recall"] = float(precision), float(recall)
        acc = self.class_accuracy
        out["class_accuracy"] = float(acc.compute()) if acc is not None and int(acc.total) > 0 else None
        out["num_real"], out["num_fake"] = self.num_real, self.num_fake
        return out

    def reset_fake(self) -> None:
        """Forget the generated images; the real statistics stay."""
        self.fid.reset()  # reset_real_features=False keeps the real sums
        self.pr.reset()
        if self.inception_score is not None:
            self.inception_score.reset()
        if self.class_accuracy is not None:
            self.class_accuracy.reset()

    def reset(self) -> None:
        """Forget everything, real statistics included."""
        self.fid.reset_real_features = self.pr.reset_real_features = True
        try:
            self.reset_fake()
        finally:
            self.fid.reset_real_features = self.pr.reset_real_features = False

    def to(self, device: str | torch.device) -> "GenerativeMetrics":
        """Move the feature network and all metric states."""
        self.device = torch.device(device)
        for module in (self.net, self.fid, self.inception_score, self.pr, self.class_accuracy):
            if module is not None:
                module.to(self.device)
        return self
