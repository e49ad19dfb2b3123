"""The tokenizer interface every generator is written against.

A tokenizer turns images (B, 3, H, W) in [-1, 1] into one or more token maps and back. It is
trained once (stage 1, by `TokenizerModule`) and then frozen and shared by every generator that fits
it. Single-scale tokenizers have one entry in `scales`; multi-scale (VAR-style) tokenizers have one
per scale, coarse to fine. Generators check `scales` and `vocab_size` at construction time.

Subclasses implement `encode`, `decode`, `forward` (the training pass) and `scales`, and record
their constructor arguments with `_record_init_args` so that `spec()` can rebuild them from a
checkpoint without unpickling anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from arzoo.class_paths import resolve_class


@dataclass
class TokenizerOutput:
    """What one training pass of a tokenizer returns."""

    recon: torch.Tensor  # (B, 3, H, W), decoder output, not clamped
    codebook_loss: torch.Tensor  # moves the codebook (and VAR's Phi convs) towards the encoder output
    commit_loss: torch.Tensor  # moves the encoder output towards the codebook (beta already applied)
    token_maps: list[torch.Tensor]  # one (B, h_k, w_k) int64 map per scale
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. LlamaGen's entropy loss

    @property
    def quant_loss(self) -> torch.Tensor:
        """Everything the quantiser adds to the reconstruction loss."""
        total = self.codebook_loss + self.commit_loss
        for value in self.extra_losses.values():
            total = total + value
        return total


class Tokenizer(nn.Module, ABC):
    """Image <-> token maps. Concrete classes: `VQTokenizer`, `MultiScaleVQTokenizer`."""

    image_size: int
    downsample: int

    def _record_init_args(self, **kwargs: Any) -> None:
        """Keep the constructor arguments so `spec()` can rebuild this tokenizer."""
        self._init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}

    def spec(self) -> dict[str, Any]:
        """`{"class_path", "init_args"}` of this tokenizer: plain data, stored in checkpoints."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self._init_args)}

    @property
    @abstractmethod
    def scales(self) -> tuple[tuple[int, int], ...]:
        """Token grid (h_k, w_k) of every scale, coarse to fine; one entry for single-scale tokenizers."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of codebook entries."""

    @property
    @abstractmethod
    def codebook_dim(self) -> int:
        """Width of one codebook vector."""

    @property
    def grid(self) -> tuple[int, int]:
        """The finest token grid (h, w)."""
        return self.scales[-1]

    @abstractmethod
    def encode(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> one (B, h_k, w_k) int64 token map per scale."""

    @abstractmethod
    def decode(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        """Token maps (as returned by `encode`) -> images (B, 3, H, W) clamped to [-1, 1]."""

    @abstractmethod
    def forward(self, images_B3HW: torch.Tensor) -> TokenizerOutput:
        """The training pass: reconstruction, quantiser losses and the token maps."""

    def check_images(self, images_B3HW: torch.Tensor) -> None:
        """Raise a clear error unless `images` is a (B, 3, image_size, image_size) batch."""
        expected = (3, self.image_size, self.image_size)
        if images_B3HW.ndim != 4 or tuple(images_B3HW.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}) (image_size={self.image_size}), got {tuple(images_B3HW.shape)}"
            )

    def check_token_maps(self, token_maps: list[torch.Tensor]) -> None:
        """Raise a clear error unless there is one (B, h_k, w_k) map per scale."""
        if len(token_maps) != len(self.scales):
            raise ValueError(
                f"{type(self).__name__} has {len(self.scales)} scale(s) {list(self.scales)}, "
                f"got {len(token_maps)} token map(s)"
            )
        for k, (tokens, hw) in enumerate(zip(token_maps, self.scales)):
            if tokens.ndim != 3 or tuple(tokens.shape[1:]) != hw:
                raise ValueError(
                    f"token map {k} should have shape (B, {hw[0]}, {hw[1]}), got {tuple(tokens.shape)}"
                )

    def freeze(self) -> "Tokenizer":
        """Eval mode and no gradients: how generators hold their tokenizer."""
        self.eval()
        self.requires_grad_(False)
        return self


def check_image_size(image_size: int, downsample: int, owner: str) -> None:
    """Raise a clear error unless `image_size` is a positive multiple of `downsample`."""
    if image_size <= 0 or image_size % downsample != 0:
        lower = max(downsample, image_size // downsample * downsample)
        raise ValueError(
            f"{owner}: image_size {image_size} is not divisible by the tokenizer's downsampling factor "
            f"{downsample} (2 ** (len(ch_mult) - 1)); use a multiple of {downsample}, e.g. {lower} or "
            f"{lower + downsample}"
        )


def resolve_tokenizer_class(class_path: str, source: str | None = None) -> type[Tokenizer]:
    """The Tokenizer subclass `class_path` names (nothing is built). A spec read from a file
    (`source`) names arzoo's or an already imported class only (`arzoo.class_paths`)."""
    return resolve_class(class_path, what="tokenizer class", source=source or "a tokenizer spec", base=Tokenizer)


def build_tokenizer(spec: Mapping[str, Any], source: str | None = None) -> Tokenizer:
    """Build a tokenizer from its `spec()` (class_path + init_args)."""
    if not isinstance(spec, Mapping):
        raise ValueError(f"a tokenizer spec must be a mapping with class_path and init_args, got {type(spec).__name__}")
    cls = resolve_tokenizer_class(spec.get("class_path"), source)
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, Mapping):
        raise ValueError(f"tokenizer spec init_args must be a mapping, got {type(init_args).__name__}")
    return cls(**dict(init_args))
