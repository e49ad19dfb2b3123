"""Load official LlamaGen (FoundationVision/LlamaGen) configs and checkpoints into arzoo modules.

Sections:
* Checkpoint files: reading a file safely and finding the state dict inside it (shared by all parts).
* VQ tokenizer: `ModelArgs` of `tokenizer/tokenizer_image/vq_model.py` -> `VQTokenizer` kwargs, the
  VQ-16 / VQ-8 presets and `load_vq_tokenizer`.

Facts used here are in tests/fixtures/parity/llamagen/SPEC.md (sections 2 and 5).
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

import torch

from arzoo.tokenizers.vq import VQTokenizer

# ================================================================================================
# Checkpoint files (shared)
# ================================================================================================

# Where official training scripts put the weights; the official samplers try "model", then
# "module", then "state_dict". "ema" (written next to "model" by EMA runs) is the last resort.
STATE_DICT_KEYS = ("model", "module", "state_dict", "ema")
# Added by DDP (`module.`) and by saving a `torch.compile`d module (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def load_checkpoint_file(path: str | Path) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with clear errors for bad files.

    `argparse.Namespace` is allow-listed: LlamaGen's DDP checkpoints store the training `args` as one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    # The weights-only unpickler raises almost anything (IndexError, KeyError...) on junk bytes.
    except Exception as err:  # noqa: BLE001
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        hint = ""
        if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower():
            hint = (
                " The file pickles objects other than tensors and plain containers; re-save just "
                "its state dict (e.g. torch.save({'model': ckpt['model']}, path)) from a trusted "
                "environment."
            )
        raise ValueError(
            f"{str(path)!r} is not a readable torch checkpoint (torch.load with weights_only=True "
            f"failed: {type(err).__name__}: {first_line}).{hint}"
        ) from err


def _is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of names to tensors."""
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_wrapper_prefixes(key: str) -> str:
    """Drop leading `module.` / `_orig_mod.` (in any order, repeated) from one key."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def extract_state_dict(obj: Any, key: str | None = None) -> dict[str, torch.Tensor]:
    """A bare state dict, or a checkpoint holding one under `key` (default: the first of
    "model", "module", "state_dict", "ema") -> the state dict with wrapper prefixes stripped."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise ValueError(
                f"checkpoint has no {key!r} entry; its top-level keys are {sorted(map(str, obj))[:10]}"
            )
        found = obj[key]
    else:
        found = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), Mapping)), obj)
    if not _is_state_dict(found):
        raise ValueError(
            "could not find a state dict (a mapping of names to tensors) in the checkpoint: looked "
            f"under {list(STATE_DICT_KEYS) if key is None else [key]} and at the top level; top-level "
            f"keys are {sorted(map(str, obj))[:10]}"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for name, tensor in found.items():
        new_name = _strip_wrapper_prefixes(name)
        if new_name in state_dict:
            raise ValueError(
                f"state dict key {name!r} collides with another key after removing wrapper prefixes"
            )
        state_dict[new_name] = tensor
    return state_dict


def _describe_mismatch(
    expected: Mapping[str, torch.Size],
    got: Mapping[str, torch.Tensor],
    optional: set[str],
    limit: int = 5,
) -> list[str]:
    """Human-readable lines for missing / unexpected / wrongly shaped keys (empty when they fit)."""
    missing = [k for k in expected if k not in got and k not in optional]
    unexpected = [k for k in got if k not in expected and k not in optional]
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in got and tuple(got[k].shape) != tuple(expected[k])
    ]
    lines = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{len(items)} {title}: {items[:limit]}{more}")
    return lines


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
    raw = load_checkpoint_file(source) if isinstance(source, (str, Path)) else source
    where = str(source) if isinstance(source, (str, Path)) else "the given mapping"
    state_dict = extract_state_dict(raw)

    tokenizer = VQTokenizer(**config)
    expected = {k: v.shape for k, v in tokenizer.state_dict().items()}
    # Only usage statistics: upstream keeps it out of checkpoints when show_usage is off.
    optional = {"quantize.codebook_used"}
    problems = _describe_mismatch(expected, state_dict, optional)
    if problems:
        overrides = f" with overrides {kwargs}" if kwargs else ""
        raise ValueError(
            f"checkpoint {where} does not fit VQTokenizer built from preset {preset!r}{overrides}: "
            + "; ".join(problems)
            + ". Pick the matching preset (VQ-16: ch_mult [1,1,2,2,4], VQ-8: [1,2,2,4]) or pass the "
            "checkpoint's config as keyword arguments."
        )
    load = {k: v for k, v in state_dict.items() if k in expected}
    tokenizer.load_state_dict(load, strict=False)
    return tokenizer.eval()
