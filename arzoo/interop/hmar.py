"""Load official HMAR (NVlabs/HMAR) checkpoints into arzoo's `MaskedHierarchicalGenerator`.

HMAR ships inference checkpoints (`hmar-dXX.pth`) in the layout of its `HMAR` class
(docs/parity/hmar.md section 1): `base_blocks`, `ns_blocks`, `mask_blocks`,
`ns_head*`, `mask_head*`, `word_embed` without bias plus `word_embed_bias`, `mask_embed`. arzoo's
`HMARTransformer` has exactly these keys, so they load strictly. Its tokenizer is VAR's released
VQVAE (`arzoo.interop.var.load_vqvae('vae_ch160v4096z32.pth')`).

* `hmar_config_from_state_dict`: the architecture of an inference state dict.
* `inference_state_dict_from_stages`: the two training checkpoints (stage 1 `NextScalePrediction`,
  stage 2 `MaskedPrediction`) -> one inference state dict, as upstream's loaders do.
* `load_hmar_generator`: a released `hmar-dXX.pth` (or a state dict) -> `MaskedHierarchicalGenerator`.

Upstream's `HMAR.generate(label_B, cfg, top_k, top_p, mask=True, mask_schedule)` maps to

    generator.sample_images(labels, cfg=1 + cfg, top_k=top_k or None, top_p=top_p or 1.0,
                            mask_schedule=mask_schedule, refine=mask, generator=torch.Generator().manual_seed(seed))

(arzoo's `cfg = 1` means no guidance; upstream's top_k = 0 / top_p = 0 mean off).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from arzoo.checkpoint_io import extract_state_dict
from arzoo.checkpoint_io import read_checkpoint as load_checkpoint_file
from arzoo.generators.masked_hierarchical import MaskedHierarchicalGenerator
from arzoo.networks.hmar import stage1_key_to_inference, stage2_key_to_inference
from arzoo.interop.var import build_loaded_generator, check_tokenizer_args
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

__all__ = ["hmar_config_from_state_dict", "inference_state_dict_from_stages", "load_hmar_generator"]

_BLOCK = re.compile(r"^(base|ns|mask)_blocks\.(\d+)\.")
# Constructor arguments a `config=` may give (official names; cond_drop_rate -> class_dropout_prob).
_CONFIG_KEYS = (
    "depth", "n_layers_train", "embed_dim", "num_heads", "mlp_ratio", "drop_rate", "attn_drop_rate",
    "drop_path_rate", "norm_eps", "attn_l2_norm", "patch_nums", "num_classes", "cond_drop_rate",
)  # fmt: skip


def hmar_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Official-style constructor arguments of an inference `HMAR` state dict, read from the shapes
    (`depth` = base + next-scale blocks, `n_layers_train` = next-scale blocks, heads from
    `scale_mul_1H11` (else `depth`), `patch_nums` from `lvl_1L`); `drop_path_rate = 0.1 * depth / 24`
    and `cond_drop_rate = 0.1` as upstream's builder, since a state dict does not hold them."""
    for key in ("pos_start", "lvl_1L", "class_emb.weight", "ns_head.weight", "mask_embed.weight"):
        if key not in state_dict:
            stage1 = "blocks.0.ffn.fc1.weight" in state_dict
            hint = " (a VAR or stage-1 checkpoint? see arzoo.interop.var)" if stage1 else ""
            raise ValueError(f"not an official HMAR inference state dict: no {key!r} entry{hint}")
    counts = {"base": set(), "ns": set(), "mask": set()}
    for key in state_dict:
        if m := _BLOCK.match(key):
            counts[m.group(1)].add(int(m.group(2)))
    n = len(counts["ns"])
    if n == 0 or len(counts["mask"]) != n:
        raise ValueError(f"HMAR needs as many mask_blocks as ns_blocks (>= 1), got {len(counts['mask'])} and {n}")
    C = state_dict["pos_start"].shape[-1]
    depth = len(counts["base"]) + n
    first = "base_blocks.0." if counts["base"] else "ns_blocks.0."
    l2 = first + "attn.scale_mul_1H11" in state_dict
    tokens = torch.bincount(state_dict["lvl_1L"].reshape(-1).long()).tolist()
    patch_nums = [math.isqrt(c) for c in tokens]
    if any(pn * pn != c for pn, c in zip(patch_nums, tokens)):
        raise ValueError(f"lvl_1L does not describe square token maps (tokens per scale: {tokens})")
    return dict(
        depth=depth,
        n_layers_train=n,
        embed_dim=C,
        num_heads=state_dict[first + "attn.scale_mul_1H11"].shape[1] if l2 else depth,
        mlp_ratio=state_dict[first + "ffn.fc1.weight"].shape[0] / C,
        drop_path_rate=0.1 * depth / 24,
        norm_eps=1e-6,
        attn_l2_norm=l2,
        patch_nums=patch_nums,
        num_classes=state_dict["class_emb.weight"].shape[0] - 1,
        cond_drop_rate=0.1,
    )


