"""Load official NAR (ThisisBillhe/NAR, `NAR-images/`) configs and checkpoints into arzoo modules.

NAR is a fork of LlamaGen: its `ModelArgs` is LlamaGen's plus `medusa_attention_num` (arzoo's
`extra_layers`), its state dict LlamaGen's with `n_layer + medusa_attention_num` blocks plus
`medusa_norm.weight` and `medusa_output.weight`, and its checkpoint files are written by the same
training script. So the key mapping is the identity and the reading, key cleanup and strict loading
are LlamaGen's (`load_gpt_weights`, `load_gpt_network`, `build_gpt_generator`); what this module adds
is the config mapping, the presets (LlamaGen's plus GPT-M) and the NAR-specific keys, hint and
classes (`NeighborTransformer` / `NextNeighborGenerator`). The tokenizer is LlamaGen's VQ
(`arzoo.interop.llamagen.load_vq_tokenizer`).
Facts: docs/parity/nar.md sections 1, 2 and 6.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from arzoo.generators.next_neighbor import NeighborTransformer, NextNeighborGenerator
from arzoo.interop.llamagen import build_gpt_generator, gpt_kwargs_from_official, load_gpt_network, load_gpt_weights

__all__ = ["NAR_PRESETS", "load_nar", "load_next_neighbor_generator", "nar_kwargs_from_official"]

# NAR's `GPT_models` (c2i): LlamaGen's presets plus GPT-M; every one with medusa_attention_num = 1.
NAR_PRESETS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        "GPT-B": MappingProxyType(dict(dim=768, n_layer=12, n_head=12)),
        "GPT-M": MappingProxyType(dict(dim=1024, n_layer=18, n_head=16)),
        "GPT-L": MappingProxyType(dict(dim=1024, n_layer=24, n_head=16)),
        "GPT-XL": MappingProxyType(dict(dim=1280, n_layer=36, n_head=20)),
        "GPT-XXL": MappingProxyType(dict(dim=1536, n_layer=48, n_head=24)),
        "GPT-XXXL": MappingProxyType(dict(dim=2560, n_layer=48, n_head=40)),
        "GPT-1B": MappingProxyType(dict(dim=2048, n_layer=22, n_head=32)),
        "GPT-3B": MappingProxyType(dict(dim=3200, n_layer=24, n_head=32)),
        "GPT-7B": MappingProxyType(dict(dim=4096, n_layer=32, n_head=32)),
    }
)
# What the released c2i checkpoints were trained with, besides the preset's width and depth.
_RELEASED = MappingProxyType(dict(vocab_size=16384, num_classes=1000, grid_size=16, extra_layers=1))
# KV caches of a model saved after generation, the RoPE table and the masks, should a file carry them.
_NON_WEIGHT_KEY = re.compile(
    r"^(layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache)|freqs_cis|causal_mask|proximity_mask)$"
)
_HINT = (
    "Pick the matching preset (GPT-B/M/L/XL/XXL) and grid_size (16 for 256 px, 24 for 384 px), "
    "or pass the checkpoint's config, e.g. **nar_kwargs_from_official(model_args)."
)


def nar_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Official NAR `ModelArgs` fields -> `NeighborTransformer` keyword arguments.

    `medusa_attention_num` (default 1) becomes `extra_layers`; every other field is LlamaGen's and
    maps as in `arzoo.interop.llamagen.gpt_kwargs_from_official` (same checks, same defaults).
    """
    fields = dict(config)
    extra_layers = fields.pop("medusa_attention_num", 1)
    kwargs = gpt_kwargs_from_official(fields)
    kwargs["extra_layers"] = extra_layers
    return kwargs


def _architecture(preset: str | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    if preset is None:
        return dict(kwargs)
    if preset not in NAR_PRESETS:
        raise ValueError(f"unknown NAR preset {preset!r}; choose one of {list(NAR_PRESETS)}")
    return {**_RELEASED, **NAR_PRESETS[preset], **kwargs}


def load_nar(
    source: str | Path | Mapping[str, Any], *, preset: str | None = None, **kwargs: Any
) -> NeighborTransformer:
    """An official NAR c2i checkpoint (path, checkpoint dict or state dict) -> NeighborTransformer (eval).

    Weights come from `ckpt["model"]`, else `"module"`, `"state_dict"`, `"ema"`, else the whole
    mapping; `module.` / `_orig_mod.` prefixes are stripped and KV-cache buffers, `freqs_cis` and
    mask entries dropped; the rest must fit exactly. The architecture is `preset` ("GPT-B",
    "GPT-M", "GPT-L", ... with vocab 16384, 1000 classes, a 16x16 grid and one extra block)
    overridden by `kwargs` (NeighborTransformer keyword arguments, e.g.
    `**nar_kwargs_from_official(model_args)`). Parameters are float32.
    """
    return load_gpt_network(
        NeighborTransformer, _architecture(preset, kwargs), source,
        preset=preset, overrides=kwargs, presets=NAR_PRESETS, loader="load_nar", load_weights=_load_weights,
    )  # fmt: skip


def _load_weights(
    model: NeighborTransformer, source: str | Path | Mapping[str, Any], described: str
) -> NeighborTransformer:
    """Load an official NAR checkpoint into `model` strictly; a caller's mapping is copied, never aliased."""
    return load_gpt_weights(model, source, described, what="NAR checkpoint", non_weight=_NON_WEIGHT_KEY, hint=_HINT)


def load_next_neighbor_generator(
    source: str | Path | Mapping[str, Any] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    preset: str | None = None,
    tokenizer_path: str | None = None,
    **overrides: Any,
) -> NextNeighborGenerator:
    """An official NAR c2i GPT -> `NextNeighborGenerator` (eval mode) that samples as NAR's `generate()`.

    The architecture comes from the official `ModelArgs` fields in `config` (see
    `nar_kwargs_from_official`) or from `preset`; `overrides` (NextNeighborGenerator /
    BaseGenerator keyword arguments, e.g. `cfg_interval=...`) win. `source` (path, checkpoint dict or
    state dict) is loaded strictly into `generator.net`; without one the network keeps its fresh init.

    Map NAR's `generate(model, labels, N, cfg_scale, cfg_interval, temperature, top_k, top_p)` to
    `generator.cfg_interval = cfg_interval; generator.generate(labels, cfg=cfg_scale, temperature=...,
    top_k=top_k or None, top_p=..., generator=torch.Generator().manual_seed(seed))`.
    """
    if config is not None and preset is not None:
        raise ValueError("pass either config= (official ModelArgs fields) or preset=, not both")
    if config is not None:
        kwargs = nar_kwargs_from_official(config)
    else:
        kwargs = _architecture(preset, {}) if preset is not None else {}
    return build_gpt_generator(
        NextNeighborGenerator, kwargs, source,
        config=config, preset=preset, tokenizer_path=tokenizer_path, overrides=overrides, load_weights=_load_weights,
    )  # fmt: skip
