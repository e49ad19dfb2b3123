"""Raster-order autoregressive generation (LlamaGen, class-conditional).

The network is LlamaGen's GPT (`arzoo.networks.llamagen.RasterTransformer`, official state-dict
keys); this module is the paradigm: one token per step, in the order of `build_schedule`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from arzoo.generators.base import BaseGenerator
from arzoo.generators.registry import register_sizes
from arzoo.generators.state import SamplingState
from arzoo.networks.llamagen import RasterTransformer

# ---- generator: one token per step, raster order ----


class RasterGenerator(BaseGenerator):
    """LlamaGen as an arzoo paradigm: N steps, one token each, in raster order, causal attention.

    The order is the schedule: a subclass that returns another permutation from `build_schedule`
    (say column-major) trains and samples in that order; each token keeps the 2-D RoPE angles of
    the grid cell it occupies. `cfg_interval` is LlamaGen's: with `cfg_interval >= 0`, guidance
    stops after token `cfg_interval + 1` (-1: always guide).

    Network arguments are those of `RasterTransformer`; `vocab_size` and `grid_size` default to the
    tokenizer's (given both, no tokenizer is needed: e.g. to count parameters on the meta device).
    The remaining keyword arguments (`tokenizer_path`, `num_classes`, `class_dropout_prob`, `lr`,
    `ema_decay`, ...) are `BaseGenerator`'s.
    """

    paradigm = "raster"
    network_cls: ClassVar[type[RasterTransformer]] = RasterTransformer

    def __init__(
        self,
        dim: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        multiple_of: int = 32,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        token_dropout_p: float = 0.1,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.1,
        ffn_dropout_p: float = 0.1,
        drop_path_rate: float = 0.0,
        vocab_size: int | None = None,
        grid_size: int | None = None,
        cfg_interval: int = -1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        vocab_size, scales = self.resolve_sizes(vocab_size, None if grid_size is None else ((grid_size, grid_size),))
        if len(scales) != 1 or scales[0][0] != scales[0][1]:
            raise ValueError(
                f"{type(self).__name__} needs a single square token grid, but the tokenizer has scales {list(scales)}"
            )
        self.vocab_size, self.scales = vocab_size, scales
        self.grid_size = scales[0][0]
        self.cfg_interval = cfg_interval
        self.net = self.build_network(  # the other fields come from the arguments of the same names
            vocab_size=vocab_size, num_classes=self.num_classes, grid_size=self.grid_size,
            class_dropout_prob=self.class_dropout_prob,
        )  # fmt: skip
        self.configure_ema()

    def build_schedule(self) -> list[torch.Tensor]:
        """Raster order: step i predicts cell i."""
        return [torch.tensor([i]) for i in range(self.num_tokens)]

    def teacher_inputs(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """Each step reads the previously predicted token: all but the last, in prediction order."""
        return tokens_BN[:, self.prediction_order[:-1].to(tokens_BN.device)]

    def step_inputs(self, state: SamplingState) -> torch.Tensor | None:
        """The token drawn at the previous step (R, 1); None at step 0 (the class token alone)."""
        if state.step == 0:
            return None
        cells = self.prediction_order[state.step - 1 : state.step].to(state.tokens.device)
        return state.tokens[:, cells]

    def forward(self, inputs: torch.Tensor, labels_B: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: tokens (B, N-1) in prediction order -> logits (B, N, V)."""
        if mask is not None and self._mask_is_causal():
            mask = None  # the same mask, but SDPA's is_causal path is faster
        cells = self.prediction_order[:-1].to(inputs.device)
        return self.net(inputs, labels_B, cell_positions=cells, mask=None if mask is None else mask[None, None])

    def _mask_is_causal(self) -> bool:
        n = self.num_tokens
        return torch.equal(self.mask.cpu(), torch.tril(torch.ones(n, n, dtype=torch.bool)))

    def start_sampling(self, state: SamplingState) -> SamplingState:
        self.net.setup_cache(len(state.labels), 1 + self.num_tokens)
        return state

    def forward_step(self, inputs: torch.Tensor | None, state: SamplingState) -> torch.Tensor:
        """Step 0 reads the class token, step k > 0 the token of step k-1 -> logits (R, 1, V)."""
        if state.step == 0:
            return self.net.prefill(state.labels)[:, None]
        cell = int(self.prediction_order[state.step - 1])
        return self.net.decode_step(inputs, slot_pos=state.step, cell=cell)[:, None]

    def end_sampling(self, state: SamplingState) -> SamplingState:
        self.net.clear_cache()
        return state

    def cfg_scale(self, step: int, cfg: float) -> float:
        """LlamaGen's `cfg_interval`: tokens 0 .. cfg_interval + 1 are guided, later ones are not."""
        if self.cfg_interval > -1 and step > self.cfg_interval + 1:
            return 1.0
        return cfg


# Official LlamaGen sizes (ImageNet c2i, 16x16 tokens, 16384 codes) and tiny ones for the digits.
_OFFICIAL = dict(vocab_size=16384, grid_size=16, num_classes=1000, multiple_of=256)
register_sizes(
    RasterGenerator,
    {
        "raster-b": dict(dim=768, n_layer=12, n_head=12, **_OFFICIAL),
        "raster-l": dict(dim=1024, n_layer=24, n_head=16, **_OFFICIAL),
        "raster-xl": dict(dim=1280, n_layer=36, n_head=20, **_OFFICIAL),
        "raster-xxl": dict(dim=1536, n_layer=48, n_head=24, **_OFFICIAL),
        "raster-3b": dict(dim=3200, n_layer=24, n_head=32, **_OFFICIAL),
        "raster-tiny": dict(dim=128, n_layer=4, n_head=4, multiple_of=32),
        "raster-small": dict(dim=256, n_layer=6, n_head=8, multiple_of=32),
    },
)
