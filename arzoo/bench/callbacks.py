"""Callback the harness adds to every training run it launches: progress and training throughput."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning as L


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)  # the harness polls this file; never let it read half a write


class BenchProgress(L.Callback):
    """Writes `progress.json` (step, max_steps, elapsed) while training and `train_stats.json` at the end."""

    def __init__(self, folder: str, every_n_steps: int = 5) -> None:
        self.folder = Path(folder)
        self.every_n_steps = every_n_steps
        self._start = 0.0
        self._images = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start = time.perf_counter()
        self._images = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict) and "image" in batch:
            self._images += len(batch["image"])
        elif isinstance(batch, dict) and "tokens" in batch:
            self._images += len(batch["tokens"])
        if trainer.global_step % self.every_n_steps == 0:
            _write_json(self.folder / "progress.json", self._stats(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        stats = self._stats(trainer)
        stats["train_images_per_s"] = self._images / max(stats["elapsed_s"], 1e-9)
        _write_json(self.folder / "progress.json", stats)
        _write_json(self.folder / "train_stats.json", stats)

    def _stats(self, trainer: L.Trainer) -> dict[str, Any]:
        return {
            "step": trainer.global_step,
            "max_steps": trainer.max_steps,
            "images_seen": self._images,
            "elapsed_s": time.perf_counter() - self._start,
        }
