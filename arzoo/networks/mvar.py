"""M-VAR's class-conditional transformer (OliverRensu/MVAR `models/mvar.py`): VAR's network with
Mamba across scales. Facts: docs/parity/mvar.md."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arzoo.networks.config import check_positive_ints
from arzoo.networks.var import NextScaleTransformer, VARConfig, matmul_dtype
from arzoo.nn.mamba import Mamba2State
from arzoo.nn.mvar import MVARBlock

__all__ = ["MVARConfig", "MVARTransformer"]


@dataclass(frozen=True, kw_only=True)
class MVARConfig(VARConfig):
    """M-VAR's network arguments: VAR's plus each block's Mamba2 sizes (M-VAR's values, mamba-ssm
    2.2's defaults) and the attention backend of teacher forcing."""

    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_headdim: int = 64
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.shared_aln:
            raise ValueError(
                "MVARConfig (M-VAR) does not support shared_aln=True: each M-VAR block needs 9 AdaLN "
                "vectors and upstream's shared AdaLN (6 vectors) is broken; use shared_aln=False"
            )
        check_positive_ints("MVARConfig", **{f"mamba_{k}": v for k, v in self.mamba_kwargs().items()})
        if (self.mamba_expand * self.embed_dim) % self.mamba_headdim:
            raise ValueError(
                f"MVARConfig: the Mamba2 width mamba_expand * embed_dim = {self.mamba_expand * self.embed_dim} is "
                f"not divisible by mamba_headdim {self.mamba_headdim}"
            )

    def mamba_kwargs(self) -> dict[str, int]:
        """The Mamba2 sizes as `Mamba2`'s own argument names."""
        return dict(d_state=self.mamba_d_state, d_conv=self.mamba_d_conv, expand=self.mamba_expand,
                    headdim=self.mamba_headdim)  # fmt: skip


