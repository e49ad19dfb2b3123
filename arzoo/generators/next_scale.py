"""Next-scale prediction (VAR, class-conditional).

The network is VAR's transformer (`VAR` of `models/var.py` with the blocks of `models/basic_var.py`
in FoundationVision/VAR), with the official state-dict keys so official checkpoints load unchanged
(`arzoo.interop.var.load_var_generator`). It predicts the token maps of a multi-scale residual VQ
tokenizer (`MultiScaleVQTokenizer`) coarse to fine: one step per scale, every position of a scale in
parallel, each position seeing the positions of its own and all coarser scales (block-causal). The
input of scale k is the tokenizer's running reconstruction f_hat after scales < k, area-resized to
scale k's grid. Facts: docs/parity/var.md sections 3-8.

`inter_scale="mamba"` swaps the blocks for M-VAR's (OliverRensu/MVAR; `MVARTransformer`, official
M-VAR keys, `arzoo.interop.mvar.load_mvar_generator`): attention only within each scale, a causal
Mamba2 scan over the whole sequence carrying the coarser scales. Sampling then carries each block's
Mamba2 state from scale to scale (no KV cache, no re-run over the prefix). Facts:
docs/parity/mvar.md.

Shape letters: B batch, L = sum of pn_k^2 token positions, l one scale's positions, C width,
Cv codebook width (`codebook_dim`), V vocabulary, H heads, hd head width.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from arzoo.generators.base import BaseGenerator
from arzoo.generators.registry import register_sizes
from arzoo.generators.sampling import SamplingConfig, filter_logits_var
from arzoo.generators.state import SamplingState
from arzoo.nn.llama import DropPath
from arzoo.nn.mamba import Mamba2State
from arzoo.nn.mvar import MVARFFN as FFN  # VAR's MLP, the same in M-VAR
from arzoo.nn.mvar import MVARBlock
from arzoo.tokenizers.base import Tokenizer
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

# float32 ln(100) as a Python float: the official `torch.log(torch.tensor(100)).item()` clamp of the head scale.
_MAX_SCALE_MUL = 4.605170249938965

# ---- network: VAR's transformer ----


class SelfAttention(nn.Module):
    """VAR's `SelfAttention`, the block's inter-token mixer.

    Keys: `mat_qkv.weight` (3C, C; no bias parameter), `q_bias`, `v_bias`, the all-zero buffer
    `zero_k_bias`, `scale_mul_1H11` (only with `attn_l2_norm`), `proj.weight` / `proj.bias`.
    With `attn_l2_norm` q and k are L2-normalised, q is multiplied by `exp(min(scale_mul, ln 100))`
    and the softmax scale is 1; otherwise the softmax scale is `0.25 / sqrt(hd)` (both official).

    The mixer interface a block relies on (what a replacement such as M-VAR's must offer):
    `forward(x_BLC, attn_bias) -> (B, L, C)` with `attn_bias` an additive mask (1, 1, L, L) or None,
    and `kv_caching(enable)`: while enabled, every call appends its keys / values to a cache and
    attends over everything cached, unmasked (sampling one scale at a time).
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
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
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
        self.caching = False
        self.cached_k: torch.Tensor | None = None
        self.cached_v: torch.Tensor | None = None

    def kv_caching(self, enable: bool) -> None:
        """Switch the KV cache on (empty) or off (freed)."""
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(dim=0)  # each (B, H, L, hd)
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(_MAX_SCALE_MUL).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
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


class NextScaleTransformer(nn.Module):
    """VAR's class-conditional transformer: [class tokens of scale 0] + next-scale inputs -> logits.

    State-dict keys are the official ones (SPEC 3.2): `pos_start`, `pos_1LC`, the buffers `lvl_1L`
    and `attn_bias_for_masking`, `word_embed`, `class_emb` (row `num_classes` = the null class),
    `lvl_embed`, `shared_ada_lin.1.*` (shared AdaLN only), `blocks.{b}.{attn,ffn,ada_lin|ada_gss}.*`,
    `head_nm.ada_lin.1.*`, `head`. The tokenizer is not a submodule (official files are separate too).

    Label dropout is the caller's job (upstream's `forward` draws it itself, every call; arzoo's
    `BaseGenerator.drop_labels` reproduces that draw in training). Weights are initialised as the
    official training script does (`init_weights` with `init_std=-1`, i.e. sqrt(1 / 3C)).

    A subclass may change how tokens mix by overriding `build_mixer(block_idx)` (the `attn` of each
    block) or `build_block(block_idx, drop_path)` (whole blocks); both run while the blocks are built,
    after the sizes (`C`, `num_heads`, `patch_nums`, ...) are set. `build_attn_bias` gives the
    `attn_bias_for_masking` buffer, `sampling_cache(enable)` starts / frees what sampling carries
    across scales, and `teacher_forcing_input` / `scale_input` are the embeddings a new `forward` /
    `forward_scale` can reuse (`MVARTransformer` overrides all of these).
    """

    def __init__(
        self,
        *,
        depth: int,
        embed_dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        vocab_size: int,
        codebook_dim: int,
        patch_nums: Sequence[int],
        num_classes: int,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        init_std: float = -1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("depth", depth),
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("vocab_size", vocab_size),
            ("codebook_dim", codebook_dim),
            ("num_classes", num_classes),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"NextScaleTransformer: {name} must be a positive int, got {value!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"NextScaleTransformer: embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        patch_nums = tuple(int(pn) for pn in patch_nums)
        if len(patch_nums) < 2 or any(pn <= 0 for pn in patch_nums):
            raise ValueError(
                f"NextScaleTransformer: patch_nums must hold at least 2 positive scale sides, got {list(patch_nums)}"
            )
        self.config: dict[str, Any] = dict(
            depth=depth,
            embed_dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            shared_aln=shared_aln,
            attn_l2_norm=attn_l2_norm,
            vocab_size=vocab_size,
            codebook_dim=codebook_dim,
            patch_nums=patch_nums,
            num_classes=num_classes,
        )
        self.depth, self.C, self.D, self.num_heads = depth, embed_dim, embed_dim, num_heads
        self.V, self.Cvae, self.num_classes = vocab_size, codebook_dim, num_classes
        self.mlp_ratio, self.drop_rate, self.attn_drop_rate = mlp_ratio, drop_rate, attn_drop_rate
        self.norm_eps, self.shared_aln, self.attn_l2_norm = norm_eps, shared_aln, attn_l2_norm
        self.patch_nums = patch_nums
        self.L = sum(pn * pn for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for pn in patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        # Construction order as upstream (so the state dict lists the keys in the official order).
        init_std_auto = math.sqrt(1 / embed_dim / 3)
        self.word_embed = nn.Linear(codebook_dim, embed_dim)
        self.class_emb = nn.Embedding(num_classes + 1, embed_dim)
        nn.init.trunc_normal_(self.class_emb.weight.data, mean=0, std=init_std_auto)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, embed_dim))
        nn.init.trunc_normal_(self.pos_start.data, mean=0, std=init_std_auto)
        pos_1LC = []
        for pn in patch_nums:
            pe = torch.empty(1, pn * pn, embed_dim)
            nn.init.trunc_normal_(pe, mean=0, std=init_std_auto)
            pos_1LC.append(pe)
        self.pos_1LC = nn.Parameter(torch.cat(pos_1LC, dim=1))
        self.lvl_embed = nn.Embedding(len(patch_nums), embed_dim)
        nn.init.trunc_normal_(self.lvl_embed.weight.data, mean=0, std=init_std_auto)

        self.shared_ada_lin: nn.Module = nn.Identity()
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(embed_dim, 6 * embed_dim))
        rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(self.build_block(block_idx, rates[block_idx]) for block_idx in range(depth))

        # Scale index of every position, and the additive attention mask of teacher forcing
        # (`build_attn_bias`); official buffers, in official checkpoints.
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking", self.build_attn_bias(d[0, :, 0]).contiguous())

        self.head_nm = AdaLNBeforeHead(embed_dim, self.D, norm_eps=norm_eps)
        self.head = nn.Linear(embed_dim, vocab_size)
        self.init_weights(init_adaln, init_adaln_gamma, init_head, init_std)

    def build_block(self, block_idx: int, drop_path: float) -> nn.Module:
        """Block `block_idx` (`blocks.{b}`): VAR's `AdaLNSelfAttn` around `build_mixer(block_idx)`.

        The network calls a block as `block(x_BLC, cond, attn_bias)` (teacher forcing with the
        additive mask; one scale at a time with `attn_bias=None` while `block.attn` caches) and
        switches its cache with `block.attn.kv_caching(enable)`; `init_weights` applies VAR's
        block-specific scaling to `AdaLNSelfAttn` blocks only."""
        return AdaLNSelfAttn(
            self.C,
            self.D,
            self.build_mixer(block_idx),
            mlp_ratio=self.mlp_ratio,
            drop=self.drop_rate,
            drop_path=drop_path,
            norm_eps=self.norm_eps,
            shared_aln=self.shared_aln,
        )

    def build_attn_bias(self, scale_of_position: torch.Tensor) -> torch.Tensor:
        """The `attn_bias_for_masking` buffer (1, 1, L, L) from the scale index (L,) of every position:
        VAR's block-causal mask, 0 where the key's scale is not finer than the query's, -inf elsewhere."""
        d = scale_of_position
        return torch.where(d[:, None] >= d[None, :], 0.0, -torch.inf).reshape(1, 1, self.L, self.L)

    def build_mixer(self, block_idx: int) -> nn.Module:
        """The inter-token mixer of block `block_idx` (`blocks.{b}.attn`): VAR's self-attention."""
        return SelfAttention(
            self.C,
            self.num_heads,
            attn_drop=self.attn_drop_rate,
            proj_drop=self.drop_rate,
            attn_l2_norm=self.attn_l2_norm,
        )

    @torch.no_grad()
    def init_weights(
        self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02, init_std: float = 0.02
    ) -> None:
        """The official `init_weights` (SPEC 6); `init_std < 0` means sqrt(1 / 3C)."""
        if init_std < 0:
            init_std = (1 / self.C / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight.data, std=init_std)
        if init_head >= 0:
            self.head.weight.data.mul_(init_head)
            self.head.bias.data.zero_()
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.data.zero_()
        for block in self.blocks:
            if not isinstance(block, AdaLNSelfAttn):
                continue
            mixer = block.attn
            if isinstance(getattr(mixer, "proj", None), nn.Linear):
                mixer.proj.weight.data.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            if block.shared_aln:
                block.ada_gss.data[:, :, 2:].mul_(init_adaln)
                block.ada_gss.data[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight.data[2 * self.C :].mul_(init_adaln)
                block.ada_lin[-1].weight.data[: 2 * self.C].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.data.zero_()

    # -- embeddings ----------------------------------------------------------------------------

    def lvl_pos(self) -> torch.Tensor:
        """(1, L, C): level embedding of every position + its absolute position embedding."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """head(head_nm(h, cond)) in float32."""
        return self.head(self.head_nm(h_BLC.float(), cond_BD).float()).float()

    # -- teacher forcing -------------------------------------------------------------------------

    def forward(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Official `VAR.forward` without the label dropout: labels (B,) in [0, num_classes] and the
        next-scale inputs (B, L' - first_l, Cv) of the first scales (L' <= L; L' = L in training) ->
        logits (B, L', V) float32. `attn_bias` (additive, broadcastable to (B, H, L', L')) defaults to
        the block-causal `attn_bias_for_masking`."""
        x_BLC, cond_BD = self.teacher_forcing_input(label_B, x_BLCv_wo_first_l)
        ed = x_BLC.shape[1]
        attn_bias = self.attn_bias_for_masking[:, :, :ed, :ed] if attn_bias is None else attn_bias
        cond_or_gss = self.shared_ada_lin(cond_BD)
        main_type = _main_type(x_BLC)
        x_BLC, cond_or_gss, attn_bias = x_BLC.to(main_type), cond_or_gss.to(main_type), attn_bias.to(main_type)
        for block in self.blocks:
            x_BLC = block(x_BLC, cond_or_gss, attn_bias)
        return self.get_logits(x_BLC, cond_BD)

    def teacher_forcing_input(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' input (B, L', C) float32 ([class token + pos_start ; word_embed(x)] + level and
        position embeddings, computed outside autocast as upstream) and the class embedding (B, C)."""
        B = x_BLCv_wo_first_l.shape[0]
        ed = self.first_l + x_BLCv_wo_first_l.shape[1]
        if label_B.shape != (B,) or x_BLCv_wo_first_l.ndim != 3 or x_BLCv_wo_first_l.shape[2] != self.Cvae:
            raise ValueError(
                f"expected labels (B,) and inputs (B, L - {self.first_l}, {self.Cvae}), got "
                f"{tuple(label_B.shape)} and {tuple(x_BLCv_wo_first_l.shape)}"
            )
        if ed > self.L:
            raise ValueError(f"{ed} positions exceed the {self.L} of patch_nums {list(self.patch_nums)}")
        with torch.autocast(device_type=x_BLCv_wo_first_l.device.type, enabled=False):
            cond_BD = self.class_emb(label_B)
            sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, self.first_l, -1)
            x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)
            x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed])
        return x_BLC, cond_BD

    # -- sampling: one scale at a time, with the KV caches -------------------------------------

    def kv_caching(self, enable: bool) -> None:
        """Switch every block's KV cache on (empty) or off (freed)."""
        for block in self.blocks:
            block.attn.kv_caching(enable)

    def sampling_cache(self, enable: bool) -> None:
        """Start (empty) or free what scale-by-scale sampling carries from one scale to the next:
        here every block's attention KV cache (`kv_caching`)."""
        self.kv_caching(enable)

    def forward_scale(self, label_B: torch.Tensor, si: int, next_input: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (R, pn_si^2, V) of scale `si` for R = len(label_B) rows, appending to the KV caches.

        Scale 0 reads the class tokens alone (`next_input` None). Scale si > 0 reads `next_input`,
        the running f_hat after scales < si area-resized to pn_si: (B, Cv, pn, pn) or (B, pn^2, Cv),
        with B = R or R/2 (then repeated to both CFG halves after the embedding, as upstream).
        Scales must be fed in order 0, 1, ... after `kv_caching(True)`.
        """
        if not 0 <= si < len(self.patch_nums):
            raise ValueError(f"scale index {si} out of range for {len(self.patch_nums)} scales")
        if si > 0 and (next_input is None or not getattr(self.blocks[0].attn, "caching", True)):
            raise RuntimeError(
                "scale si > 0 needs its next_input and the KV caches (kv_caching(True), then the scales in order)"
            )
        x_BlC, cond_BD = self.scale_input(label_B, si, next_input)
        cond_or_gss = self.shared_ada_lin(cond_BD)
        for block in self.blocks:
            x_BlC = block(x_BlC, cond_or_gss, None)
        return self.get_logits(x_BlC, cond_BD)

    def scale_input(
        self, label_B: torch.Tensor, si: int, next_input: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' input (R, pn_si^2, C) of scale `si` while sampling (see `forward_scale`) and
        the class embedding (R, C) of the R = len(label_B) rows."""
        rows = label_B.shape[0]
        cond_BD = self.class_emb(label_B)
        lvl_pos = self.lvl_pos()
        if si == 0:
            x_BlC = (
                cond_BD.unsqueeze(1).expand(rows, self.first_l, -1)
                + self.pos_start.expand(rows, self.first_l, -1)
                + lvl_pos[:, : self.first_l]
            )
        else:
            assert next_input is not None
            B = next_input.shape[0]
            if next_input.ndim == 4:
                next_input = next_input.view(B, self.Cvae, -1).transpose(1, 2)
            begin, end = self.begin_ends[si]
            if next_input.shape[1:] != (end - begin, self.Cvae) or rows % B != 0:
                raise ValueError(
                    f"scale {si} input should be (B, {self.Cvae}, {self.patch_nums[si]}, {self.patch_nums[si]}) or "
                    f"(B, {end - begin}, {self.Cvae}) with B dividing {rows}, got {tuple(next_input.shape)}"
                )
            x_BlC = self.word_embed(next_input) + lvl_pos[:, begin:end]
            if rows != B:
                x_BlC = x_BlC.repeat(rows // B, 1, 1)
        return x_BlC, cond_BD


# ---- network: M-VAR's transformer (Mamba across scales) ----


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

    def __init__(
        self,
        *,
        mamba_d_state: int = 64,
        mamba_d_conv: int = 4,
        mamba_expand: int = 2,
        mamba_headdim: int = 64,
        attn_backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("shared_aln", False):
            raise ValueError(
                "inter_scale='mamba' (M-VAR) does not support shared_aln=True: each M-VAR block needs 9 AdaLN "
                "vectors and upstream's shared AdaLN (6 vectors) is broken; use shared_aln=False"
            )
        for name, value in (("mamba_d_state", mamba_d_state), ("mamba_d_conv", mamba_d_conv),
                            ("mamba_expand", mamba_expand), ("mamba_headdim", mamba_headdim)):  # fmt: skip
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MVARTransformer: {name} must be a positive int, got {value!r}")
        embed_dim = kwargs.get("embed_dim")
        if isinstance(embed_dim, int) and (mamba_expand * embed_dim) % mamba_headdim:
            raise ValueError(
                f"MVARTransformer: the Mamba2 width mamba_expand * embed_dim = {mamba_expand * embed_dim} is not "
                f"divisible by mamba_headdim {mamba_headdim}"
            )
        # read by build_block while the parent constructor builds the blocks
        self.mamba_kwargs = dict(d_state=mamba_d_state, d_conv=mamba_d_conv, expand=mamba_expand,
                                 headdim=mamba_headdim)  # fmt: skip
        self.attn_backend = attn_backend
        super().__init__(**kwargs)
        self.config.update(
            inter_scale="mamba", mamba_d_state=mamba_d_state, mamba_d_conv=mamba_d_conv,
            mamba_expand=mamba_expand, mamba_headdim=mamba_headdim,
        )  # fmt: skip
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
            mamba_kwargs=self.mamba_kwargs,
            attn_backend=self.attn_backend,
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
        main_type = _main_type(x_BLC)
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


def _main_type(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul gets here under autocast (x's dtype without), as upstream probes it."""
    probe = x.new_ones(8, 8)
    return torch.matmul(probe, probe).dtype


# ---- generator: one step per scale, coarse to fine ----


# How positions of different scales mix: VAR's block-causal attention, or M-VAR's intra-scale
# attention plus a Mamba2 scan over the sequence. Mamba2 defaults: M-VAR's (mamba-ssm 2.2's).
INTER_SCALE = ("attention", "mamba")
_MAMBA_DEFAULTS = dict(mamba_d_state=64, mamba_d_conv=4, mamba_expand=2, mamba_headdim=64)

# Official VAR optimizer: no weight decay on 1-D parameters, biases and these names (train.py's nowd_keys).
_NO_WEIGHT_DECAY_KEYS = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)  # fmt: skip


class NextScaleGenerator(BaseGenerator):
    """VAR as an arzoo paradigm: one step per scale of a `MultiScaleVQTokenizer`, block-causal.

    Step k predicts every position of scale k at once from the class and the tokenizer's running
    reconstruction of scales < k (`teacher_inputs(tokens)` = `tokenizer.teacher_forcing_input`).
    While sampling, `state.carry` holds the running f_hat and the next scale's input; each step's
    tokens are added to f_hat right after they are drawn (`update_state`), and `decode_state`
    decodes the final f_hat (so `more_smooth` images are the official ones).

    Guidance is VAR's, in arzoo's convention that `cfg = 1` means none: the guidance weight grows
    linearly over the scales, `t = (cfg - 1) * k / (K - 1)`, logits `(1 + t) * cond - t * uncond`
    (the conditional logits alone at scale 0). Upstream's `cfg` argument is arzoo's `cfg - 1`.
    Sampling filters are VAR's (`filter_logits_var`: top-k ties survive, top-p in VAR's sense), then
    one `torch.multinomial` over all (B*l, V) rows per scale with the given generator. With
    `more_smooth` (upstream's Gumbel-softmax visualisation mode) the ids are still drawn, but each
    scale adds the Gumbel-softmax-weighted mix of codebook vectors to f_hat instead.

    `inter_scale` picks how positions of different scales mix: "attention" (VAR: block-causal
    attention, `NextScaleTransformer`) or "mamba" (M-VAR: attention inside each scale plus a Mamba2
    scan across scales, `MVARTransformer`; `mamba_d_state`, `mamba_d_conv`, `mamba_expand`,
    `mamba_headdim` size its Mamba2, M-VAR's values by default; `shared_aln` is refused). With
    "mamba" the teacher-forcing `mask` is block-diagonal and `generate()` carries every block's
    Mamba2 state (for the CFG-doubled rows) from one scale to the next, so each scale runs Mamba
    over its own positions only; the logits equal the teacher-forced ones up to float rounding.

    Network arguments are those of `NextScaleTransformer`; `vocab_size`, `patch_nums` and
    `codebook_dim` default to the tokenizer's (given all three, no tokenizer is needed: e.g. to
    count parameters on the meta device). `label_smoothing` is the trainer's `--ls`. The remaining
    keyword arguments (`tokenizer_path`, `num_classes`, `class_dropout_prob` = upstream's
    `cond_drop_rate`, `lr`, `ema_decay`, ...) are `BaseGenerator`'s.
    """

    paradigm = "next-scale"
    tokenizer_kind = MultiScaleVQTokenizer

    def __init__(
        self,
        depth: int = 4,
        embed_dim: int = 128,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        init_std: float = -1.0,
        vocab_size: int | None = None,
        patch_nums: Sequence[int] | None = None,
        codebook_dim: int | None = None,
        label_smoothing: float = 0.0,
        more_smooth: bool = False,
        inter_scale: str = "attention",
        mamba_d_state: int = 64,
        mamba_d_conv: int = 4,
        mamba_expand: int = 2,
        mamba_headdim: int = 64,
        **kwargs: Any,
    ) -> None:
        if inter_scale not in INTER_SCALE:
            raise ValueError(f"inter_scale must be one of {list(INTER_SCALE)}, got {inter_scale!r}")
        mamba = dict(mamba_d_state=mamba_d_state, mamba_d_conv=mamba_d_conv, mamba_expand=mamba_expand,
                     mamba_headdim=mamba_headdim)  # fmt: skip
        if inter_scale == "attention" and mamba != _MAMBA_DEFAULTS:
            changed = {k: v for k, v in mamba.items() if v != _MAMBA_DEFAULTS[k]}
            raise ValueError(
                f"{changed} only apply to inter_scale='mamba' (this generator has inter_scale='attention')"
            )
        if inter_scale == "mamba" and shared_aln:
            raise ValueError(
                "inter_scale='mamba' (M-VAR) does not support shared_aln=True: each M-VAR block needs 9 AdaLN "
                "vectors and upstream's shared AdaLN (6 vectors) is broken; use shared_aln=False"
            )
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        patch_nums = None if patch_nums is None else tuple(int(pn) for pn in patch_nums)
        tok = self.tokenizer
        name = type(self).__name__
        if tok is None:
            missing = [k for k, v in (("vocab_size", vocab_size), ("patch_nums", patch_nums),
                                      ("codebook_dim", codebook_dim)) if v is None]  # fmt: skip
            if missing:
                raise ValueError(
                    f"{name} needs a tokenizer_path, or explicit vocab_size, patch_nums and codebook_dim "
                    f"(missing: {', '.join(missing)})"
                )
        else:
            where = self.hparams.get("tokenizer_path") or "the tokenizer spec"
            assert isinstance(tok, MultiScaleVQTokenizer)
            if patch_nums is not None and patch_nums != tuple(tok.patch_nums):
                raise ValueError(
                    f"{name} was configured with patch_nums {list(patch_nums)}, but the tokenizer ({where}) has "
                    f"patch_nums {list(tok.patch_nums)}"
                )
            if codebook_dim is not None and codebook_dim != tok.codebook_dim:
                raise ValueError(
                    f"{name} was configured with codebook_dim {codebook_dim}, but the tokenizer ({where}) has "
                    f"codebook_dim {tok.codebook_dim}"
                )
            codebook_dim = tok.codebook_dim
        scales = None if patch_nums is None else tuple((pn, pn) for pn in patch_nums)
        vocab_size, scales = self.resolve_sizes(vocab_size, scales)
        self.vocab_size, self.scales = vocab_size, scales
        self.patch_nums = tuple(h for h, _ in scales)
        if len(self.patch_nums) < 2:
            raise ValueError(f"{name} needs at least 2 scales (coarse to fine), got patch_nums {list(self.patch_nums)}")
        self.codebook_dim = int(codebook_dim)
        self.label_smoothing = label_smoothing
        self.more_smooth = more_smooth
        self.inter_scale = inter_scale
        self.net = self.build_network(
            mamba if inter_scale == "mamba" else {},
            depth=depth,
            embed_dim=embed_dim,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            norm_eps=norm_eps,
            shared_aln=shared_aln,
            attn_l2_norm=attn_l2_norm,
            vocab_size=vocab_size,
            codebook_dim=self.codebook_dim,
            patch_nums=self.patch_nums,
            num_classes=self.num_classes,
            init_adaln=init_adaln,
            init_adaln_gamma=init_adaln_gamma,
            init_head=init_head,
            init_std=init_std,
        )
        self.configure_ema()

    def build_network(self, extra: Mapping[str, Any], **net_kwargs: Any) -> nn.Module:
        """`self.net`: `NextScaleTransformer(**net_kwargs)`, or with `inter_scale='mamba'` an
        `MVARTransformer` (`extra` holds its Mamba2 sizes). Subclasses may build another network."""
        if self.inter_scale == "mamba":
            return MVARTransformer(**extra, **net_kwargs)
        return NextScaleTransformer(**net_kwargs)

    def _load_tokenizer(self, path: str | None, spec: Mapping | None) -> Tokenizer | None:
        try:
            return super()._load_tokenizer(path, spec)
        except TypeError as err:
            raise TypeError(
                f"next-scale prediction needs a multi-scale tokenizer (MultiScaleVQTokenizer, e.g. from "
                f"recipes/digits/tokenizer_msvq.yaml or arzoo.interop.var.load_vqvae), not a single token grid: {err}"
            ) from err

    # ---- the paradigm ----------------------------------------------------------------------------

    def build_schedule(self) -> list[torch.Tensor]:
        """Step k predicts the positions of scale k (contiguous, row-major)."""
        return [torch.arange(begin, end) for begin, end in self.net.begin_ends]

    @property
    def first_l(self) -> int:
        """Positions of the first scale (predicted from the class alone)."""
        return self.patch_nums[0] ** 2

    def teacher_inputs(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """The next-scale inputs (B, N - first_l, Cv) of all scales but the first: the tokenizer's
        running reconstruction of the coarser scales, area-resized to each scale."""
        tok = self.require_tokenizer()
        # float32 as upstream (its trainer builds the inputs outside the autocast region)
        with torch.autocast(device_type=tokens_BN.device.type, enabled=False):
            return tok.teacher_forcing_input(self.split_scales(tokens_BN))

    def step_inputs(self, state: SamplingState) -> torch.Tensor | None:
        """Step 0: None (class tokens only); step k: the running f_hat after scale k-1 area-resized
        to pn_k (B, Cv, pn, pn), from `state.carry`."""
        if state.step == 0:
            return None
        if state.carry.get("next_input") is None:
            raise RuntimeError(f"step {state.step} has no input yet: the tokens of step {state.step - 1} were not drawn")
        return state.carry["next_input"]

    def visibility_mask(self) -> torch.Tensor:
        """(N, N) bool, True = may attend. VAR: block-causal (own and coarser scales). M-VAR
        (`inter_scale='mamba'`): block-diagonal, attention stays inside each scale (coarser scales
        reach a position through the causal Mamba scan, which no mask describes)."""
        if self.inter_scale == "mamba":
            with torch.device("cpu"):
                steps = self.step_of_slot()
                return steps[:, None] == steps[None, :]
        return super().visibility_mask()

    def teacher_forcing(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V). With `inter_scale='mamba'` the network's own one-segment-per-scale
        attention is used (flash-attn varlen / FlexAttention on CUDA) rather than the dense `mask`."""
        if self.inter_scale == "mamba":
            return self(self.teacher_inputs(tokens_BN), labels_B, None)
        return super().teacher_forcing(tokens_BN, labels_B)

    def forward(self, inputs: torch.Tensor, labels_B: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: next-scale inputs (B, N - first_l, Cv) -> logits (B, N, V); `mask` (N, N)
        bool (True = may attend) becomes an additive mask (default: the network's own, block-causal
        for VAR, one attention segment per scale for M-VAR)."""
        bias = None
        if mask is not None:
            zeros = torch.zeros(mask.shape, device=mask.device)
            bias = zeros.masked_fill(~mask, float("-inf"))[None, None]
        return self.net(labels_B, inputs, attn_bias=bias)

    def start_sampling(self, state: SamplingState) -> SamplingState:
        self.require_tokenizer()
        self.net.sampling_cache(True)
        return state

    def forward_step(self, inputs: torch.Tensor | None, state: SamplingState) -> torch.Tensor:
        """Logits (R, pn_step^2, V) of one scale through the KV caches."""
        return self.net.forward_scale(state.labels, state.step, inputs)

    def end_sampling(self, state: SamplingState) -> SamplingState:
        self.net.sampling_cache(False)
        return state

    def cfg_scale(self, step: int, cfg: float) -> float:
        """The guidance scale `1 + t` of scale `step`, t = (cfg - 1) * step / (num_steps - 1)."""
        return 1.0 + self.cfg_weight(step, cfg)

    def cfg_weight(self, step: int, cfg: float) -> float:
        """VAR's guidance weight t of scale `step`: grows linearly from 0 to cfg - 1 over the scales."""
        return (cfg - 1.0) * (step / (self.num_steps - 1))

    def guide_logits(self, cond_BlV: torch.Tensor, uncond_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """VAR's guidance `(1 + t) * cond - t * uncond` (upstream's op order)."""
        t = self.cfg_weight(state.step, state.cfg)
        return (1 + t) * cond_BlV - t * uncond_BlV

    def logits_to_tokens(self, logits_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """VAR's sampler: temperature, `filter_logits_var`, one multinomial over the (B*l, V) rows
        (or argmax with `greedy`)."""
        if state.sampling.greedy and self.more_smooth:
            raise ValueError("more_smooth adds Gumbel noise to every scale: it cannot be combined with greedy=True")
        return self.draw_scale(logits_BlV, state.sampling, state.generator)[0]

    def update_state(self, state: SamplingState, ids_Bl: torch.Tensor, logits_BlV: torch.Tensor) -> SamplingState:
        """Record the scale's tokens and add its codes to the running f_hat (`state.carry`): the
        codebook vectors of the ids, or with `more_smooth` the Gumbel-softmax mix (noise drawn from
        the generator after the ids, temperature max(0.27 (1 - 0.95 r), 0.005), r = k/(K-1))."""
        state = super().update_state(state, ids_Bl, logits_BlV)
        tok = self.require_tokenizer()
        assert isinstance(tok, MultiScaleVQTokenizer)
        step = state.step
        if state.carry.get("f_hat") is None:
            P = self.patch_nums[-1]
            state.carry["f_hat"] = torch.zeros(ids_Bl.shape[0], self.codebook_dim, P, P, device=logits_BlV.device)
        if self.more_smooth:
            logits = self.filtered_logits(logits_BlV, state.sampling)
            ratio = step / (self.num_steps - 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            scaled = logits.mul(1 + ratio)
            noise = -torch.empty_like(scaled).exponential_(generator=state.generator).log()
            weights = ((scaled + noise) / tau).softmax(dim=-1)
            h_BlC = weights @ tok.quantize.embedding.weight.unsqueeze(0)
        else:
            h_BlC = tok.embed_tokens(ids_Bl)
        state.carry["f_hat"], state.carry["next_input"] = tok.next_scale_input(step, state.carry["f_hat"], h_BlC)
        return state

    def filtered_logits(self, logits_BlV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """VAR's temperature-scaled, top-k / top-p filtered float logits of one scale."""
        logits = logits_BlV.float()
        if sampling.temperature != 1.0:
            logits = logits / sampling.temperature
        return filter_logits_var(logits, sampling.top_k, sampling.top_p)

    def draw_scale(
        self, logits_BlV: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """VAR's draw of one scale: (ids (B, l), the temperature-scaled and filtered float logits)."""
        B, l, V = logits_BlV.shape
        logits = self.filtered_logits(logits_BlV, sampling)
        if sampling.greedy:
            ids_Bl = logits.argmax(dim=-1)
        else:
            probs = logits.softmax(dim=-1).view(-1, V)
            ids_Bl = torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)
        return ids_Bl, logits

    def sample_random_labels(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`batch_size` class ids drawn uniformly with replacement, as upstream's sampler does for
        `label_B=None` (one `torch.multinomial` on the generator's device, before any token draw)."""
        device = generator.device if generator is not None else self.device
        uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, dtype=torch.float32, device=device)
        labels = torch.multinomial(uniform, num_samples=batch_size, replacement=True, generator=generator)
        return labels.reshape(batch_size).to(self.device)

    @torch.no_grad()
    def decode_state(self, state: SamplingState) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]: the tokenizer decodes the final f_hat (upstream's image is
        `(img + 1) / 2`)."""
        return self.require_tokenizer().decode_fhat(state.carry["f_hat"])  # type: ignore[attr-defined]

    # ---- training --------------------------------------------------------------------------------

    def token_loss(self, logits_BNV: torch.Tensor, targets_BN: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all positions, with `label_smoothing` (upstream's trainer: `--ls`)."""
        return F.cross_entropy(
            logits_BNV.reshape(-1, logits_BNV.shape[-1]).float(),
            targets_BN.reshape(-1),
            label_smoothing=self.label_smoothing,
        )

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """As upstream's train.py: no weight decay on 1-D parameters, biases, positional / level
        embeddings, `ada_gss` and the attention scales."""
        return param.ndim == 1 or name.endswith("bias") or any(key in name for key in _NO_WEIGHT_DECAY_KEYS)


# Official VAR sizes (ImageNet 256, SPEC 7: width 64*depth, heads = depth, drop path 0.1*depth/24,
# L2-normalised attention, the released VQVAE's 4096 codes of width 32) and a tiny one for the digits.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def _official(depth: int) -> dict[str, Any]:
    return dict(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        drop_path_rate=0.1 * depth / 24,
        attn_l2_norm=True,
        shared_aln=False,
        vocab_size=4096,
        codebook_dim=32,
        patch_nums=list(PATCH_NUMS_256),
        num_classes=1000,
    )


def _official_mvar(depth: int) -> dict[str, Any]:
    """M-VAR's released sizes (SPEC 7): VAR's with Mamba across scales; the d16 / d20 checkpoints
    use attn_l2_norm=False (M-VAR's README), d24 / d30 True."""
    return dict(_official(depth), inter_scale="mamba", attn_l2_norm=depth >= 24)


register_sizes(
    NextScaleGenerator,
    {
        "var-d16": _official(16),
        "var-d20": _official(20),
        "var-d24": _official(24),
        "var-d30": _official(30),
        "var-tiny": dict(depth=4, embed_dim=128, num_heads=4),
        "mvar-d16": _official_mvar(16),
        "mvar-d20": _official_mvar(20),
        "mvar-d24": _official_mvar(24),
        "mvar-d30": _official_mvar(30),
        "mvar-tiny": dict(depth=4, embed_dim=128, num_heads=4, inter_scale="mamba"),
    },
)
