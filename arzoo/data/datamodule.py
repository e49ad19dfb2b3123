"""`ImageDataModule`: one LightningDataModule for every image source arzoo trains on."""

from __future__ import annotations

import logging
import warnings
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Subset

from arzoo.data.datasets import ImageDataset, TensorImageDataset, collate_images, pil_to_tensor
from arzoo.data.sampler import ResumableRandomSampler
from arzoo.data.token_cache import TokenCacheDataset, collate_tokens
from arzoo.data.sources import (
    find_columns, folder_label_note, load_digits_arrays, load_folder, load_hub, parse_source, seeded_split,
)  # fmt: skip
from arzoo.errors import DataError

log = logging.getLogger(__name__)

VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


class ImageDataModule(L.LightningDataModule):
    """Images in [-1, 1] with integer labels, from `digits`, `hf:<name>` or `folder:<path>`.

    Batches are dicts: `image` (B, 3, S, S) float, `label` (B,) int64 (-1 when the source has
    no labels). Unreadable images are skipped; each is reported once and counted in `num_skipped`.

    `streaming: true` reads an `hf:` / `folder:` source as a stream, shuffled in a buffer and split
    across ranks (see `arzoo.data.streaming`; under DDP cap training with `trainer.max_steps`).
    `token_cache: <dir>` trains on the tokens `arzoo tokenize` wrote for this recipe: training
    batches then carry `tokens` (B, N) instead of `image`; validation still reads images.
    """

    def __init__(
        self,
        source: str = "digits",
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        hflip: bool = False,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        train_split: str = "train",
        val_split: str | None = None,
        streaming: bool = False,
        token_cache: str | None = None,
    ) -> None:
        super().__init__()
        self.spec = parse_source(source)  # fail at construction, not after the model is built
        if streaming and self.spec.kind == "digits":
            raise ValueError(
                "streaming: true needs an 'hf:<name>' or 'folder:<path>' source; 'digits' is held in memory"
            )
        if image_size <= 0:
            raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"num_workers must be an int >= 0 (0: load in the main process), got {num_workers!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.save_hyperparameters()
        self.source = source
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.hflip = hflip
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.train_split = train_split
        self.val_split = val_split
        self.streaming = streaming
        self.token_cache = token_cache
        self.num_classes = 0
        self.class_names: list[str] = []
        self.has_labels = True  # False when the source has no label column (images get label -1)
        self.label_note: str | None = None  # why there are no labels, when arzoo can tell
        self.images_read = {"train": 0, "eval": 0}  # readable images (or token rows) delivered so far
        self.batches_read = {"train": 0, "eval": 0}  # batches delivered (a resumed, finished epoch delivers none)
        self.train_set: torch.utils.data.Dataset | None = None
        self.val_set: torch.utils.data.Dataset | None = None
        self.skipped: set[str] = set()
        self._train_sampler: ResumableRandomSampler | None = None
        self._resume: dict[str, int] | None = None  # data position from a checkpoint, used once

    @property
    def num_skipped(self) -> int:
        """How many distinct unreadable images were skipped so far."""
        return len(self.skipped)

    def setup(self, stage: str | None = None) -> None:
        """Read the source once; later calls reuse it."""
        if self.train_set is not None:
            return
        if self.spec.kind == "digits":
            self._setup_digits()
        elif self.streaming:
            self._setup_streaming()
        else:
            table = load_folder(self.spec.target) if self.spec.kind == "folder" else load_hub(self.spec.target)
            self._setup_table(table)
        if self.token_cache is not None:
            self._setup_token_cache()

    def _setup_token_cache(self) -> None:
        """Train on the cached tokens of `arzoo tokenize`; validation stays on images."""
        from arzoo.data.token_cache import TokenCacheDataset, check_cache_matches, check_tokenizer

        cache = TokenCacheDataset(self.token_cache, hflip=self.hflip)
        check_cache_matches(cache.meta, self.token_cache, source=self.source, image_size=self.image_size)
        module = self.trainer.lightning_module if self.trainer is not None else None
        check_tokenizer(cache.meta, self.token_cache, getattr(module, "tokenizer", None))
        self.train_set = cache

    def _setup_streaming(self) -> None:
        """`hf:` / `folder:` data read as a stream, shuffled in a buffer and split across the ranks."""
        from arzoo.data.streaming import load_streaming

        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.train_set, self.val_set, self.class_names = load_streaming(self, rank=rank, world_size=world)
        self.has_labels = self.train_set.label_column is not None
        if not self.has_labels and self.spec.kind == "folder":
            self.label_note = folder_label_note(self.spec.target)
        if world > 1 and getattr(trainer, "max_steps", -1) in (-1, None):
            rank_zero_warn("streamed data under several ranks: set trainer.max_steps, or a rank that gets fewer "
                           "batches ends its epoch first and the others wait for it forever")
        self.num_classes = len(self.class_names)

    def _setup_digits(self) -> None:
        from PIL import Image

        images, labels = load_digits_arrays()
        tensors = torch.stack([pil_to_tensor(Image.fromarray(img), self.image_size) for img in images])
        train_idx, val_idx = seeded_split(len(images), self.val_fraction, self.split_seed)
        labels_t = torch.from_numpy(labels)
        self.train_set = TensorImageDataset(tensors[train_idx], labels_t[train_idx], hflip=self.hflip)
        self.val_set = TensorImageDataset(tensors[val_idx], labels_t[val_idx], hflip=False)
        self.num_classes = 10
        self.class_names = [str(i) for i in range(10)]

    def _setup_table(self, table: Any) -> None:
        if self.train_split not in table:
            raise ValueError(f"{self.source!r} has no split {self.train_split!r}; it has {list(table)}")
        train = table[self.train_split]
        image_col, label_col = find_columns(train.features)
        self.has_labels = label_col is not None
        if not self.has_labels and self.spec.kind == "folder":
            self.label_note = folder_label_note(self.spec.target)
        if label_col is not None and hasattr(train.features[label_col], "names"):
            self.class_names = list(train.features[label_col].names)
            self.num_classes = len(self.class_names)
        val_name = self.val_split or next((s for s in VAL_SPLIT_NAMES if s in table), None)
        if val_name is not None and val_name not in table:
            raise ValueError(f"{self.source!r} has no split {val_name!r}; it has {list(table)}")

        def make(split: Any, hflip: bool) -> ImageDataset:
            return ImageDataset(split, image_col, label_col, self.image_size, hflip=hflip)

        if val_name is not None:
            self.train_set, self.val_set = make(train, self.hflip), make(table[val_name], False)
        else:
            if len(train) < 2:
                raise ValueError(f"{self.source!r} has {len(train)} image(s); need at least 2 to split off validation")
            train_idx, val_idx = seeded_split(len(train), self.val_fraction, self.split_seed)
            self.train_set = Subset(make(train, self.hflip), train_idx)
            self.val_set = Subset(make(train, False), val_idx)

    def _loader(self, dataset: torch.utils.data.Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup()
            return self._loader(self.train_set if shuffle else self.val_set, shuffle)
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)  # streaming: shuffles and splits itself
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            # a seeded sampler instead of shuffle=True: a resumed fit continues the same order mid-epoch
            sampler=self._make_train_sampler(len(dataset)) if shuffle and not iterable else None,
            drop_last=shuffle and (iterable or len(dataset) > self.batch_size),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_tokens if isinstance(dataset, TokenCacheDataset) else collate_images,
        )

    def _make_train_sampler(self, num_samples: int) -> ResumableRandomSampler:
        resume, self._resume = self._resume, None
        # torch.initial_seed() is seed_everything's seed: the order follows the run's seed without using its RNG
        sampler = ResumableRandomSampler(num_samples, seed=resume["seed"] if resume else torch.initial_seed())
        if resume:
            sampler.resume_at(resume["epoch"], resume["samples_done"])
        self._train_sampler = sampler
        return sampler

    def state_dict(self) -> dict[str, Any]:
        """The training data position (seed, epoch, samples done), saved in checkpoints for resuming."""
        trainer, sampler = self.trainer, self._train_sampler
        if trainer is None or sampler is None or trainer.world_size > 1:  # DDP splits the order again per rank
            return {}
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        epoch = trainer.current_epoch
        if batches >= trainer.num_training_batches:  # saved at the end of an epoch: the next one starts afresh
            epoch, batches = epoch + 1, 0
        return {"seed": sampler.seed, "epoch": epoch, "samples_done": batches * self.batch_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the training order where the checkpoint left it (next `train_dataloader()`)."""
        if {"seed", "epoch", "samples_done"} <= set(state_dict):
            self._resume = {k: int(state_dict[k]) for k in ("seed", "epoch", "samples_done")}
            # Lightning warns that a mid-epoch resume repeats data unless the DataLoader itself is
            # stateful; the sampler above does continue the order, so the warning does not apply
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Record unreadable images (in the main process, whatever the worker count) and drop the list;
        count the readable ones (see `check_something_was_read`)."""
        for name in batch.pop("skipped", []):
            if name not in self.skipped:
                self.skipped.add(name)
                rank_zero_warn(f"skipping unreadable image {name}; {self.num_skipped} skipped so far")
        rows = batch["tokens"] if "tokens" in batch else batch.get("image")
        training = self.trainer is not None and self.trainer.training
        split = "train" if training else "eval"
        self.images_read[split] += 0 if rows is None else len(rows)
        self.batches_read[split] += 1
        return batch

    def check_something_was_read(self, split: str) -> None:
        """Raise a DataError naming the source when a whole pass over `split` ("train" | "eval") read no image."""
        if self.images_read[split] > 0 or self.batches_read[split] == 0:
            return
        example = f" (e.g. {sorted(self.skipped)[0]})" if self.skipped else ""
        what = "training" if split == "train" else "validation"
        raise DataError(
            f"no {what} image of source {self.source!r} could be read: {self.num_skipped} unreadable image(s) "
            f"skipped{example}; nothing was trained or saved"
        )

    def teardown(self, stage: str) -> None:
        if self.skipped:
            # `stage` is a TrainerFn (a str enum): its value reads "fit", not "TrainerFn.FITTING"
            log.warning("%d unreadable image(s) were skipped during %s", self.num_skipped, getattr(stage, "value", stage))
