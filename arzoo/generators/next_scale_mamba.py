"""Next-scale prediction with Mamba across scales (M-VAR, OliverRensu/MVAR, arXiv 2411.10433).

M-VAR is VAR's paradigm on another network (`MVARTransformer`, official M-VAR keys,
`arzoo.interop.mvar.load_mvar_generator`): attention only within each scale, and a causal Mamba2
scan over the whole sequence that carries the coarser scales. Everything else (inputs, guidance,
filters, the running f_hat, the loss) is `NextScaleGenerator`'s. Sampling carries every block's
Mamba2 state (for the CFG-doubled rows) from one scale to the next, so each scale runs Mamba over
its own positions only (no KV cache, no re-run over the prefix); the logits equal the
teacher-forced ones up to float rounding. Facts: docs/parity/mvar.md.
"""

from __future__ import annotations

from typing import Any

import torch

from arzoo.generators.next_scale import NextScaleGenerator, official_sizes
from arzoo.generators.registry import register_sizes
from arzoo.networks.mvar import MVARTransformer


class MambaScaleGenerator(NextScaleGenerator):
    """M-VAR: `NextScaleGenerator` with intra-scale attention plus a Mamba2 scan across scales.

    `mamba_d_state`, `mamba_d_conv`, `mamba_expand` and `mamba_headdim` size each block's Mamba2
    (M-VAR's values, mamba-ssm 2.2's defaults); `shared_aln` is refused (each M-VAR block needs 9
    AdaLN vectors, upstream's shared AdaLN has 6). Other arguments are `NextScaleGenerator`'s.
    """

    network_cls = MVARTransformer  # its `MVARConfig` reads the Mamba2 sizes from these arguments

    def __init__(
        self,
        mamba_d_state: int = 64,
        mamba_d_conv: int = 4,
        mamba_expand: int = 2,
        mamba_headdim: int = 64,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)  # builds the network; its MVARConfig reads the Mamba2 sizes and refuses shared_aln

    def visibility_mask(self) -> torch.Tensor:
        """(N, N) bool, block-diagonal: attention stays inside each scale (coarser scales reach a
        position through the causal Mamba scan, which no mask describes)."""
        with torch.device("cpu"):
            steps = self.step_of_slot()
            return steps[:, None] == steps[None, :]

    def teacher_forcing(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V) through the network's own one-segment-per-scale attention (flash-attn
        varlen / FlexAttention on CUDA) rather than the dense `mask`."""
        return self(self.teacher_inputs(tokens_BN), labels_B, None)


def _official_mvar(depth: int) -> dict[str, Any]:
    """M-VAR's released sizes (docs/parity/mvar.md section 7): VAR's; the d16 / d20 checkpoints use
    attn_l2_norm=False (M-VAR's README), d24 / d30 True."""
    return dict(official_sizes(depth), attn_l2_norm=depth >= 24)


register_sizes(
    MambaScaleGenerator,
    {
        "mvar-d16": _official_mvar(16),
        "mvar-d20": _official_mvar(20),
        "mvar-d24": _official_mvar(24),
        "mvar-d30": _official_mvar(30),
        "mvar-tiny": dict(depth=4, embed_dim=128, num_heads=4),
    },
)
