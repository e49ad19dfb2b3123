"""Load official LlamaGen (FoundationVision/LlamaGen) configs and checkpoints into arzoo modules.

Sections:
* Checkpoint files: read with `arzoo.checkpoint_io` (`load_checkpoint_file` and `extract_state_dict`
  are re-exported from there).
* VQ tokenizer: `ModelArgs` of `tokenizer/tokenizer_image/vq_model.py` -> `VQTokenizer` kwargs, the
  VQ-16 / VQ-8 presets and `load_vq_tokenizer`.
* GPT (c2i): `ModelArgs` of `autoregressive/models/gpt.py` -> `RasterTransformer` kwargs, the
  GPT-B ... GPT-3B presets, `load_gpt` and `load_raster_generator` (the network inside a
  `RasterGenerator`, to sample as upstream's `generate()`). Their building blocks
  (`load_gpt_weights`, `load_gpt_network`, `build_gpt_generator`) also serve NAR (`arzoo.interop.nar`),
  whose checkpoints share LlamaGen's layout.

Facts used here are in docs/parity/llamagen.md (sections 1, 2, 5, 6 and 8).
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping, TypeVar

import torch

from arzoo.checkpoint_io import describe_state_dict_mismatch, extract_state_dict
from arzoo.checkpoint_io import read_checkpoint as load_checkpoint_file
from arzoo.generators.raster import RasterGenerator, RasterTransformer
from arzoo.networks.llamagen import LlamaGenTrunk
from arzoo.tokenizers.vq import VQTokenizer

__all__ = [
    "GPT_PRESETS",
    "VQ_8",
    "VQ_16",
    "VQ_PRESETS",
    "build_gpt_generator",
    "extract_state_dict",
    "gpt_kwargs_from_official",
    "load_checkpoint_file",
    "load_gpt",
    "load_gpt_network",
    "load_gpt_weights",
    "load_raster_generator",
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


# ================================================================================================
# GPT, class-conditional (autoregressive/models/gpt.py, model_type='c2i')
# ================================================================================================

# The c2i presets of `GPT_models` (SPEC section 8). The released class-conditional checkpoints use
# vocab 16384, 1000 classes and a 16x16 (256 px) or 24x24 (384 px) grid.
GPT_PRESETS: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        "GPT-B": MappingProxyType(dict(dim=768, n_layer=12, n_head=12)),
        "GPT-L": MappingProxyType(dict(dim=1024, n_layer=24, n_head=16)),
        "GPT-XL": MappingProxyType(dict(dim=1280, n_layer=36, n_head=20)),
        "GPT-XXL": MappingProxyType(dict(dim=1536, n_layer=48, n_head=24)),
        "GPT-3B": MappingProxyType(dict(dim=3200, n_layer=24, n_head=32)),
    }
)
# What the released c2i checkpoints were trained with, besides the preset's width and depth.
_GPT_RELEASED = MappingProxyType(dict(vocab_size=16384, num_classes=1000, grid_size=16))

# Official `ModelArgs` defaults (SPEC section 1), used for fields a config leaves out.
_GPT_OFFICIAL_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        dim=4096,
        n_layer=32,
        n_head=32,
        n_kv_head=None,
        multiple_of=256,
        ffn_dim_multiplier=None,
        rope_base=10000,
        norm_eps=1e-5,
        initializer_range=0.02,
        token_dropout_p=0.1,
        attn_dropout_p=0.0,
        resid_dropout_p=0.1,
        ffn_dropout_p=0.1,
        drop_path_rate=0.0,
        num_classes=1000,
        caption_dim=2048,
        class_dropout_prob=0.1,
        model_type="c2i",
        vocab_size=16384,
        cls_token_num=1,
        block_size=256,
        max_batch_size=32,
        max_seq_len=2048,
    )
)
# Fields passed through unchanged as RasterTransformer kwargs.
_GPT_SAME_NAME = (
    "dim",
    "n_layer",
    "n_head",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "initializer_range",
    "token_dropout_p",
    "attn_dropout_p",
    "resid_dropout_p",
    "ffn_dropout_p",
    "drop_path_rate",
    "num_classes",
    "class_dropout_prob",
    "vocab_size",
)
# t2i-only or unused by the model.
_GPT_IGNORED = frozenset({"caption_dim", "max_batch_size", "max_seq_len"})
# Keys of official checkpoints that are not weights: KV caches of a model saved after generation
# (SPEC section 2) and the RoPE table / causal mask should a checkpoint carry them.
_GPT_NON_WEIGHT_KEY = re.compile(
    r"^(layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache)|freqs_cis|causal_mask)$"
)
_GPT_HINT = (
    "Pick the matching preset (GPT-B/L/XL/XXL/3B) and grid_size (16 for 256 px, 24 for 384 px), "
    "or pass the checkpoint's config, e.g. **gpt_kwargs_from_official(model_args)."
)
# The network a loader builds (RasterTransformer, or another network on LlamaGen's trunk such as NAR's).
_Net = TypeVar("_Net", bound=LlamaGenTrunk)
# The generator a loader builds (RasterGenerator or a subclass, e.g. NAR's NextNeighborGenerator).
_Gen = TypeVar("_Gen", bound=RasterGenerator)


def gpt_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Official GPT `ModelArgs` fields -> `RasterTransformer` keyword arguments.

    Fields not given take the official defaults (SPEC section 1). `block_size` (a perfect square
    g*g) becomes `grid_size`; `caption_dim`, `max_batch_size` and `max_seq_len` are ignored. Only
    `model_type='c2i'`, `cls_token_num=1` and `n_kv_head=None` (or equal to `n_head`) are supported;
    other values and unknown fields raise ValueError.
    """
    known = set(_GPT_OFFICIAL_DEFAULTS)
    unknown = sorted(str(k) for k in config if k not in known)
    if unknown:
        raise ValueError(f"unknown LlamaGen GPT config field(s) {unknown}; known: {sorted(known)}")
    full = {**_GPT_OFFICIAL_DEFAULTS, **config}
    if full["model_type"] != "c2i":
        raise ValueError(
            f"LlamaGen model_type {full['model_type']!r} is not supported: only class-conditional 'c2i' "
            "models load into RasterTransformer (t2i has a caption projection instead of a class table)"
        )
    if full["cls_token_num"] != 1:
        raise ValueError(
            f"cls_token_num={full['cls_token_num']} is not supported: c2i needs 1 (the label embedder "
            "yields one token while the RoPE table gets cls_token_num zero rows; upstream breaks otherwise)"
        )
    if full["n_kv_head"] is not None and full["n_kv_head"] != full["n_head"]:
        raise ValueError(
            f"n_kv_head={full['n_kv_head']} (grouped-query attention) is not supported: upstream's KV "
            f"cache is allocated with n_head heads, so such a model cannot generate; use None"
        )
    block_size = full["block_size"]
    grid_size = math.isqrt(block_size) if isinstance(block_size, int) and block_size > 0 else -1
    if grid_size * grid_size != block_size:
        raise ValueError(f"block_size must be a perfect square g*g (the token grid), got {block_size!r}")
    kwargs = {name: full[name] for name in _GPT_SAME_NAME}
    kwargs["rope_base"] = float(full["rope_base"])
    kwargs["grid_size"] = grid_size
    return kwargs


