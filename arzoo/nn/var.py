"""VAR's layers (FoundationVision/VAR `models/basic_var.py`): the attention mixer, the AdaLN block
and the AdaLN before the head, with the official state-dict keys. Facts: docs/parity/var.md."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arzoo.nn.llama import DropPath

__all__ = ["FFN", "AdaLNBeforeHead", "AdaLNSelfAttn", "SelfAttention", "SharedAdaLin", "VARAttentionWeights"]

_MAX_SCALE_MUL = torch.log(torch.tensor(100.0)).item()  # ln(100) in float32, as upstream


class FFN(nn.Module):
    """VAR's MLP `fc2(GELU_tanh(fc1(x)))` (keys `fc1`, `fc2`), used by VAR's and M-VAR's blocks."""

    def __init__(self, embed_dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))

# ---- network: VAR's transformer ----


class VARAttentionWeights(nn.Module):
    """The weights VAR's attention and M-VAR's share, and their projection to q, k, v.

    Keys: `mat_qkv.weight` (3C, C; no bias parameter), `q_bias`, `v_bias`, the all-zero buffer
    `zero_k_bias`, `scale_mul_1H11` (only with `attn_l2_norm`), `proj.weight` / `proj.bias`.
    With `attn_l2_norm` q and k are L2-normalised, q is multiplied by `exp(min(scale_mul, ln 100))`
    and the softmax scale is 1; otherwise the softmax scale is `0.25 / sqrt(hd)` (both official).
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        attn_l2_norm: bool = True,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def project_qkv(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) -> qkv (B, L, 3, H, hd), with the q and v biases (k has none)."""
        B, L, _ = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        return F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """With `attn_l2_norm`: q, k L2-normalised and q scaled per head (heads on axis `head_dim`)."""
        if not self.attn_l2_norm:
            return q, k
        scale_mul = self.scale_mul_1H11.clamp_max(_MAX_SCALE_MUL).exp()  # (1, H, 1, 1)
        if head_dim == 2:
            scale_mul = scale_mul.transpose(1, 2)
        return F.normalize(q, dim=-1).mul(scale_mul), F.normalize(k, dim=-1)


class SelfAttention(VARAttentionWeights):
    """VAR's `SelfAttention`, the block's inter-token mixer (weights: `VARAttentionWeights`).

    The mixer interface a block relies on (what a replacement such as M-VAR's must offer):
    `forward(x_BLC, attn_bias) -> (B, L, C)` with `attn_bias` an additive mask (1, 1, L, L) or None,
    and `kv_caching(enable)`: while enabled, every call appends its keys / values to a cache and
    attends over everything cached, unmasked (sampling one scale at a time).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.caching = False
        self.cached_k: torch.Tensor | None = None
        self.cached_v: torch.Tensor | None = None

    def kv_caching(self, enable: bool) -> None:
        """Switch the KV cache on (empty) or off (freed)."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        q, k, v = self.project_qkv(x_BLC).permute(2, 0, 3, 1, 4).unbind(dim=0)  # each (B, H, L, hd)
        q, k = self.normalize_qk(q, k, head_dim=1)
        if self.caching:
            if self.cached_k is not None:
                k = torch.cat((self.cached_k, k), dim=2)
                v = torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = self.attend(q, k, v, attn_bias)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Any) -> torch.Tensor:
        """Softmax attention of q (B, H, L, hd) over k, v (B, H, S, hd) with `attn_bias` (additive or
        None) -> (B, H, L, hd); a subclass may accept other mask descriptions here."""
        dropout_p = self.attn_drop if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=dropout_p, scale=self.scale)


class SharedAdaLin(nn.Linear):
    """`shared_ada_lin`'s Linear: cond (B, D) -> (B, 1, 6, C), shared by all blocks."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return super().forward(cond_BD).view(-1, 1, 6, self.weight.shape[0] // 6)


class AdaLNSelfAttn(nn.Module):
    """VAR's block: AdaLN-modulated mixer (`attn`) and MLP (`ffn`), each gated by its own gamma.

        x = x + drop_path(attn(LN(x) * (1 + scale1) + shift1, attn_bias) * gamma1)
        x = x + drop_path(ffn (LN(x) * (1 + scale2) + shift2) * gamma2)

    The six modulation vectors come from `ada_lin(cond)` (keys `ada_lin.1.*`), or with shared AdaLN
    from `ada_gss + shared_ada_lin(cond)` (the network passes the latter as `cond`). `attn` is any
    mixer with `SelfAttention`'s interface (see there), e.g. one that mixes across scales differently.
    """

    def __init__(
        self,
        embed_dim: int,
        cond_dim: int,
        mixer: nn.Module,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        drop_path: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
    ) -> None:
        super().__init__()
        self.C = embed_dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = mixer
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.shared_aln = shared_aln
        if shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, embed_dim) / embed_dim**0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 6 * embed_dim))

    def modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(gamma1, gamma2, scale1, scale2, shift1, shift2), each (B, 1, C), in the official order."""
        if self.shared_aln:
            return (self.ada_gss + cond).unbind(2)  # (1,1,6,C) + (B,1,6,C)
        return self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)

    def forward(self, x_BLC: torch.Tensor, cond: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        h = self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1)
        x_BLC = x_BLC + self.drop_path(self.attn(h, attn_bias=attn_bias).mul_(gamma1))
        h = self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """`head_nm`: `LN(x) * (1 + scale) + shift` with (scale, shift) = `ada_lin(cond)` (keys `ada_lin.1.*`)."""

    def __init__(self, embed_dim: int, cond_dim: int, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.C = embed_dim
        self.ln_wo_grad = nn.LayerNorm(embed_dim, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(cond_dim, 2 * embed_dim))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)
