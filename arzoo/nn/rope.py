"""LlamaGen's 2-D rotary position embedding (RoPE) over a g x g token grid.

Follows `precompute_freqs_cis_2d` and `apply_rotary_emb` of FoundationVision/LlamaGen
(`autoregressive/models/gpt.py`; docs/parity/llamagen.md section 3.4):

* A table row holds `head_dim / 2` (cos, sin) pairs, float32. The first `head_dim / 4` angles are
  the cell's row index times the base frequencies, the last `head_dim / 4` its column index times
  the same frequencies, with `w_k = 1 / base^(2k / (head_dim/2))`.
* The table used by the c2i GPT is `[cls_token_num zero rows] + [one row per cell, raster order]`.
  The class rows are all zeros (cos = sin = 0, not the identity), so a class token's rotated q/k
  are exactly zero.
* The rotation acts on interleaved pairs `(x[2j], x[2j+1])`, in float32, cast back to x's dtype.

`rope_2d_for_cells` gives the rows of arbitrary grid cells, so that token orderings other than
raster order can use the angles of the cell each token sits in. For raster order over the whole
grid it reproduces the official table bit for bit (the cos/sin run over the same (N, hd/2) layout);
for other cell lists a value may differ from the raster table's by an ULP (vectorised vs scalar
cos), so models gather their rows from one precomputed table instead.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rope", "rope_2d_for_cells", "rope_2d_table", "rope_base_frequencies"]


def _check_head_dim(head_dim: int) -> None:
    if head_dim <= 0 or head_dim % 4 != 0:
        raise ValueError(
            f"2-D RoPE needs a head dim divisible by 4 (one quarter of the rotated pairs per grid "
            f"axis), got head_dim={head_dim}; choose dim / n_head as a multiple of 4"
        )


def rope_base_frequencies(
    head_dim: int, base: float = 10000.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The `head_dim / 4` base frequencies `1 / base^(2k / (head_dim/2))`, float32, in the official
    operation order (even integers as floats, divided by head_dim/2, base raised to them, reciprocal)."""
    _check_head_dim(head_dim)
    half = head_dim // 2
    exponents = torch.arange(0, half, 2, device=device)[: half // 2].float() / half
    return 1.0 / (base**exponents)


def rope_2d_for_cells(
    rows: torch.Tensor, cols: torch.Tensor, head_dim: int, base: float = 10000.0
) -> torch.Tensor:
    """RoPE rows (N, head_dim/2, 2) = (cos, sin) float32 for the grid cells `(rows[n], cols[n])`.

    `rows` and `cols` are integer tensors of shape (N,) (the raster index of a cell is r*g + c).
    The angles of a cell are `[r*w_0 .. r*w_{hd/4-1}, c*w_0 .. c*w_{hd/4-1}]`.
    """
    _check_head_dim(head_dim)
    if rows.dim() != 1 or rows.shape != cols.shape:
        raise ValueError(
            f"rows and cols must be 1-D tensors of the same length, got shapes {tuple(rows.shape)} "
            f"and {tuple(cols.shape)}"
        )
    if rows.is_floating_point() or cols.is_floating_point():
        raise ValueError("rows and cols must be integer grid coordinates")
    freqs = rope_base_frequencies(head_dim, base, device=rows.device)
    # float32 products, as `torch.outer(arange(g), freqs)` upstream.
    angles = torch.cat(
        [rows.float()[:, None] * freqs[None, :], cols.float()[:, None] * freqs[None, :]], dim=-1
    ).contiguous()
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_2d_table(
    grid_size: int,
    head_dim: int,
    base: float = 10000.0,
    cls_token_num: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """LlamaGen's `freqs_cis`: (cls_token_num + g*g, head_dim/2, 2) float32.

    Rows `0 .. cls_token_num-1` are zeros (class tokens); row `cls_token_num + r*g + c` holds the
    angles of grid cell (r, c). `device` defaults to torch's current default device; the official
    code builds the table on the CPU.
    """
    _check_head_dim(head_dim)
    if grid_size <= 0:
        raise ValueError(f"grid_size must be positive, got {grid_size}")
    if cls_token_num < 0:
        raise ValueError(f"cls_token_num must be >= 0, got {cls_token_num}")
    cells = torch.arange(grid_size * grid_size, device=device)
    grid = rope_2d_for_cells(cells // grid_size, cells % grid_size, head_dim, base)
    cls_rows = torch.zeros(cls_token_num, head_dim // 2, 2, dtype=grid.dtype, device=grid.device)
    return torch.cat([cls_rows, grid], dim=0)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of `x` (B, L, H, hd) by `freqs` (L, hd/2, 2), or per batch row
    (B, L, hd/2, 2); same shape and dtype.

    Pair j = (x[2j], x[2j+1]) becomes (x0*cos_j - x1*sin_j, x1*cos_j + x0*sin_j), computed in
    float32 and cast back to x's dtype (the official `apply_rotary_emb`).
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rope expects x of shape (B, L, H, hd), got {tuple(x.shape)}")
    seq_len, head_dim = x.shape[1], x.shape[3]
    per_row = freqs.dim() == 4
    expected = ((x.shape[0],) if per_row else ()) + (seq_len, head_dim // 2, 2)
    if head_dim % 2 != 0 or tuple(freqs.shape) != expected:
        raise ValueError(
            f"RoPE rows of shape {tuple(freqs.shape)} do not fit x of shape {tuple(x.shape)}: expected {expected}"
        )
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, L, H, hd/2, 2)
    freqs = freqs.reshape(x.shape[0] if per_row else 1, seq_len, 1, head_dim // 2, 2)
    rotated = torch.stack(
        [
            pairs[..., 0] * freqs[..., 0] - pairs[..., 1] * freqs[..., 1],
            pairs[..., 1] * freqs[..., 0] + pairs[..., 0] * freqs[..., 1],
        ],
        dim=-1,
    )
    return rotated.flatten(3).type_as(x)
