"""Load official LlamaGen (FoundationVision/LlamaGen) configs and checkpoints into arzoo modules.

Sections:
* Checkpoint files: read with `arzoo.checkpoint_io` (`load_checkpoint_file` and `extract_state_dict`
  are re-exported from there).
* VQ tokenizer: `ModelArgs` of `tokenizer/tokenizer_image/vq_model.py` -> `VQTokenizer` kwargs, the
  VQ-16 / VQ-8 presets and `load_vq_tokenizer`.

Facts used here are in tests/fixtures/parity/llamagen/SPEC.md (sections 2 and 5).
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from arzoo.checkpoint_io import describe_state_dict_mismatch, extract_state_dict
from arzoo.checkpoint_io import read_checkpoint as load_checkpoint_file
from arzoo.tokenizers.vq import VQTokenizer

__all__ = [
    "VQ_8",
    "VQ_16",
    "VQ_PRESETS",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_vq_tokenizer",
    "vq_kwargs_from_official",
]

# ================================================================================================
# VQ tokenizer (tokenizer/tokenizer_image/vq_model.py)
# ================================================================================================

# The released presets (`VQ_models` in vq_model.py). `VQModel` hard-codes ch=128 and
# num_res_blocks=2; the released checkpoints are trained at 256 px.
VQ_16: Mapping[str, Any] = MappingProxyType(
    dict(
        image_size=256,
        codebook_size=16384,
        codebook_embed_dim=8,
        codebook_l2_norm=True,
        codebook_show_usage=True,
        commit_loss_beta=0.25,
        entropy_loss_ratio=0.0,
        encoder_ch_mult=(1, 1, 2, 2, 4),
        decoder_ch_mult=(1, 1, 2, 2, 4),
        z_channels=256,
        ch=128,
        num_res_blocks=2,
        dropout=0.0,
    )
)
VQ_8: Mapping[str, Any] = MappingProxyType(
    {**VQ_16, "encoder_ch_mult": (1, 2, 2, 4), "decoder_ch_mult": (1, 2, 2, 4)}
)
VQ_PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({"VQ-16": VQ_16, "VQ-8": VQ_8})

# Official `ModelArgs` field (plus the fixture's `ch` / `num_res_blocks` / `image_size`) -> our kwarg.
_VQ_FIELD_MAP = {
    "codebook_size": "codebook_size",
    "codebook_embed_dim": "codebook_embed_dim",
    "codebook_l2_norm": "codebook_l2_norm",
    "codebook_show_usage": "codebook_show_usage",
    "commit_loss_beta": "commit_loss_beta",
    "entropy_loss_ratio": "entropy_loss_ratio",
    "encoder_ch_mult": "encoder_ch_mult",
    "decoder_ch_mult": "decoder_ch_mult",
    "z_channels": "z_channels",
    "dropout_p": "dropout",
    "ch": "ch",
    "num_res_blocks": "num_res_blocks",
    "image_size": "image_size",
}
# Derived values some configs carry for information; the tokenizer recomputes them.
_VQ_INFORMATIONAL = frozenset({"downsample", "grid_size"})


def vq_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Official VQ `ModelArgs` fields (+ `ch`, `num_res_blocks`, `image_size`) -> VQTokenizer kwargs.

    Fields not given keep VQTokenizer's defaults (= the official defaults, i.e. VQ-16 at 256 px).
    `downsample` and `grid_size` are ignored; any other unknown field is an error (likely a typo).
    """
    unknown = sorted(k for k in config if k not in _VQ_FIELD_MAP and k not in _VQ_INFORMATIONAL)
    if unknown:
        raise ValueError(
            f"unknown LlamaGen VQ config field(s) {unknown}; known: {sorted(_VQ_FIELD_MAP)} "
            f"(ignored: {sorted(_VQ_INFORMATIONAL)})"
        )
    kwargs: dict[str, Any] = {}
    for field_name, kwarg in _VQ_FIELD_MAP.items():
        if field_name in config:
            value = config[field_name]
            kwargs[kwarg] = list(value) if field_name.endswith("_ch_mult") else value
    return kwargs


def load_vq_tokenizer(
    source: str | Path | Mapping[str, Any], *, preset: str = "VQ-16", **kwargs: Any
) -> VQTokenizer:
    """An official LlamaGen VQ checkpoint (path, checkpoint dict or state dict) -> VQTokenizer (eval).

    The tokenizer is built from `preset` ("VQ-16" or "VQ-8") overridden by `kwargs` (VQTokenizer
    keyword arguments), and loaded strictly, except that the `quantize.codebook_used` usage buffer
    may be absent from (or surplus in) the checkpoint.
    """
    if preset not in VQ_PRESETS:
        raise ValueError(f"unknown LlamaGen VQ preset {preset!r}; choose one of {sorted(VQ_PRESETS)}")
    config = {**VQ_PRESETS[preset], **kwargs}
    is_path = isinstance(source, (str, Path))
    raw = load_checkpoint_file(source, "LlamaGen VQ checkpoint") if is_path else source
    where = str(source) if is_path else "the given mapping"
    state_dict = extract_state_dict(raw)

    tokenizer = VQTokenizer(**config)
    expected = {k: v.shape for k, v in tokenizer.state_dict().items()}
    overrides = f" with overrides {kwargs}" if kwargs else ""
    problem = describe_state_dict_mismatch(
        expected,
        state_dict,
        context=f"checkpoint {where} does not fit VQTokenizer built from preset {preset!r}{overrides}",
        hint="Pick the matching preset (VQ-16: ch_mult [1,1,2,2,4], VQ-8: [1,2,2,4]) or pass the "
        "checkpoint's config as keyword arguments.",
        # Only usage statistics: upstream keeps it out of checkpoints when show_usage is off.
        optional={"quantize.codebook_used"},
    )
    if problem:
        raise ValueError(problem)
    load = {k: v for k, v in state_dict.items() if k in expected}
    tokenizer.load_state_dict(load, strict=False)
    return tokenizer.eval()