def inference_state_dict_from_stages(
    stage1: Mapping[str, torch.Tensor], stage2: Mapping[str, torch.Tensor], depth: int, n_layers_train: int
) -> dict[str, torch.Tensor]:
    """Official stage-1 (`NextScalePrediction`) and stage-2 (`MaskedPrediction`) state dicts -> the
    inference `HMAR` one (stage 2's frozen base blocks must equal stage 1's)."""
    out = {stage1_key_to_inference(k, depth, n_layers_train): v for k, v in stage1.items()}
    for key, value in stage2.items():
        new = stage2_key_to_inference(key, depth, n_layers_train)
        if new in out and not torch.equal(out[new], value):
            raise ValueError(f"stage 2's {key!r} differs from stage 1's {new!r}: not fine-tuned from this stage 1")
        out[new] = value
    return out


def load_hmar_generator(
    source: str | Path | Mapping[str, Any],
    *,
    config: Mapping[str, Any] | None = None,
    tokenizer: MultiScaleVQTokenizer | None = None,
    tokenizer_path: str | None = None,
    **overrides: Any,
) -> MaskedHierarchicalGenerator:
    """An official HMAR inference checkpoint (path, checkpoint dict or state dict, e.g. the released
    `hmar-d16.pth`) -> `MaskedHierarchicalGenerator` (eval mode), loaded strictly into `.net`.

    The architecture comes from `config` (official names, see `_CONFIG_KEYS`), completed from the
    state dict (`hmar_config_from_state_dict`); the generator is in `stage=2` (both branches trained,
    so `generate()` refines by default); `overrides` (generator keyword arguments, e.g.
    `mask_schedule=...`) win. The tokenizer: `tokenizer_path` (an arzoo tokenizer checkpoint), a
    `tokenizer` object (copied), or none (then logits only, no sampling)."""
    check_tokenizer_args(tokenizer, tokenizer_path)
    is_path = isinstance(source, (str, Path))
    raw = load_checkpoint_file(source, "HMAR checkpoint") if is_path else source
    state_dict = extract_state_dict(raw)
    official = hmar_config_from_state_dict(state_dict)
    if config is not None:
        unknown = sorted(str(k) for k in config if k not in _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown HMAR config key(s) {unknown}; known: {list(_CONFIG_KEYS)}")
        official.update(config)
    kwargs: dict[str, Any] = {k: v for k, v in official.items() if k != "cond_drop_rate"}
    kwargs["class_dropout_prob"] = float(official["cond_drop_rate"])
    kwargs["patch_nums"] = [int(pn) for pn in official["patch_nums"]]
    kwargs["stage"] = 2  # both branches are trained: sampling refines with the mask branch by default
    if tokenizer is None and tokenizer_path is None:
        kwargs["vocab_size"] = state_dict["ns_head.weight"].shape[0]
        kwargs["codebook_dim"] = state_dict["word_embed.weight"].shape[1]
    kwargs.update(overrides)
    return build_loaded_generator(
        MaskedHierarchicalGenerator, kwargs, state_dict, source=source, tokenizer=tokenizer,
        tokenizer_path=tokenizer_path, described=str(official),
        hint="Pass the checkpoint's constructor arguments as config= and a tokenizer with its vocabulary and "
        "codebook width.",
    )  # fmt: skip
