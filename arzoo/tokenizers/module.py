"""`TokenizerModule`: stage-1 training of any `Tokenizer` (reconstruction + quantiser losses)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Mapping

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics.image import PeakSignalNoiseRatio

from arzoo.checkpoint_io import check_state_dict_fits
from arzoo.data.image_grid import save_image_grid
from arzoo.metrics.codebook import CodebookUsage
from arzoo.optim import check_optimizer_args, warmup_cosine_scheduler
from arzoo.tokenizers.base import Tokenizer, build_tokenizer


class TokenizerModule(L.LightningModule):
    """Trains a tokenizer: `rec_loss(recon, image) + codebook loss + commitment loss`.

    Logs the losses, PSNR and codebook usage, and writes `recon.png` (originals in one row,
    their reconstructions in the row below) into the run folder after every validation.
    The checkpoint stores the tokenizer's spec, so `arzoo.tokenizers.load_tokenizer(path)` rebuilds it.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        rec_loss: Literal["l1", "l2", "l1+l2"] = "l2",
        grid_images: int = 16,
    ) -> None:
        super().__init__()
        if isinstance(tokenizer, Mapping):  # rebuilt from a checkpoint's hyper-parameters
            tokenizer = build_tokenizer(tokenizer)
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be an arzoo Tokenizer, got {type(tokenizer).__name__}")
        check_optimizer_args(lr, betas, weight_decay, warmup_steps, min_lr_ratio)
        if rec_loss not in ("l1", "l2", "l1+l2"):
            raise ValueError(f"rec_loss must be 'l1', 'l2' or 'l1+l2', got {rec_loss!r}")
        self.save_hyperparameters(ignore=["tokenizer"])
        self.hparams["tokenizer"] = tokenizer.spec()  # plain data: loads with weights_only=True
        self.tokenizer = tokenizer
        self.val_psnr = PeakSignalNoiseRatio(data_range=(-1.0, 1.0))
        self.val_usage = CodebookUsage(tokenizer.vocab_size)
        self.train_usage = CodebookUsage(tokenizer.vocab_size)
        self._grid_batch: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        """Check that the data's image size is the one the tokenizer was built for."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_size = getattr(datamodule, "image_size", None)
        if data_size is not None and data_size != self.tokenizer.image_size:
            raise ValueError(
                f"the data's image_size is {data_size} but the tokenizer was built for image_size "
                f"{self.tokenizer.image_size}; set both to the same value in the recipe"
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, weights that do not fit this tokenizer (e.g. `--ckpt_path` of another size)."""
        if isinstance(checkpoint.get("state_dict"), Mapping):
            check_state_dict_fits(self, checkpoint["state_dict"], "the checkpoint's state_dict")

    def reconstruction_loss(self, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """The configured pixel loss."""
        kind = self.hparams.rec_loss
        loss = recon.new_zeros(())
        if "l1" in kind:
            loss = loss + F.l1_loss(recon, images)
        if "l2" in kind:
            loss = loss + F.mse_loss(recon, images)
        return loss

    def _step(self, batch: dict[str, Any], split: str) -> tuple[torch.Tensor, Any]:
        images = batch["image"]
        out = self.tokenizer(images)
        rec = self.reconstruction_loss(out.recon, images)
        loss = rec + out.quant_loss
        # evaluation losses are averaged over the ranks (once per epoch); training logs stay per rank
        kw = dict(batch_size=len(images), sync_dist=split != "train")
        self.log(f"{split}/loss", loss, prog_bar=True, **kw)
        self.log(f"{split}/rec_loss", rec, **kw)
        self.log(f"{split}/codebook_loss", out.codebook_loss, **kw)
        self.log(f"{split}/commit_loss", out.commit_loss, **kw)
        for name, value in out.extra_losses.items():
            self.log(f"{split}/{name}_loss", value, **kw)
        return loss, out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if len(batch["image"]) == 0:  # every image of this batch was unreadable
            return None
        loss, out = self._step(batch, "train")
        self.train_usage.update(out.token_maps)
        self.log("train/codebook_usage", self.train_usage, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if len(batch["image"]) == 0:
            return
        images = batch["image"]
        _, out = self._step(batch, "val")
        self.val_psnr.update(out.recon.clamp(-1, 1), images)
        self.val_usage.update(out.token_maps)
        self.log("val/psnr", self.val_psnr, prog_bar=True, batch_size=len(images))
        self.log("val/codebook_usage", self.val_usage, prog_bar=True, batch_size=len(images))
        if batch_idx == 0:
            self._grid_batch = images[: self.hparams.grid_images]

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Token maps and clamped reconstructions of a batch."""
        token_maps = self.tokenizer.encode(batch["image"])
        return {"token_maps": token_maps, "recon": self.tokenizer.decode(token_maps), "label": batch["label"]}

    def on_validation_epoch_end(self) -> None:
        if self._grid_batch is None or self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        path = self.save_reconstruction_grid(self._grid_batch, self.run_dir() / "recon.png")
        self.print(f"reconstructions (odd rows: originals, even rows: reconstructions): {path}")

    def run_dir(self) -> Path:
        """The folder this run writes into (the logger's version folder, else the trainer's root)."""
        # not `trainer.log_dir`: it broadcasts from rank 0, so rank-0-only callers would hang under DDP
        logger = self.trainer.logger
        path = (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)) if logger else None
        return Path(path or self.trainer.default_root_dir)

    @torch.no_grad()
    def save_reconstruction_grid(self, images: torch.Tensor, path: str | Path, per_row: int = 8) -> Path:
        """PNG with each row of originals followed by a row of their (decoded token) reconstructions."""
        recon = self.tokenizer.decode(self.tokenizer.encode(images))
        rows = []
        for start in range(0, len(images), per_row):
            rows += [images[start : start + per_row], recon[start : start + per_row]]
        if len(images) % per_row:  # pad the last pair so rows stay aligned
            pad = per_row - len(images) % per_row
            rows[-2] = torch.cat([rows[-2], torch.ones_like(images[:pad])])
            rows[-1] = torch.cat([rows[-1], torch.ones_like(images[:pad])])
        return save_image_grid(torch.cat(rows), path, nrow=per_row, upscale=max(1, 128 // images.shape[-1]))

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, param in self.tokenizer.named_parameters():
            if not param.requires_grad:
                continue
            # norms, biases and the codebook are not weight-decayed
            (no_decay if param.ndim < 2 or "embedding" in name else decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        # no max_steps/max_epochs: keep the LR constant after warmup instead of a cosine of unknown length
        total = int(total) if math.isfinite(total) else 0
        scheduler = warmup_cosine_scheduler(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
