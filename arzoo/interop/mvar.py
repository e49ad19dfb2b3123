"""Load official M-VAR (OliverRensu/MVAR) configs and checkpoints into arzoo modules.

M-VAR is VAR with a Mamba2 mixer across scales (docs/parity/mvar.md): its constructor
takes exactly VAR's arguments (`MVAR(vae_local, num_classes, depth, ...)`), its tokenizer is VAR's
released VQVAE (`arzoo.interop.var.load_vqvae`), and its state dict is VAR's outside the blocks. In
arzoo it is a `MambaScaleGenerator` (network `MVARTransformer`).

* `mvar_kwargs_from_official`: official `MVAR(**config)` kwargs -> `MambaScaleGenerator` kwargs.
* `mvar_config_from_state_dict`: the official constructor kwargs of an official state dict (as
  `build_vae_mvar` made them; `num_heads = depth` when the attention has no `scale_mul_1H11`).
* `mamba_kwargs_from_state_dict`: the Mamba2 sizes (`mamba_d_state`, `mamba_d_conv`,
  `mamba_expand`, `mamba_headdim`) read from the `blocks.0.mamba.*` shapes.
* `load_mvar_generator`: a released `dXX.pth` (or a state dict) -> `MambaScaleGenerator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from arzoo.generators.next_scale_mamba import MambaScaleGenerator
from arzoo.interop.var import (
    build_next_scale_generator,
    check_tokenizer_args,
    extract_state_dict,
    load_checkpoint_file,
    var_config_from_state_dict,
    var_kwargs_from_official,
)
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

__all__ = [
    "load_mvar_generator",
    "mamba_kwargs_from_state_dict",
    "mvar_config_from_state_dict",
    "mvar_kwargs_from_official",
]

_MAMBA = "blocks.0.mamba."


def mvar_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Official `MVAR(**config)` kwargs (without `vae_local`) -> `MambaScaleGenerator` kwargs.

    The constructor is VAR's (`var_kwargs_from_official`: keys left out take the official defaults,
    e.g. `attn_l2_norm=False`, `cond_drop_rate` becomes `class_dropout_prob`). The Mamba2 sizes are
    hard-coded upstream (d_state 64, d_conv 4, expand 2, headdim 64), which are
    `MambaScaleGenerator`'s defaults. `shared_aln=True` is rejected (upstream's
    is broken, SPEC 5).
    """
    kwargs = var_kwargs_from_official(config)
    if kwargs["shared_aln"]:
        raise ValueError("M-VAR's shared_aln=True is broken upstream (6 shared AdaLN vectors, 9 used): not supported")
    return kwargs


def _need_mamba(state_dict: Mapping[str, torch.Tensor]) -> None:
    if _MAMBA + "in_proj.weight" not in state_dict:
        hint = " (a VAR checkpoint? use arzoo.interop.var.load_var_generator)" if "blocks.0.attn.mat_qkv.weight" in (
            state_dict
        ) else ""
        raise ValueError(f"not an official M-VAR state dict: no {_MAMBA}* entries{hint}")


def mvar_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The official `MVAR` constructor kwargs of an official state dict (see
    `arzoo.interop.var.var_config_from_state_dict`: the same reading, M-VAR's builder being VAR's)."""
    _need_mamba(state_dict)
    return var_config_from_state_dict(state_dict)


def mamba_kwargs_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """`mamba_d_state`, `mamba_d_conv`, `mamba_expand`, `mamba_headdim` of the Mamba2 mixers in an
    official M-VAR state dict, read from the `blocks.0.mamba.*` shapes (mamba-ssm's Mamba2 with one
    B/C group and no gated-MLP split, as M-VAR builds it)."""
    _need_mamba(state_dict)
    C = state_dict["pos_start"].shape[-1]
    conv_dim, _, d_conv = state_dict[_MAMBA + "conv1d.weight"].shape
    d_inner = state_dict[_MAMBA + "norm.weight"].shape[0]
    nheads = state_dict[_MAMBA + "A_log"].shape[0]
    in_rows = state_dict[_MAMBA + "in_proj.weight"].shape[0]
    d_state, odd = divmod(conv_dim - d_inner, 2)
    if odd or d_state <= 0 or d_inner % C or d_inner % nheads or in_rows != 2 * d_inner + 2 * d_state + nheads:
        raise ValueError(
            f"unsupported Mamba2 layout in {_MAMBA}*: width {C}, conv channels {conv_dim}, norm {d_inner}, "
            f"heads {nheads}, in_proj rows {in_rows} (expected one group of B/C states and d_inner = expand x width)"
        )
    return dict(mamba_d_state=d_state, mamba_d_conv=d_conv, mamba_expand=d_inner // C, mamba_headdim=d_inner // nheads)


def load_mvar_generator(
    source: str | Path | Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    tokenizer: MultiScaleVQTokenizer | None = None,
    tokenizer_path: str | None = None,
    **overrides: Any,
) -> MambaScaleGenerator:
    """An official M-VAR checkpoint (path, checkpoint dict or state dict, e.g. the released `d16.pth`)
    -> `MambaScaleGenerator` (eval mode) that samples as upstream's
    `autoregressive_infer_cfg`, carrying each block's Mamba2 state from scale to scale instead of
    re-running Mamba over the prefix.

    The architecture comes from the official constructor kwargs in `config`
    (`mvar_kwargs_from_official`), else from the state dict (`mvar_config_from_state_dict`; note that
    the released d16 / d20 need `attn_l2_norm=False`, which the missing `scale_mul_1H11` keys tell);
    the Mamba2 sizes always from the state dict; `overrides` (MambaScaleGenerator / BaseGenerator
    keyword arguments) win. Tokenizer (`tokenizer_path`, a `tokenizer` object, or none) and strict
    loading as `arzoo.interop.var.load_var_generator`; M-VAR uses VAR's released VQVAE
    (`load_vqvae('vae_ch160v4096z32.pth')`). Upstream's sampling arguments map as there:
    `cfg=1 + cfg`, `top_k=top_k or None`, `top_p=top_p or 1.0`, `generator=torch.Generator().manual_seed(g_seed)`.
    """
    check_tokenizer_args(tokenizer, tokenizer_path)
    is_path = isinstance(source, (str, Path))
    raw = load_checkpoint_file(source, "M-VAR checkpoint") if is_path else source
    state_dict = extract_state_dict(raw)
    _need_mamba(state_dict)
    official = dict(config) if config is not None else mvar_config_from_state_dict(state_dict)
    kwargs = {**mvar_kwargs_from_official(official), **mamba_kwargs_from_state_dict(state_dict)}
    return build_next_scale_generator(
        source, state_dict, kwargs, official=official,
        tokenizer=tokenizer, tokenizer_path=tokenizer_path, overrides=overrides, generator_cls=MambaScaleGenerator,
    )  # fmt: skip
