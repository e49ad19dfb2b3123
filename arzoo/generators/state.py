"""`SamplingState`: everything one generation carries from step to step, passed to every hook.

The generation loop (`BaseGenerator.run_sampling`) builds one, hands it to each sampling hook and
takes the one the hook returns; nothing about a generation in progress lives on the module. A
paradigm keeps its own carried values in `carry` (VAR: the running reconstruction `f_hat` and the
next scale's input; HMAR: the refinement trace) and reads its declared sampling options from
`options`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from arzoo.generators.sampling import TokenSampler


@dataclass
class SamplingState:
    """One generation in progress (R rows: B conditional ones, then B null-class ones with guidance)."""

    tokens: torch.Tensor  # (R, N) tokens drawn so far, at flat positions; later steps still 0
    labels: torch.Tensor  # (R,) class ids, the null class in the second half when guided
    batch_size: int  # B
    cfg: float  # 1 = no guidance
    sampler: TokenSampler  # the decoding strategy: logits -> tokens
    generator: torch.Generator | None = None
    options: dict[str, Any] = field(default_factory=dict)  # the paradigm's `sampling_options`, filled in
    carry: dict[str, Any] = field(default_factory=dict)  # the paradigm's values carried between steps
    step: int = 0  # the step being run
    substep: int = 0  # within a step, for paradigms that run several passes per step (HMAR)

    @property
    def guided(self) -> bool:
        """Whether the rows are doubled for classifier-free guidance."""
        return self.cfg != 1.0

    def conditional_tokens(self) -> torch.Tensor:
        """(B, N) the tokens of the conditional rows."""
        return self.tokens[: self.batch_size]
