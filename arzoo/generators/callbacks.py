"""Callbacks for generator training."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from arzoo.data.image_grid import save_image_grid
from arzoo.generators.base import BaseGenerator


class SampleGrid(L.Callback):
    """Every `every_n_steps` optimizer steps (and at the end of fit), save a grid of samples.

    Class-conditional grids have one row per class. Writes `samples/step_<N>.png` and
    `samples.png` (the latest) into the run folder, with a fixed seed so grids are comparable.
    """

    def __init__(
        self,
        every_n_steps: int = 500,
        per_class: int = 8,
        max_classes: int = 10,
        cfg: float = 2.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.per_class = per_class
        self.max_classes = max_classes
        self.kwargs = dict(cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p)
        self.seed = seed
        self._last_step = -1  # with gradient accumulation several batches share one global step

    def _save(self, trainer: L.Trainer, module: BaseGenerator) -> None:
        if not trainer.is_global_zero or module.tokenizer is None or trainer.global_step == self._last_step:
            return
        self._last_step = trainer.global_step
        classes = min(module.num_classes, self.max_classes)
        labels = torch.arange(classes).repeat_interleave(self.per_class)
        generator = torch.Generator(device=module.device).manual_seed(self.seed)
        images = module.sample_images(labels, generator=generator, **self.kwargs)
        run = module.run_dir()
        save_image_grid(images, run / "samples" / f"step_{trainer.global_step}.png", nrow=self.per_class, upscale=2)
        path = save_image_grid(images, run / "samples.png", nrow=self.per_class, upscale=2)
        module.print(f"samples at step {trainer.global_step} (one row per class): {path}")

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, module)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if trainer.global_step % self.every_n_steps != 0:
            self._save(trainer, module)
