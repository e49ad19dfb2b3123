"""Convolutional building blocks of the VQ autoencoders (LlamaGen's and VAR's share the same math).

Both official tokenizers use the taming-transformers blocks: GroupNorm(32, eps 1e-6) + SiLU residual
blocks, single-head spatial self-attention, a right/bottom-padded stride-2 downsample and a
nearest-neighbour upsample. Only the attribute names differ, and the attention block takes a flag
for VAR's fused `qkv` projection, so that each tokenizer keeps its official state-dict keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the official 32 groups; channel counts must be multiples of 32."""
    if channels % GROUPS != 0:
        raise ValueError(
            f"channel count {channels} is not a multiple of {GROUPS}: the VQ autoencoders use GroupNorm "
            f"with {GROUPS} groups, so `ch * ch_mult[i]` and `z_channels` must be multiples of {GROUPS}"
        )
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice, plus a 1x1 `nin_shortcut` only when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BCHW)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = x_BCHW if self.nin_shortcut is None else self.nin_shortcut(x_BCHW)
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions (q/k/v as 1x1 convs), with a residual.

    `fused_qkv=True` stores one `qkv` conv (VAR's layout); otherwise separate `q`, `k`, `v` convs
    (LlamaGen's layout). The arithmetic (bmm, scale C^-0.5, softmax over keys) follows both.
    """

    def __init__(self, channels: int, fused_qkv: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.norm = group_norm(channels)
        self.fused_qkv = fused_qkv
        if fused_qkv:
            self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        else:
            self.q = nn.Conv2d(channels, channels, 1)
            self.k = nn.Conv2d(channels, channels, 1)
            self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x_BCHW.shape
        h = self.norm(x_BCHW)
        if self.fused_qkv:
            q, k, v = self.qkv(h).reshape(B, 3, C, H, W).unbind(1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q_BNC = q.reshape(B, C, H * W).permute(0, 2, 1)
        w_BNN = torch.bmm(q_BNC, k.reshape(B, C, H * W)) * (int(C) ** -0.5)
        w_BNN = F.softmax(w_BNN, dim=2)
        out_BCN = torch.bmm(v.reshape(B, C, H * W), w_BNN.permute(0, 2, 1))
        return x_BCHW + self.proj_out(out_BCN.reshape(B, C, H, W))


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv (the official asymmetric padding)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(x_BCHW.float(), scale_factor=2.0, mode="nearest").to(x_BCHW.dtype)
        return self.conv(up)
