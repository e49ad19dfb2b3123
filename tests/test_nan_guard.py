"""A non-finite loss stops training with the step and batch statistics, and the last good checkpoint is kept."""

from __future__ import annotations

import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from arzoo.callbacks import NonFiniteLossError, describe_batch
from arzoo.checkpoint_io import read_checkpoint
from arzoo.cli import ArzooTrainer
from arzoo.data import ImageDataModule
from arzoo.generators import RasterGenerator
from arzoo.tokenizers import TokenizerModule, VQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint


def _tokenizer() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(image_size=16, codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 1],
                       decoder_ch_mult=[1, 1], z_channels=32, ch=32, num_res_blocks=1)


class NaNAtStep(ImageDataModule):
    """Digits, with NaN pixels in the batch of optimizer step `step` (a broken file or augmentation)."""

    def __init__(self, step: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_step = step

    def on_before_batch_transfer(self, batch, dataloader_idx):
        batch = super().on_before_batch_transfer(batch, dataloader_idx)
        if self.trainer.training and self.trainer.global_step == self.nan_step:
            batch["image"][0, :, :2, :2] = float("nan")
        return batch


def _trainer(tmp_path, steps: int = 10) -> L.Trainer:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0, every_n_train_steps=1)
    return ArzooTrainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[checkpoint],
                        default_root_dir=tmp_path)


def test_nan_in_the_data_stops_tokenizer_training_and_keeps_the_last_checkpoint(tmp_path):
    module = TokenizerModule(_tokenizer(), lr=1e-3)
    with pytest.raises(NonFiniteLossError) as info, pytest.warns(UserWarning, match="statistics of the batch") as seen:
        _trainer(tmp_path).fit(module, NaNAtStep(3, image_size=16, batch_size=8))
    message = str(info.value)
    assert "non-finite training loss nan at step 3 (epoch 0, batch 3" in message and "\n" not in message  # one line
    stats = "\n".join(str(w.message) for w in seen if "statistics of the batch" in str(w.message))
    assert "image (8, 3, 16, 16): min -1, max 1" in stats and "non-finite values 12" in stats
    assert re.search(r"label \(8,\): range [0-9]\.\.[0-9]", stats)
    ckpt = read_checkpoint(tmp_path / "last.ckpt")
    assert ckpt["global_step"] == 3  # written after step 3, before the bad batch
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert all(torch.isfinite(p).all() for p in module.parameters())  # stopped before the optimizer step


def test_non_finite_generator_loss_stops_training(tmp_path, monkeypatch):
    tok = save_tokenizer_checkpoint(_tokenizer(), tmp_path / "tok.ckpt")
    model = RasterGenerator(tokenizer_path=str(tok), dim=32, n_layer=1, n_head=2, multiple_of=32, warmup_steps=0)
    real = model.token_loss
    monkeypatch.setattr(model, "token_loss", lambda logits, targets: real(logits, targets) * (
        float("inf") if model.trainer.global_step == 2 else 1.0))
    with pytest.raises(NonFiniteLossError, match=r"loss inf at step 2 "), \
            pytest.warns(UserWarning, match=r"(?s)statistics of the batch.*image \(8, 3, 16, 16\)"):
        _trainer(tmp_path / "run").fit(model, ImageDataModule(image_size=16, batch_size=8))
    assert read_checkpoint(tmp_path / "run/last.ckpt")["global_step"] == 2


def test_a_checkpoint_with_non_finite_weights_is_not_written(tmp_path):
    module = TokenizerModule(_tokenizer())
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(module, ImageDataModule(image_size=16, batch_size=8))
    good = (tmp_path / "last.ckpt").read_bytes()
    with torch.no_grad():
        next(module.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="refusing to write a checkpoint at step 1: 1 weight tensor"):
        trainer.save_checkpoint(tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == good


def test_describe_batch():
    lines = describe_batch({"image": torch.tensor([[0.5, float("inf")], [-1.0, 2.0]]), "label": torch.tensor([3, 7]),
                            "name": ["a"], "empty": torch.empty(0)})
    assert lines == ["image (2, 2): min -1, max 2, mean 0.5, non-finite values 1", "label (2,): range 3..7",
                     "empty: empty (0,)"]
