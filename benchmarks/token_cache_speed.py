"""Generator training speed from images (tokenizer every step) vs from a token cache (`arzoo tokenize`).

    python benchmarks/token_cache_speed.py [--config recipes/digits/raster.yaml] [--steps 40] [--warmup 5]

Writes the recipe's token cache into a temporary folder, then runs `trainer.fit` twice on the
recipe's model and data (built by the same parser as `arzoo fit`; no logger, checkpoints,
callbacks or validation), timing the optimizer steps after a warm-up. Prints a Markdown table
with the load average: the machines are shared. Needs the recipe's tokenizer checkpoint.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

ROOT = Path(__file__).resolve().parents[1]


class StepTimer(L.Callback):
    """Wall time of every training batch (forward, backward, optimizer step, data loading included)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: object) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.times.append(now - self._last)
        self._last = now


def build(config: str, steps: int, token_cache: str | None) -> tuple[L.Trainer, Any, Any, StepTimer]:
    """Model, data and a bare trainer from the recipe, as `arzoo fit` would build them."""
    from arzoo.cli.lightning_cli import ArzooCLI, ArzooTrainer

    overrides = ["--trainer.max_steps", str(steps), "--trainer.logger", "false", "--trainer.callbacks", "[]",
                 "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
                 "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    if token_cache:
        overrides += ["--data.init_args.token_cache", token_cache]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended")
        cli = ArzooCLI(L.LightningModule, None, trainer_class=ArzooTrainer, subclass_mode_model=True,
                       subclass_mode_data=True, parser_kwargs={"parser_mode": "omegaconf+"},
                       auto_configure_optimizers=False, save_config_callback=None, run=False,
                       args=["--config", config, *overrides])
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    return cli.trainer, cli.model, cli.datamodule, timer


def steps_per_second(config: str, steps: int, warmup: int, token_cache: str | None) -> tuple[float, float]:
    """(median, mean) optimizer steps/s after `warmup` steps."""
    trainer, model, data, timer = build(config, steps + warmup, token_cache)
    trainer.fit(model, data)
    measured = timer.times[warmup:]
    return 1.0 / statistics.median(measured), len(measured) / sum(measured)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "recipes/digits/raster.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args = parser.parse_args()
    from arzoo.cli.tokenize import tokenize

    sys.argv = sys.argv[:1]
    with tempfile.TemporaryDirectory(prefix="arzoo-token-cache-") as tmp:
        start = time.perf_counter()
        cache = tokenize(args.config, out=str(Path(tmp) / "cache"))
        tokenize_s = time.perf_counter() - start
        load_before = os.getloadavg()
        images = steps_per_second(args.config, args.steps, args.warmup, None)
        cached = steps_per_second(args.config, args.steps, args.warmup, str(cache))
        load_after = os.getloadavg()
    print(f"\n{args.config}: {args.steps} timed steps after {args.warmup} warm-up, torch threads "
          f"{torch.get_num_threads()}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print(f"one-off `arzoo tokenize`: {tokenize_s:.1f} s\n")
    print("| training data | steps/s (median) | steps/s (mean) |\n|---|---|---|")
    print(f"| images, tokenizer every step | {images[0]:.2f} | {images[1]:.2f} |")
    print(f"| token cache | {cached[0]:.2f} | {cached[1]:.2f} |")
    print(f"\nspeed-up (median): {cached[0] / images[0]:.2f}x")


if __name__ == "__main__":
    main()
