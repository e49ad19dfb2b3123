"""VAR's class-conditional transformer (`VAR` of FoundationVision/VAR `models/var.py`), with the
official state-dict keys. Facts: docs/parity/var.md sections 3-8.

Shape letters: B batch, L = sum of pn_k^2 token positions, l one scale's positions, C width,
Cv codebook width, V vocabulary, H heads, hd head width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from arzoo.networks.config import check_positive_ints, config_to_dict, network_config
from arzoo.nn.var import AdaLNBeforeHead, AdaLNSelfAttn, SelfAttention, SharedAdaLin

__all__ = ["NextScaleTransformer", "VARConfig", "matmul_dtype"]


@dataclass(frozen=True, kw_only=True)
class VARConfig:
    """VAR's network arguments, written once (upstream's `VAR.__init__`); checked on construction."""

    depth: int
    embed_dim: int
    num_heads: int
    vocab_size: int
    codebook_dim: int
    patch_nums: tuple[int, ...]
    num_classes: int
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    init_adaln: float = 0.5
    init_adaln_gamma: float = 1e-5
    init_head: float = 0.02
    init_std: float = -1.0  # < 0: sqrt(1 / 3C), as the official training script

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_ints(name, depth=self.depth, embed_dim=self.embed_dim, num_heads=self.num_heads,
                            vocab_size=self.vocab_size, codebook_dim=self.codebook_dim, num_classes=self.num_classes)  # fmt: skip
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"{name}: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        patch_nums = tuple(int(pn) for pn in self.patch_nums)
        if len(patch_nums) < 2 or any(pn <= 0 for pn in patch_nums):
            raise ValueError(f"{name}: patch_nums must hold at least 2 positive scale sides, got {list(patch_nums)}")
        object.__setattr__(self, "patch_nums", patch_nums)

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a plain dict (`patch_nums` a list), e.g. for JSON."""
        return config_to_dict(self)


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

    config_cls: ClassVar[type[VARConfig]] = VARConfig  # a subclass with more arguments extends it

    def __init__(self, config: VARConfig | None = None, **kwargs: Any) -> None:
        """Built from `config`, or from its fields as keyword arguments (`NextScaleTransformer(depth=2, ...)`)."""
        super().__init__()
        c = self.config = network_config(self.config_cls, config, kwargs, type(self).__name__)  # the build_* hooks read it
        self.depth, self.C, self.D, self.num_heads = c.depth, c.embed_dim, c.embed_dim, c.num_heads
        self.V, self.Cvae, self.num_classes = c.vocab_size, c.codebook_dim, c.num_classes
        self.mlp_ratio, self.drop_rate, self.attn_drop_rate = c.mlp_ratio, c.drop_rate, c.attn_drop_rate
        self.norm_eps, self.shared_aln, self.attn_l2_norm = c.norm_eps, c.shared_aln, c.attn_l2_norm
        self.patch_nums = patch_nums = c.patch_nums
        embed_dim = c.embed_dim
        self.L = sum(pn * pn for pn in patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for pn in patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn

        # Construction order as upstream (so the state dict lists the keys in the official order).
        init_std_auto = math.sqrt(1 / embed_dim / 3)
        self.word_embed = nn.Linear(c.codebook_dim, embed_dim)
        self.class_emb = nn.Embedding(c.num_classes + 1, embed_dim)
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
        if c.shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(embed_dim, 6 * embed_dim))
        rates = [r.item() for r in torch.linspace(0, c.drop_path_rate, c.depth, device="cpu")]
        self.blocks = nn.ModuleList(self.build_block(block_idx, rates[block_idx]) for block_idx in range(c.depth))

        # Scale index of every position, and the additive attention mask of teacher forcing
        # (`build_attn_bias`); official buffers, in official checkpoints.
        d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(patch_nums)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        self.register_buffer("attn_bias_for_masking", self.build_attn_bias(d[0, :, 0]).contiguous())

        self.head_nm = AdaLNBeforeHead(embed_dim, self.D, norm_eps=c.norm_eps)
        self.head = nn.Linear(embed_dim, c.vocab_size)
        self.init_weights(c.init_adaln, c.init_adaln_gamma, c.init_head, c.init_std)

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
        main_type = matmul_dtype(x_BLC)
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


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul gets here under autocast (x's dtype without), as upstream probes it."""
    probe = x.new_ones(8, 8)
    return torch.matmul(probe, probe).dtype
