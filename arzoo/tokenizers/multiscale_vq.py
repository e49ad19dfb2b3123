"""VAR's multi-scale residual VQVAE (`VQVAE` + `VectorQuantizer2`), with its official state-dict layout.

Architecture and quantiser math follow `models/{vqvae,quant,basic_vae}.py` of FoundationVision/VAR
(see docs/parity/var.md sections 1 and 2). An image is encoded to a feature map
f (B, Cv, P, P); the quantiser then explains it coarse to fine: at scale k the residual is
area-resized to pn_k x pn_k, every cell takes its nearest codebook vector, the code map is
bicubic-upsampled back to P x P, refined by a small conv Phi and added to the running sum f_hat.
Decoding is `decoder(post_quant_conv(f_hat))`. Attribute names are the official ones, so official
checkpoints load with `load_state_dict` (see `arzoo.interop.var.load_vqvae`).

Shape letters: B batch, Cv codebook width (`z_channels`), P last patch number (latent side),
pn a scale's side, l = pn * pn, L = sum of l, V vocabulary size, N = B * pn * pn.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from arzoo.nn.conv import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm
from arzoo.tokenizers.base import Tokenizer, TokenizerOutput, check_image_size

# ------------------------------------------------------------------------------------------------
# Encoder / decoder (official `basic_vae.Encoder` / `Decoder`, `double_z=False`)
# ------------------------------------------------------------------------------------------------


class _Level(nn.Module):
    """One resolution level: `block.{j}`, `attn.{j}` (lowest resolution only) and an optional resampler.

    A plain container so that the state-dict keys read `down.{i}.block.{j}...` as in VAR.
    """

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()


class _Mid(nn.Module):
    """The official middle stage: `block_1`, `attn_1` (identity without `using_mid_sa`), `block_2`."""

    def __init__(self, channels: int, dropout: float, using_mid_sa: bool) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        # nn.Identity has no parameters, so the key set matches the official `make_attn(using_sa=False)`.
        self.attn_1 = AttnBlock(channels, fused_qkv=True) if using_mid_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        """block_1 -> attn_1 -> block_2 at constant width."""
        return self.block_2(self.attn_1(self.block_1(h_BCHW)))


class VAREncoder(nn.Module):
    """VAR's `Encoder`: images (B, 3, H, W) -> features (B, z_channels, H/2^(n-1), W/2^(n-1))."""

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_ch_mult = (1, *ch_mult)  # level i starts at the width of level i-1 (ch for level 0)
        self.down = nn.ModuleList()
        block_in = ch
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_ch_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_levels - 1 and using_sa:  # attention only at the lowest resolution
                    level.attn.append(AttnBlock(block_in, fused_qkv=True))
            if i != self.num_levels - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, dropout, using_mid_sa)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Images -> pre-quant_conv features (B, z_channels, h, w)."""
        h = self.conv_in(x_B3HW)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != self.num_levels - 1:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VARDecoder(nn.Module):
    """VAR's `Decoder`: latents (B, z_channels, h, w) -> images (B, 3, h*2^(n-1), w*2^(n-1)), unclamped.

    `up` is indexed by level (`up.0` is the full-resolution level, processed last), as in the
    official code, which builds the levels in reverse and prepends each one.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        z_channels: int,
        dropout: float = 0.0,
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, dropout, using_mid_sa)
        levels: list[_Level] = []
        for i in reversed(range(self.num_levels)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):  # one more block than the encoder, as in taming
                level.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_levels - 1 and using_sa:
                    level.attn.append(AttnBlock(block_in, fused_qkv=True))
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """Post-quant_conv latents -> images (not clamped)."""
        h = self.mid(self.conv_in(z_BCHW))
        for i in reversed(range(self.num_levels)):
            level = self.up[i]
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if i != 0:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------
# Phi: the residual refinement convs, and which one each scale uses
# ------------------------------------------------------------------------------------------------


