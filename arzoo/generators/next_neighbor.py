"""Next-neighbour autoregressive generation (NAR, class-conditional): the paradigm.

NAR decodes a g x g token grid near-to-far, one anti-diagonal r + c = t per step (2g - 1 forward
passes). The network, its two heads and the per-grid plan are in `arzoo/networks/nar.py` (its
docstring describes them); this module supplies the schedule (the plan's diagonals), the mask (a
token sees its own and nearer diagonals), NAR's `cfg_interval` and its RNG order of draws.
Facts: docs/parity/nar.md (on top of llamagen.md).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from arzoo.generators.raster import RasterGenerator
from arzoo.generators.registry import register_sizes
from arzoo.generators.state import SamplingState
from arzoo.networks.nar import NeighborPlan, NeighborStep, NeighborTransformer, combine_heads, neighbor_plan

__all__ = [
    "NeighborPlan",
    "NeighborStep",
    "NeighborTransformer",
    "NextNeighborGenerator",
    "combine_heads",
    "neighbor_plan",
]


# ---- generator: one anti-diagonal per step ------------------------------------------------------


class NextNeighborGenerator(RasterGenerator):
    """NAR as an arzoo paradigm: 2g - 1 steps, step t producing the cells with r + c = t.

    Arguments are `RasterGenerator`'s plus `extra_layers` (NAR's `medusa_attention_num`, the blocks
    between the right head and the below head). Training is teacher forcing on the full grid under
    the proximity mask, with the mean cross-entropy of the combined logits over all cells (as
    upstream). `cfg_interval` is NAR's: it counts generated *tokens* — guidance stops before the
    first step at which more than `cfg_interval` tokens exist (-1: always guide); LlamaGen's
    `RasterGenerator` counts steps instead.

    The schedule, the head routing and the KV-cache steps are one plan (`neighbor_plan`): another
    order of cells needs another plan, not only another `build_schedule`.
    """

    paradigm = "next-neighbor"
    network_cls = NeighborTransformer
    net: NeighborTransformer

    def __init__(self, extra_layers: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # builds the network (its `NARConfig` reads extra_layers from the arguments)
        self._seq_mask_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def build_schedule(self) -> list[torch.Tensor]:
        """The anti-diagonals r + c = 0 .. 2g-2, each in increasing-row order."""
        return neighbor_plan(self.grid_size).diagonals

    def visibility_mask(self) -> torch.Tensor:
        """(N, N) over cells in prediction order: a cell's token sees every token with `r'+c' <= r+c`."""
        with torch.device("cpu"):
            cells = self.prediction_order
            diag = cells // self.grid_size + cells % self.grid_size
            return diag[None, :] <= diag[:, None]

    def sequence_mask(self, mask_NN: torch.Tensor) -> torch.Tensor:
        """A prediction-order (N, N) visibility mask -> the network's (1+N, 1+N) mask over
        [class] + raster slots (the class slot sees itself, every token sees it); cached for `self.mask`."""
        cached = getattr(self, "_seq_mask_cache", None)
        if cached is not None and cached[0] is mask_NN:
            return cached[1]
        order = self.prediction_order.to(mask_NN.device)
        n = self.num_tokens
        seq = torch.tril(torch.ones(1 + n, 1 + n, dtype=torch.bool, device=mask_NN.device))
        image = torch.empty_like(mask_NN)
        image[order[:, None], order[None, :]] = mask_NN
        seq[1:, 1:] = image
        self._seq_mask_cache = (mask_NN, seq)
        return seq

    def teacher_inputs(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """The whole grid (raster order): the visibility mask decides what each slot reads."""
        return tokens_BN

    def step_inputs(self, state: SamplingState) -> torch.Tensor | None:
        """The tokens of diagonal t - 1 (R, n_{t-1}); None at step 0 (the class token alone)."""
        if state.step == 0:
            return None
        return state.tokens[:, self.schedule[state.step - 1].to(state.tokens.device)]

    def forward(self, inputs: torch.Tensor, labels_B: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: the full grid (B, N) in raster order -> combined logits (B, N, V) in
        prediction order. `mask` is an (N, N) visibility mask (default: `self.mask`)."""
        seq_mask = self.sequence_mask(self.mask if mask is None else mask)
        right, below = self.net(inputs, labels_B, mask=seq_mask[None, None])
        return self.net.neighbor_logits(right, below)[:, self.prediction_order.to(inputs.device)]

    def start_sampling(self, state: SamplingState) -> SamplingState:
        self.net.setup_cache(len(state.labels))
        return state

    def forward_step(self, inputs: torch.Tensor | None, state: SamplingState) -> torch.Tensor:
        """Step 0 reads the class token, step t > 0 feeds diagonal t - 1 -> logits (R, n_t, V)."""
        return self.net.decode_diagonal(state.labels if state.step == 0 else inputs, state.step)

    @functools.cached_property
    def _tokens_before_step(self) -> list[int]:
        sizes = [len(s) for s in self.schedule]
        return [sum(sizes[:step]) for step in range(len(sizes))]

    def cfg_scale(self, step: int, cfg: float) -> float:
        """NAR's `cfg_interval`, counted in tokens: guidance is off from the first step (after the
        prefill) before which more than `cfg_interval` tokens were generated."""
        if self.cfg_interval > -1 and step > 0 and self._tokens_before_step[step] > self.cfg_interval:
            return 1.0
        return cfg

    def logits_to_tokens(self, logits_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """One draw per cell of the diagonal, cell by cell (increasing row), each over the batch: NAR's RNG order."""
        columns = [state.sampler(logits_BlV[:, k], state.generator) for k in range(logits_BlV.shape[1])]
        return torch.stack(columns, dim=1)


# NAR's c2i sizes: LlamaGen's presets (+ GPT-M) with one extra block (SPEC section 6), over
# LlamaGen's VQ-16 (16x16 tokens, 16384 codes), 1000 classes.
_OFFICIAL = dict(vocab_size=16384, grid_size=16, num_classes=1000, multiple_of=256, extra_layers=1)
register_sizes(
    NextNeighborGenerator,
    {
        "nar-b": dict(dim=768, n_layer=12, n_head=12, **_OFFICIAL),
        "nar-m": dict(dim=1024, n_layer=18, n_head=16, **_OFFICIAL),
        "nar-l": dict(dim=1024, n_layer=24, n_head=16, **_OFFICIAL),
        "nar-xl": dict(dim=1280, n_layer=36, n_head=20, **_OFFICIAL),
        "nar-xxl": dict(dim=1536, n_layer=48, n_head=24, **_OFFICIAL),
        "nar-tiny": dict(dim=128, n_layer=4, n_head=4, multiple_of=32, extra_layers=1),
    },
)
