"""Codebook usage: the fraction of codebook entries a set of token maps uses."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class CodebookUsage(Metric):
    """Fraction of the `vocab_size` codes seen at least once since the last reset (synced across ranks)."""

    full_state_update = False

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.add_state("counts", default=torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, token_maps: list[torch.Tensor]) -> None:
        """Count every token of every scale."""
        for tokens in token_maps:
            self.counts += torch.bincount(tokens.reshape(-1), minlength=self.vocab_size)

    def compute(self) -> torch.Tensor:
        return (self.counts > 0).float().mean()