def phi_ticks(num_phi: int) -> tuple[float, ...]:
    """The official tick positions of `num_phi` Phi convs in [0, 1] (float64, numpy-linspace arithmetic).

    `np.linspace(1/3/K, 1-1/3/K, K)` when K == 4, else `np.linspace(1/2/K, 1-1/2/K, K)`; written out
    in Python floats (start + i * step, last tick set to stop exactly, as numpy does) so that the
    float64 rounding, and hence the tie-breaking of SPEC 2.1, is the official one.
    """
    if num_phi < 1:
        raise ValueError(f"need at least one Phi conv, got {num_phi}")
    # `1/3/K` (not 1/(3*K)): the official expression; both round the same way for small K, but
    # keeping the exact expression costs nothing.
    start = 1 / 3 / num_phi if num_phi == 4 else 1 / 2 / num_phi
    stop = 1 - start
    if num_phi == 1:
        return (start,)
    step = (stop - start) / (num_phi - 1)
    return tuple(i * step + start for i in range(num_phi - 1)) + (stop,)


def phi_index(si: int, num_scales: int, num_phi: int) -> int:
    """Index of the Phi that scale `si` (0-based, out of `num_scales`) uses: nearest tick, first on ties."""
    if num_phi == 1:  # `PhiShared` ignores the position
        return 0
    at = si / (num_scales - 1)  # Python float division, as the official `si/(SN-1)`
    distances = [abs(tick - at) for tick in phi_ticks(num_phi)]
    return min(range(num_phi), key=distances.__getitem__)  # first minimum, like np.argmin


class Phi(nn.Conv2d):
    """`Phi(h) = (1 - r) * h + r * conv3x3(h)` with `r = |quant_resi|` (keys `weight`, `bias`)."""

    def __init__(self, channels: int, quant_resi: float) -> None:
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h_BCHW: torch.Tensor) -> torch.Tensor:
        """Blend the input with its 3x3 conv (official op order: `h*(1-r) + conv(h)*r`)."""
        return h_BCHW.mul(1 - self.resi_ratio) + super().forward(h_BCHW).mul_(self.resi_ratio)


class PhiShared(nn.Module):
    """`share_quant_resi == 1`: one Phi for every scale (key `qresi`)."""

    def __init__(self, phi: nn.Module) -> None:
        super().__init__()
        self.qresi = phi

    def __len__(self) -> int:
        return 1

    def get(self, k: int) -> nn.Module:
        """The Phi with index `k` (always the shared one)."""
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """`share_quant_resi = K >= 2`: K Phi convs shared among the scales (keys `qresi_ls.{k}`)."""

    def __init__(self, phis: Sequence[nn.Module]) -> None:
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    def __len__(self) -> int:
        return len(self.qresi_ls)

    def get(self, k: int) -> nn.Module:
        """The Phi with index `k`."""
        return self.qresi_ls[k]


class PhiNonShared(nn.ModuleList):
    """`share_quant_resi == 0`: `default_qresi_counts or SN` Phi convs (keys `{k}`)."""

    def get(self, k: int) -> nn.Module:
        """The Phi with index `k`."""
        return self[k]


# ------------------------------------------------------------------------------------------------
# The multi-scale residual quantiser (official `VectorQuantizer2`)
# ------------------------------------------------------------------------------------------------


@dataclass
class MultiScaleQuantizerOutput:
    """What one training pass of the quantiser returns."""

    f_hat_BCPP: torch.Tensor  # straight-through estimate: value f_hat, gradient identity to f
    codebook_loss: torch.Tensor  # mean over scales of mse(f_hat, f.detach()): codebook and Phi
    commit_loss: torch.Tensor  # beta * mean over scales of mse(f_hat.detach(), f): the encoder
    token_maps: list[torch.Tensor]  # one (B, pn, pn) int64 map per scale


def _area(x_BCHW: torch.Tensor, pn: int) -> torch.Tensor:
    """Area (adaptive average) resize to pn x pn, the official 'down' interpolation."""
    return F.interpolate(x_BCHW, size=(pn, pn), mode="area")


def _bicubic(x_BCHW: torch.Tensor, side: int) -> torch.Tensor:
    """Bicubic resize (align_corners=False, no antialias), the official 'up' interpolation."""
    return F.interpolate(x_BCHW, size=(side, side), mode="bicubic")


