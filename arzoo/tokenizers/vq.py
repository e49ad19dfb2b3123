"""LlamaGen's single-scale VQ tokenizer (`VQModel`), with its official state-dict layout.

Architecture and quantiser math follow `tokenizer/tokenizer_image/vq_model.py` of
FoundationVision/LlamaGen (see docs/parity/llamagen.md section 5): a taming-style
conv encoder, a 1x1 `quant_conv` down to the codebook width E, nearest-neighbour lookup in an
(optionally l2-normalised) codebook of K vectors, a 1x1 `post_quant_conv` and a mirrored decoder.
Attribute names are the official ones, so official checkpoints load with `load_state_dict` (see
`arzoo.interop.llamagen.load_vq_tokenizer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from arzoo.nn.conv import AttnBlock, Downsample, ResnetBlock, Upsample, group_norm
from arzoo.tokenizers.base import Tokenizer, TokenizerOutput, check_image_size

# The official usage buffer is always this long, whatever the codebook size.
USAGE_HISTORY = 65536


# ------------------------------------------------------------------------------------------------
# Encoder / decoder
# ------------------------------------------------------------------------------------------------


class _Level(nn.Module):
    """One resolution level: `res.{j}`, `attn.{j}` (deepest level only) and an optional resampler.

    A plain container so that the state-dict keys read `conv_blocks.{i}.res.{j}...` as in LlamaGen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


def _mid(channels: int, dropout: float) -> nn.ModuleList:
    """The official middle stage: res, attn, res at constant width (`mid.0`, `mid.1`, `mid.2`)."""
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, dropout),
            AttnBlock(channels),
            ResnetBlock(channels, channels, dropout),
        ]
    )


class Encoder(nn.Module):
    """LlamaGen's `Encoder`: images (B, 3, H, W) -> features (B, z_channels, H/2^(L-1), W/2^(L-1))."""

    def __init__(
        self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float
    ) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        in_ch_mult = (1, *ch_mult)  # level i starts at the width of level i-1 (ch for level 0)
        self.conv_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            level = _Level()
            block_in, block_out = ch * in_ch_mult[i], ch * mult
            for _ in range(num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_levels - 1:  # attention only at the coarsest resolution
                    level.attn.append(AttnBlock(block_in))
            if i != self.num_levels - 1:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = _mid(block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """Images -> pre-quant_conv features (B, z_channels, h, w)."""
        h_BCHW = self.conv_in(x_B3HW)
        for i, level in enumerate(self.conv_blocks):
            for j in range(self.num_res_blocks):
                h_BCHW = level.res[j](h_BCHW)
                if len(level.attn) > 0:
                    h_BCHW = level.attn[j](h_BCHW)
            if i != self.num_levels - 1:
                h_BCHW = level.downsample(h_BCHW)
        for block in self.mid:
            h_BCHW = block(h_BCHW)
        return self.conv_out(F.silu(self.norm_out(h_BCHW)))


class Decoder(nn.Module):
    """LlamaGen's `Decoder`: (B, z_channels, h, w) -> images (B, 3, h*2^(L-1), w*2^(L-1)), unclamped.

    `conv_blocks.{k}` holds level `L-1-k` (deepest first), as in the official key layout.
    """

    def __init__(
        self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float
    ) -> None:
        super().__init__()
        self.num_levels = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, dropout)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(self.num_levels)):
            level = _Level()
            block_out = ch * ch_mult[i]
            for _ in range(num_res_blocks + 1):  # one more res block than the encoder, as upstream
                level.res.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if i == self.num_levels - 1:
                    level.attn.append(AttnBlock(block_in))
            if i != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z_BCHW: torch.Tensor) -> torch.Tensor:
        """post_quant_conv output -> images (B, 3, H, W), not clamped."""
        h_BCHW = self.conv_in(z_BCHW)
        for block in self.mid:
            h_BCHW = block(h_BCHW)
        for k, level in enumerate(self.conv_blocks):
            for j in range(self.num_res_blocks + 1):
                h_BCHW = level.res[j](h_BCHW)
                if len(level.attn) > 0:
                    h_BCHW = level.attn[j](h_BCHW)
            if k != self.num_levels - 1:
                h_BCHW = level.upsample(h_BCHW)
        return self.conv_out(F.silu(self.norm_out(h_BCHW)))