def load_gpt(
    source: str | Path | Mapping[str, Any], *, preset: str | None = None, **kwargs: Any
) -> RasterTransformer:
    """An official LlamaGen c2i GPT checkpoint (path, checkpoint dict or state dict) ->
    RasterTransformer in eval mode.

    The weights are taken from `ckpt["model"]`, else `"module"`, `"state_dict"`, `"ema"`, else the
    whole mapping (FSDP's bare `consolidated.pth`); `module.` / `_orig_mod.` prefixes are stripped,
    and KV-cache buffers (`layers.*.attention.kv_cache.*`, saved by a model that had generated) and a
    `freqs_cis` entry are dropped. The rest must fit exactly.

    The architecture is `preset` ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-3B", with vocab 16384,
    1000 classes and a 16x16 grid as released) overridden by `kwargs` (RasterTransformer keyword
    arguments, e.g. `grid_size=24` for the 384 px checkpoints, or `gpt_kwargs_from_official(cfg)`);
    without a preset, `kwargs` must give the whole architecture. Parameters are float32.
    """
    if preset is not None:
        if preset not in GPT_PRESETS:
            raise ValueError(f"unknown LlamaGen GPT preset {preset!r}; choose one of {list(GPT_PRESETS)}")
        config = {**_GPT_RELEASED, **GPT_PRESETS[preset], **kwargs}
    else:
        config = dict(kwargs)
    return load_gpt_network(
        RasterTransformer, config, source, preset=preset, overrides=kwargs, presets=GPT_PRESETS, loader="load_gpt"
    )


