"""`SampleQuality`: FID / IS / precision-recall / classifier accuracy of a generator at validation end.

The same `GenerativeMetrics` object as the benchmark harness. Real statistics come from the
first full validation epoch's batches (sanity-check batches are skipped) and are kept; at the
end of each scored validation epoch the generator samples `num_samples` images through its
`sample_images(labels, generator=..., **sample_kwargs)` (labels cycle over the classes) and
the results are logged as `<prefix>fid`, `<prefix>is_mean`, ... .
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch

from arzoo.metrics.generative import GenerativeMetrics

LOGGED = ("fid", "is_mean", "is_std", "precision", "recall", "class_accuracy")


class SampleQuality(L.Callback):
    """Score `num_samples` generated images against the validation images every `every_n_epochs` validations."""

    def __init__(
        self,
        num_samples: int = 500,
        batch_size: int = 100,
        feature: str = "digits",
        feature_path: str | None = None,
        max_real: int | None = None,
        every_n_epochs: int = 1,
        seed: int = 0,
        prefix: str = "val/",
        sample_kwargs: dict[str, Any] | None = None,
        metrics: GenerativeMetrics | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 2 or batch_size < 1 or every_n_epochs < 1:
            raise ValueError(
                f"need num_samples >= 2, batch_size >= 1, every_n_epochs >= 1; "
                f"got {num_samples}, {batch_size}, {every_n_epochs}"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.feature = feature
        self.feature_path = feature_path
        self.max_real = max_real
        self.every_n_epochs = every_n_epochs
        self.seed = seed
        self.prefix = prefix
        self.sample_kwargs = dict(sample_kwargs or {})
        self.metrics = metrics
        self._real_done = False
        self._validations = 0
        self.last: dict[str, Any] = {}

    def _build(self, images: torch.Tensor, module: Any) -> GenerativeMetrics:
        if self.metrics is None:
            self.metrics = GenerativeMetrics(
                feature=self.feature,
                image_size=images.shape[-1],
                num_classes=int(getattr(module, "num_classes", 0) or 0),
                device=module.device,
                feature_path=self.feature_path,
                cache_dir=os.environ.get("ARZOO_CACHE"),
            )
        else:
            self.metrics.to(module.device)
        return self.metrics

    def on_validation_batch_end(
        self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or self._real_done:
            return
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        metrics = self._build(images, module)
        if self.max_real is not None:
            images = images[: max(0, self.max_real - metrics.num_real)]
        metrics.update_real(images)

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        self._real_done = self._real_done or self.metrics is not None
        if self.metrics is None or (self._validations - 1) % self.every_n_epochs != 0:
            return
        metrics = self.metrics
        metrics.reset_fake()
        num_classes = int(getattr(module, "num_classes", 0) or 0)
        labels = torch.arange(self.num_samples) % max(1, num_classes)
        score_labels = metrics.class_accuracy is not None and num_classes == metrics.net.num_classes
        # Different ranks draw different samples; torchmetrics gathers the states in compute().
        offset = self.seed + 1000003 * trainer.global_rank
        for i, start in enumerate(range(0, self.num_samples, self.batch_size)):
            chunk = labels[start : start + self.batch_size].to(module.device)
            generator = torch.Generator(device=module.device).manual_seed(offset + i)
            images = module.sample_images(chunk, generator=generator, **self.sample_kwargs)
            metrics.update_fake(images, chunk if score_labels else None)
        self.last = metrics.compute()
        values = {f"{self.prefix}{k}": float(self.last[k]) for k in LOGGED if self.last.get(k) is not None}
        module.log_dict(values, sync_dist=False, rank_zero_only=True)
