"""Load official VAR (FoundationVision/VAR) configs and checkpoints into arzoo modules.

Sections:
* Checkpoint files: read with `arzoo.checkpoint_io` (`load_checkpoint_file` and `extract_state_dict`
  are re-exported from there).
* VQVAE tokenizer: `models/vqvae.py` constructor kwargs -> `MultiScaleVQTokenizer` kwargs, the
  released 256px preset `VAR_VQVAE_256` and `load_vqvae`.
* (VAR transformer: added in its own section below.)

Facts used here are in tests/fixtures/parity/var/SPEC.md (sections 1 and 7) and README.md.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from arzoo.checkpoint_io import describe_state_dict_mismatch, extract_state_dict
from arzoo.checkpoint_io import read_checkpoint as load_checkpoint_file
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

__all__ = [
    "VAR_VQVAE_256",
    "extract_state_dict",
    "load_checkpoint_file",
    "load_vqvae",
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
