"""Training safety callbacks that `arzoo fit` adds to every run: a non-finite loss guard and RNG resume state.

Both work for any LightningModule (generators and `TokenizerModule` alike).
"""

from __future__ import annotations

import math
import random
from typing import Any, Mapping

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import numpy as np
import torch


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss (or the weights about to be saved) stopped being finite."""


def describe_batch(batch: Any, prefix: str = "") -> list[str]:
    """One line per tensor of a (nested) batch: shape and min / max / mean, with the count of non-finite values."""
    if isinstance(batch, torch.Tensor):
        name = prefix or "batch"
        if batch.numel() == 0:
            return [f"{name}: empty {tuple(batch.shape)}"]
        values = batch.detach()
        if values.is_floating_point() or values.is_complex():
            values = values.float()
            finite = torch.isfinite(values)
            bad = int((~finite).sum())
            good = values[finite]
            if len(good) == 0:
                return [f"{name} {tuple(batch.shape)}: no finite values ({bad} non-finite)"]
            return [
                f"{name} {tuple(batch.shape)}: min {good.min().item():.4g}, max {good.max().item():.4g}, "
                f"mean {good.mean().item():.4g}, non-finite values {bad}"
            ]
        return [f"{name} {tuple(batch.shape)}: range {values.min().item()}..{values.max().item()}"]
    if isinstance(batch, Mapping):
        return [line for k, v in batch.items() for line in describe_batch(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(batch, (list, tuple)):
        return [line for i, v in enumerate(batch) for line in describe_batch(v, f"{prefix}[{i}]")]
    return []


class NonFiniteGuard(L.Callback):
    """Stop training at the first non-finite loss, before the optimizer step can spoil the weights.

    The error names the step, the loss and statistics of the offending batch. Checkpoints written
    earlier stay as they are; a checkpoint whose weights are not finite is refused instead of
    overwriting the last good one.
    """

    def __init__(self) -> None:
        super().__init__()
        self._batch: Any = None
        self._batch_idx = -1

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch, self._batch_idx = batch, batch_idx  # a reference only: statistics are computed on failure

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._batch = None

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        bad = not bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:  # every rank must stop together, or the others wait in all-reduce forever
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return
        stats = "\n  ".join(describe_batch(self._batch)) or "(no tensors in the batch)"
        value = loss.detach().float().reshape(-1)[0].item() if loss.numel() else math.nan
        rank_zero_warn(f"statistics of the batch with a non-finite loss (step {trainer.global_step}):\n  {stats}")
        raise NonFiniteLossError(
            f"non-finite training loss {value} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {self._batch_idx}; its statistics are printed above); training stopped before the optimizer "
            f"step, so checkpoints already written (e.g. last.ckpt) hold the last finite weights. Check the data "
            "for non-finite pixels, lower the learning rate or raise warmup_steps, clip gradients "
            "(trainer.gradient_clip_val) or use bf16-mixed instead of 16-mixed precision"
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # parameters only: buffers may hold -inf on purpose (VAR's additive attention mask)
        params = {name for name, _ in pl_module.named_parameters()}
        bad = [
            name
            for name, value in checkpoint.get("state_dict", {}).items()
            if name in params and isinstance(value, torch.Tensor) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())
        ]
        if bad:
            raise NonFiniteLossError(
                f"refusing to write a checkpoint at step {trainer.global_step}: {len(bad)} weight tensor(s) are "
                f"not finite ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); the previous checkpoint is "
                "kept. Lower the learning rate or clip gradients (trainer.gradient_clip_val)."
            )


def _numpy_state() -> dict[str, Any]:
    # np.random.get_state() holds an ndarray, which torch.load(weights_only=True) refuses: store tensors
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state: Mapping[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["name"], keys, state["pos"], state["has_gauss"], state["gauss"]))


class RNGResumeState(L.Callback):
    """Save the global torch / CUDA / numpy / Python RNG states in checkpoints and restore them on resume.

    Restored when training starts (after the checkpoint and the data loaders are set up), so random
    draws during training — label dropout, flips — continue exactly as in an uninterrupted run.
    States are those of the process that writes the checkpoint (rank 0 under DDP).
    """

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        _set_numpy_state(state["numpy"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


class EmptyDataGuard(L.Callback):
    """Stop a fit whose first training epoch read no image at all (every file unreadable), before any
    checkpoint is written: the data module names the source and what it skipped."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check = getattr(trainer.datamodule, "check_something_was_read", None)
        if callable(check):
            check("train")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check = getattr(trainer.datamodule, "check_something_was_read", None)
        # only for `arzoo validate / test`: inside a fit, an unreadable validation set must not stop training
        if callable(check) and trainer.state.fn in ("validate", "test"):
            check("eval")


def default_callbacks() -> list[L.Callback]:
    """The callbacks `arzoo fit` adds unless the configuration already has one of the same class."""
    return [NonFiniteGuard(), RNGResumeState(), EmptyDataGuard()]