class MultiScaleResidualQuantizer(nn.Module):
    """VAR's `VectorQuantizer2`: residual quantisation of f (B, Cv, P, P) over the `patch_nums` scales."""

    def __init__(
        self,
        vocab_size: int,
        codebook_dim: int,
        patch_nums: Sequence[int],
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.Cvae = codebook_dim
        self.patch_nums = tuple(patch_nums)
        self.beta = beta
        self.using_znorm = using_znorm
        num_scales = len(self.patch_nums)

        def make_phi() -> nn.Module:
            # |quant_resi| <= 1e-6 means no refinement: identities, and no state-dict keys.
            return Phi(codebook_dim, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        self.quant_resi: PhiShared | PhiPartiallyShared | PhiNonShared
        if share_quant_resi == 0:  # one Phi per scale (or per `default_qresi_counts` tick)
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or num_scales)])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared([make_phi() for _ in range(share_quant_resi)])
        num_phi = len(self.quant_resi)
        self.phi_indices: tuple[int, ...] = tuple(
            phi_index(si, num_scales, num_phi) for si in range(num_scales)
        )

        # Codebook usage EMA of the official distributed trainer: kept (zeros) for key compatibility only.
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(num_scales, vocab_size))
        self.embedding = nn.Embedding(vocab_size, codebook_dim)

    @torch.no_grad()
    def init_codebook(self, eini: float) -> None:
        """The official `eini` codebook init: 0 keeps N(0, 1), > 0 truncated normal (std eini), < 0 U(+-|eini|/V)."""
        if eini > 0:
            nn.init.trunc_normal_(self.embedding.weight, std=eini)
        elif eini < 0:
            bound = abs(eini) / self.vocab_size
            self.embedding.weight.uniform_(-bound, bound)

    @property
    def num_scales(self) -> int:
        """SN, the number of scales."""
        return len(self.patch_nums)

    def phi(self, si: int) -> nn.Module:
        """The Phi conv that scale `si` uses (SPEC 2.1)."""
        return self.quant_resi.get(self.phi_indices[si])

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Nearest codebook index (N,) of each row of z (N, Cv), computed exactly as the official code."""
        codebook_VC = self.embedding.weight.detach()
        if self.using_znorm:  # cosine similarity of l2-normalised vectors
            z_NC = F.normalize(z_NC, dim=-1)
            return torch.argmax(z_NC @ F.normalize(codebook_VC.T, dim=0), dim=1)
        # |z|^2 + |e|^2 - 2 z.e, with the official op order (norm sums first, then one in-place addmm).
        d_NV = z_NC.square().sum(dim=1, keepdim=True) + codebook_VC.square().sum(dim=1)
        d_NV.addmm_(z_NC, codebook_VC.T, alpha=-2, beta=1)
        return torch.argmin(d_NV, dim=1)

    def _residual_pass(
        self, f_BCPP: torch.Tensor, with_grad: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The coarse-to-fine loop of SPEC 2.3: per-scale (B, pn, pn) ids and the running f_hat after each.

        With `with_grad` the codebook lookup and the Phi convs keep their graph (training); the
        residual that picks the codes never carries a gradient.
        """
        B, C, H, W = f_BCPP.shape
        P = self.patch_nums[-1]
        if C != self.Cvae or (H, W) != (P, P):
            raise ValueError(
                f"the quantiser expects features of shape (B, {self.Cvae}, {P}, {P}) (last patch number "
                f"{P}), got {tuple(f_BCPP.shape)}"
            )
        f_rest_BCPP = f_BCPP.detach().float().clone()
        f_hat_BCPP = torch.zeros_like(f_rest_BCPP)
        idx_maps: list[torch.Tensor] = []
        f_hats: list[torch.Tensor] = []
        last = self.num_scales - 1
        for si, pn in enumerate(self.patch_nums):
            rest_BChw = f_rest_BCPP if si == last else _area(f_rest_BCPP, pn)
            idx_Bhw = self.nearest_code(rearrange(rest_BChw, "b c h w -> (b h w) c")).view(B, pn, pn)
            with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                h_BChw = self.embedding(idx_Bhw).permute(0, 3, 1, 2)
                if si != last:  # the last scale already is P x P
                    h_BChw = _bicubic(h_BChw, P)
                h_BCPP = self.phi(si)(h_BChw.contiguous())
                f_hat_BCPP = f_hat_BCPP + h_BCPP  # out of place: the list keeps every partial sum
            f_rest_BCPP = f_rest_BCPP - h_BCPP.detach()
            idx_maps.append(idx_Bhw)
            f_hats.append(f_hat_BCPP)
        return idx_maps, f_hats

    def f_to_token_maps(self, f_BCPP: torch.Tensor) -> list[torch.Tensor]:
        """Features -> one (B, pn, pn) int64 id map per scale (`f_to_idxBl_or_fhat(to_fhat=False)`)."""
        with torch.autocast(device_type=f_BCPP.device.type, enabled=False):  # distances in float32
            return self._residual_pass(f_BCPP, with_grad=False)[0]

    def f_to_fhats(self, f_BCPP: torch.Tensor) -> list[torch.Tensor]:
        """Features -> running f_hat (B, Cv, P, P) after each scale (`f_to_idxBl_or_fhat(to_fhat=True)`)."""
        with torch.autocast(device_type=f_BCPP.device.type, enabled=False):
            return self._residual_pass(f_BCPP, with_grad=True)[1]

    def forward(self, f_BCPP: torch.Tensor) -> MultiScaleQuantizerOutput:
        """The training pass (SPEC 2.6): straight-through f_hat, codebook and commitment losses, ids."""
        with torch.autocast(device_type=f_BCPP.device.type, enabled=False):
            f_BCPP = f_BCPP.float()
            f_no_grad = f_BCPP.detach()
            idx_maps, f_hats = self._residual_pass(f_BCPP, with_grad=True)
            # Official: sum_si beta * mse(f_hat.detach(), f) + mse(f_hat, f.detach()), divided by SN;
            # kept as two terms so that the caller can weight them.
            codebook_loss = sum(F.mse_loss(f_hat, f_no_grad) for f_hat in f_hats) / self.num_scales
            commit_sum = sum(F.mse_loss(f_hat.detach(), f_BCPP) for f_hat in f_hats)
            commit_loss = commit_sum * (self.beta / self.num_scales)
            # Straight-through: the value of f_hat, the gradient of f (official op order).
            f_hat_st = (f_hats[-1].detach() - f_no_grad) + f_BCPP
        # The official trainer also updates `ema_vocab_hit_SV` here with an all-reduce; that is a
        # usage statistic of distributed training only and is deliberately skipped.
        return MultiScaleQuantizerOutput(f_hat_st, codebook_loss, commit_loss, idx_maps)