def load_gpt_weights(
    model: _Net,
    source: str | Path | Mapping[str, Any],
    described: str,
    *,
    what: str = "LlamaGen GPT checkpoint",
    non_weight: re.Pattern[str] = _GPT_NON_WEIGHT_KEY,
    hint: str = _GPT_HINT,
) -> _Net:
    """Load an official GPT checkpoint (see `load_gpt`) into `model` strictly; parameters float32.

    A file's tensors are assigned (no copy); a caller's mapping is copied, so the model never
    aliases it (a model still on the meta device is first allocated on the CPU for that). The RoPE
    table is built on the CPU regardless. NAR's checkpoints share the layout, so `nar.py` loads with
    its own `what` (names the file in errors), `non_weight` (keys to drop) and `hint`.
    """
    is_path = isinstance(source, (str, Path))
    raw = load_checkpoint_file(source, what) if is_path else source
    where = str(source) if is_path else "the given mapping"
    state_dict = {k: v for k, v in extract_state_dict(raw).items() if not non_weight.match(k)}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problem = describe_state_dict_mismatch(
        expected,
        state_dict,
        context=f"checkpoint {where} does not fit {type(model).__name__} built from {described}",
        hint=hint,
    )
    if problem:
        raise ValueError(problem)
    if not is_path and model.tok_embeddings.weight.is_meta:
        model.to_empty(device="cpu")
    model.load_state_dict(state_dict, strict=True, assign=is_path)
    return model.float()


def load_gpt_network(
    net_cls: type[_Net],
    config: Mapping[str, Any],
    source: str | Path | Mapping[str, Any],
    *,
    preset: str | None,
    overrides: Mapping[str, Any],
    presets: Mapping[str, Any],
    loader: str,
    load_weights: Callable[[_Net, str | Path | Mapping[str, Any], str], _Net] = load_gpt_weights,
) -> _Net:
    """`net_cls(**config)` (eval mode) with the official weights of `source` (for `load_gpt` and NAR's `load_nar`).

    `preset`, `overrides`, `presets` and `loader` (the public function's name) only word the errors;
    `load_weights` loads strictly (default: LlamaGen's `load_gpt_weights`).
    """
    required = ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "grid_size")
    missing = [name for name in required if name not in config]
    if missing:
        raise ValueError(
            f"{loader} needs the architecture: missing {missing}; pass preset= one of {list(presets)} "
            f"or the {net_cls.__name__} keyword arguments"
        )
    # Built on the meta device (no init cost for billions of parameters).
    with torch.device("meta"):
        model = net_cls(**config)
    if preset is None:
        described = f"kwargs {overrides}"
    else:
        described = f"preset {preset!r}" + (f" with overrides {overrides}" if overrides else "")
    return load_weights(model, source, described).eval()


