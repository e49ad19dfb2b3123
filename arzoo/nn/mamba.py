"""Mamba2 mixer with mamba-ssm's parameter names and shapes, a pure-PyTorch chunked SSD scan, and a
recurrent state for feeding a sequence in pieces.

Checkpoint layout: exactly `mamba_ssm.Mamba2` (2.2.x), so that official state dicts (e.g. M-VAR's
`blocks.{i}.mamba.*`, docs/parity/mvar.md section 6) load strictly:

| key | shape |
|---|---|
| `dt_bias`, `A_log` | (nheads,) |
| `D` | (nheads,), or (d_ssm,) with `D_has_hdim=True` |
| `in_proj.weight` (+ `.bias` with `bias=True`) | (2*d_inner + 2*ngroups*d_state + nheads, d_model) |
| `conv1d.weight`, `.bias` | (conv_dim, 1, d_conv), (conv_dim,) with conv_dim = d_ssm + 2*ngroups*d_state |
| `norm.weight` | (d_ssm,), only with `rmsnorm=True` |
| `out_proj.weight` (+ `.bias`) | (d_model, d_inner) |

Math (mamba-ssm's fused mem-efficient path): `in_proj` -> [z0 | x0 | z | xBC | dt] (z0/x0 only when
d_ssm < d_inner) -> causal depthwise conv1d over xBC (kernel d_conv, left zero padding) + SiLU ->
split xBC into x (heads of `headdim`), B, C (`ngroups` groups of `d_state`, head h uses group
h // (nheads / ngroups)) -> dt = softplus(dt + dt_bias), A = -exp(A_log) -> the scan

    s_t = exp(dt_t A) s_{t-1} + dt_t B_t x_t^T,    y_t = C_t s_t + D x_t

-> y = RMSNorm_grouped(y * SiLU(z)) * norm.weight (norm_before_gate=False; eps 1e-5) -> out_proj.

Backends (same parameters either way):

* CUDA tensors with mamba-ssm importable (`backend="auto"` or `"kernels"`): mamba-ssm's Triton
  kernels (`mamba_split_conv1d_scan_combined` for a stateless call, `causal_conv1d_fn` +
  `mamba_chunk_scan_combined` when a state goes in or out, `causal_conv1d_update` +
  `selective_state_update` for `step`). mamba-ssm/causal-conv1d are imported lazily, the first
  time a CUDA tensor reaches `forward`, never when arzoo is imported; any import failure (they
  cannot be built on CPU machines) falls back to PyTorch.
* Everywhere else (`backend="torch"`): `ssd_chunk_scan`, the SSD "minimal" form: quadratic
  attention-like products inside each chunk of `chunk_size` tokens plus a recurrence over chunks
  (one small Python step per chunk, not per token).

Recurrent state (`Mamba2State`): `conv_state` (B, conv_dim, d_conv), the last d_conv raw (pre-conv)
xBC inputs, newest last, zeros before the sequence start; `ssm_state` (B, nheads, headdim, d_state)
float32. These are mamba-ssm's inference-cache layouts. A zero state is the same as no state, and
`forward(u2, state=forward(u1, return_state=True)[1])` equals the tail of `forward(cat(u1, u2))`.
States are never modified in place: every call returns new tensors.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GatedRMSNorm", "Mamba2", "Mamba2State", "mamba_kernels", "ssd_chunk_scan"]


class Mamba2State(NamedTuple):
    """Carried state of one `Mamba2` layer: `conv_state` (B, conv_dim, d_conv), the last d_conv
    pre-conv xBC inputs (newest last); `ssm_state` (B, nheads, headdim, d_state), float32."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