class MVARTransformer(NextScaleTransformer):
    """M-VAR's class-conditional transformer (OliverRensu/MVAR `models/mvar.py`): VAR's network with
    `MVARBlock`s, i.e. bidirectional attention inside each scale, then a Mamba2 mixer over the whole
    flattened sequence (coarse to fine, causal), then the FFN, with 9 AdaLN vectors per block
    (`arzoo.nn.mvar`; facts: docs/parity/mvar.md).

    State-dict keys are the official M-VAR ones (SPEC 6): VAR's outside the blocks (`class_emb`,
    `pos_start`, `pos_1LC`, `lvl_embed`, the buffers `lvl_1L` and `attn_bias_for_masking`, here
    block-diagonal, `word_embed`, `head_nm`, `head`) and `blocks.{b}.{attn,mamba,ffn,ada_lin}.*` with
    the `attn.patch_nums` buffer. Official checkpoints load strictly
    (`arzoo.interop.mvar.load_mvar_generator`).

    Teacher forcing (`forward`) attends within each scale only: one attention segment per scale
    (flash-attn varlen / FlexAttention on CUDA, a boolean block-diagonal mask with SDPA elsewhere),
    or the additive / boolean `attn_bias` given. This is M-VAR's train-mode graph; upstream's
    eval-mode `forward` is a different, broken one (SPEC 5) and is not reproduced.

    Sampling (`sampling_cache(True)`, then `forward_scale` for scales 0, 1, ...) needs no attention
    KV cache (attention never leaves the scale). Each block instead carries its Mamba2 recurrent
    state (`Mamba2State`: the last d_conv - 1 conv inputs and the SSM state, one row per CFG row),
    so scale k costs O(pn_k^2) instead of upstream's re-run of Mamba over the whole prefix; the
    logits equal the teacher-forced ones up to float rounding.

    `shared_aln` is refused (upstream's is broken: `ada_gss` holds 6 vectors, the block needs 9).
    Weights are initialised as upstream's `init_weights` (VAR's, which assumes 6 AdaLN chunks: rows
    [0, 2C) of every `ada_lin` (gammas 1 and 2) are scaled by `init_adaln_gamma`, all others, the FFN
    gamma 3 included, by `init_adaln`; Mamba's `in_proj` / `out_proj` are re-drawn like every Linear
    and `conv1d` as trunc-normal(0.02) with zero bias; `dt_bias`, `A_log`, `D`, `norm.weight` keep
    Mamba2's own init).
    """

    config_cls = MVARConfig
    config: MVARConfig

    def __init__(self, config: MVARConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._mamba_states: list[Mamba2State | None] | None = None  # per block, while sampling
        self._next_scale = 0

    def build_attn_bias(self, scale_of_position: torch.Tensor) -> torch.Tensor:
        """M-VAR's `attn_bias_for_masking`: block-diagonal, 0 where query and key share a scale, -inf
        elsewhere (kept for strict loading; teacher forcing uses attention segments instead)."""
        d = scale_of_position
        return torch.where(d[:, None] == d[None, :], 0.0, -torch.inf).reshape(1, 1, self.L, self.L)

    def build_block(self, block_idx: int, drop_path: float) -> nn.Module:
        """Block `block_idx` (`blocks.{b}`): an `MVARBlock` conditioned on the class embedding."""
        return MVARBlock(
            self.C,
            self.num_heads,
            self.patch_nums,
            cond_dim=self.D,
            mlp_ratio=self.mlp_ratio,
            norm_eps=self.norm_eps,
            attn_l2_norm=self.attn_l2_norm,
            drop=self.drop_rate,
            attn_drop=self.attn_drop_rate,
            drop_path=drop_path,
            mamba_kwargs=self.config.mamba_kwargs(),
            attn_backend=self.config.attn_backend,
        )

    @torch.no_grad()
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = 0.02
    ) -> None:
        """Upstream's `init_weights` (see the class docstring); `init_std < 0` means sqrt(1 / 3C)."""
        super().init_weights(init_adaln, init_adaln_gamma, init_head, init_std)  # Linear, Embedding, head(_nm)
        for block in self.blocks:
            assert isinstance(block, MVARBlock)
            conv = block.mamba.conv1d
            nn.init.trunc_normal_(conv.weight.data, std=0.02)
            if conv.bias is not None:
                conv.bias.data.zero_()
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            ada = block.ada_lin[-1]
            ada.weight.data[2 * self.C :].mul_(init_adaln)
            ada.weight.data[: 2 * self.C].mul_(init_adaln_gamma)  # VAR's 6-chunk layout: gammas 1 and 2 only
            ada.bias.data.zero_()

    def forward(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing (upstream's train-mode `MVAR.forward` without the label dropout): labels (B,)
        and the next-scale inputs (B, L' - first_l, Cv) of whole scales (L' <= L) -> logits (B, L', V)
        float32. `attn_bias` (boolean, True = attend, or additive; (L', L') or broadcastable to
        (B, H, L', L')) replaces the default one-segment-per-scale attention."""
        x_BLC, cond_BD = self.teacher_forcing_input(label_B, x_BLCv_wo_first_l)
        main_type = matmul_dtype(x_BLC)
        x_BLC, cond = x_BLC.to(main_type), cond_BD.to(main_type)
        if attn_bias is not None and attn_bias.is_floating_point():
            attn_bias = attn_bias.to(main_type)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond, attn_mask=attn_bias)
        return self.get_logits(x_BLC, cond_BD)

    def kv_caching(self, enable: bool) -> None:
        """M-VAR keeps no attention KV cache; see `sampling_cache`."""
        self.sampling_cache(enable)

    def sampling_cache(self, enable: bool) -> None:
        """Start (zero states, next scale 0) or free the carried Mamba2 state of every block."""
        self._mamba_states = [None] * len(self.blocks) if enable else None
        self._next_scale = 0

    def forward_scale(self, label_B: torch.Tensor, si: int, next_input: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (R, pn_si^2, V) of scale `si` for R = len(label_B) rows (inputs as in VAR's
        `forward_scale`): attention among the scale's tokens, every block's Mamba continuing from its
        carried state. After `sampling_cache(True)` the scales must come in order 0, 1, ... with the
        same rows; without it only scale 0 can run (from zero states, nothing is kept)."""
        if not 0 <= si < len(self.patch_nums):
            raise ValueError(f"scale index {si} out of range for {len(self.patch_nums)} scales")
        caching = self._mamba_states is not None
        if si > 0 and (next_input is None or not caching):
            raise RuntimeError(
                "scale si > 0 needs its next_input and the carried Mamba states (sampling_cache(True), then the "
                "scales in order)"
            )
        if caching and si != self._next_scale:
            raise RuntimeError(f"scale {si} was fed, but the carried Mamba states are at scale {self._next_scale}")
        x_BlC, cond_BD = self.scale_input(label_B, si, next_input)
        states = self._mamba_states if caching else [None] * len(self.blocks)
        assert states is not None
        for i, block in enumerate(self.blocks):
            x_BlC, states[i] = block.forward_scale(x_BlC, cond_BD, states[i])
        if caching:
            self._next_scale = si + 1
        return self.get_logits(x_BlC, cond_BD)