def load_raster_generator(
    source: str | Path | Mapping[str, Any] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    preset: str | None = None,
    tokenizer_path: str | None = None,
    **overrides: Any,
) -> RasterGenerator:
    """An official LlamaGen c2i GPT -> `RasterGenerator` (eval mode) that samples as `generate()`.

    The architecture (with `num_classes`, `class_dropout_prob`, `vocab_size` and the grid) comes
    from the official `ModelArgs` fields in `config` (see `gpt_kwargs_from_official`), or from
    `preset` ("GPT-B" ... "GPT-3B" with the official defaults: vocab 16384, 1000 classes, 16x16
    grid), or from neither; `overrides` (RasterGenerator / BaseGenerator keyword arguments, e.g.
    `grid_size=24`, `cfg_interval=4`, `lr=...`) win. With `tokenizer_path` its vocabulary and grid
    must fit. The checkpoint `source` (path, checkpoint dict or state dict, read as by `load_gpt`)
    is loaded strictly into `generator.net`; without one the network keeps its fresh init.

    Map upstream's `generate(..., cfg_scale, cfg_interval, temperature, top_k, top_p)` to
    `generator.cfg_interval = cfg_interval; generator.generate(labels, cfg=cfg_scale,
    temperature=..., top_k=top_k or None, top_p=..., generator=torch.Generator().manual_seed(seed))`.
    Upstream guides only when cfg_scale > 1, arzoo whenever cfg != 1; a draw per token either way,
    so top_k=1 is not `greedy=True` (which consumes no randomness).
    """
    if config is not None and preset is not None:
        raise ValueError("pass either config= (official ModelArgs fields) or preset=, not both")
    if preset is not None and preset not in GPT_PRESETS:
        raise ValueError(f"unknown LlamaGen GPT preset {preset!r}; choose one of {list(GPT_PRESETS)}")
    official = config if config is not None else GPT_PRESETS[preset] if preset is not None else None
    kwargs = gpt_kwargs_from_official(official) if official is not None else {}
    return build_gpt_generator(
        RasterGenerator, kwargs, source,
        config=config, preset=preset, tokenizer_path=tokenizer_path, overrides=overrides,
    )  # fmt: skip


def build_gpt_generator(
    generator_cls: type[_Gen],
    kwargs: Mapping[str, Any],
    source: str | Path | Mapping[str, Any] | None,
    *,
    config: Mapping[str, Any] | None,
    preset: str | None,
    tokenizer_path: str | None,
    overrides: Mapping[str, Any],
    load_weights: Callable[[Any, str | Path | Mapping[str, Any], str], Any] = load_gpt_weights,
) -> _Gen:
    """`generator_cls(**kwargs, **overrides)` (eval mode) with `source` loaded strictly into `.net` (shared by
    `load_raster_generator` and NAR's `load_next_neighbor_generator`; `config` and `preset` only word the errors)."""
    kwargs = dict(kwargs)
    # The generators initialise with upstream's fixed std 0.02; irrelevant once weights are loaded.
    init_std = kwargs.pop("initializer_range", 0.02)
    if source is None and init_std != 0.02:
        raise ValueError(f"initializer_range={init_std} is not supported for a fresh network (0.02 only)")
    kwargs = {**kwargs, **overrides}
    if tokenizer_path is not None:
        kwargs["tokenizer_path"] = tokenizer_path
    # On the meta device (no init cost) unless a tokenizer must really be loaded or no weights follow.
    on_meta = source is not None and tokenizer_path is None
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        generator = generator_cls(**kwargs)
    if source is not None:
        if on_meta:  # `.to` too: Lightning's `device` attribute does not follow `to_empty`
            generator.to_empty(device="cpu").to("cpu")
        described = f"preset {preset!r}" if preset is not None else f"config {dict(config or {})}"
        described += f" with overrides {overrides}" if overrides else ""
        load_weights(generator.net, source, described)
        generator.configure_ema()  # an EMA copy (ema_decay > 0) starts from the loaded weights
    return generator.eval()