# ------------------------------------------------------------------------------------------------
# Quantiser
# ------------------------------------------------------------------------------------------------


@dataclass
class QuantizerLosses:
    """The quantiser's loss terms (LlamaGen's `emb_loss` tuple) and the codebook usage."""

    vq_loss: torch.Tensor  # mean((z_q - sg(z))^2): moves the codebook
    commit_loss: torch.Tensor  # beta * mean((sg(z_q) - z)^2): moves the encoder
    entropy_loss: torch.Tensor  # ratio * (sample entropy - batch entropy); 0 when the ratio is 0
    codebook_usage: float  # unique codes among the last 65536 indices / K (training mode only, else 0)


def compute_entropy_loss(affinity_NK: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """LlamaGen's `compute_entropy_loss` ("softmax" type): mean per-sample entropy - batch entropy."""
    flat_NK = affinity_NK.reshape(-1, affinity_NK.shape[-1]) / temperature
    probs_NK = F.softmax(flat_NK, dim=-1)
    # The +1e-5 inside log_softmax (a no-op shift) and inside the log are upstream's; kept for parity.
    log_probs_NK = F.log_softmax(flat_NK + 1e-5, dim=-1)
    avg_probs_K = torch.mean(probs_NK, dim=0)
    avg_entropy = -torch.sum(avg_probs_K * torch.log(avg_probs_K + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs_NK * log_probs_NK, dim=-1))
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    """LlamaGen's `VectorQuantizer`: nearest codebook vector (cosine when l2-normalised), ST gradient."""

    def __init__(
        self,
        codebook_size: int,
        embed_dim: int,
        beta: float,
        entropy_loss_ratio: float,
        l2_norm: bool,
        show_usage: bool,
    ) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.beta = beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.l2_norm = l2_norm
        self.show_usage = show_usage
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        # Upstream init: U(-1/K, 1/K), then normalised rows when the codebook is l2-normalised.
        self.embedding.weight.data.uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if show_usage:
            # Shift register of the last 65536 indices, stored as floats (initial zeros count as
            # code 0), exactly as upstream; it is in official checkpoints, hence persistent.
            self.register_buffer("codebook_used", torch.zeros(USAGE_HISTORY))

    def codebook(self) -> torch.Tensor:
        """The codebook as used for lookup, (K, E): rows l2-normalised when `l2_norm`."""
        weight_KE = self.embedding.weight
        return F.normalize(weight_KE, p=2, dim=-1) if self.l2_norm else weight_KE

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices of any shape (...) -> codebook vectors (..., E) (upstream `get_codebook_entry`)."""
        return self.codebook()[indices]

    def usage(self) -> float:
        """Fraction of codes among the last 65536 recorded indices (0 without `show_usage`)."""
        if not self.show_usage:
            return 0.0
        return len(torch.unique(self.codebook_used)) / self.codebook_size

    @torch.no_grad()
    def _record_usage(self, indices_N: torch.Tensor) -> float:
        """Push `indices_N` into the usage shift register; return the new usage."""
        n = min(indices_N.shape[0], USAGE_HISTORY)  # upstream breaks above 65536; keep the newest
        used = self.codebook_used
        if n < USAGE_HISTORY:
            used[:-n] = used[n:].clone()
        used[-n:] = indices_N[-n:].to(used.dtype)
        return self.usage()

    def _distances(self, z_NE: torch.Tensor, codebook_KE: torch.Tensor) -> torch.Tensor:
        """|z|^2 + |e|^2 - 2 z.e, (N, K), with upstream's operation order (argmin ties must agree)."""
        return (
            torch.sum(z_NE**2, dim=1, keepdim=True)
            + torch.sum(codebook_KE**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", z_NE, codebook_KE.t())
        )

    def nearest(self, z_BEhw: torch.Tensor) -> torch.Tensor:
        """Features (B, E, h, w) -> nearest code indices (B, h, w) int64, no side effects."""
        B, E, h, w = z_BEhw.shape
        with torch.autocast(z_BEhw.device.type, enabled=False):
            z_NE = z_BEhw.permute(0, 2, 3, 1).reshape(-1, E).float()
            codebook_KE = self.codebook().float()
            if self.l2_norm:
                z_NE = F.normalize(z_NE, p=2, dim=-1)
            d_NK = self._distances(z_NE, codebook_KE)
        return torch.argmin(d_NK, dim=1).reshape(B, h, w)

    def forward(self, z_BEhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizerLosses]:
        """Features (B, E, h, w) -> (straight-through quant (B, E, h, w), indices (B, h, w), losses).

        Losses are computed in both modes (the tokenizer's validation needs them); the usage register
        only moves in training mode, as upstream.
        """
        B, E, h, w = z_BEhw.shape
        in_dtype = z_BEhw.dtype
        # float32 throughout: under bf16 autocast the distance matmul would mis-rank close codes.
        with torch.autocast(z_BEhw.device.type, enabled=False):
            z_BhwE = z_BEhw.float().permute(0, 2, 3, 1).contiguous()
            codebook_KE = self.codebook().float()
            if self.l2_norm:
                z_BhwE = F.normalize(z_BhwE, p=2, dim=-1)
            z_NE = z_BhwE.view(-1, E)  # raster order per image
            d_NK = self._distances(z_NE, codebook_KE)
            indices_N = torch.argmin(d_NK, dim=1)
            zq_BhwE = codebook_KE[indices_N].view(z_BhwE.shape)

            usage = self._record_usage(indices_N) if (self.show_usage and self.training) else 0.0
            vq_loss = torch.mean((zq_BhwE - z_BhwE.detach()) ** 2)
            commit_loss = self.beta * torch.mean((zq_BhwE.detach() - z_BhwE) ** 2)
            if self.entropy_loss_ratio > 0:
                entropy_loss = self.entropy_loss_ratio * compute_entropy_loss(-d_NK)
            else:
                # Upstream multiplies an (N, K) softmax entropy by 0; skip that work.
                entropy_loss = d_NK.new_zeros(())

            # Straight-through: the value of z_q (up to rounding), the gradient of z.
            zq_BhwE = z_BhwE + (zq_BhwE - z_BhwE).detach()
            quant_BEhw = zq_BhwE.permute(0, 3, 1, 2).to(in_dtype)
        losses = QuantizerLosses(vq_loss, commit_loss, entropy_loss, usage)
        return quant_BEhw, indices_N.reshape(B, h, w), losses


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


class VQTokenizer(Tokenizer):
    """LlamaGen's `VQModel` (VQ-16 by default): one (H/16, W/16) token map over a 16384-code book."""

    def __init__(
        self,
        image_size: int = 256,
        codebook_size: int = 16384,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        codebook_show_usage: bool = True,
        commit_loss_beta: float = 0.25,
        entropy_loss_ratio: float = 0.0,
        encoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        decoder_ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        z_channels: int = 256,
        ch: int = 128,
        num_res_blocks: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        encoder_ch_mult = [int(m) for m in encoder_ch_mult]
        decoder_ch_mult = [int(m) for m in decoder_ch_mult]
        self._record_init_args(
            image_size=int(image_size),
            codebook_size=int(codebook_size),
            codebook_embed_dim=int(codebook_embed_dim),
            codebook_l2_norm=bool(codebook_l2_norm),
            codebook_show_usage=bool(codebook_show_usage),
            commit_loss_beta=float(commit_loss_beta),
            entropy_loss_ratio=float(entropy_loss_ratio),
            encoder_ch_mult=list(encoder_ch_mult),
            decoder_ch_mult=list(decoder_ch_mult),
            z_channels=int(z_channels),
            ch=int(ch),
            num_res_blocks=int(num_res_blocks),
            dropout=float(dropout),
        )
        if not encoder_ch_mult or not decoder_ch_mult:
            raise ValueError(
                f"VQTokenizer: encoder_ch_mult and decoder_ch_mult must be non-empty, got "
                f"{encoder_ch_mult} and {decoder_ch_mult}"
            )
        downsample = 2 ** (len(encoder_ch_mult) - 1)
        upsample = 2 ** (len(decoder_ch_mult) - 1)
        if upsample != downsample:
            raise ValueError(
                f"VQTokenizer: encoder_ch_mult {encoder_ch_mult} downsamples by {downsample} but "
                f"decoder_ch_mult {decoder_ch_mult} upsamples by {upsample}; both lists need the same "
                f"length so that decoded images have the input size"
            )
        for name, value in (("codebook_size", codebook_size), ("codebook_embed_dim", codebook_embed_dim),
                            ("num_res_blocks", num_res_blocks), ("ch", ch), ("z_channels", z_channels)):
            if int(value) <= 0:
                raise ValueError(f"VQTokenizer: {name} must be positive, got {value}")
        check_image_size(int(image_size), downsample, "VQTokenizer")

        self.image_size = int(image_size)
        self.downsample = downsample
        self._grid = self.image_size // downsample
        self.codebook_size = int(codebook_size)
        self.codebook_embed_dim = int(codebook_embed_dim)
        self.entropy_loss_ratio = float(entropy_loss_ratio)

        net = dict(
            ch=int(ch), num_res_blocks=int(num_res_blocks), z_channels=int(z_channels), dropout=float(dropout)
        )
        self.encoder = Encoder(ch_mult=encoder_ch_mult, **net)
        self.decoder = Decoder(ch_mult=decoder_ch_mult, **net)
        self.quantize = VectorQuantizer(
            self.codebook_size,
            self.codebook_embed_dim,
            float(commit_loss_beta),
            self.entropy_loss_ratio,
            bool(codebook_l2_norm),
            bool(codebook_show_usage),
        )
        self.quant_conv = nn.Conv2d(int(z_channels), self.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.codebook_embed_dim, int(z_channels), 1)

    # -- Tokenizer interface ---------------------------------------------------------------------

    @property
    def scales(self) -> tuple[tuple[int, int], ...]:
        """One (g, g) grid, g = image_size / downsample."""
        return ((self._grid, self._grid),)

    @property
    def vocab_size(self) -> int:
        """Number of codebook entries K."""
        return self.codebook_size

    @property
    def codebook_dim(self) -> int:
        """Codebook vector width E."""
        return self.codebook_embed_dim

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight (upstream `Decoder.last_layer`, for adaptive GAN weights)."""
        return self.decoder.conv_out.weight

    def features(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> pre-quantisation latents z (B, E, h, w) = quant_conv(encoder(x))."""
        self.check_images(images_B3HW)
        return self.quant_conv(self.encoder(images_B3HW))

    def quantize_features(
        self, z_BEhw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, QuantizerLosses]:
        """Latents (B, E, h, w) -> (straight-through quant (B, E, h, w), indices (B, h, w), losses)."""
        return self.quantize(z_BEhw)

    @torch.no_grad()
    def encode(self, images_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Images in [-1, 1] -> [token map (B, g, g) int64]; never touches the usage register."""
        self.check_images(images_B3HW)
        z_BEhw = self.quant_conv(self.encoder(images_B3HW))
        return [self.quantize.nearest(z_BEhw)]

    def embed(self, tokens_Bhw: torch.Tensor) -> torch.Tensor:
        """Token map (B, h, w) -> codebook vectors (B, E, h, w), normalised as used for lookup."""
        if tokens_Bhw.numel() > 0:
            lo, hi = int(tokens_Bhw.min()), int(tokens_Bhw.max())
            # Out-of-range indices would be a device-side assert on CUDA; fail clearly instead.
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"VQTokenizer: token ids must lie in [0, {self.codebook_size}), "
                    f"got min {lo}, max {hi}"
                )
        return self.quantize.lookup(tokens_Bhw.long()).permute(0, 3, 1, 2).contiguous()

    def decode_latent(self, quant_BEhw: torch.Tensor) -> torch.Tensor:
        """Quantised latents (B, E, h, w) -> images (B, 3, H, W), not clamped (upstream `decode`)."""
        return self.decoder(self.post_quant_conv(quant_BEhw))

    def decode(self, token_maps: list[torch.Tensor]) -> torch.Tensor:
        """[token map (B, g, g)] -> images (B, 3, H, W) clamped to [-1, 1]."""
        self.check_token_maps(token_maps)
        return self.decode_latent(self.embed(token_maps[0])).clamp(-1.0, 1.0)

    def forward(self, images_B3HW: torch.Tensor) -> TokenizerOutput:
        """Training pass: encode, quantise (straight-through), decode; losses in both modes."""
        quant_BEhw, indices_Bhw, losses = self.quantize_features(self.features(images_B3HW))
        extra = {"entropy": losses.entropy_loss} if self.entropy_loss_ratio > 0 else {}
        return TokenizerOutput(
            recon=self.decode_latent(quant_BEhw),
            codebook_loss=losses.vq_loss,
            commit_loss=losses.commit_loss,
            token_maps=[indices_Bhw],
            extra_losses=extra,
        )
