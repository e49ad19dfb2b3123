"""NAR's network and its per-grid plan (next-neighbour generation, class-conditional).

NAR ("Neighboring Autoregressive Modeling for Efficient Visual Generation", ThisisBillhe/NAR,
`NAR-images/`) is a fork of LlamaGen that decodes a g x g token grid near-to-far: step t produces
every cell of the anti-diagonal r + c = t at once, so an image takes 2g - 1 forward passes
instead of g * g. Facts: docs/parity/nar.md (on top of llamagen.md).

What is LlamaGen's is reused from `raster.py` (embeddings, blocks, 2-D RoPE, KV cache, label
dropout, sampling filters). What NAR adds, and this module supplies:

* the **schedule**: the anti-diagonals, each in increasing-row order (`neighbor_plan`);
* the **mask**: a token sees every token on its own and on nearer diagonals (`r'+c' <= r+c`);
* the **heads**: one trunk of `n_layer + extra_layers` blocks; the "right" head (`norm`, `output`)
  reads the state after block `n_layer - 1` and predicts the right neighbour (r, c+1), the "below"
  head (`medusa_norm`, `medusa_output`) reads the last block and predicts (r+1, c). A cell's logits
  are the mean of the right-head logits of its left neighbour and the below-head logits of its
  upper neighbour (one of them on the first row / column; cell (0, 0) averages both heads at the
  class token).

Everything per grid size (the diagonals, the slots fed at each step, the masks, which head output
feeds which cell) is computed once in `neighbor_plan` and cached; the network keeps one device copy
of the per-step tensors (slots, RoPE rows, mask rows, head weights), so a decoding step only runs
the blocks. The KV cache is written once per diagonal, at the diagonal's raster slots.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from arzoo.networks.llamagen import LlamaGenConfig, LlamaGenTrunk
from arzoo.nn.llama import RMSNorm

__all__ = ["NARConfig", "NeighborPlan", "NeighborStep", "NeighborTransformer", "combine_heads", "neighbor_plan"]


# ---- the schedule, once per grid size ----------------------------------------------------------


@dataclass(frozen=True)
class NeighborStep:
    """One decoding step: the cells it produces and where their logits come from.

    `fed_slots` are the sequence slots fed at this step (the class slot 0 at step 0, else `1 + cell`
    for the cells of the previous diagonal, increasing row). Output k (cell `cells[k]`) is
    `right[from_left[k]] * left_weight[k] + below[from_above[k]] * above_weight[k]` over the head
    outputs of the fed slots (index -1 -> weight 0).
    """

    cells: torch.Tensor  # (n,) raster indices produced, increasing row
    fed_slots: torch.Tensor  # (n_in,)
    from_left: torch.Tensor  # (n,) index into fed_slots, -1 if none
    from_above: torch.Tensor  # (n,)


@dataclass(frozen=True)
class NeighborPlan:
    """Everything NAR needs for a g x g grid, built once (`neighbor_plan`), on the CPU."""

    grid_size: int
    steps: tuple[NeighborStep, ...]
    seq_mask: torch.Tensor  # (1+N, 1+N) bool, raster slots: the training mask
    from_left: torch.Tensor  # (N,) slot whose right-head output predicts each cell (raster order)
    from_above: torch.Tensor  # (N,) slot whose below-head output predicts each cell
    cache_mask: torch.Tensor  # (S, S) bool, S = 1+N rounded up to a multiple of 8: the inference mask

    @property
    def diagonals(self) -> list[torch.Tensor]:
        """Cells (raster indices) produced at each step."""
        return [step.cells for step in self.steps]


def _neighbour_slots(r: int, c: int, g: int) -> tuple[int | None, int | None]:
    """Sequence slots whose right / below head output predicts cell (r, c); (0, 0) reads the class slot twice."""
    if r == 0 and c == 0:
        return 0, 0
    left = 1 + r * g + c - 1 if c > 0 else None
    above = 1 + (r - 1) * g + c if r > 0 else None
    return left, above


def _sources(cells: list[int], fed_slots: list[int], g: int) -> tuple[torch.Tensor, torch.Tensor]:
    index = {slot: i for i, slot in enumerate(fed_slots)}
    pairs = [_neighbour_slots(cell // g, cell % g, g) for cell in cells]
    from_left = [index[left] if left is not None else -1 for left, _ in pairs]
    from_above = [index[above] if above is not None else -1 for _, above in pairs]
    return torch.tensor(from_left, dtype=torch.long), torch.tensor(from_above, dtype=torch.long)


def _proximity_mask(seq_len: int, g: int) -> torch.Tensor:
    """NAR's mask: lower-triangular over `seq_len` slots, the image block replaced by `r'+c' <= r+c`."""
    mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool))
    cells = torch.arange(g * g)
    diag = cells // g + cells % g
    mask[1 : 1 + g * g, 1 : 1 + g * g] = diag[None, :] <= diag[:, None]
    return mask


