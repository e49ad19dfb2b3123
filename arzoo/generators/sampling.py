"""Decoding strategies: objects that turn one step's logits into tokens, kept apart from the networks.

As diffusers keeps schedulers apart from models, the generation loop only calls a `TokenSampler`
(`state.sampler`): `filter(logits)` gives the temperature-scaled, filtered float logits and
`draw(filtered, generator)` the ids. Two ship, each reproducing its official code's token streams
with a seeded `torch.Generator`:

* `TopKTopPSampler` (the default): LlamaGen's `sample` (ties at the top-k threshold survive; top-p
  keeps the first token that crosses `top_p`), one `torch.multinomial(probs, 1)` per row.
* `VARSampler` (next-scale paradigms): VAR's `sample_with_top_k_top_p_` op order, one multinomial
  over all (B*l, V) rows of a scale.

A new strategy (speculative, collaborative, ...) subclasses `TokenSampler` and is passed as
`generate(labels, sampler=...)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class TokenSampler(ABC):
    """A decoding strategy over float logits (..., V) -> ids (...); the temperature and filters it holds."""

    temperature: float = 1.0
    top_k: int | None = None  # None: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    greedy: bool = False  # argmax instead of a draw (consumes no randomness)

    def check(self, vocab_size: int) -> "TokenSampler":
        """Raise a clear error for arguments a user can get wrong."""
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k must be between 1 and the vocabulary size {vocab_size}, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        return self

    @abstractmethod
    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature-scaled, filtered float logits (..., V) (-inf where a token cannot be drawn)."""

    @abstractmethod
    def draw(self, filtered: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ids (...) from `filter`'s output (..., V)."""

    def __call__(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ids (...) from raw logits (..., V): `draw(filter(logits))`."""
        return self.draw(self.filter(logits), generator)


@dataclass(frozen=True)
class TopKTopPSampler(TokenSampler):
    """LlamaGen's sampler: temperature, top-k, top-p, one multinomial draw per row."""

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        return filter_logits(logits.float() / max(self.temperature, 1e-5), self.top_k, self.top_p)

    def draw(self, filtered: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.greedy:
            return filtered.argmax(dim=-1)
        probs_NV = F.softmax(filtered.reshape(-1, filtered.shape[-1]), dim=-1)
        return torch.multinomial(probs_NV, num_samples=1, generator=generator).reshape(filtered.shape[:-1])


@dataclass(frozen=True)
class VARSampler(TokenSampler):
    """VAR's sampler: temperature (when not 1), `filter_logits_var`, one multinomial over all rows."""

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return filter_logits_var(logits, self.top_k, self.top_p)

    def draw(self, filtered: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.greedy:
            return filtered.argmax(dim=-1)
        probs = filtered.softmax(dim=-1).view(-1, filtered.shape[-1])
        ids = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator)
        return ids.view(filtered.shape[:-1])


def filter_logits(logits_NV: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering with -inf, as LlamaGen's `top_k_top_p_filtering` (returns a new tensor)."""
    logits_NV = logits_NV.clone()
    if top_k is not None:
        k = min(max(top_k, 1), logits_NV.shape[-1])
        threshold = torch.topk(logits_NV, k, dim=-1).values[..., -1:]
        logits_NV[logits_NV < threshold] = float("-inf")
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits_NV, descending=True, dim=-1)
        cum_probs = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum_probs > top_p
        # shift right so the first token that crosses top_p is kept, and always keep the best one
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits_NV[remove.scatter(-1, sorted_idx, remove)] = float("-inf")
    return logits_NV


def guide(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance `uncond + (cond - uncond) * scale` (LlamaGen's operation order)."""
    return uncond_logits + (cond_logits - uncond_logits) * scale


def filter_logits_var(logits: torch.Tensor, top_k: int | None = None, top_p: float = 1.0) -> torch.Tensor:
    """Top-k then top-p filtering with -inf, as VAR's `sample_with_top_k_top_p_` (returns a new tensor).

    Works on any (..., V) shape, row by row over the last axis, with VAR's op order (so that a
    seeded draw from the result reproduces the official ids; docs/parity/var.md 5):

    * top-k (`top_k` not None; VAR's `top_k > 0`): logits strictly below the k-th largest of their
      row become -inf (ties with the threshold survive).
    * top-p (`top_p < 1`; VAR's `top_p > 0`): the row is sorted ascending and softmaxed (after top-k);
      entries whose cumulative probability is `<= 1 - top_p` are removed, the largest always kept.
      `top_p = 1.0` is off (VAR's 0.0 also means off; arzoo's API uses 1.0 for that).
    """
    logits = logits.clone()
    if top_k is not None:
        kth_largest = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth_largest, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # always keep the most likely token
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), float("-inf"))
    return logits
