"""Masked-hierarchical generation (HMAR, NVlabs/HMAR, arXiv 2506.04421), class-conditional.

HMAR is VAR's next-scale machine with two changes (facts: docs/parity/hmar.md):

* **Markovian scales.** A token attends only to the tokens of its own scale (block-diagonal mask).
  The coarser scales reach scale k only through its input, the tokenizer's running reconstruction
  f_hat after scales < k brought to scale k's grid (VAR's input). So sampling keeps no KV cache:
  each scale runs the network over its own tokens only, and memory stays flat in the scale count.
* **Masked refinement within a scale.** After the next-scale branch has drawn every token of a scale
  at once, a mask-prediction branch (its own last `n_layers_train` blocks and head, on the shared
  base blocks) re-draws the least confident ones MaskGIT-style in a schedule of sub-steps. The
  schedule (`mask_schedule`: per scale, how many tokens each sub-step fixes) is a sampling argument.

Training has two stages (`stage`): 1 trains the next-scale branch (VAR with the Markovian mask and
the official log-normal per-scale loss weights), 2 fine-tunes the mask branch (mask embedding, last
blocks, head) from a stage-1 checkpoint (`init_from`) with the rest frozen. Both stages train the
same network, in the official inference layout (`HMAR`: `base_blocks`, `ns_blocks`, `mask_blocks`,
`ns_head*`, `mask_head*`, `word_embed` without bias + `word_embed_bias`, `mask_embed`), so the
released checkpoints load strictly (`arzoo.interop.hmar.load_hmar_generator`).

The network (`HMARTransformer`) and the official key maps are in `arzoo/networks/hmar.py`;
guidance, filters and the tokenizer helpers are `NextScaleGenerator`'s. Shape letters as there: B batch, L positions, l one scale's positions,
C width, Cv codebook width, V vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from arzoo.checkpoint_io import extract_state_dict, read_checkpoint
from arzoo.generators.next_scale import PATCH_NUMS_256, NextScaleGenerator
from arzoo.generators.hmar_schedules import default_mask_schedule, lognorm_loss_weights
from arzoo.generators.registry import register_sizes
from arzoo.generators.state import SamplingState
from arzoo.networks.hmar import (
    MASK_BRANCH,
    HMARTransformer,
    MarkovSelfAttention,
    stage1_key_to_inference,
    stage2_key_to_inference,
)
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

__all__ = [
    "HMARTransformer",
    "MarkovSelfAttention",
    "MaskedHierarchicalGenerator",
    "default_mask_schedule",
    "lognorm_loss_weights",
    "stage1_key_to_inference",
    "stage2_key_to_inference",
]


# ---- generator ----


class MaskedHierarchicalGenerator(NextScaleGenerator):
    """HMAR as an arzoo paradigm: one step per scale of a `MultiScaleVQTokenizer`, each scale seeing
    only itself (block-diagonal visibility), refined by masked sub-steps while sampling.

    `stage` 1 trains the next-scale branch (the loss weighted per position by
    `lognorm_loss_weights`, or uniformly with `loss_weighting='uniform'`); `stage` 2 fine-tunes the
    mask branch only, starting from `init_from` (a stage-1 arzoo checkpoint, an official stage-1
    state dict or an inference `HMAR` one; read when fitting starts): each training step draws one
    mask ratio p ~ U[0, 1) (0.5 in validation) and masks ceil(p * pn^2) random positions of every
    scale but the first, the same for the whole batch; the loss is the cross-entropy over them.
    `n_layers_train` is the number of blocks of each branch (upstream's `n_layers_train`).

    `generate(..., mask_schedule=...)` overrides the `mask_schedule` argument (per scale, how many
    tokens each sub-step fixes: `[n_0, n_1, ...]` summing to pn^2; a one-entry list means no
    refinement; default: upstream's, `default_mask_schedule`). Per scale, the next-scale branch
    draws every token (VAR's guidance, filters and draw); then, while sub-steps remain, all but the
    n_0 most confident tokens (softmax of the filtered, guided logits at the drawn token; stable
    ascending sort, so ties re-mask the lowest raster positions first) are masked, the mask branch
    re-draws every position (guidance weight (cfg - 1) * 1e-6 as upstream, i.e. practically none),
    the masked ones take the new tokens, and the least confident of them stay masked for the next
    sub-step. `trace=True` records every step in the final state's `carry["trace"]`
    (`run_sampling(..., trace=True)`).

    Other arguments are `NextScaleGenerator`'s (no `shared_aln` or `more_smooth`),
    with `init_adaln_gamma` 1e-3 by default (HMAR's). `attn_backend` picks the block-diagonal
    attention of teacher forcing: "auto" (FlexAttention on CUDA, SDPA elsewhere), "sdpa" or "flex".
    """

    paradigm = "masked-hierarchical"
    network_cls = HMARTransformer  # its `HMARConfig` reads `n_layers_train` and `attn_backend` from these arguments
    # `refine=None`: refine in stage 2 only (in stage 1 the mask branch is untrained)
    sampling_options = {"mask_schedule": None, "refine": None, "trace": False}

    def __init__(
        self,
        n_layers_train: int = 1,
        stage: int = 1,
        mask_schedule: Sequence[Sequence[int]] | None = None,
        init_from: str | None = None,
        loss_weighting: str = "lognorm",
        attn_backend: str = "auto",
        init_adaln_gamma: float = 1e-3,
        **kwargs: Any,
    ) -> None:
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (next-scale branch) or 2 (mask branch), got {stage!r}")
        if loss_weighting not in ("lognorm", "uniform"):
            raise ValueError(f"loss_weighting must be 'lognorm' or 'uniform', got {loss_weighting!r}")
        for name in ("more_smooth", "shared_aln"):
            if kwargs.get(name) not in (None, False):
                raise ValueError(f"HMAR does not support {name}={kwargs[name]!r}")
        super().__init__(init_adaln_gamma=init_adaln_gamma, **kwargs)  # builds the network (build_network)
        self.stage = stage
        self.loss_weighting = loss_weighting
        self.mask_schedule = self.check_mask_schedule(
            default_mask_schedule(self.patch_nums) if mask_schedule is None else mask_schedule
        )
        with torch.device("cpu"):  # a constant, also when the model is built on the meta device
            self.loss_weights = lognorm_loss_weights(self.patch_nums)
        self._initialised = False
        self.set_trainable()

    # ---- stages ----------------------------------------------------------------------------------

    def set_trainable(self) -> None:
        """Stage 1: everything but the mask branch trains; stage 2: only the mask branch."""
        for name, param in self.net.named_parameters():
            param.requires_grad_(name.startswith(MASK_BRANCH) == (self.stage == 2))

    def num_trainable_params(self) -> int:
        """Parameters this stage trains."""
        return sum(p.numel() for p in self.net.parameters() if p.requires_grad)

    def setup(self, stage: str) -> None:
        """Stage 2, when fitting starts: the weights of `init_from`, the mask branch copied from the
        next-scale one (a resumed run then restores its own checkpoint over these)."""
        super().setup(stage)
        if stage != "fit" or self.stage != 2 or self._initialised:
            return
        if self.hparams.get("init_from") is None:
            raise ValueError(
                "stage 2 fine-tunes the mask branch of a trained stage-1 model: give init_from= (a stage-1 "
                "checkpoint, e.g. runs/.../last.ckpt)"
            )
        self.load_stage1(self.hparams["init_from"])

    def load_stage1(self, source: str | Path | Mapping[str, Any]) -> None:
        """Load a stage-1 model (arzoo checkpoint, official stage-1 state dict, or an inference
        `HMAR` state dict) and start the mask branch from its next-scale branch."""
        where = str(source) if isinstance(source, (str, Path)) else "the given mapping"
        raw = read_checkpoint(source, "HMAR stage-1 checkpoint") if isinstance(source, (str, Path)) else source
        state = extract_state_dict(raw)
        if any(k.startswith("net.") for k in state):
            state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        elif any(k.startswith("blocks.") for k in state):  # official NextScalePrediction layout
            depth, n = self.net.depth, self.net.n_layers_train
            state = {stage1_key_to_inference(k, depth, n): v for k, v in state.items()}
        mine = self.net.state_dict()
        missing = sorted(k for k in mine if k not in state and not k.startswith(MASK_BRANCH))
        unexpected = sorted(k for k in state if k not in mine)
        wrong = sorted(k for k in state if k in mine and state[k].shape != mine[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(
                f"{where} does not fit this HMAR network: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                f"other shapes {wrong[:5]} (same depth, width, n_layers_train, tokenizer?)"
            )
        self.net.load_state_dict({**mine, **state}, strict=True)
        self.net.init_mask_branch_from_ns()
        self.configure_ema()  # an EMA copy starts from the loaded weights
        self._initialised = True

    # ---- the paradigm ----------------------------------------------------------------------------

    def visibility_mask(self) -> torch.Tensor:
        """(N, N) bool: block-diagonal, each scale sees only itself (Markovian)."""
        with torch.device("cpu"):
            steps = self.step_of_slot()
            return steps[:, None] == steps[None, :]

    def check_mask_schedule(self, schedule: Sequence[Sequence[int]]) -> list[list[int]]:
        """The schedule as lists of ints, with a clear error unless each scale's entries are
        positive and sum to its token count."""
        schedule = [[int(n) for n in steps] for steps in schedule]
        if len(schedule) != len(self.patch_nums):
            raise ValueError(
                f"mask_schedule needs one entry per scale ({len(self.patch_nums)} for patch_nums "
                f"{list(self.patch_nums)}), got {len(schedule)}"
            )
        for si, (steps, pn) in enumerate(zip(schedule, self.patch_nums)):
            if not steps or min(steps) < 1 or sum(steps) != pn * pn:
                raise ValueError(
                    f"mask_schedule[{si}] = {steps}: the tokens fixed per sub-step must be positive and sum "
                    f"to the {pn}x{pn} scale's {pn * pn} tokens"
                )
        return schedule

    def own_scale_input(self, si: int, ids_Bl: torch.Tensor) -> torch.Tensor:
        """Scale si's own codes as the mask branch reads them (B, pn^2, Cv): area_down(phi_si(
        bicubic_up(codebook(ids)))), without the resizes at the last scale (upstream's
        `idxBl_to_mask_input`)."""
        tok = self.require_tokenizer()
        assert isinstance(tok, MultiScaleVQTokenizer)
        pn, P = self.patch_nums[si], self.patch_nums[-1]
        h_BChw = tok.embed_tokens(ids_Bl).transpose(1, 2).reshape(ids_Bl.shape[0], self.codebook_dim, pn, pn)
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(P, P), mode="bicubic")
        h_BChw = F.interpolate(tok.refine_scale_codes(si, h_BChw), size=(pn, pn), mode="area")
        return h_BChw.flatten(2).transpose(1, 2)

    def own_scale_inputs(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """`own_scale_input` of every scale but the first: (B, N - first_l, Cv)."""
        maps = [m.flatten(1) for m in self.split_scales(tokens_BN)]
        with torch.autocast(device_type=tokens_BN.device.type, enabled=False):
            return torch.cat([self.own_scale_input(si, maps[si]) for si in range(1, len(maps))], dim=1)

    def draw_training_mask(self, device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
        """(N - first_l,) bool: ceil(p * pn^2) random positions of every scale but the first, with one
        p ~ U[0, 1) per call in training (0.5 otherwise), the same for the whole batch."""
        p = float(torch.rand((), generator=generator)) if self.training else 0.5
        parts = []
        for pn in self.patch_nums[1:]:
            n = max(1, math.ceil(p * pn * pn))  # at least one, so the loss is never over nothing
            keep = torch.zeros(pn * pn, dtype=torch.bool)
            keep[torch.randperm(pn * pn, generator=generator)[:n]] = True
            parts.append(keep)
        return torch.cat(parts).to(device)

    # ---- training --------------------------------------------------------------------------------

    def forward(self, inputs: torch.Tensor, labels_B: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing of the next-scale branch: inputs (B, N - first_l, Cv) -> logits (B, N, V);
        `mask` (N, N) bool (True = may attend) defaults to block-diagonal attention per scale."""
        return self.net(labels_B, inputs, attn_bias=mask)

    def teacher_forcing(
        self, tokens_BN: torch.Tensor, labels_B: torch.Tensor, masked: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, N, V): the next-scale branch in stage 1; in stage 2 the mask branch, with
        `masked` (N - first_l,) bool over every scale but the first (default: a freshly drawn one)."""
        x_ns = self.teacher_inputs(tokens_BN)
        if self.stage == 1:
            return self.net(labels_B, x_ns)
        if masked is None:
            masked = self.draw_training_mask(tokens_BN.device)
        return self.net.forward_mask(labels_B, x_ns, self.own_scale_inputs(tokens_BN), masked[None])

    def sequence_loss(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Stage 1: VAR's teacher forcing; stage 2: one drawn mask, the loss over its positions."""
        if self.stage == 1:
            return super().sequence_loss(tokens_BN, labels_B)
        masked = self.draw_training_mask(tokens_BN.device)
        logits = self.teacher_forcing(tokens_BN, labels_B, masked)
        return self.token_loss(logits, tokens_BN, loss_mask=F.pad(masked, (self.first_l, 0)))

    def position_losses(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor, context_BN: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Stage 1: every position; stage 2: the positions of one drawn mask (NaN elsewhere)."""
        if self.stage == 1:
            return super().position_losses(tokens_BN, labels_B, context_BN, generator)
        masked = F.pad(self.draw_training_mask(tokens_BN.device, generator), (self.first_l, 0))
        logits = self.teacher_forcing(tokens_BN if context_BN is None else context_BN, labels_B, masked[self.first_l :])
        ce_BN = F.cross_entropy(logits.float().transpose(1, 2), tokens_BN, reduction="none")
        return ce_BN.masked_fill(~masked, float("nan"))

    def token_loss(
        self, logits_BNV: torch.Tensor, targets_BN: torch.Tensor, loss_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Stage 1: per-position cross-entropy weighted by `loss_weights` (summing to 1), summed over
        positions, mean over the batch. Stage 2: mean cross-entropy over the masked positions
        (`loss_mask` (N,) bool)."""
        ce_BN = F.cross_entropy(
            logits_BNV.float().transpose(1, 2), targets_BN, label_smoothing=self.label_smoothing, reduction="none"
        )
        if self.stage == 1 and self._trainer is not None:  # the plain mean, comparable with the unigram baseline
            split = "train" if self.training else "val"
            self.log(f"{split}/mean_ce", ce_BN.mean().detach(), batch_size=len(ce_BN))
        if self.stage == 2:  # the unmasked positions are never trained: only the masked ones count
            if loss_mask is None:
                raise ValueError("stage 2's loss is over the masked positions: give loss_mask (N,) bool")
            return ce_BN[:, loss_mask].mean()
        if self.loss_weighting == "uniform":
            return ce_BN.mean()
        return (ce_BN * self.loss_weights.to(ce_BN.device)).sum(dim=1).mean()

    # ---- sampling --------------------------------------------------------------------------------

    def start_sampling(self, state: SamplingState) -> SamplingState:
        """VAR's caches, and the sampling options resolved: the mask schedule checked, `refine`'s
        default (stage 2 only), an empty trace when `trace=True`."""
        state = super().start_sampling(state)
        options = state.options
        schedule = options["mask_schedule"]
        options["mask_schedule"] = self.mask_schedule if schedule is None else self.check_mask_schedule(schedule)
        options["refine"] = self.stage == 2 if options["refine"] is None else bool(options["refine"])
        state.carry["trace"] = [] if options["trace"] else None
        return state

    def forward_step(self, inputs: torch.Tensor | tuple | None, state: SamplingState) -> torch.Tensor:
        """Next-scale logits (R, pn_step^2, V) of one scale, over its own tokens only; with a tuple
        `(next_input, own_BlCv, masked_Bl)`, the mask branch's logits of a refinement sub-step (one
        entry point for every network pass, so callers can count them)."""
        if isinstance(inputs, tuple):
            return self.net.forward_scale(state.labels, state.step, *inputs)
        return self.net.forward_scale(state.labels, state.step, inputs)

    def guide_logits(self, cond_BlV: torch.Tensor, uncond_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """VAR's guidance for the next-scale draw; in the mask sub-steps weight (cfg - 1) * 1e-6, as
        upstream hard-codes `cfg * 1e-6` there."""
        if state.substep == 0:
            return super().guide_logits(cond_BlV, uncond_BlV, state)
        t = (state.cfg - 1.0) * 1e-6
        return (1 + t) * cond_BlV - t * uncond_BlV

    def logits_to_tokens(self, logits_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """VAR's draw of the scale, then the masked refinement of its schedule -> final ids (B, l)."""
        ids_Bl, filtered = self.draw_scale(logits_BlV, state.sampler, state.generator)
        return self.refine_scale(ids_Bl, logits_BlV, filtered, state)

    def refine_scale(
        self, ids_Bl: torch.Tensor, logits_BlV: torch.Tensor, filtered_BlV: torch.Tensor, state: SamplingState
    ) -> torch.Tensor:
        """The masked sub-steps of scale `state.step` after its next-scale draw `ids_Bl` -> final ids (B, l)."""
        B, l = ids_Bl.shape
        si, trace = state.step, state.carry.get("trace")
        plan = state.options["mask_schedule"][si] if state.options["refine"] else [l]
        record = trace is not None
        steps: list[dict[str, Any]] = []
        if record:
            steps.append(dict(kind="ns", logits_cfg=logits_BlV.float().clone(), sampled=ids_Bl.clone()))
            if l > 1:  # as upstream's trace: what stays masked after the draw (nothing without refinement)
                steps[0]["idx_to_mask_after"] = ids_Bl.new_zeros(B, 0)
        finalized_Bl = torch.zeros_like(ids_Bl)  # the sub-step that fixed each token (0: the next-scale draw)
        if len(plan) > 1 and l > 1:
            next_input = state.carry.get("next_input")
            # stable sort: with equal confidences (e.g. top_k=1) the lowest raster positions are re-masked
            masked_idx = _confidence(filtered_BlV, ids_Bl).argsort(dim=-1, stable=True)[:, : l - plan[0]]
            if record:
                steps[0]["idx_to_mask_after"] = masked_idx.clone()
            for j in range(1, len(plan)):
                masked_Bl = torch.zeros_like(ids_Bl, dtype=torch.bool).scatter_(1, masked_idx, True)
                own_BlCv = self.own_scale_input(si, ids_Bl)  # the masked tokens' codes still reach neighbours
                state.substep = j
                logits = self.forward_step((next_input, own_BlCv, masked_Bl), state).float()
                logits = self.apply_guidance(logits, state)
                new_Bl, filtered = self.draw_scale(logits, state.sampler, state.generator)
                if record:
                    steps.append(dict(kind="mask", tokens_in=ids_Bl.clone(), idx_to_mask_in=masked_idx.clone(),
                                      logits_cfg=logits, sampled=new_Bl))  # fmt: skip
                ids_Bl = torch.where(masked_Bl, new_Bl, ids_Bl)
                if j == len(plan) - 1:
                    finalized_Bl[masked_Bl] = j
                    break
                conf = _confidence(filtered, new_Bl).gather(1, masked_idx)
                masked_idx = masked_idx.gather(1, conf.argsort(dim=-1, stable=True)[:, : sum(plan[j + 1 :])])
                finalized_Bl[masked_Bl & ~torch.zeros_like(masked_Bl).scatter_(1, masked_idx, True)] = j
                if record:
                    steps[-1]["idx_to_mask_after"] = masked_idx.clone()
        state.substep = 0
        if record:
            trace.append(dict(si=si, pn=self.patch_nums[si], steps=steps, final_tokens=ids_Bl.clone(),
                                     finalized_at_step=finalized_Bl))  # fmt: skip
        return ids_Bl


def _confidence(filtered_BlV: torch.Tensor, ids_Bl: torch.Tensor) -> torch.Tensor:
    """(B, l) probability of the drawn tokens under the filtered logits (upstream's confidence)."""
    return filtered_BlV.softmax(dim=-1).gather(-1, ids_Bl.unsqueeze(-1)).squeeze(-1)


def _official(depth: int) -> dict[str, Any]:
    """A released size (SPEC 7): VAR-d's transformer, width 64 * depth, 8 blocks per branch."""
    return dict(depth=depth, embed_dim=64 * depth, num_heads=depth, drop_path_rate=0.1 * depth / 24,
                attn_l2_norm=True, vocab_size=4096, codebook_dim=32, patch_nums=list(PATCH_NUMS_256),
                num_classes=1000, n_layers_train=8)  # fmt: skip


register_sizes(
    MaskedHierarchicalGenerator,
    {
        "hmar-d16": _official(16),
        "hmar-d20": _official(20),
        "hmar-d24": _official(24),
        "hmar-d30": _official(30),
        "hmar-tiny": dict(depth=4, embed_dim=128, num_heads=4, n_layers_train=2),
    },
)
