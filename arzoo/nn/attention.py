"""Attention helpers shared by the transformer generators: a key/value cache and an SDPA wrapper.

`KVCache` follows LlamaGen's (`autoregressive/models/gpt.py`): zero-filled (B, H, S, hd) buffers,
new keys/values are written at the given sequence positions and attention always runs over all S
slots, with a boolean mask hiding the slots not written yet. Unlike upstream, the buffers are
registered with `persistent=False`, so a model's `state_dict()` never contains them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["KVCache", "attend"]


class KVCache(nn.Module):
    """Preallocated key/value buffers `k_cache`, `v_cache`, each (batch_size, num_heads, max_seq_len,
    head_dim), zero-filled and non-persistent (never in a state dict)."""

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        max_seq_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("batch_size", batch_size),
            ("num_heads", num_heads),
            ("max_seq_len", max_seq_len),
            ("head_dim", head_dim),
        ):
            if value <= 0:
                raise ValueError(f"KVCache {name} must be positive, got {value}")
        shape = (batch_size, num_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_batch_size(self) -> int:
        return self.k_cache.shape[0]

    @property
    def max_seq_len(self) -> int:
        return self.k_cache.shape[2]

    def reset(self) -> None:
        """Zero both buffers (not needed for correctness: unwritten slots are masked out)."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(
        self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` (B, H, L, hd) at slots `input_pos` (L,) and return all keys and values
        (B, H, S, hd) of the first B cache rows (B may be smaller than the allocated batch)."""
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"k and v must both be (B, H, L, hd), got {tuple(k.shape)} and {tuple(v.shape)}")
        batch, heads, length, head_dim = k.shape
        _, cache_heads, _, cache_head_dim = self.k_cache.shape
        if heads != cache_heads or head_dim != cache_head_dim or batch > self.max_batch_size:
            raise ValueError(
                f"k/v of shape {tuple(k.shape)} do not fit the KV cache of shape {tuple(self.k_cache.shape)} "
                "(need the same heads and head dim, and a batch no larger than the cache's)"
            )
        if input_pos.dim() != 1 or input_pos.shape[0] != length:
            raise ValueError(
                f"input_pos must be a 1-D tensor of {length} positions (one per new key), got shape "
                f"{tuple(input_pos.shape)}"
            )
        k_all, v_all = self.k_cache[:batch], self.v_cache[:batch]
        k_all[:, :, input_pos] = k.to(k_all.dtype)
        v_all[:, :, input_pos] = v.to(v_all.dtype)
        return k_all, v_all


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for q (B, H, L, hd) and k, v (B, H, S, hd) -> (B, H, L, hd).

    `mask` is boolean (True = attend), broadcastable from (B or 1, H or 1, L, S). `is_causal` and a
    mask are mutually exclusive. `scale` defaults to 1/sqrt(hd).
    """
    if mask is not None:
        if is_causal:
            raise ValueError("attend: give either a mask or is_causal=True, not both")
        if mask.dtype != torch.bool:
            raise ValueError(f"attend: the mask must be boolean (True = attend), got {mask.dtype}")
        if mask.dim() != 4 or mask.shape[-2:] != (q.shape[-2], k.shape[-2]):
            raise ValueError(
                f"attend: mask of shape {tuple(mask.shape)} does not fit (B or 1, H or 1, "
                f"{q.shape[-2]}, {k.shape[-2]})"
            )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale
    )