@functools.lru_cache(maxsize=1)
def mamba_kernels() -> SimpleNamespace | None:
    """mamba-ssm's (and causal-conv1d's) CUDA/Triton entry points, or None when mamba-ssm cannot
    be imported. Cached; only called for CUDA inputs. causal-conv1d and `selective_state_update`
    are optional (their fields are None when missing)."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import (
            mamba_chunk_scan_combined,
            mamba_split_conv1d_scan_combined,
        )
    except Exception:  # ImportError, or a broken CUDA extension (OSError, RuntimeError, ...)
        return None
    try:
        from mamba_ssm.ops.triton.selective_state_update import selective_state_update
    except Exception:
        selective_state_update = None
    try:
        from causal_conv1d import causal_conv1d_fn, causal_conv1d_update
    except Exception:
        causal_conv1d_fn = causal_conv1d_update = None
    return SimpleNamespace(
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
        mamba_split_conv1d_scan_combined=mamba_split_conv1d_scan_combined,
        selective_state_update=selective_state_update,
        causal_conv1d_fn=causal_conv1d_fn,
        causal_conv1d_update=causal_conv1d_update,
    )


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., i, j] = x[j+1] + ... + x[i] for i >= j, -inf above the
    diagonal; computed by a masked cumsum (no cumsum differences, so no cancellation)."""
    length = x.shape[-1]
    x = x.unsqueeze(-1).expand(*x.shape, length)  # [..., i, j] = x[i]
    strict = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~strict, 0.0)
    out = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~causal, -math.inf)


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 256,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD scan in float32 (no D skip, no gate).

    x (b, l, h, p), dt (b, l, h) already discretised (after softplus), A (h,) negative,
    B and C (b, l, g, n) with h divisible by g, initial_state (b, h, p, n) or None (zeros).
    Returns y (b, l, h, p) in x's dtype and the final state (b, h, p, n) float32.

    Inside a chunk of T tokens: y_diag = (C B^T * exp(segsum(dt A))) (dt x), quadratic in T;
    across chunks: the chunk-end states are passed on by s <- exp(sum dt A) s + chunk_state.
    The tail is zero-padded (dt = 0 there, so padding changes neither y nor the final state).
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, length, h, p = x.shape
    g, n = B.shape[-2:]
    if h % g:
        raise ValueError(f"nheads {h} is not divisible by ngroups {g}")
    out_dtype = x.dtype
    x, dt, A, B, C = x.float(), dt.float(), A.float(), B.float(), C.float()
    if initial_state is None:
        state = x.new_zeros(b, h, p, n)
    else:
        state = initial_state.float()
    if length == 0:
        return x.new_zeros(b, 0, h, p).to(out_dtype), state
    T = min(chunk_size, length)
    pad = (-length) % T
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    nc = (length + pad) // T
    rep = h // g

    X = (x * dt.unsqueeze(-1)).view(b, nc, T, h, p)
    dA = (dt * A).view(b, nc, T, h).permute(0, 3, 1, 2)  # (b, h, c, T)
    Bc = B.view(b, nc, T, g, n)
    Cc = C.view(b, nc, T, g, n)
    dA_cs = torch.cumsum(dA, dim=-1)  # (b, h, c, T)

    # 1. Within-chunk (diagonal blocks).
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)  # (b, c, g, T, T), shared by a group's heads
    if rep > 1:
        CB = CB.repeat_interleave(rep, dim=2)
    decay_in = torch.exp(_segsum(dA)).permute(0, 2, 1, 3, 4)  # (b, c, h, T, T)
    y = torch.einsum("bchls,bcshp->bclhp", CB * decay_in, X)

    # 2. State contributed by each chunk, taken at its end.
    Bh = Bc.repeat_interleave(rep, dim=3) if rep > 1 else Bc.expand(b, nc, T, h, n)
    decay_to_end = torch.exp(dA_cs[..., -1:] - dA_cs)  # (b, h, c, T)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bh, decay_to_end, X)

    # 3. Recurrence across chunks: the state entering each chunk.
    chunk_decay = torch.exp(dA_cs[..., -1])  # (b, h, c)
    entering = []
    for c in range(nc):
        entering.append(state)
        state = state * chunk_decay[:, :, c, None, None] + chunk_states[:, c]
    prev = torch.stack(entering, dim=1)  # (b, c, h, p, n)

    # 4. Contribution of the entering state to every position of the chunk.
    Ch = Cc.repeat_interleave(rep, dim=3) if rep > 1 else Cc.expand(b, nc, T, h, n)
    y = y + torch.einsum("bclhn,bchpn,bhcl->bclhp", Ch, prev, torch.exp(dA_cs))
    y = y.reshape(b, nc * T, h, p)[:, :length]
    return y.to(out_dtype), state


