"""LlamaGen's transformer pieces (RMSNorm, SwiGLU, RoPE attention, pre-norm block).

Attribute names are those of `autoregressive/models/gpt.py` in FoundationVision/LlamaGen, so that
official state dicts load unchanged (docs/parity/llamagen.md sections 2-3):
`attention.wqkv`, `attention.wo`, `feed_forward.w1/w3/w2`, `attention_norm`, `ffn_norm`, all
Linear layers without bias. Grouped-query attention is not supported (upstream's KV cache breaks
with it; SPEC section 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from arzoo.nn.attention import KVCache, attend
from arzoo.nn.rope import apply_rope

__all__ = [
    "Attention",
    "DropPath",
    "FeedForward",
    "RMSNorm",
    "TransformerBlock",
    "swiglu_hidden_dim",
]


def swiglu_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """LlamaGen's SwiGLU width: int(2 * 4 * dim / 3), times `ffn_dim_multiplier` (truncated) if
    given, then rounded up to a multiple of `multiple_of` (unchanged if already one).

    768 -> 2048, 1024 -> 2816, 3200 -> 8704; 64 with multiple_of 32 -> 192.
    """
    if multiple_of <= 0:
        raise ValueError(f"multiple_of must be positive, got {multiple_of}")
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    if hidden % multiple_of:
        hidden += multiple_of - hidden % multiple_of
    return hidden


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back to x's dtype, then times `weight` (init 1)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(torch.mean(xf * xf, dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: `ffn_dropout(w2(silu(w1 x) * w3 x))`."""

    def __init__(
        self,
        dim: int,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        ffn_dropout_p: float = 0.0,
    ) -> None:
        super().__init__()
        hidden = swiglu_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Attention(nn.Module):
    """Multi-head self-attention with 2-D RoPE on q and k; one fused `wqkv` projection (rows: all of
    q, then k, then v; head h owns rows h*hd .. (h+1)*hd-1 of each part), output `wo`.

    `kv_cache` is None until `setup_cache` is called; it is used only by calls that pass `input_pos`.
    """

    def __init__(
        self, dim: int, n_head: int, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0
    ) -> None:
        super().__init__()
        if dim % n_head != 0:
            raise ValueError(f"dim {dim} is not divisible by n_head {n_head}")
        self.dim = dim
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, 3 * dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """Allocate a zero-filled KV cache of (batch_size, n_head, max_seq_len, head_dim)."""
        self.kv_cache = KVCache(
            batch_size, self.n_head, max_seq_len, self.head_dim, dtype=dtype, device=device
        )
        return self.kv_cache

    def clear_cache(self) -> None:
        self.kv_cache = None

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, L, D), RoPE rows `freqs` (L, hd/2, 2) -> (B, L, D).

        * no `input_pos`, no mask: causal attention over the L positions (`is_causal=True`);
        * no `input_pos`, a boolean mask (B or 1, H or 1, L, L): that mask;
        * `input_pos` (L,): k/v are written into the KV cache at those slots and the queries attend
          over all cache slots under `mask` (B or 1, H or 1, L, S), which is then required.
        """
        batch, length, _ = x.shape
        q, k, v = self.wqkv(x).split([self.dim, self.dim, self.dim], dim=-1)
        q = q.view(batch, length, self.n_head, self.head_dim)
        k = k.view(batch, length, self.n_head, self.head_dim)
        v = v.view(batch, length, self.n_head, self.head_dim)
        q = apply_rope(q, freqs)
        k = apply_rope(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("input_pos was given but no KV cache is set up (call setup_cache first)")
            if mask is None:
                raise ValueError("attending over the KV cache needs a boolean mask (B, 1, L, S)")
            k, v = self.kv_cache.update(input_pos, k, v)
        dropout_p = self.attn_dropout_p if self.training else 0.0
        out = attend(q, k, v, mask=mask, is_causal=mask is None, dropout_p=dropout_p)
        out = out.transpose(1, 2).contiguous().view(batch, length, self.dim)
        return self.resid_dropout(self.wo(out))


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's `DropPath`, scale_by_keep=True); identity in eval mode."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
        if keep_prob > 0.0:
            keep.div_(keep_prob)
        return x * keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + drop_path(attention(attention_norm(x))); out = h + drop_path(
    feed_forward(ffn_norm(h)))."""

    def __init__(
        self,
        dim: int,
        n_head: int,
        multiple_of: int = 256,
        ffn_dim_multiplier: float | None = None,
        norm_eps: float = 1e-5,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.0,
        ffn_dropout_p: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.attention = Attention(dim, n_head, attn_dropout_p, resid_dropout_p)
        self.feed_forward = FeedForward(dim, multiple_of, ffn_dim_multiplier, ffn_dropout_p)
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, L, D), RoPE rows (L, hd/2, 2) -> (B, L, D); see `Attention.forward` for mask/input_pos."""
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs, mask, input_pos))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))
