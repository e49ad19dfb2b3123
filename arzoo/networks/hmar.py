"""HMAR's network in the official inference layout (NVlabs/HMAR `HMAR`): VAR's transformer with a
Markovian (per-scale) attention, a next-scale branch and a mask-prediction branch on shared base
blocks, and the maps from the official training layouts' keys. Facts: docs/parity/hmar.md.

Shape letters: B batch, L positions, l one scale's positions, C width, Cv codebook width, V vocabulary.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arzoo.networks.var import NextScaleTransformer, VARConfig
from arzoo.networks.var import matmul_dtype as _main_type
from arzoo.nn.mvar import scale_lengths, segment_attention
from arzoo.nn.var import SelfAttention

__all__ = ["MASK_BRANCH", "HMARConfig", "HMARTransformer", "MarkovSelfAttention", "stage1_key_to_inference", "stage2_key_to_inference"]

# The mask branch's parameters (stage 2 trains these and nothing else).
MASK_BRANCH = ("mask_blocks.", "mask_head_nm.", "mask_head.", "mask_embed.")


# ---- network ----


class MarkovSelfAttention(SelfAttention):
    """VAR's self-attention whose mask may also be a tuple of segment lengths: block-diagonal
    attention, one segment per scale (FlexAttention on CUDA, SDPA with a boolean mask elsewhere)."""

    attn_backend: str = "auto"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Any) -> torch.Tensor:
        if isinstance(attn_bias, tuple):
            dropout_p = self.attn_drop if self.training else 0.0
            return segment_attention(q, k, v, attn_bias, self.scale, dropout_p, self.attn_backend)
        return super().attend(q, k, v, attn_bias)


@dataclass(frozen=True, kw_only=True)
class HMARConfig(VARConfig):
    """HMAR's network arguments: VAR's (no shared AdaLN) plus the blocks each branch owns
    (`n_layers_train`) and the attention backend of teacher forcing."""

    n_layers_train: int = 8
    attn_backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        n, depth = self.n_layers_train, self.depth
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= depth:
            raise ValueError(f"HMAR: n_layers_train must be an int in [1, depth={depth}], got {n!r}")
        if self.shared_aln:
            raise ValueError("HMAR has no shared AdaLN (shared_aln=False in every official config)")
        if self.attn_backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attn_backend must be 'auto', 'sdpa' or 'flex', got {self.attn_backend!r}")


class HMARTransformer(NextScaleTransformer):
    """HMAR's network in the official inference layout (SPEC 1), built as the stage-1 network
    (VAR's, `depth` blocks) and then arranged as upstream's `load_base_and_ns_state_dict` does:
    blocks [0, depth - n) become `base_blocks`, the last n = `n_layers_train` become `ns_blocks`,
    `head(_nm)` becomes `ns_head(_nm)`, `word_embed`'s bias becomes `word_embed_bias`. The mask
    branch (`mask_blocks`, `mask_head(_nm)`) starts as a copy of the next-scale one, as stage 2
    starts from stage 1 (`init_mask_branch_from_ns`); `mask_embed` is the mask token (1, C).

    Both branches share the base blocks. Teacher forcing (`forward`: next-scale branch,
    `forward_mask`: mask branch) attends within each scale only; `forward_scale` runs one scale
    while sampling, over its own tokens, with nothing carried from earlier scales but its input.
    `attn_bias_for_masking` (official buffer) is the block-diagonal additive mask.
    """

    config_cls = HMARConfig
    config: HMARConfig

    def __init__(self, config: HMARConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.n_layers_train = n_layers_train = self.config.n_layers_train
        depth = self.depth
        self.scale_lens = scale_lengths(self.patch_nums)
        base = depth - n_layers_train
        blocks = list(self.blocks)
        del self.blocks, self.shared_ada_lin
        self.base_blocks = nn.ModuleList(blocks[:base])
        self.ns_blocks = nn.ModuleList(blocks[base:])
        self.mask_blocks = copy.deepcopy(self.ns_blocks)
        self.ns_head_nm, self.ns_head = self.head_nm, self.head
        del self.head_nm, self.head
        self.mask_head_nm, self.mask_head = copy.deepcopy(self.ns_head_nm), copy.deepcopy(self.ns_head)
        weight, bias = self.word_embed.weight, self.word_embed.bias
        del self.word_embed  # re-added last, for the official key order
        self.word_embed_bias = nn.Parameter(bias.detach().clone())
        self.word_embed = nn.Linear(self.Cvae, self.C, bias=False)
        self.word_embed.weight = weight
        self.mask_embed = nn.Embedding(1, self.C)
        nn.init.trunc_normal_(self.mask_embed.weight.data, mean=0, std=math.sqrt(1 / self.C / 3))

    def build_mixer(self, block_idx: int) -> nn.Module:
        """VAR's self-attention, also taking segment lengths as its mask (block-diagonal attention)."""
        mixer = MarkovSelfAttention(
            self.C, self.num_heads, attn_drop=self.attn_drop_rate, proj_drop=self.drop_rate,
            attn_l2_norm=self.attn_l2_norm,
        )  # fmt: skip
        mixer.attn_backend = self.config.attn_backend
        return mixer

    def build_attn_bias(self, scale_of_position: torch.Tensor) -> torch.Tensor:
        """Block-diagonal `attn_bias_for_masking` (1, 1, L, L): 0 within a scale, -inf across."""
        d = scale_of_position
        return torch.where(d[:, None] == d[None, :], 0.0, -torch.inf).reshape(1, 1, self.L, self.L)

    @torch.no_grad()
    def init_mask_branch_from_ns(self) -> None:
        """Copy the next-scale branch's last blocks and head into the mask branch (stage 2's start)."""
        for src, dst in ((self.ns_blocks, self.mask_blocks), (self.ns_head_nm, self.mask_head_nm),
                         (self.ns_head, self.mask_head)):  # fmt: skip
            dst.load_state_dict(src.state_dict())

    def branch(self, masked: bool) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
        """(blocks, head_nm, head) of the mask branch or the next-scale branch."""
        if masked:
            return self.mask_blocks, self.mask_head_nm, self.mask_head
        return self.ns_blocks, self.ns_head_nm, self.ns_head

    # -- embeddings --------------------------------------------------------------------------------

    def embed(
        self,
        label_B: torch.Tensor,
        begin: int,
        x_ns_BlCv: torch.Tensor | None,
        x_own_BlCv: torch.Tensor | None = None,
        masked_Bl: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocks' input for positions [begin, begin + l) and the class embedding (B, C).

        Position 0 (when `begin == 0`) is the class token + `pos_start`; the others are
        `word_embed(x_ns) + word_embed_bias`, where `x_ns` (B, l, Cv) is the running f_hat brought
        to the position's scale. The mask branch adds `word_embed(x_own)` (the scale's own codes)
        with the `masked_Bl` positions (bool, broadcastable to (B, l)) replaced by `mask_embed`.
        Level and position embeddings are added to all. Float32, outside autocast (as upstream)."""
        B = label_B.shape[0]
        with torch.autocast(device_type=label_B.device.type, enabled=False):
            cond_BD = self.class_emb(label_B)
            parts = []
            if begin == 0:
                parts.append(cond_BD.unsqueeze(1) + self.pos_start.expand(B, self.first_l, -1))
            if x_ns_BlCv is not None and x_ns_BlCv.shape[1] > 0:
                h_BlC = self.word_embed(x_ns_BlCv.float())
                if x_own_BlCv is not None:
                    own_BlC = self.word_embed(x_own_BlCv.float())
                    if masked_Bl is not None:
                        own_BlC = torch.where(masked_Bl[..., None], self.mask_embed.weight, own_BlC)
                    h_BlC = h_BlC + own_BlC
                parts.append(h_BlC + self.word_embed_bias)
            x_BlC = torch.cat(parts, dim=1)
            end = begin + x_BlC.shape[1]
            if end > self.L:
                raise ValueError(f"{end} positions exceed the {self.L} of patch_nums {list(self.patch_nums)}")
            x_BlC = x_BlC + self.lvl_pos()[:, begin:end]
        return x_BlC, cond_BD

    def run(self, x_BlC: torch.Tensor, cond_BD: torch.Tensor, masked: bool, attn_bias: Any) -> torch.Tensor:
        """Base blocks, then one branch's blocks and head -> logits (B, l, V) float32."""
        blocks, head_nm, head = self.branch(masked)
        main_type = _main_type(x_BlC)
        x_BlC, cond = x_BlC.to(main_type), cond_BD.to(main_type)
        if isinstance(attn_bias, torch.Tensor) and attn_bias.is_floating_point():
            attn_bias = attn_bias.to(main_type)
        for block in (*self.base_blocks, *blocks):
            x_BlC = block(x_BlC, cond, attn_bias)
        return head(head_nm(x_BlC.float(), cond_BD).float()).float()

    def _teacher_mask(self, length: int, attn_bias: torch.Tensor | None) -> Any:
        """The given mask, or one attention segment per (whole) scale of the first `length` positions."""
        if attn_bias is not None:
            return attn_bias
        lens, total = [], 0
        for n in self.scale_lens:
            if total >= length:
                break
            lens.append(min(n, length - total))
            total += lens[-1]
        return tuple(lens)

    # -- teacher forcing -------------------------------------------------------------------------

    def forward(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, attn_bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Next-scale branch (stage 1, upstream's `NextScalePrediction.forward` without label
        dropout): labels (B,) and next-scale inputs (B, L' - 1, Cv) -> logits (B, L', V).
        `attn_bias` (bool, True = attend, or additive) replaces the block-diagonal attention."""
        self._check_inputs(label_B, x_BLCv_wo_first_l)
        x_BLC, cond_BD = self.embed(label_B, 0, x_BLCv_wo_first_l)
        return self.run(x_BLC, cond_BD, False, self._teacher_mask(x_BLC.shape[1], attn_bias))

    def forward_mask(
        self,
        label_B: torch.Tensor,
        x_BLCv_wo_first_l: torch.Tensor,
        x_own_BLCv_wo_first_l: torch.Tensor,
        masked_BL: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask branch (stage 2, upstream's `MaskedPrediction.forward`): the next-scale inputs, each
        scale's own codes (`x_own`, both (B, L' - 1, Cv)) and which of those L' - 1 positions are
        masked (bool, (B, L' - 1) or (1, L' - 1)) -> logits (B, L', V)."""
        self._check_inputs(label_B, x_BLCv_wo_first_l)
        if x_own_BLCv_wo_first_l.shape != x_BLCv_wo_first_l.shape:
            raise ValueError(
                f"own-scale inputs {tuple(x_own_BLCv_wo_first_l.shape)} differ from the next-scale inputs "
                f"{tuple(x_BLCv_wo_first_l.shape)}"
            )
        x_BLC, cond_BD = self.embed(label_B, 0, x_BLCv_wo_first_l, x_own_BLCv_wo_first_l, masked_BL)
        return self.run(x_BLC, cond_BD, True, self._teacher_mask(x_BLC.shape[1], attn_bias))

    def _check_inputs(self, label_B: torch.Tensor, x_BLCv: torch.Tensor) -> None:
        B = x_BLCv.shape[0]
        if label_B.shape != (B,) or x_BLCv.ndim != 3 or x_BLCv.shape[2] != self.Cvae:
            raise ValueError(
                f"expected labels (B,) and inputs (B, L - {self.first_l}, {self.Cvae}), got "
                f"{tuple(label_B.shape)} and {tuple(x_BLCv.shape)}"
            )

    def teacher_forcing_input(
        self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next-scale branch's input (B, L', C) and the class embedding: `embed` from position 0."""
        return self.embed(label_B, 0, x_BLCv_wo_first_l)

    # -- sampling: one scale at a time, nothing cached -------------------------------------------

    def sampling_cache(self, enable: bool) -> None:
        """HMAR carries no KV cache from scale to scale: nothing to start or free."""

    def kv_caching(self, enable: bool) -> None:
        """No KV cache (see `sampling_cache`)."""

    def forward_scale(
        self,
        label_B: torch.Tensor,
        si: int,
        next_input: torch.Tensor | None = None,
        own_input: torch.Tensor | None = None,
        masked_Bl: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (R, pn_si^2, V) of scale `si` for R = len(label_B) rows: the next-scale branch, or
        with `own_input` (the scale's own codes, (B, pn^2, Cv)) and `masked_Bl` (B, pn^2) the mask
        branch. `next_input` is f_hat after scales < si brought to pn_si, (B, Cv, pn, pn) or
        (B, pn^2, Cv) (None for scale 0); inputs with B = R / 2 serve both CFG halves."""
        if not 0 <= si < len(self.patch_nums):
            raise ValueError(f"scale index {si} out of range for {len(self.patch_nums)} scales")
        rows = label_B.shape[0]
        begin, end = self.begin_ends[si]
        if si == 0:
            if own_input is not None:
                raise ValueError("the first scale (the class token) has no mask branch")
            x_BlC, cond_BD = self.embed(label_B, 0, None)
            return self.run(x_BlC, cond_BD, False, None)
        if next_input is None:
            raise ValueError(f"scale {si} needs its next_input (f_hat after the coarser scales)")
        if next_input.ndim == 4:
            next_input = next_input.flatten(2).transpose(1, 2)
        B = next_input.shape[0]
        if next_input.shape[1:] != (end - begin, self.Cvae) or rows % B != 0:
            raise ValueError(
                f"scale {si} input should be (B, {self.Cvae}, {self.patch_nums[si]}, {self.patch_nums[si]}) or "
                f"(B, {end - begin}, {self.Cvae}) with B dividing {rows}, got {tuple(next_input.shape)}"
            )
        reps = rows // B
        own = None if own_input is None else own_input.repeat(reps, 1, 1)
        masked = None if masked_Bl is None else masked_Bl.repeat(reps, 1)
        x_BlC, cond_BD = self.embed(label_B, begin, next_input.repeat(reps, 1, 1), own, masked)
        return self.run(x_BlC, cond_BD, own_input is not None, None)


# ---- the official training layouts' keys ----


def stage1_key_to_inference(key: str, depth: int, n_layers_train: int) -> str:
    """A stage-1 (`NextScalePrediction`, VAR layout) state-dict key -> the inference `HMAR` key."""
    if key.startswith("blocks."):
        idx, rest = key[len("blocks."):].split(".", 1)
        i, base = int(idx), depth - n_layers_train
        return f"base_blocks.{i}.{rest}" if i < base else f"ns_blocks.{i - base}.{rest}"
    if key.startswith("head"):
        return "ns_" + key
    return "word_embed_bias" if key == "word_embed.bias" else key


def stage2_key_to_inference(key: str, depth: int, n_layers_train: int) -> str:
    """A stage-2 (`MaskedPrediction`) state-dict key -> the inference `HMAR` key (its first
    `depth - n_layers_train` blocks are the frozen base blocks, the last ones the mask branch)."""
    if key.startswith("blocks."):
        idx, rest = key[len("blocks."):].split(".", 1)
        i, base = int(idx), depth - n_layers_train
        return f"base_blocks.{i}.{rest}" if i < base else f"mask_blocks.{i - base}.{rest}"
    if key.startswith("head"):
        return "mask_" + key
    return key