class GatedRMSNorm(nn.Module):
    """mamba-ssm's `RMSNormGated` (`layernorm_gated.RMSNorm`): with `norm_before_gate=False`,
    RMSNorm(x * SiLU(z)) * weight; RMS over groups of `group_size` channels; float32 math."""

    def __init__(
        self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False
    ) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = hidden_size if group_size is None else group_size
        if hidden_size % self.group_size:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by group_size {self.group_size}")
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        if z is not None and not self.norm_before_gate:
            x = x * F.silu(z.float())
        xg = x.unflatten(-1, (-1, self.group_size))
        xg = xg * torch.rsqrt(xg.square().mean(dim=-1, keepdim=True) + self.eps)
        out = xg.flatten(-2) * self.weight.float()
        if z is not None and self.norm_before_gate:
            out = out * F.silu(z.float())
        return out.to(dtype)


class Mamba2(nn.Module):
    """`mamba_ssm.Mamba2` (2.2.x) re-implemented: same constructor defaults, parameter names, shapes
    and init; `forward(u (B, L, d_model)) -> (B, L, d_model)`.

    `forward(u, state=None, return_state=False, chunk_size=None)` continues from `state` (a
    `Mamba2State`; None = start of sequence) and, with `return_state=True`, returns
    `(out, new_state)`. `step(u (B, 1, D) or (B, D), state)` is the single-token recurrence.
    `backend`: "auto" (mamba-ssm kernels for CUDA inputs when importable, else PyTorch), "torch",
    or "kernels" (raises when mamba-ssm is missing or the input is not on CUDA). `chunk_size` is
    the SSD chunk length of both backends (256 as in mamba-ssm).
    Unsupported mamba-ssm options: tensor/sequence parallelism (`process_group`), varlen
    `seq_idx`/`cu_seqlens`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        backend: str = "auto",
        layer_idx: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        self.ngroups = ngroups
        if self.d_ssm % headdim:
            raise ValueError(f"d_ssm {self.d_ssm} is not divisible by headdim {headdim}")
        self.nheads = self.d_ssm // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads {self.nheads} is not divisible by ngroups {ngroups}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.chunk_size = chunk_size
        self.backend = backend
        self.layer_idx = layer_idx
        self.d_mlp = self.d_inner - self.d_ssm
        self.conv_dim = self.d_ssm + 2 * ngroups * d_state

        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=bias, **factory)
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, kernel_size=d_conv, groups=self.conv_dim,
            padding=d_conv - 1, bias=conv_bias, **factory,
        )
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()

        dt = torch.exp(
            torch.rand(self.nheads, **factory) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.dt_bias._no_weight_decay = True
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"bad A_init_range {A_init_range}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = GatedRMSNorm(
                self.d_ssm, eps=1e-5, group_size=self.d_ssm // ngroups, norm_before_gate=norm_before_gate
            )
            if device is not None or dtype is not None:
                self.norm.to(**{k: v for k, v in factory.items() if v is not None})
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    # ----------------------------------------------------------------------------------- helpers
    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, expand={self.expand}, "
            f"headdim={self.headdim}, nheads={self.nheads}, ngroups={self.ngroups}, "
            f"chunk_size={self.chunk_size}, backend={self.backend!r}"
        )

    def allocate_state(
        self, batch_size: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> Mamba2State:
        """Zero state (equivalent to starting a sequence): conv_state in `dtype` (default: the conv
        weight's), ssm_state float32. conv_state uses mamba-ssm's (B, W, D).transpose layout."""
        device = self.conv1d.weight.device if device is None else device
        dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv = torch.zeros(batch_size, self.d_conv, self.conv_dim, device=device, dtype=dtype).transpose(1, 2)
        ssm = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=torch.float32)
        return Mamba2State(conv, ssm)

    def _kernels_for(self, u: torch.Tensor) -> SimpleNamespace | None:
        if self.backend == "torch":
            return None
        if self.backend not in ("auto", "kernels"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'kernels', got {self.backend!r}")
        kernels = mamba_kernels() if u.is_cuda else None
        if kernels is None and self.backend == "kernels":
            raise RuntimeError("backend='kernels' needs a CUDA input and an importable mamba-ssm")
        return kernels

    def _split(self, zxbcdt: torch.Tensor):
        return torch.split(
            zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1
        )

    def _D(self) -> torch.Tensor:
        """D as (nheads, headdim) or (nheads,) (mamba-ssm's kernel argument)."""
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _dt(self, dt: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(dt.float() + self.dt_bias.float())
        lo, hi = self.dt_limit
        if (lo, hi) != (0.0, float("inf")):
            dt = dt.clamp(min=lo, max=hi)
        return dt

    def _finish(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Gate/norm y (.., d_ssm), prepend the gated-MLP part, out_proj."""
        if self.rmsnorm:
            y = self.norm(y, z)
        else:
            y = y * F.silu(z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    def _conv(self, xBC: torch.Tensor, state: Mamba2State | None, kernels) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU over xBC (B, L, conv_dim), continuing after the last
        d_conv - 1 inputs in `state`; returns (activated (B, L, conv_dim), new conv_state)."""
        w = self.d_conv
        xt = xBC.transpose(1, 2)  # (B, D, L)
        if state is None:
            history = xt.new_zeros(xt.shape[0], xt.shape[1], w - 1)
        else:
            history = state.conv_state[..., 1:].to(xt.dtype)
        xcat = torch.cat([history, xt], dim=-1)  # (B, D, w - 1 + L)
        new_conv = xcat[..., -w:]
        fn = None if kernels is None else kernels.causal_conv1d_fn
        if fn is not None:
            out = fn(xcat, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")[..., w - 1:]
        else:
            out = F.silu(F.conv1d(xcat, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))
        return out.transpose(1, 2), new_conv

    # ----------------------------------------------------------------------------------- forward
    def forward(
        self,
        u: torch.Tensor,
        state: Mamba2State | None = None,
        return_state: bool = False,
        chunk_size: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Mamba2State]:
        """u (B, L, d_model) -> out (B, L, d_model), or (out, new_state) with `return_state=True`.

        `state`: the `Mamba2State` left by the previous piece of the same sequences (None: start).
        `chunk_size` overrides `self.chunk_size` for this call (the result does not depend on it
        beyond float rounding).
        """
        if u.dim() != 3 or u.shape[-1] != self.d_model:
            raise ValueError(f"Mamba2 expects (B, L, {self.d_model}), got {tuple(u.shape)}")
        chunk_size = self.chunk_size if chunk_size is None else chunk_size
        kernels = self._kernels_for(u)
        zxbcdt = self.in_proj(u)
        A = -torch.exp(self.A_log.float())

        if kernels is not None and state is None and not return_state:
            # The fused training path of mamba_ssm.Mamba2 (use_mem_eff_path=True).
            limit = {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}
            return kernels.mamba_split_conv1d_scan_combined(
                zxbcdt,
                self.conv1d.weight.squeeze(1),
                self.conv1d.bias,
                self.dt_bias,
                A,
                D=self._D(),
                chunk_size=chunk_size,
                activation="silu",
                rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
                rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6,
                outproj_weight=self.out_proj.weight,
                outproj_bias=self.out_proj.bias,
                headdim=None if self.D_has_hdim else self.headdim,
                ngroups=self.ngroups,
                norm_before_gate=self.norm_before_gate,
                **limit,
            )

        z0, x0, z, xBC, dt = self._split(zxbcdt)
        xBC, new_conv = self._conv(xBC, state, kernels)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        batch, length = u.shape[:2]
        x = x.unflatten(-1, (self.nheads, self.headdim))
        B = B.unflatten(-1, (self.ngroups, self.d_state))
        C = C.unflatten(-1, (self.ngroups, self.d_state))
        init = None if state is None else state.ssm_state

        if kernels is not None:
            limit = {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}
            y, final = kernels.mamba_chunk_scan_combined(
                x, dt, A, B, C, chunk_size,
                D=self._D(),
                z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim)),
                dt_bias=self.dt_bias,
                initial_states=None if init is None else init.contiguous(),
                dt_softplus=True,
                return_final_states=True,
                **limit,
            )
            y = y.flatten(-2)
            final = final.float()
            if self.rmsnorm:
                y = self.norm(y, z)
            if self.d_mlp > 0:
                y = torch.cat([F.silu(z0) * x0, y], dim=-1)
            out = self.out_proj(y)
        else:
            dt = self._dt(dt)
            y, final = ssd_chunk_scan(x, dt, A, B, C, chunk_size, init)
            D = self.D.float().view(self.nheads, self.headdim if self.D_has_hdim else 1)
            y = (y.float() + x.float() * D).to(x.dtype).flatten(-2)
            out = self._finish(y, z, z0, x0)
        if return_state:
            return out, Mamba2State(new_conv, final)
        return out

    def step(self, u: torch.Tensor, state: Mamba2State | None) -> tuple[torch.Tensor, Mamba2State]:
        """One token: u (B, 1, d_model) or (B, d_model) -> (out of the same shape, new state)."""
        squeeze = u.dim() == 2
        if squeeze:
            u = u.unsqueeze(1)
        if u.dim() != 3 or u.shape[1] != 1:
            raise ValueError(f"step expects (B, 1, D) or (B, D), got {tuple(u.shape)}")
        if state is None:
            state = self.allocate_state(u.shape[0], device=u.device, dtype=u.dtype)
        kernels = self._kernels_for(u)
        zxbcdt = self.in_proj(u[:, 0])
        z0, x0, z, xBC, dt = self._split(zxbcdt)
        A = -torch.exp(self.A_log.float())
        conv_w = self.conv1d.weight.squeeze(1)  # (D, W)

        if kernels is not None and kernels.causal_conv1d_update is not None:
            conv_state = state.conv_state.to(xBC.dtype).clone()
            xBC = kernels.causal_conv1d_update(xBC, conv_state, conv_w, self.conv1d.bias, "silu")
        else:
            conv_state = torch.cat([state.conv_state[..., 1:].to(xBC.dtype), xBC.unsqueeze(-1)], dim=-1)
            xBC = (conv_state * conv_w).sum(-1)
            if self.conv1d.bias is not None:
                xBC = xBC + self.conv1d.bias
            xBC = F.silu(xBC)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.unflatten(-1, (self.nheads, self.headdim))  # (B, h, p)
        B = B.unflatten(-1, (self.ngroups, self.d_state))  # (B, g, n)
        C = C.unflatten(-1, (self.ngroups, self.d_state))

        if kernels is not None and kernels.selective_state_update is not None:
            ssm = state.ssm_state.clone()
            p, n = self.headdim, self.d_state
            y = kernels.selective_state_update(
                ssm, x,
                dt.unsqueeze(-1).expand(-1, -1, p),
                A[:, None, None].expand(-1, p, n).float(),
                B, C,
                self.D.view(self.nheads, p) if self.D_has_hdim else self.D[:, None].expand(-1, p),
                z=None if self.rmsnorm else z.unflatten(-1, (self.nheads, p)),
                dt_bias=self.dt_bias[:, None].expand(-1, p),
                dt_softplus=True,
            )
            y = y.flatten(-2)
            if self.rmsnorm:
                y = self.norm(y, z)
            if self.d_mlp > 0:
                y = torch.cat([F.silu(z0) * x0, y], dim=-1)
            out = self.out_proj(y)
        else:
            dtf = self._dt(dt)  # (B, h)
            rep = self.nheads // self.ngroups
            Bh = B.float().repeat_interleave(rep, dim=1)  # (B, h, n)
            Ch = C.float().repeat_interleave(rep, dim=1)
            xf = x.float()
            ssm = state.ssm_state.float() * torch.exp(dtf * A)[..., None, None] + torch.einsum(
                "bh,bhn,bhp->bhpn", dtf, Bh, xf
            )
            D = self.D.float().view(self.nheads, self.headdim if self.D_has_hdim else 1)
            y = torch.einsum("bhpn,bhn->bhp", ssm, Ch) + xf * D
            out = self._finish(y.to(x.dtype).flatten(-2), z, z0, x0)
        out = out if squeeze else out.unsqueeze(1)
        return out, Mamba2State(conv_state, ssm)
