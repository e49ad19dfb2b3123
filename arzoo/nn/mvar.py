"""M-VAR's transformer block: VAR's AdaLN block with intra-scale attention and a Mamba2 mixer across
scales (OliverRensu/MVAR `models/basic_mvar.py`; docs/parity/mvar.md sections 2-3).

Parameter names are those of one official block with the `blocks.{i}.` prefix stripped, so the
released checkpoints' block weights load strictly:

    attn.mat_qkv.weight (3C, C), attn.q_bias (C), attn.v_bias (C), attn.zero_k_bias (C, buffer),
    attn.patch_nums (S, int32 buffer holding pn**2), attn.scale_mul_1H11 (1, H, 1, 1; only with
    attn_l2_norm), attn.proj.weight/.bias, mamba.* (mamba-ssm Mamba2: d_state 64, d_conv 4,
    expand 2, headdim 64), ffn.fc1/.fc2 (.weight, .bias), ada_lin.1.weight (9C, D), ada_lin.1.bias.

Block (`[γ1 γ2 γ3 s1 s2 s3 b1 b2 b3] = ada_lin(cond)`, LN non-affine with eps `norm_eps`):

    x <- x + γ1 * Attn (LN(x)(1 + s1) + b1)     bidirectional, within each scale only
    x <- x + γ2 * Mamba(LN(x)(1 + s2) + b2)     causal scan over the whole token sequence
    x <- x + γ3 * FFN  (LN(x)(1 + s3) + b3)

Because attention never crosses scales and Mamba is causal, feeding one scale at a time with the
Mamba state carried over (`MVARBlock.forward_scale`) equals the teacher-forced `forward`. (The
official sampler instead re-runs Mamba over the whole prefix at every scale: same numbers up to
rounding, quadratic cost; its eval-mode `forward` is a different, broken graph that is not
reproduced here, SPEC section 5.)

Intra-scale attention backends (same weights and math; `MVARSelfAttention.attn_backend`):
"auto" picks flash-attn's `flash_attn_varlen_func` with one segment per (sample, scale) for CUDA
fp16/bf16 inputs when flash-attn is importable, else a FlexAttention block mask on CUDA, else
`F.scaled_dot_product_attention` with a boolean block-diagonal mask (always on CPU). flash-attn
and FlexAttention are imported lazily on the first CUDA call, never at arzoo import time.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from arzoo.nn.llama import DropPath
from arzoo.nn.mamba import Mamba2, Mamba2State
from arzoo.nn.var import FFN, VARAttentionWeights

__all__ = [
    "MVARBlock",
    "MVARFFN",
    "MVARSelfAttention",
    "intra_scale_mask",
    "scale_lengths",
    "segment_attention",
]


def scale_lengths(patch_nums: Sequence[int]) -> tuple[int, ...]:
    """Token count of every scale: (pn_1**2, ..., pn_S**2)."""
    return tuple(int(p) * int(p) for p in patch_nums)


def intra_scale_mask(patch_nums: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) boolean block-diagonal mask, True where query and key lie in the same scale (M-VAR's
    training attention; equals `attn_bias_for_masking == 0` of the official state dict)."""
    lens = torch.tensor(scale_lengths(patch_nums), device=device)
    seg = torch.repeat_interleave(torch.arange(len(lens), device=device), lens)
    return seg[:, None] == seg[None, :]


@functools.lru_cache(maxsize=1)
def _flash_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA extension
        return None
    return flash_attn_varlen_func


@functools.lru_cache(maxsize=1)
def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None
    return torch.compile(flex_attention, dynamic=False), create_block_mask


@functools.lru_cache(maxsize=32)
def _segment_block_mask(seq_lens: tuple[int, ...], device: str):
    _, create_block_mask = _flex()
    seg = torch.repeat_interleave(
        torch.arange(len(seq_lens), device=device), torch.tensor(seq_lens, device=device)
    )

    def same_segment(b, h, q_idx, kv_idx):
        return seg[q_idx] == seg[kv_idx]

    total = sum(seq_lens)
    return create_block_mask(same_segment, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device)


@functools.lru_cache(maxsize=32)
def _segment_mask_cpu_cached(seq_lens: tuple[int, ...], device: str) -> torch.Tensor:
    seg = torch.repeat_interleave(
        torch.arange(len(seq_lens), device=device), torch.tensor(seq_lens, device=device)
    )
    return seg[:, None] == seg[None, :]


