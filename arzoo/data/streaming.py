"""Streaming `hf:` / `folder:` sources: HF `IterableDataset`s shuffled in a buffer and split across ranks.

Nothing is downloaded or converted up front: rows are read as training consumes them. Each rank
keeps its own part of the stream (`datasets.distributed.split_dataset_by_node`: whole shards when
their number divides evenly, else every `world_size`-th row), and DataLoader workers split a
rank's shards again, so keep `n_shards >= world_size * num_workers`. Ranks may then get slightly
different numbers of batches: cap training with `trainer.max_steps` (and validation with
`limit_val_batches`) under DDP, or the rank that runs out first waits for the others forever.

Without a validation split, a row is held out for validation when a hash of its file name (or
bytes) and `split_seed` falls below `val_fraction`: the same rows on every rank and every run,
whatever the shard order.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

import torch

from arzoo.data.datasets import decode_row
from arzoo.data.sources import find_columns, load_folder, load_hub

SHUFFLE_BUFFER = 1000  # rows held for the streaming shuffle (datasets' own default)
VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


class StreamingImages(torch.utils.data.IterableDataset):
    """Decodes the rows of an HF `IterableDataset` into `{"image", "label"}` items (bad files: `skipped`)."""

    def __init__(self, table: Any, image_column: str, label_column: str | None, image_size: int, hflip: bool) -> None:
        super().__init__()
        self.table = table
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = image_size
        self.hflip = hflip
        self.epoch = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # a new shuffle each pass (HF seeds it with seed + epoch); persistent workers keep their count
        self.table.set_epoch(self.epoch)
        self.epoch += 1
        for i, row in enumerate(self.table):
            where = f"streamed row {i}"
            yield decode_row(row, self.image_column, self.label_column, self.image_size, self.hflip, where)


def held_out(row: dict[str, Any], image_column: str, val_fraction: float, seed: int) -> bool:
    """Whether a row belongs to the validation part (by a hash of its path, else of its bytes)."""
    ref = row[image_column]
    key = ref.get("path") or ref.get("bytes") or b""
    digest = hashlib.sha1(f"{seed}:".encode() + (key.encode() if isinstance(key, str) else key)).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def load_streaming(data: Any, rank: int, world_size: int) -> tuple[StreamingImages, StreamingImages, list[str]]:
    """(train, val, class names) of an `ImageDataModule`'s `hf:` / `folder:` source, streamed, for one rank."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    spec = data.spec
    table = load_folder(spec.target, streaming=True) if spec.kind == "folder" else load_hub(spec.target, streaming=True)
    if data.train_split not in table:
        raise ValueError(f"{data.source!r} has no split {data.train_split!r}; it has {list(table)}")
    train = table[data.train_split]
    if train.features is None:
        raise ValueError(f"{data.source!r} does not declare its columns when streamed; use streaming: false")
    image_col, label_col = find_columns(train.features)
    names = list(getattr(train.features[label_col], "names", []) or []) if label_col else []
    val_name = data.val_split or next((s for s in VAL_SPLIT_NAMES if s in table), None)
    if val_name is not None and val_name not in table:
        raise ValueError(f"{data.source!r} has no split {val_name!r}; it has {list(table)}")

    def undecoded(split: Any) -> Any:
        return split.cast_column(image_col, datasets.Image(decode=False))

    train = undecoded(train)
    if val_name is not None:
        val = undecoded(table[val_name])
    else:
        if not 0.0 < data.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {data.val_fraction}")
        args = (image_col, data.val_fraction, data.split_seed)
        val = train.filter(lambda row: held_out(row, *args))
        train = train.filter(lambda row: not held_out(row, *args))
    # split_seed, not the process seed: every rank must shuffle the shards alike before taking its part
    train = train.shuffle(seed=data.split_seed, buffer_size=SHUFFLE_BUFFER)
    train = split_dataset_by_node(train, rank=rank, world_size=world_size)
    val = split_dataset_by_node(val, rank=rank, world_size=world_size)
    return (
        StreamingImages(train, image_col, label_col, data.image_size, data.hflip),
        StreamingImages(val, image_col, label_col, data.image_size, False),
        names,
    )
