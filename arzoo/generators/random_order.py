"""Random-order generation (RandAR / RAR style), written against the public contract only.

Each row gets its own permutation of the cells, drawn anew per training batch and per generation.
Slot s holds the token of step s-1 (RoPE row of its own cell) plus a learned embedding of the cell
step s predicts: without that "position instruction" the network cannot know which cell comes next
and learns to ignore its context. The order is a sampling option (`"random"` or `"raster"`), so
comparing orders needs no retraining. The worked example of `docs/new_paradigm.md`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from arzoo.generators.raster import RasterGenerator
from arzoo.generators.state import SamplingState
from arzoo.networks.llamagen import RasterTransformer

class RandomOrderTransformer(RasterTransformer):
    """LlamaGen's transformer plus one learned embedding per target cell (`target_embeddings`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target_embeddings = nn.Embedding(self.num_tokens, self.dim)
        nn.init.normal_(self.target_embeddings.weight, std=self.initializer_range)

    def slots(self, labels_B: torch.Tensor, prev_BT: torch.Tensor, order_BN: torch.Tensor, start: int = 0) -> tuple:
        """Slots from `start` on, each told the cell it predicts (start 0: the class slot, then `prev_BT`)
        -> (x (B, L, D), per-row RoPE rows (B, L, hd/2, 2)); token i sits at cell order[:, start - 1 + i]."""
        T, first, x = prev_BT.shape[1], max(start - 1, 0), self.tok_embeddings(prev_BT)
        freqs = self.rope_rows(T, order_BN[:, first : first + T])  # the class row first
        if start == 0:
            x = torch.cat([self.embed_class(labels_B), x], dim=1)
        else:
            freqs = freqs[:, 1:]
        x = x + self.target_embeddings(order_BN[:, start : start + x.shape[1]])
        return self.tok_dropout(x), freqs


class RandomOrderGenerator(RasterGenerator):
    """One token per step, in a random order per row (RandAR-style position instructions)."""

    paradigm = "random-order"
    sampling_options = {"order": "random"}  # or "raster": the same model, another order
    network_cls = RandomOrderTransformer
    net: RandomOrderTransformer

    def sample_order(self, batch_size: int, generator: torch.Generator | None, order: str = "random") -> torch.Tensor:
        """(B, N) the cells in the order each row visits them."""
        if order == "raster":
            return torch.arange(self.num_tokens, device=self.device).expand(batch_size, -1)
        if order != "random":
            raise ValueError(f"order must be 'random' or 'raster', got {order!r}")
        device = generator.device if generator is not None else self.device
        noise = torch.rand(batch_size, self.num_tokens, generator=generator, device=device)
        return noise.argsort(dim=1).to(self.device)

    def teacher_inputs(self, tokens_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens in a freshly drawn order per row, that order), both (B, N)."""
        order = self.sample_order(len(tokens_BN), None)
        return tokens_BN.gather(1, order), order

    def forward(self, inputs: tuple, labels_B: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, N, V), slot s predicting the row's s-th cell (causal over slots)."""
        ordered, order = inputs
        x, freqs = self.net.slots(labels_B, ordered[:, :-1], order)
        return self.net.head(self.net.run_blocks(x, freqs, None))

    def sequence_loss(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        inputs = self.teacher_inputs(tokens_BN)
        return self.token_loss(self(inputs, labels_B), inputs[0])

    def position_losses(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor, context_BN: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Per-slot cross-entropy (B, N) in one drawn order, shared by the context and the targets."""
        order = self.sample_order(len(tokens_BN), generator)
        seen_BN = tokens_BN if context_BN is None else context_BN
        logits = self((seen_BN.gather(1, order), order), labels_B)
        return F.cross_entropy(logits.float().transpose(1, 2), tokens_BN.gather(1, order), reduction="none")

    def start_sampling(self, state: SamplingState) -> SamplingState:
        state = super().start_sampling(state)  # the KV cache
        order = self.sample_order(state.batch_size, state.generator, state.options["order"])
        state.carry["order"] = order.repeat(2, 1) if state.guided else order  # the null-class rows follow
        return state

    def step_inputs(self, state: SamplingState) -> torch.Tensor:
        """The token drawn at the previous step, (R, 1); (R, 0) at step 0."""
        return state.tokens.gather(1, state.carry["order"][:, max(state.step - 1, 0) : state.step])

    def forward_step(self, inputs: torch.Tensor, state: SamplingState) -> torch.Tensor:
        x, freqs = self.net.slots(state.labels, inputs, state.carry["order"], start=state.step)
        return self.net.cached_step(x, freqs, torch.tensor([state.step], device=x.device))

    def update_state(self, state: SamplingState, ids_Bl: torch.Tensor, logits_BlV: torch.Tensor) -> SamplingState:
        """Write the drawn token at each row's own cell."""
        cells = state.carry["order"][:, state.step : state.step + 1]
        state.tokens.scatter_(1, cells, ids_Bl.repeat(2, 1) if state.guided else ids_Bl)
        return state