# ------------------------------------------------------------------------------------------------
# The tokenizer (official `VQVAE`)
# ------------------------------------------------------------------------------------------------


def _as_int_tuple(values: Sequence[int], name: str) -> tuple[int, ...]:
    """A tuple of ints from a list/tuple (checkpoints store lists); a clear error otherwise."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    out = tuple(values)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    return out


class MultiScaleVQTokenizer(Tokenizer):
    """VAR's VQVAE: conv encoder, multi-scale residual quantiser over `patch_nums`, conv decoder.

    The default arguments build the released 256px tokenizer (`vae_ch160v4096z32.pth`); the official
    constructor hard-codes `ch_mult`, `num_res_blocks`, `using_sa` and `using_mid_sa`, which are
    arguments here so that small models can be built.
    """

    def __init__(
        self,
        image_size: int = 256,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        dropout: float = 0.0,
        beta: float = 0.25,
        using_znorm: bool = False,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        using_sa: bool = True,
        using_mid_sa: bool = True,
        codebook_init: float = 0.0,
    ) -> None:
        super().__init__()
        ch_mult = _as_int_tuple(ch_mult, "ch_mult")
        patch_nums = _as_int_tuple(patch_nums, "patch_nums")
        self._record_init_args(
            image_size=image_size,
            vocab_size=vocab_size,
            z_channels=z_channels,
            ch=ch,
            ch_mult=ch_mult,
            num_res_blocks=num_res_blocks,
            dropout=dropout,
            beta=beta,
            using_znorm=using_znorm,
            quant_conv_ks=quant_conv_ks,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
            default_qresi_counts=default_qresi_counts,
            patch_nums=patch_nums,
            using_sa=using_sa,
            using_mid_sa=using_mid_sa,
            codebook_init=codebook_init,
        )
        owner = type(self).__name__
        if len(ch_mult) == 0 or any(m <= 0 for m in ch_mult):
            raise ValueError(f"{owner}: ch_mult must be a non-empty sequence of positive ints, got {ch_mult}")
        if num_res_blocks < 1:
            raise ValueError(f"{owner}: num_res_blocks must be >= 1, got {num_res_blocks}")
        if vocab_size < 1 or z_channels < 1:
            raise ValueError(
                f"{owner}: vocab_size and z_channels must be positive, got {vocab_size}, {z_channels}"
            )
        if quant_conv_ks < 1 or quant_conv_ks % 2 == 0:
            raise ValueError(
                f"{owner}: quant_conv_ks must be a positive odd kernel size (padding ks//2 keeps the grid), "
                f"got {quant_conv_ks}"
            )
        if share_quant_resi < 0 or default_qresi_counts < 0:
            raise ValueError(
                f"{owner}: share_quant_resi and default_qresi_counts must be >= 0, got "
                f"{share_quant_resi}, {default_qresi_counts}"
            )
        self.image_size = image_size
        self.downsample = 2 ** (len(ch_mult) - 1)
        check_image_size(image_size, self.downsample, owner)
        self._check_patch_nums(patch_nums, image_size, self.downsample)
        self._patch_nums = patch_nums

        self.encoder = VAREncoder(ch, ch_mult, num_res_blocks, z_channels, dropout, using_sa, using_mid_sa)
        self.decoder = VARDecoder(ch, ch_mult, num_res_blocks, z_channels, dropout, using_sa, using_mid_sa)
        self.quantize = MultiScaleResidualQuantizer(
            vocab_size=vocab_size,
            codebook_dim=z_channels,
            patch_nums=patch_nums,
            beta=beta,
            using_znorm=using_znorm,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
            default_qresi_counts=default_qresi_counts,
        )
        self.quantize.init_codebook(codebook_init)
        pad = quant_conv_ks // 2  # keeps the P x P grid
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, stride=1, padding=pad)

    @staticmethod
    def _check_patch_nums(patch_nums: tuple[int, ...], image_size: int, downsample: int) -> None:
        """Raise a clear error unless `patch_nums` is a usable, strictly increasing scale schedule."""
        grid = image_size // downsample
        where = f"patch_nums {list(patch_nums)} (image_size {image_size}, downsampling {downsample})"
        if len(patch_nums) < 2:
            # The Phi position of scale si is si / (SN - 1), so one scale is not a schedule.
            raise ValueError(f"{where}: need at least 2 scales, coarse to fine, e.g. [1, 2, ..., {grid}]")
        if any(pn <= 0 for pn in patch_nums) or any(a >= b for a, b in zip(patch_nums, patch_nums[1:])):
            raise ValueError(f"{where}: patch numbers must be positive and strictly increasing")
        if patch_nums[-1] != grid:
            raise ValueError(
                f"{where}: the last patch number must equal the latent grid side "
                f"image_size // downsampling = {image_size} // {downsample} = {grid}, got {patch_nums[-1]}"
            )

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def patch_nums(self) -> tuple[int, ...]:
        """Side pn_k of every scale's token map, coarse to fine."""
        return self._patch_nums

    @property
    def scales(self) -> tuple[tuple[int, int], ...]:
        """(pn_k, pn_k) for every scale."""
        return tuple((pn, pn) for pn in self._patch_nums)

    @property
    def vocab_size(self) -> int:
        """V, the number of codebook entries."""
        return self.quantize.vocab_size

    @property
    def codebook_dim(self) -> int:
        """Cv (= z_channels), the width of a codebook vector."""
        return self.quantize.Cvae

    @property
    def num_tokens(self) -> int:
        """L = sum of pn_k^2, the tokens of all scales together."""
        return sum(pn * pn for pn in self._patch_nums)

    @property
    def first_l(self) -> int:
        """pn_0^2, the tokens of the first scale (predicted from the class condition alone)."""
        return self._patch_nums[0] ** 2

    # ---- checkpoint compatibility --------------------------------------------------------------

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Official override: an `ema_vocab_hit_SV` with another number of scales is replaced by ours."""
        key = "quantize.ema_vocab_hit_SV"
        incoming = state_dict.get(key)
        own = self.quantize.ema_vocab_hit_SV
        if isinstance(incoming, torch.Tensor) and incoming.shape[0] != own.shape[0]:
            patched: OrderedDict[str, Any] = OrderedDict(state_dict)  # do not modify the caller's dict
            if hasattr(state_dict, "_metadata"):
                patched._metadata = state_dict._metadata  # type: ignore[attr-defined]
            patched[key] = own
            state_dict = patched
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # ---- images <-> features <-> ids ------------------------------------------------------------

    def features(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> f (B, Cv, P, P) = quant_conv(encoder(images)), what the quantiser sees."""
        self.check_images(images_B3HW)
        return self.quant_conv(self.encoder(images_B3HW))

    def features_to_token_maps(self, f_BCPP: torch.Tensor) -> list[torch.Tensor]:
        """Features -> one (B, pn, pn) int64 id map per scale (official `f_to_idxBl_or_fhat`)."""
        return self.quantize.f_to_token_maps(f_BCPP)

    def features_to_fhats(self, f_BCPP: torch.Tensor) -> list[torch.Tensor]:
        """Features -> the running f_hat (B, Cv, P, P) after each scale (official `f_to_idxBl_or_fhat`)."""
        return self.quantize.f_to_fhats(f_BCPP)

    def encode(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> one (B, pn, pn) int64 token map per scale (official `img_to_idxBl`)."""
        return self.features_to_token_maps(self.features(images_B3HW))

    # ---- ids -> embeddings, teacher forcing and sampling helpers --------------------------------

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: ids (B, l) or maps (B, h, w) -> embeddings (B, l, Cv) / (B, h*w, Cv)."""
        if ids.ndim not in (2, 3):
            raise ValueError(f"embed_tokens expects ids of shape (B, l) or (B, h, w), got {tuple(ids.shape)}")
        return self.quantize.embedding(ids.flatten(1))

    def embed_soft(self, weights_BlV: torch.Tensor) -> torch.Tensor:
        """A mixture of codebook vectors per position: weights (B, l, V) -> embeddings (B, l, Cv)
        (VAR's Gumbel-softmax `more_smooth` codes)."""
        return weights_BlV @ self.quantize.embedding.weight.unsqueeze(0)

    def refine_scale_codes(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """Scale si's residual refinement phi_si (the convolution applied before a scale is added to
        f_hat): (B, Cv, h, w) -> (B, Cv, h, w)."""
        return self.quantize.phi(si)(h_BChw)

    def _flat_ids(
        self, token_maps: Sequence[torch.Tensor], allow_missing_last: bool = False
    ) -> list[torch.Tensor]:
        """Per-scale ids as (B, pn^2), from maps (B, pn, pn) or already flat (B, pn^2); checks the sizes."""
        SN = len(self._patch_nums)
        counts = (SN - 1, SN) if allow_missing_last else (SN,)
        if len(token_maps) not in counts:
            raise ValueError(
                f"expected {SN} token maps (patch_nums {list(self._patch_nums)}), got {len(token_maps)}"
            )
        flat: list[torch.Tensor] = []
        for si, ids in enumerate(token_maps):
            pn = self._patch_nums[si]
            if ids.shape[1:] not in ((pn, pn), (pn * pn,)):
                raise ValueError(
                    f"token map {si} should have shape (B, {pn}, {pn}) or (B, {pn * pn}), "
                    f"got {tuple(ids.shape)}"
                )
            flat.append(ids.reshape(ids.shape[0], pn * pn))
        return flat

    def _embed_map(self, ids_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Flat ids (B, pn^2) -> codebook map (B, Cv, pn, pn), as `embedding(ids).transpose(1, 2).view`."""
        h_BCl = self.quantize.embedding(ids_Bl).transpose(1, 2)  # a view, like the official code's
        return h_BCl.reshape(ids_Bl.shape[0], self.codebook_dim, pn, pn)

    def teacher_forcing_input(self, token_maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-scale ids -> the next-scale inputs (B, L - first_l, Cv) (official `idxBl_to_var_input`).

        Scale si+1's input is the running f_hat after scale si, area-resized to pn_{si+1} and
        flattened row-major; the last scale's ids are not needed (and may be left out).
        """
        ids = self._flat_ids(token_maps, allow_missing_last=True)
        B, P, SN = ids[0].shape[0], self._patch_nums[-1], len(self._patch_nums)
        f_hat_BCPP = torch.zeros(B, self.codebook_dim, P, P, device=ids[0].device, dtype=torch.float32)
        inputs: list[torch.Tensor] = []
        for si in range(SN - 1):
            h_BChw = _bicubic(self._embed_map(ids[si], self._patch_nums[si]), P)
            f_hat_BCPP = f_hat_BCPP + self.quantize.phi(si)(h_BChw)
            next_BChw = _area(f_hat_BCPP, self._patch_nums[si + 1])
            inputs.append(rearrange(next_BChw, "b c h w -> b (h w) c"))
        return torch.cat(inputs, dim=1)

    def next_scale_input(
        self, si: int, f_hat_BCPP: torch.Tensor, h_BChw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Add scale si's codes to f_hat; return (new f_hat, next scale's input (B, Cv, pn', pn') or None).

        `h_BChw` is scale si's codebook map (B, Cv, pn, pn), or its embeddings (B, pn^2, Cv) as given by
        `embed_tokens`. Official `get_next_autoregressive_input`, except that f_hat is not modified in
        place and the input after the last scale is None.
        """
        SN, P = len(self._patch_nums), self._patch_nums[-1]
        if not 0 <= si < SN:
            raise ValueError(f"scale index {si} out of range for {SN} scales")
        pn = self._patch_nums[si]
        if h_BChw.ndim == 3:  # (B, l, Cv) embeddings -> (B, Cv, pn, pn), as the official sampler does
            h_BChw = h_BChw.transpose(1, 2).reshape(h_BChw.shape[0], self.codebook_dim, pn, pn)
        if tuple(h_BChw.shape[1:]) != (self.codebook_dim, pn, pn):
            raise ValueError(
                f"scale {si} codes should have shape (B, {self.codebook_dim}, {pn}, {pn}) or "
                f"(B, {pn * pn}, {self.codebook_dim}), got {tuple(h_BChw.shape)}"
            )
        if si == SN - 1:
            return f_hat_BCPP + self.quantize.phi(si)(h_BChw), None
        f_hat_BCPP = f_hat_BCPP + self.quantize.phi(si)(_bicubic(h_BChw, P))  # conv after upsampling
        next_pn = self._patch_nums[si + 1]
        return f_hat_BCPP, _area(f_hat_BCPP, next_pn)

    # ---- decoding ------------------------------------------------------------------------------

    def token_maps_to_fhat(
        self, token_maps: Sequence[torch.Tensor], last_one: bool = True
    ) -> torch.Tensor | list[torch.Tensor]:
        """Per-scale ids -> final f_hat (B, Cv, P, P), or every partial sum when `last_one` is False.

        Official `embed_to_fhat(all_to_max_scale=True)`; maps (B, pn, pn) or flat ids (B, pn^2).
        """
        ids = self._flat_ids(token_maps)
        B, P, SN = ids[0].shape[0], self._patch_nums[-1], len(self._patch_nums)
        f_hat_BCPP = torch.zeros(B, self.codebook_dim, P, P, device=ids[0].device, dtype=torch.float32)
        partial_sums: list[torch.Tensor] = []
        for si, pn in enumerate(self._patch_nums):
            h_BChw = self._embed_map(ids[si], pn)
            if si != SN - 1:
                h_BChw = _bicubic(h_BChw, P)
            f_hat_BCPP = f_hat_BCPP + self.quantize.phi(si)(h_BChw)
            partial_sums.append(f_hat_BCPP)
        return f_hat_BCPP if last_one else partial_sums

    def decode_fhat(self, f_hat_BCPP: torch.Tensor) -> torch.Tensor:
        """f_hat (B, Cv, P, P) -> images clamped to [-1, 1] (official `fhat_to_img`)."""
        return self.decoder(self.post_quant_conv(f_hat_BCPP)).clamp(-1, 1)

    def decode(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        """Token maps (B, pn, pn) per scale -> images (B, 3, H, W) clamped to [-1, 1]."""
        self.check_token_maps(token_maps)
        return self.decode_fhat(self.token_maps_to_fhat(token_maps, last_one=True))

    def decode_per_scale(self, token_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Token maps -> one clamped image per scale, decoded from the partial sum up to that scale."""
        self.check_token_maps(token_maps)
        return [self.decode_fhat(f_hat) for f_hat in self.token_maps_to_fhat(token_maps, last_one=False)]

    # ---- training ------------------------------------------------------------------------------

    def forward(self, images_B3HW: torch.Tensor) -> TokenizerOutput:
        """The training pass (official `VQVAE.forward`): unclamped reconstruction, VQ losses, token maps."""
        quantized = self.quantize(self.features(images_B3HW))
        recon_B3HW = self.decoder(self.post_quant_conv(quantized.f_hat_BCPP))
        return TokenizerOutput(
            recon=recon_B3HW,
            codebook_loss=quantized.codebook_loss,
            commit_loss=quantized.commit_loss,
            token_maps=quantized.token_maps,
        )