@functools.lru_cache(maxsize=None)
def neighbor_plan(grid_size: int) -> NeighborPlan:
    """The NAR schedule, masks and head routing of a g x g grid (cached per g; CPU tensors)."""
    if grid_size <= 0:
        raise ValueError(f"grid_size must be positive, got {grid_size}")
    g = grid_size
    with torch.device("cpu"):  # also when called under torch.device("meta")
        diagonals = [[r * g + (t - r) for r in range(max(0, t - g + 1), min(t, g - 1) + 1)] for t in range(2 * g - 1)]
        steps = []
        for t, cells in enumerate(diagonals):
            fed = [0] if t == 0 else [1 + cell for cell in diagonals[t - 1]]
            from_left, from_above = _sources(cells, fed, g)
            steps.append(NeighborStep(torch.tensor(cells), torch.tensor(fed), from_left, from_above))
        from_left, from_above = _sources(list(range(g * g)), list(range(1 + g * g)), g)
        cache_len = -(-(1 + g * g) // 8) * 8  # upstream's KV cache length
        return NeighborPlan(
            grid_size=g,
            steps=tuple(steps),
            seq_mask=_proximity_mask(1 + g * g, g),
            from_left=from_left,
            from_above=from_above,
            cache_mask=_proximity_mask(cache_len, g),
        )


def _head_weights(from_left: torch.Tensor, from_above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1) float weights of the right / below head per output: 1, or 1/2 each where both exist."""
    has_left, has_above = (from_left >= 0).float(), (from_above >= 0).float()
    both = has_left * has_above
    return (has_left - both / 2)[:, None], (has_above - both / 2)[:, None]


def combine_heads(
    right_BSV: torch.Tensor, below_BSV: torch.Tensor, from_left: torch.Tensor, from_above: torch.Tensor
) -> torch.Tensor:
    """NAR's logit assembly: (B, S, V) raw head logits -> (B, n, V), output k from slots
    `from_left[k]` (right head) and `from_above[k]` (below head), their mean where both exist."""
    return _combine(right_BSV, below_BSV, _routing(from_left, from_above, right_BSV.device))


def _routing(from_left: torch.Tensor, from_above: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    w_left, w_above = _head_weights(from_left, from_above)
    return dict(
        left=from_left.clamp(min=0).to(device),
        above=from_above.clamp(min=0).to(device),
        w_left=w_left.to(device),
        w_above=w_above.to(device),
    )


def _combine(right_BSV: torch.Tensor, below_BSV: torch.Tensor, routing: dict[str, torch.Tensor]) -> torch.Tensor:
    # `r/2 + b/2` equals upstream's `(r + b) / 2` bit for bit (halving is exact), and `x*1 + y*0 = x`.
    right = right_BSV[:, routing["left"]] * routing["w_left"]
    return right + below_BSV[:, routing["above"]] * routing["w_above"]


# ---- network: LlamaGen's GPT with NAR's second head ----------------------------------------------


@dataclass(frozen=True, kw_only=True)
class NARConfig(LlamaGenConfig):
    """NAR's network arguments: LlamaGen's, `n_layer` blocks under the right head, plus
    `extra_layers` (upstream's `medusa_attention_num`) more under the below head."""

    extra_layers: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.extra_layers, int) or isinstance(self.extra_layers, bool) or self.extra_layers < 0:
            raise ValueError(f"extra_layers (NAR's medusa_attention_num) must be an int >= 0, got {self.extra_layers!r}")

    @property
    def num_blocks(self) -> int:
        """Transformer blocks in the trunk: `n_layer` under the right head, then `extra_layers`."""
        return self.n_layer + self.extra_layers


class NeighborTransformer(LlamaGenTrunk):
    """NAR's class-conditional GPT: LlamaGen's trunk of `n_layer + extra_layers` blocks, two heads.

    State-dict keys are the official ones: LlamaGen's (`layers.{i}` for i < n_layer + extra_layers,
    `norm`, `output`) plus `medusa_norm.weight` and `medusa_output.weight`. `extra_layers` is
    upstream's `medusa_attention_num` (m). Stochastic-depth rates ramp over all n_layer + m blocks.
    As upstream, only `output.weight` starts at zero; `medusa_output.weight` keeps N(0, 0.02).

    The sequence is [class] + the full grid in raster order (slot 1 + r*g + c holds cell (r, c), with
    that cell's RoPE row), the layout upstream trains and decodes with.
    """

    config_cls = NARConfig
    config: NARConfig

    def __init__(self, config: NARConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)  # the trunk: config.num_blocks = n_layer + extra_layers blocks
        self.extra_layers = self.config.extra_layers  # `self.n_layer` blocks under the right head
        self.medusa_norm = RMSNorm(self.dim, eps=self.config.norm_eps)
        self.medusa_output = nn.Linear(self.dim, self.vocab_size, bias=False)
        self.medusa_output.weight.data.normal_(mean=0.0, std=self.initializer_range)
        self.plan = neighbor_plan(self.grid_size)
        self._device_plans: dict[torch.device, tuple[dict[str, Any], list[dict[str, Any]]]] = {}

    @property
    def num_steps(self) -> int:
        """Forward passes per image: 2g - 1."""
        return len(self.plan.steps)

    # -- trunk and heads ---------------------------------------------------------------------------

    def heads(
        self, x: torch.Tensor, freqs: torch.Tensor, mask: torch.Tensor | None, input_pos: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedded sequence (B, L, D) -> raw (right, below) head logits, each (B, L, V) float32."""
        right_state = x
        for i, layer in enumerate(self.layers):
            x = layer(x, freqs, mask, input_pos)
            if i == self.n_layer - 1:
                right_state = x
        right = self.output(self.norm(right_state)).float()
        below = self.medusa_output(self.medusa_norm(x)).float()
        return right, below

    def forward(  # NAR returns both heads
        self, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Full grid `tokens` (B, N) in raster order, `labels` (B,) -> raw (right, below) logits, each
        (B, 1 + N, V) float32, one row per slot (upstream's training/eval call, see SPEC 3).

        `mask` (B or 1, H or 1, 1+N, 1+N) bool defaults to the proximity mask (`plan.seq_mask`).
        Combine the heads with `neighbor_logits`.
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.num_tokens or labels.shape != (tokens.shape[0],):
            raise ValueError(
                f"NAR's forward takes the full {self.grid_size}x{self.grid_size} grid: tokens "
                f"(B, {self.num_tokens}) and labels (B,), got {tuple(tokens.shape)} and {tuple(labels.shape)}"
            )
        x = self.tok_dropout(torch.cat([self.embed_class(labels), self.tok_embeddings(tokens)], dim=1))
        if mask is None:
            mask = self._on_device(x.device)[0]["seq_mask"]
        return self.heads(x, self._rope_table(x.device), mask, None)

    def neighbor_logits(self, right_BLV: torch.Tensor, below_BLV: torch.Tensor) -> torch.Tensor:
        """Raw head logits (B, 1+N, V) -> each cell's logits (B, N, V), raster order (SPEC 3)."""
        return _combine(right_BLV, below_BLV, self._on_device(right_BLV.device)[0]["routing"])

    # -- per-device copies of the plan, built once ----------------------------------------------

    def _on_device(self, device: torch.device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(whole-grid tensors, per-step tensors) of the plan on `device`, built on first use."""
        cached = self._device_plans.get(device)
        if cached is None:
            table = self._rope_table(device)
            cache_mask = self.plan.cache_mask.to(device)
            whole = dict(
                seq_mask=self.plan.seq_mask.to(device)[None, None],
                routing=_routing(self.plan.from_left, self.plan.from_above, device),
                cache_mask=cache_mask,
            )
            steps = []
            for step in self.plan.steps:
                slots = step.fed_slots.to(device)
                steps.append(dict(
                    fed_slots=slots,
                    freqs=table[slots],  # slot s uses RoPE row s (row 0: the class token's zeros)
                    mask=cache_mask[slots][None, None],
                    routing=_routing(step.from_left, step.from_above, device),
                ))  # fmt: skip
            cached = self._device_plans[device] = (whole, steps)
        return cached

    # -- KV-cached decoding ------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate the KV caches for `batch_size` rows and the whole sequence (1 + N slots, rounded
        up to a multiple of 8); attention masks are rows of the proximity mask (`plan.cache_mask`)."""
        if max_seq_len is not None and max_seq_len != 1 + self.num_tokens:
            raise ValueError(
                f"NAR decodes the whole grid: max_seq_len must be {1 + self.num_tokens}, got {max_seq_len}"
            )
        super().setup_cache(batch_size, 1 + self.num_tokens, dtype=dtype, device=device)
        self.causal_mask = self._on_device(self.causal_mask.device)[0]["cache_mask"]

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Write the class tokens (B,) at slot 0 -> logits (B, V) of cell (0, 0): the mean of both heads."""
        return self.decode_diagonal(labels, 0)[:, 0]

    def decode_diagonal(self, tokens: torch.Tensor, step: int) -> torch.Tensor:
        """Step `step` of the decoding: feed diagonal `step - 1` (tokens (B, n) in increasing-row
        order; at step 0 the labels (B,)) -> logits (B, n', V) of every cell of diagonal `step`."""
        if not 0 <= step < self.num_steps:
            g = self.grid_size
            raise ValueError(f"step {step} is outside the {self.num_steps} steps of a {g}x{g} grid")
        self._require_cache(tokens.shape[0])
        plan = self._on_device(self.tok_embeddings.weight.device)[1][step]
        if step == 0:
            x = self.embed_class(tokens)
        else:
            expected = (tokens.shape[0], len(plan["fed_slots"]))
            if tokens.shape != expected:
                raise ValueError(
                    f"step {step} feeds diagonal {step - 1}: tokens of shape {expected}, got {tuple(tokens.shape)}"
                )
            x = self.tok_embeddings(tokens)
        right, below = self.heads(self.tok_dropout(x), plan["freqs"], plan["mask"], plan["fed_slots"])
        return _combine(right, below, plan["routing"])
