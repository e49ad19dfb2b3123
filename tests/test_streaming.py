"""Streaming data: a local image folder read as an HF IterableDataset, split across ranks."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from arzoo.data import ImageDataModule
from arzoo.tokenizers import TokenizerModule, VQTokenizer


def make_folder(root: Path, splits: dict[str, int]) -> Path:
    """`root/<split>/<class>/*.png` (two classes, distinct random 8x8 images); a split named "" has no folder."""
    rng = np.random.default_rng(0)
    for split, per_class in splits.items():
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{cls}{i}.png")
    return root


def fingerprints(loader) -> list[str]:
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for batch in loader for x in batch["image"]]


def rank_module(root: Path, rank: int, world_size: int, **kwargs) -> ImageDataModule:
    data = ImageDataModule(source=f"folder:{root}", image_size=8, batch_size=3, streaming=True, **kwargs)
    data.trainer = SimpleNamespace(global_rank=rank, world_size=world_size)  # what setup reads of the trainer
    data.setup("fit")
    return data


def test_streamed_folder_is_split_across_ranks(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 8, "validation": 2})
    everything = rank_module(root, 0, 1)
    assert isinstance(everything.train_set, torch.utils.data.IterableDataset)
    assert everything.class_names == ["cat", "dog"] and everything.num_classes == 2
    # drop_last: 16 training images in batches of 3 -> 15 per pass on one rank
    all_train = fingerprints(everything.train_dataloader())
    assert len(all_train) == 15 and len(set(all_train)) == 15
    assert len(fingerprints(everything.val_dataloader())) == 4
    labels = [label for batch in everything.train_dataloader() for label in batch["label"].tolist()]
    assert sorted(set(labels)) == [0, 1]

    ranks = [rank_module(root, r, 2) for r in range(2)]
    seen = [set(fingerprints(DataLoaderAll(d))) for d in ranks]
    assert seen[0] and seen[1] and not seen[0] & seen[1]  # each rank reads its own rows
    assert len(seen[0] | seen[1]) == 16  # and together all of them
    val = [set(fingerprints(d.val_dataloader())) for d in ranks]
    assert not val[0] & val[1] and len(val[0] | val[1]) == 4


def DataLoaderAll(data: ImageDataModule) -> torch.utils.data.DataLoader:
    """A rank's whole training stream (no drop_last), to count every row."""
    from arzoo.data.datasets import collate_images

    return torch.utils.data.DataLoader(data.train_set, batch_size=4, collate_fn=collate_images)


def test_no_validation_split_holds_out_a_stable_part(tmp_path):
    root = make_folder(tmp_path / "imgs", {"": 20})
    first, second = rank_module(root, 0, 1, val_fraction=0.25), rank_module(root, 0, 1, val_fraction=0.25)
    val = set(fingerprints(first.val_dataloader()))
    train = set(fingerprints(DataLoaderAll(first)))
    assert val and train and not val & train and len(val | train) == 40
    assert set(fingerprints(second.val_dataloader())) == val


def test_fit_from_a_stream(tmp_path):
    root = make_folder(tmp_path / "imgs", {"train": 8, "validation": 2})
    data = ImageDataModule(source=f"folder:{root}", image_size=8, batch_size=4, streaming=True)
    tok = VQTokenizer(image_size=8, codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=[1, 1],
                      decoder_ch_mult=[1, 1], z_channels=32, ch=32, num_res_blocks=1)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(TokenizerModule(tok), data)
    assert trainer.global_step == 3


def test_streaming_needs_a_streamable_source():
    with pytest.raises(ValueError, match="streaming: true needs an 'hf:<name>' or 'folder:<path>' source"):
        ImageDataModule(source="digits", streaming=True)
