"""Load official VAR (FoundationVision/VAR) configs and checkpoints into arzoo modules.

Sections:
* Checkpoint files: read with `arzoo.checkpoint_io` (`load_checkpoint_file` and `extract_state_dict`
  are re-exported from there).
* VQVAE tokenizer: `models/vqvae.py` constructor kwargs -> `MultiScaleVQTokenizer` kwargs, the
  released 256px preset `VAR_VQVAE_256` and `load_vqvae`.
* VAR transformer: `models/var.py` constructor kwargs -> `NextScaleGenerator` kwargs
  (`var_kwargs_from_official`), the architecture of an official state dict
  (`var_config_from_state_dict`) and `load_var_generator` (the network inside a `NextScaleGenerator`,
  to sample as upstream's `autoregressive_infer_cfg`).

Facts used here are in docs/parity/var.md (sections 1, 3, 5 and 7) and README.md.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, TypeVar

import torch

from arzoo.checkpoint_io import describe_state_dict_mismatch, extract_state_dict
from arzoo.checkpoint_io import read_checkpoint as load_checkpoint_file
from arzoo.generators.next_scale import NextScaleGenerator
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

__all__ = [
    "VAR_VQVAE_256",
    "build_loaded_generator",
    "build_next_scale_generator",
    "check_tokenizer_args",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_var_generator",
    "load_vqvae",
    "var_config_from_state_dict",
    "var_kwargs_from_official",
    "vqvae_kwargs_from_official",
]

# ================================================================================================
# VQVAE tokenizer (models/vqvae.py, models/quant.py, models/basic_vae.py)
# ================================================================================================

# The released tokenizer `vae_ch160v4096z32.pth` (official defaults except ch=160), for 256 px.
VAR_VQVAE_256: Mapping[str, Any] = MappingProxyType(
    dict(
        image_size=256,
        vocab_size=4096,
        z_channels=32,
        ch=160,
        ch_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        dropout=0.0,
        beta=0.25,
        using_znorm=False,
        quant_conv_ks=3,
        quant_resi=0.5,
        share_quant_resi=4,
        default_qresi_counts=0,
        patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        using_sa=True,
        using_mid_sa=True,
    )
)

# Official `VQVAE.__init__` defaults (used for keys a config leaves out; note ch=128, not 160).
_OFFICIAL_VQVAE_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        vocab_size=4096,
        z_channels=32,
        ch=128,
        dropout=0.0,
        beta=0.25,
        using_znorm=False,
        quant_conv_ks=3,
        quant_resi=0.5,
        share_quant_resi=4,
        default_qresi_counts=0,
        v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        test_mode=True,
    )
)
# What `VQVAE.__init__` hard-codes for its `Encoder` / `Decoder` (overridable by a `ddconfig`).
_OFFICIAL_DDCONFIG_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, in_channels=3, using_sa=True, using_mid_sa=True)
)
_DDCONFIG_KEYS = frozenset(
    {"ch", "ch_mult", "num_res_blocks", "dropout", "in_channels", "z_channels", "using_sa", "using_mid_sa",
     "double_z"}
)


def vqvae_kwargs_from_official(
    config: Mapping[str, Any], ddconfig: Mapping[str, Any] | None = None, image_size: int | None = None
) -> dict[str, Any]:
    """Official `VQVAE(**config)` kwargs (+ an Encoder/Decoder `ddconfig`) -> `MultiScaleVQTokenizer` kwargs.

    `v_patch_nums` becomes `patch_nums`, `test_mode` is dropped, keys left out take the official
    defaults. A `ddconfig` (as in the parity fixtures, whose encoder/decoder replace the hard-coded
    ones) sets `ch`, `ch_mult`, `num_res_blocks`, `dropout`, `using_sa`, `using_mid_sa`; its
    `z_channels` must agree with the config and `in_channels` must be 3. `image_size` defaults to
    `patch_nums[-1] * downsampling`.
    """
    unknown = set(config) - set(_OFFICIAL_VQVAE_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown official VQVAE constructor argument(s) {sorted(unknown)}; "
            f"known: {sorted(_OFFICIAL_VQVAE_DEFAULTS)}"
        )
    official = {**_OFFICIAL_VQVAE_DEFAULTS, **config}
    # Without a ddconfig the official VQVAE builds its encoder/decoder from its own ch/dropout/z_channels.
    dd = {
        **_OFFICIAL_DDCONFIG_DEFAULTS,
        "ch": official["ch"],
        "dropout": official["dropout"],
        "z_channels": official["z_channels"],
    }
    if ddconfig is not None:
        unknown = set(ddconfig) - _DDCONFIG_KEYS
        if unknown:
            raise ValueError(
                f"unknown Encoder/Decoder ddconfig key(s) {sorted(unknown)}; known: {sorted(_DDCONFIG_KEYS)}"
            )
        dd.update(ddconfig)
    if dd.pop("double_z", False):
        raise ValueError("ddconfig has double_z=True; the VQVAE encoder is always built with double_z=False")
    if dd["in_channels"] != 3:
        raise ValueError(f"ddconfig in_channels must be 3 (RGB images), got {dd['in_channels']}")
    if dd["z_channels"] != official["z_channels"]:
        raise ValueError(
            f"ddconfig z_channels {dd['z_channels']} differs from the VQVAE z_channels "
            f"{official['z_channels']}: the encoder output feeds quant_conv, which has z_channels inputs"
        )
    patch_nums = tuple(official["v_patch_nums"])
    downsample = 2 ** (len(dd["ch_mult"]) - 1)
    return dict(
        image_size=patch_nums[-1] * downsample if image_size is None else int(image_size),
        vocab_size=official["vocab_size"],
        z_channels=official["z_channels"],
        ch=dd["ch"],
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"],
        dropout=dd["dropout"],
        beta=official["beta"],
        using_znorm=official["using_znorm"],
        quant_conv_ks=official["quant_conv_ks"],
        quant_resi=official["quant_resi"],
        share_quant_resi=official["share_quant_resi"],
        default_qresi_counts=official["default_qresi_counts"],
        patch_nums=patch_nums,
        using_sa=dd["using_sa"],
        using_mid_sa=dd["using_mid_sa"],
    )


def load_vqvae(source: str | Path | Mapping[str, Any], **kwargs: Any) -> MultiScaleVQTokenizer:
    """Official VQVAE checkpoint (path, state dict or checkpoint dict) -> `MultiScaleVQTokenizer` (eval mode).

    The model is built from `VAR_VQVAE_256` updated with `kwargs` (when `patch_nums` is given
    without `image_size`, the image size follows from it) and loaded strictly; an
    `ema_vocab_hit_SV` made for another number of scales is accepted, as in the official code.
    """
    is_path = isinstance(source, (str, Path))
    raw = load_checkpoint_file(source, "VAR VQVAE checkpoint") if is_path else source
    state_dict = extract_state_dict(raw)
    init_args = {**VAR_VQVAE_256, **kwargs}
    if "patch_nums" in kwargs and "image_size" not in kwargs:
        downsample = 2 ** (len(init_args["ch_mult"]) - 1)
        init_args["image_size"] = list(init_args["patch_nums"])[-1] * downsample
    model = MultiScaleVQTokenizer(**init_args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    where = f"{str(source)!r}" if is_path else "the given state dict"
    given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    problem = describe_state_dict_mismatch(
        expected,
        state_dict,
        context=f"{where} does not fit MultiScaleVQTokenizer({given})",
        hint="Was the checkpoint made with other constructor arguments (e.g. ch, vocab_size, z_channels, "
        "ch_mult, share_quant_resi)? Pass them as keyword arguments.",
        # MultiScaleVQTokenizer replaces one made for another number of scales (as the official code).
        any_shape={"quantize.ema_vocab_hit_SV"},
    )
    if problem:
        raise ValueError(problem)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


# ================================================================================================
# VAR transformer (models/var.py)
# ================================================================================================

# Official `VAR.__init__` defaults (SPEC 3.1; used for keys a config leaves out). Note that the
# constructor's `attn_l2_norm=False` differs from the training script / released models (True).
_OFFICIAL_VAR_DEFAULTS: Mapping[str, Any] = MappingProxyType(
    dict(
        num_classes=1000,
        depth=16,
        embed_dim=1024,
        num_heads=16,
        mlp_ratio=4.0,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        drop_path_rate=0.0,
        norm_eps=1e-6,
        shared_aln=False,
        cond_drop_rate=0.1,
        attn_l2_norm=False,
        patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        flash_if_available=True,
        fused_if_available=True,
    )
)
# Same meaning, same name in NextScaleGenerator.
_VAR_SAME_NAME = (
    "num_classes", "depth", "embed_dim", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate", "drop_path_rate",
    "norm_eps", "shared_aln", "attn_l2_norm",
)  # fmt: skip


def var_kwargs_from_official(config: Mapping[str, Any]) -> dict[str, Any]:
    """Official `VAR(**config)` kwargs (without `vae_local`) -> `NextScaleGenerator` kwargs.

    Keys left out take the official constructor defaults (SPEC 3.1; e.g. `attn_l2_norm=False`, while
    the released models use True: see `var_config_from_state_dict`). `cond_drop_rate` becomes
    `class_dropout_prob`, `patch_nums` a list; `flash_if_available` / `fused_if_available` only pick
    kernels and are dropped. The codebook sizes (`vocab_size`, `codebook_dim`) are the VQVAE's, not
    part of this config. Unknown keys raise ValueError.
    """
    if "vae_local" in config:
        raise ValueError("pass the VAR constructor arguments without vae_local (the tokenizer is loaded separately)")
    unknown = sorted(str(k) for k in config if k not in _OFFICIAL_VAR_DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown official VAR constructor argument(s) {unknown}; known: {sorted(_OFFICIAL_VAR_DEFAULTS)}"
        )
    full = {**_OFFICIAL_VAR_DEFAULTS, **config}
    kwargs = {name: full[name] for name in _VAR_SAME_NAME}
    kwargs["class_dropout_prob"] = float(full["cond_drop_rate"])
    kwargs["patch_nums"] = [int(pn) for pn in full["patch_nums"]]
    return kwargs


_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")


def var_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The official VAR constructor kwargs of an official state dict, as `build_vae_var` made them.

    Read from the shapes: depth, width, classes, `mlp_ratio`, `shared_aln`, `attn_l2_norm` (the
    `scale_mul_1H11` keys, whose shape also gives the heads) and `patch_nums` (from the `lvl_1L`
    buffer, else from the position-table sizes when they are VAR's 256 or 512 px schedules). Not in a
    state dict, hence the official builder's values: `num_heads = depth` without L2-normalised
    attention, `drop_path_rate = 0.1 * depth / 24`, `norm_eps = 1e-6`, `cond_drop_rate = 0.1`.
    """
    def need(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise ValueError(f"not an official VAR state dict: no {key!r} entry (keys: {sorted(state_dict)[:8]} ...)")
        return state_dict[key]

    C = need("pos_start").shape[-1]
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise ValueError("not an official VAR state dict: no blocks.{i}.* entries")
    depth = max(blocks) + 1
    attn_l2_norm = "blocks.0.attn.scale_mul_1H11" in state_dict
    num_heads = state_dict["blocks.0.attn.scale_mul_1H11"].shape[1] if attn_l2_norm else depth
    if "lvl_1L" in state_dict:
        counts = torch.bincount(state_dict["lvl_1L"].reshape(-1).long()).tolist()
        patch_nums = tuple(math.isqrt(c) for c in counts)
        if any(pn * pn != c for pn, c in zip(patch_nums, counts)):
            raise ValueError(f"lvl_1L does not describe square token maps (tokens per scale: {counts})")
    else:
        L, SN = need("pos_1LC").shape[1], need("lvl_embed.weight").shape[0]
        known = {(680, 10): (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (2240, 10): (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
        if (L, SN) not in known:
            raise ValueError(f"cannot tell the patch_nums of {SN} scales with {L} tokens: pass config= with patch_nums")
        patch_nums = known[(L, SN)]
    return dict(
        num_classes=need("class_emb.weight").shape[0] - 1,
        depth=depth,
        embed_dim=C,
        num_heads=num_heads,
        mlp_ratio=need("blocks.0.ffn.fc1.weight").shape[0] / C,
        drop_path_rate=0.1 * depth / 24,
        norm_eps=1e-6,
        shared_aln="shared_ada_lin.1.weight" in state_dict,
        cond_drop_rate=0.1,
        attn_l2_norm=attn_l2_norm,
        patch_nums=patch_nums,
    )


def load_var_generator(
    source: str | Path | Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    tokenizer_path: str | None = None,
    tokenizer: MultiScaleVQTokenizer | None = None,
    **overrides: Any,
) -> NextScaleGenerator:
    """An official VAR checkpoint (path, checkpoint dict or state dict, e.g. `var_d16.pth`) ->
    `NextScaleGenerator` (eval mode) that samples as upstream's `autoregressive_infer_cfg`.

    The architecture comes from the official constructor kwargs in `config` (see
    `var_kwargs_from_official`), else from the state dict itself (`var_config_from_state_dict`);
    `overrides` (NextScaleGenerator / BaseGenerator keyword arguments, e.g. `more_smooth=True`,
    `lr=...`) win. The tokenizer: `tokenizer_path` (an arzoo tokenizer checkpoint, e.g. the released
    VQVAE converted with `load_vqvae` + `save_tokenizer_checkpoint`), or a `tokenizer` object (copied
    into the generator), or none (then `vocab_size` / `codebook_dim` are read from the state dict and
    the generator can compute logits but not sample). The state dict is loaded strictly into
    `generator.net` (buffers `lvl_1L`, `attn_bias_for_masking`, `zero_k_bias` included).

    Map upstream's `autoregressive_infer_cfg(B, label_B, g_seed, cfg, top_k, top_p, more_smooth)` to

        g = torch.Generator().manual_seed(g_seed)
        labels = label_B if label_B is not None else generator.sample_random_labels(B, g)
        generator.more_smooth = more_smooth
        images = generator.sample_images(labels, cfg=1 + cfg, top_k=top_k or None, top_p=top_p or 1.0,
                                         generator=g)  # in [-1, 1]; upstream returns (images + 1) / 2

    (arzoo's `cfg = 1` means no guidance; upstream's top_k=0 / top_p=0 mean off). A draw happens at
    every scale either way, so top_k=1 is not `greedy=True` (which consumes no randomness).
    """
    check_tokenizer_args(tokenizer, tokenizer_path)
    is_path = isinstance(source, (str, Path))
    raw = load_checkpoint_file(source, "VAR checkpoint") if is_path else source
    state_dict = extract_state_dict(raw)
    if _MAMBA_KEY in state_dict:
        raise ValueError(
            "this is an M-VAR checkpoint (blocks.0.mamba.* entries): load it with "
            "arzoo.interop.mvar.load_mvar_generator"
        )
    official = dict(config) if config is not None else var_config_from_state_dict(state_dict)
    return build_next_scale_generator(
        source, state_dict, var_kwargs_from_official(official), official=official,
        tokenizer=tokenizer, tokenizer_path=tokenizer_path, overrides=overrides,
    )  # fmt: skip


_MAMBA_KEY = "blocks.0.mamba.in_proj.weight"
# The generator a loader builds: NextScaleGenerator here, MaskedHierarchicalGenerator for HMAR.
_Gen = TypeVar("_Gen", bound=NextScaleGenerator)


def check_tokenizer_args(tokenizer: MultiScaleVQTokenizer | None, tokenizer_path: str | None) -> None:
    """At most one of them, and a `MultiScaleVQTokenizer` object."""
    if tokenizer_path is not None and tokenizer is not None:
        raise ValueError("pass either tokenizer_path= or tokenizer=, not both")
    if tokenizer is not None and not isinstance(tokenizer, MultiScaleVQTokenizer):
        raise TypeError(f"tokenizer must be a MultiScaleVQTokenizer, got {type(tokenizer).__name__}")


def build_next_scale_generator(
    source: str | Path | Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    kwargs: dict[str, Any],
    *,
    official: Mapping[str, Any],
    tokenizer: MultiScaleVQTokenizer | None,
    tokenizer_path: str | None,
    overrides: Mapping[str, Any],
    generator_cls: type[NextScaleGenerator] = NextScaleGenerator,
) -> NextScaleGenerator:
    """A `generator_cls(**kwargs, **overrides)` (eval mode, default `NextScaleGenerator`) holding the official `state_dict`
    (loaded strictly into `generator.net`), with the tokenizer of `load_var_generator` (shared by
    the VAR and M-VAR loaders; `source` and `official` only word the errors)."""
    check_tokenizer_args(tokenizer, tokenizer_path)
    kwargs = dict(kwargs)
    if tokenizer_path is None and tokenizer is None:
        # Without a tokenizer the codebook sizes come from the checkpoint (head rows, word_embed columns).
        if "head.weight" in state_dict and "word_embed.weight" in state_dict:
            kwargs["vocab_size"] = state_dict["head.weight"].shape[0]
            kwargs["codebook_dim"] = state_dict["word_embed.weight"].shape[1]
    kwargs.update(overrides)
    described = f"config {dict(official)}" + (f" with overrides {dict(overrides)}" if overrides else "")
    return build_loaded_generator(
        generator_cls, kwargs, state_dict, source=source, tokenizer=tokenizer, tokenizer_path=tokenizer_path,
        described=described,
        hint="Pass the checkpoint's constructor arguments as config= (depth, embed_dim, num_heads, patch_nums, "
        "attn_l2_norm, shared_aln), and a tokenizer with its vocabulary and codebook width.",
    )  # fmt: skip


def build_loaded_generator(
    generator_cls: type[_Gen],
    kwargs: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: str | Path | Mapping[str, Any],
    tokenizer: MultiScaleVQTokenizer | None,
    tokenizer_path: str | None,
    described: str,
    hint: str,
) -> _Gen:
    """A `generator_cls(**kwargs)` (eval mode) with the tokenizer (path, object or none) and the official
    `state_dict` loaded strictly into `generator.net` (shared by the VAR, M-VAR and HMAR loaders;
    `source`, `described` and `hint` only word the errors)."""
    is_path = isinstance(source, (str, Path))
    where = str(source) if is_path else "the given mapping"
    kwargs = dict(kwargs)
    if tokenizer_path is not None:
        kwargs["tokenizer_path"] = tokenizer_path
    if tokenizer is not None:
        kwargs["tokenizer_spec"] = tokenizer.spec()
    # On the meta device (no init cost) unless a tokenizer must really be built.
    on_meta = tokenizer_path is None and tokenizer is None
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        generator = generator_cls(**kwargs)
    if tokenizer is not None:
        assert generator.tokenizer is not None
        generator.tokenizer.load_state_dict(tokenizer.state_dict())
    if on_meta:  # `.to` too: Lightning's `device` attribute does not follow `to_empty`
        generator.to_empty(device="cpu").to("cpu")
    expected = {k: v.shape for k, v in generator.net.state_dict().items()}
    problem = describe_state_dict_mismatch(
        expected,
        state_dict,
        context=f"checkpoint {where} does not fit {type(generator.net).__name__} built from {described}",
        hint=hint,
    )
    if problem:
        raise ValueError(problem)
    generator.net.load_state_dict(state_dict, strict=True, assign=is_path and on_meta)
    generator.net.float()
    generator.configure_ema()  # an EMA copy (ema_decay > 0) starts from the loaded weights
    return generator.eval()
