"""HMAR's official sampling schedule and stage-1 loss weights (NVlabs/HMAR; docs/parity/hmar.md)."""

from __future__ import annotations

import math
from typing import Sequence

import torch

def default_mask_schedule(patch_nums: Sequence[int]) -> list[list[int]]:
    """Upstream's default schedule where it applies (`utils/sampling_arg_util.py`): the 2x2 scale in
    1 + 1 sub-steps ([1, 3]), the 3x3 one in 1 + 3 ([1, 1, 2, 5]), every other scale in one step."""
    official = {2: [1, 3], 3: [1, 1, 2, 5]}
    return [list(official.get(int(pn), [int(pn) ** 2])) for pn in patch_nums]


def lognorm_loss_weights(patch_nums: Sequence[int]) -> torch.Tensor:
    """(L,) stage-1 loss weight per position (upstream's `reweight_loss` with `lognorm`): scale i gets
    a total weight proportional to the standard normal density at (pn_{S-1-i} / pn_{S-1} - mu) / sigma
    (mu, sigma: mean and sample std of pn_k / pn_{S-1}; note the reversed scale list), normalised to
    sum to 1 and shared equally by the scale's tokens."""
    pns = torch.tensor([float(pn) for pn in patch_nums], dtype=torch.float64)
    ratios = pns / pns[-1]
    z = (ratios.flip(0) - ratios.mean()) / ratios.std(unbiased=True)
    per_scale = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    per_scale = per_scale / per_scale.sum()
    return torch.cat([per_scale[i].expand(int(pn) ** 2) / int(pn) ** 2 for i, pn in enumerate(patch_nums)]).float()
