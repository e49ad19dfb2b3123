"""`ResumableRandomSampler`: shuffling that a resumed run can continue mid-epoch in the same order."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableRandomSampler(Sampler[int]):
    """A random permutation per epoch drawn from `(seed, epoch)` alone, not from the global RNG.

    Lightning calls `set_epoch` at every epoch start. `resume_at(epoch, skip)` makes the next
    iteration produce epoch `epoch`'s order without its first `skip` indices (the ones an
    interrupted run already trained on); later iterations are whole epochs again.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"cannot shuffle an empty dataset (num_samples={num_samples})")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        """Use epoch `epoch`'s permutation from the next iteration on."""
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        """Next iteration: epoch `epoch`'s order, starting after its first `skip` indices."""
        self.epoch, self._skip = epoch, max(0, skip)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        # any int seed (torch.initial_seed() can be 64-bit) folded into manual_seed's range
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        # computed eagerly: Lightning fetches the first batch before it calls set_epoch on a resume
        order = torch.randperm(self.num_samples, generator=generator)[self._skip :].tolist()
        self._skip = 0
        return iter(order)