def segment_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_lens: Sequence[int],
    scale: float,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-diagonal softmax attention, one segment per entry of `seq_lens` (summing to L), for
    q, k, v (B, H, L, hd) -> (B, H, L, hd). "auto": a FlexAttention block mask on CUDA (any dtype,
    any head width; no dropout), else SDPA with a boolean mask; "sdpa" / "flex" force one."""
    seq_lens = tuple(int(n) for n in seq_lens)
    if sum(seq_lens) != q.shape[-2]:
        raise ValueError(f"seq_lens {seq_lens} sum to {sum(seq_lens)}, not the sequence length {q.shape[-2]}")
    if backend not in ("auto", "sdpa", "flex"):
        raise ValueError(f"backend must be 'auto', 'sdpa' or 'flex', got {backend!r}")
    use_flex = q.is_cuda and dropout_p == 0.0 and _flex() is not None
    if backend == "flex" and not use_flex:
        raise RuntimeError("backend='flex' needs CUDA inputs, FlexAttention and no attention dropout")
    if backend != "sdpa" and use_flex:
        flex_attention, _ = _flex()
        block_mask = _segment_block_mask(seq_lens, str(q.device))
        return flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block_mask, scale=scale)
    mask = _segment_mask_cpu_cached(seq_lens, str(q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)


class MVARSelfAttention(VARAttentionWeights):
    """M-VAR's attention: VAR's weights (`VARAttentionWeights`) with attention inside segments
    (one per scale), plus M-VAR's `patch_nums` buffer (pn**2 per scale, int32; kept for strict loading)."""

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        patch_nums: Sequence[int],
        attn_l2_norm: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__(embed_dim, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, attn_l2_norm=attn_l2_norm)
        self.scale_lens = scale_lengths(patch_nums)
        self.register_buffer("patch_nums", torch.tensor(self.scale_lens, dtype=torch.int32))
        self.attn_backend = attn_backend

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, attn_l2_norm={self.attn_l2_norm}, attn_backend={self.attn_backend!r}"

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, C) -> q, k, v each (B, L, H, hd), q/k normalised and q scaled when l2-norm."""
        qkv = self.project_qkv(x)
        q, k, v = qkv.unbind(2)
        if self.attn_l2_norm:
            q, k = (t.to(qkv.dtype) for t in self.normalize_qk(q, k, head_dim=2))
        return q, k, v

    def _pick_backend(self, x: torch.Tensor, dtype: torch.dtype, dropout_p: float) -> str:
        backend = self.attn_backend
        if backend not in ("auto", "sdpa", "flash", "flex"):
            raise ValueError(f"attn_backend must be 'auto', 'sdpa', 'flash' or 'flex', got {backend!r}")
        if backend == "auto":
            if not x.is_cuda:
                return "sdpa"
            if dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None:
                return "flash"
            if dropout_p == 0.0 and _flex() is not None:
                return "flex"
            return "sdpa"
        if backend == "flash" and (not x.is_cuda or _flash_varlen() is None):
            raise RuntimeError("attn_backend='flash' needs a CUDA input and an importable flash-attn")
        if backend == "flex" and (not x.is_cuda or _flex() is None or dropout_p > 0):
            raise RuntimeError("attn_backend='flex' needs a CUDA input, FlexAttention and no attention dropout")
        return backend

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        seq_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """x (B, L, C) -> (B, L, C).

        * `seq_lens` (token counts summing to L): block-diagonal attention, one segment per entry
          (flash-attn varlen / FlexAttention on CUDA, SDPA with a boolean mask otherwise);
        * else `attn_mask`: boolean (True = attend) or additive float (0 / -inf, like VAR's
          `attn_bias_for_masking`), (L, L) or broadcastable (B|1, H|1, L, L), SDPA;
        * else full (unmasked) attention over the L tokens.
        """
        batch, length, _ = x.shape
        q, k, v = self._qkv(x)
        dropout_p = self.attn_drop if self.training else 0.0
        if seq_lens is not None:
            seq_lens = tuple(int(n) for n in seq_lens)
            if sum(seq_lens) != length:
                raise ValueError(f"seq_lens {seq_lens} sum to {sum(seq_lens)}, not the sequence length {length}")
            backend = self._pick_backend(x, q.dtype, dropout_p)
            if backend == "flash":
                lens = torch.tensor(seq_lens * batch, dtype=torch.int32, device=x.device)
                cu = F.pad(torch.cumsum(lens, 0, dtype=torch.int32), (1, 0))
                flat = [t.reshape(batch * length, self.num_heads, self.head_dim) for t in (q, k, v)]
                out = _flash_varlen()(
                    *flat, cu, cu, max(seq_lens), max(seq_lens), dropout_p=dropout_p, softmax_scale=self.scale
                )
                return self.proj_drop(self.proj(out.reshape(batch, length, self.embed_dim)))
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if backend == "flex":
                flex_attention, _ = _flex()
                block_mask = _segment_block_mask(seq_lens, str(x.device))
                out = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), block_mask=block_mask, scale=self.scale)
            else:
                mask = _segment_mask_cpu_cached(seq_lens, str(x.device))
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=self.scale)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if attn_mask is not None:
                if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                    raise ValueError(f"attn_mask must be boolean or additive float, got {attn_mask.dtype}")
                attn_mask = attn_mask.to(q.dtype) if attn_mask.is_floating_point() else attn_mask
                if attn_mask.shape[-2:] != (length, length):
                    raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not fit length {length}")
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=self.scale)
        out = out.transpose(1, 2).reshape(batch, length, self.embed_dim)
        return self.proj_drop(self.proj(out))


MVARFFN = FFN  # VAR's MLP, the same in M-VAR


class MVARBlock(nn.Module):
    """One M-VAR block (official `AdaLNSelfAttn` of `basic_mvar.py`, non-shared AdaLN only: the
    official `shared_aln=True` is broken, SPEC section 5).

    Args:
        embed_dim: C. num_heads: H. patch_nums: side length of every scale, e.g. (1, 2, ..., 16).
        cond_dim: width of `cond_BD` (default C; VAR's class embedding is C wide).
        mlp_ratio, norm_eps, attn_l2_norm, drop (FFN/proj dropout), attn_drop, drop_path: as VAR.
        mamba_kwargs: extra `Mamba2` arguments over M-VAR's (d_state=64, d_conv=4, expand=2).
        attn_backend: see `MVARSelfAttention` ("auto", "sdpa", "flash", "flex").

    Calls:
        `forward(x_BLC, cond_BD, attn_mask=None, seq_lens=None) -> x_BLC`: teacher-forced
        training graph over the flattened token sequence (coarse to fine, raster order inside a
        scale). Attention segments: `seq_lens` if given; else `attn_mask` if given ((L, L) or
        (B|1, H|1, L, L); boolean with True = attend, or additive float 0/-inf); else the first scales of `patch_nums` whose
        token counts add up to L (so a full sequence, or any prefix of whole scales, needs no mask).
        Mamba scans all L tokens causally from a zero state.

        `forward_scale(x_BlC, cond_BD, mamba_state=None) -> (x_BlC, new_state)`: inference for
        the tokens of ONE scale (l = pn**2). Full attention among those l tokens only (no KV cache
        needed), Mamba continuing from `mamba_state` (a `Mamba2State` of this block's mixer;
        None before the first scale). Feeding scales 1..k in turn equals `forward` on their
        concatenation. Batch rows (e.g. the 2B rows of CFG) must stay aligned with the state's.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        patch_nums: Sequence[int],
        cond_dim: int | None = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        mamba_kwargs: dict | None = None,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.C = embed_dim
        self.D = embed_dim if cond_dim is None else cond_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = MVARSelfAttention(
            embed_dim, num_heads, patch_nums, attn_l2_norm=attn_l2_norm, attn_drop=attn_drop,
            proj_drop=drop, attn_backend=attn_backend,
        )
        self.mamba = Mamba2(d_model=embed_dim, **{"d_state": 64, "d_conv": 4, "expand": 2, **(mamba_kwargs or {})})
        self.ffn = MVARFFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(self.D, 9 * embed_dim))
        self.scale_lens = scale_lengths(patch_nums)

    def ada(self, cond_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(γ1, γ2, γ3, s1, s2, s3, b1, b2, b3), each (B, 1, C)."""
        return self.ada_lin(cond_BD).view(-1, 1, 9, self.C).unbind(2)

    def _modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return self.ln_wo_grad(x) * (scale + 1) + shift

    def _default_seq_lens(self, length: int) -> tuple[int, ...]:
        total = 0
        for k, n in enumerate(self.scale_lens):
            total += n
            if total == length:
                return self.scale_lens[: k + 1]
        raise ValueError(
            f"sequence length {length} is not a prefix of whole scales {self.scale_lens}; "
            "pass seq_lens or attn_mask"
        )

    def forward(
        self,
        x_BLC: torch.Tensor,
        cond_BD: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        seq_lens: Sequence[int] | None = None,
    ) -> torch.Tensor:
        g1, g2, g3, s1, s2, s3, b1, b2, b3 = self.ada(cond_BD)
        if seq_lens is None and attn_mask is None:
            seq_lens = self._default_seq_lens(x_BLC.shape[1])
        x = x_BLC
        x = x + self.drop_path(self.attn(self._modulate(x, s1, b1), attn_mask, seq_lens) * g1)
        x = x + self.drop_path(self.mamba(self._modulate(x, s2, b2)) * g2)
        return x + self.drop_path(self.ffn(self._modulate(x, s3, b3)) * g3)

    def forward_scale(
        self,
        x_BlC: torch.Tensor,
        cond_BD: torch.Tensor,
        mamba_state: Mamba2State | None = None,
    ) -> tuple[torch.Tensor, Mamba2State]:
        g1, g2, g3, s1, s2, s3, b1, b2, b3 = self.ada(cond_BD)
        x = x_BlC
        x = x + self.drop_path(self.attn(self._modulate(x, s1, b1)) * g1)
        m, state = self.mamba(self._modulate(x, s2, b2), state=mamba_state, return_state=True)
        x = x + self.drop_path(m * g2)
        return x + self.drop_path(self.ffn(self._modulate(x, s3, b3)) * g3), state
