"""Next-frequency generation (NFIG): VAR's next-scale machinery over frequency bands.

NFIG (arXiv 2503.07076) predicts the image's latent band by band, lowest frequency first: band k+1
from bands <= k, each band a token map that grows with its frequency. Here the tokenizer does the
frequency work (`FrequencyVQTokenizer`: FFT band masks, residual quantisation band by band) and
exposes the same next-scale helpers as VAR's tokenizer, so the transformer, the block-causal mask,
the KV cache, guidance and sampling are `NextScaleGenerator`'s — no second copy. The network's
per-step embedding (`lvl_embed`, one vector per step) indexes frequency bands here: it is the band
embedding, added to every token of its band.
"""

from __future__ import annotations

from typing import Any, Sequence

from arzoo.generators.next_scale import PATCH_NUMS_256, NextScaleGenerator
from arzoo.generators.registry import register_sizes
from arzoo.tokenizers.frequency_vq import FrequencyVQTokenizer


class NextFrequencyGenerator(NextScaleGenerator):
    """One step per frequency band of a `FrequencyVQTokenizer`, coarse (low) to fine (high).

    `band_grids` (the token grid side of each band) is the tokenizer's; give it (with `vocab_size`
    and `codebook_dim`) only to build without a tokenizer, e.g. to count parameters. Every other
    argument is `NextScaleGenerator`'s (VAR's transformer, guidance and sampling).
    """

    paradigm = "next-frequency"
    tokenizer_kind = FrequencyVQTokenizer

    def __init__(self, band_grids: Sequence[int] | None = None, **kwargs: Any) -> None:
        if band_grids is not None and kwargs.get("patch_nums") is not None:
            raise ValueError("give band_grids or patch_nums, not both (they are the same thing here)")
        if band_grids is not None:
            kwargs["patch_nums"] = band_grids
        super().__init__(**kwargs)

    @property
    def band_grids(self) -> tuple[int, ...]:
        """Token grid side of each frequency band, lowest band first."""
        return self.patch_nums


def _nfig(depth: int) -> dict[str, Any]:
    """VAR's transformer at `depth` (width 64 * depth) over a 256-px, 4096-code, 10-band tokenizer."""
    return dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                attn_l2_norm=True, vocab_size=4096, codebook_dim=32, band_grids=list(PATCH_NUMS_256),
                num_classes=1000)  # fmt: skip


register_sizes(
    NextFrequencyGenerator,
    {
        "nfig-d16": _nfig(16),
        "nfig-d20": _nfig(20),
        "nfig-d24": _nfig(24),
        "nfig-tiny": dict(depth=4, embed_dim=128, num_heads=4),
    },
)
