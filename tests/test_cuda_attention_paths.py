"""The intra-scale attention of M-VAR on every path: SDPA with a block mask, flash-attn varlen, FlexAttention.

Same weights, same outputs. Runs on CUDA only; elsewhere each case is skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from arzoo.nn.mvar import MVARSelfAttention, _flash_varlen, _flex

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)


def _skip_reason(backend: str) -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device (flash-attn varlen and FlexAttention are CUDA paths)"
    if backend == "flash" and _flash_varlen() is None:
        return "flash-attn is not installed (pip install --no-build-isolation flash-attn)"
    if backend == "flex" and _flex() is None:
        return "this torch has no FlexAttention"
    return None


@pytest.mark.cuda
@pytest.mark.parametrize("backend, dtype", [("flash", torch.bfloat16), ("flex", torch.float32), ("flex", torch.bfloat16)])
def test_block_diagonal_paths_match_sdpa(backend: str, dtype: torch.dtype) -> None:
    reason = _skip_reason(backend)
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    attn = MVARSelfAttention(128, 4, PATCH_NUMS, attn_l2_norm=True).cuda().to(dtype).eval()
    x = torch.randn(3, sum(p * p for p in PATCH_NUMS), 128, device="cuda", dtype=dtype)
    lens = [p * p for p in PATCH_NUMS]
    attn.attn_backend = "sdpa"
    reference = attn(x, seq_lens=lens).float()
    attn.attn_backend = backend
    fast = attn(x, seq_lens=lens).float()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(fast, reference, atol=tol, rtol=tol)
