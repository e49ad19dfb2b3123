"""Tokenizer checkpoints: load a trained tokenizer back (without unpickling code), or write one.

`load_tokenizer` reads what `TokenizerModule` training writes (`arzoo fit --config
recipes/<data>/tokenizer_*.yaml`) and what `save_tokenizer_checkpoint` writes. The latter turns a
tokenizer built in Python, e.g. from official weights, into such a checkpoint:

    from arzoo.interop.llamagen import VQ_16, load_vq_tokenizer
    save_tokenizer_checkpoint(load_vq_tokenizer("vq_ds16_c2i.pt", **VQ_16), "checkpoints/llamagen_vq16.ckpt")
"""

from __future__ import annotations

from pathlib import Path

from arzoo.checkpoint_io import atomic_torch_save, load_state_dict_checked, read_checkpoint
from arzoo.tokenizers.base import Tokenizer, build_tokenizer, resolve_tokenizer_class


def load_tokenizer(path: str | Path, expected: type[Tokenizer] | None = None) -> Tokenizer:
    """The frozen tokenizer saved in a TokenizerModule checkpoint; `expected` checks its kind."""
    ckpt = read_checkpoint(path, "tokenizer checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"tokenizer checkpoint {str(path)!r} holds a {type(ckpt).__name__}, expected a checkpoint dict"
        )
    spec = (ckpt.get("hyper_parameters") or {}).get("tokenizer")
    if "arzoo_generator_class" in ckpt:  # BaseGenerator's CLASS_KEY (tokenizers never import generators)
        raise ValueError(
            f"{str(path)!r} is a generator checkpoint ({ckpt['arzoo_generator_class']}), but a tokenizer "
            f"checkpoint is needed here (e.g. runs/digits/tokenizer_vq/last.ckpt)"
        )
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(
            f"{str(path)!r} is not an arzoo tokenizer checkpoint (no hyper_parameters['tokenizer']); "
            f"train one with `arzoo fit --config recipes/<data>/tokenizer_*.yaml`, or convert official "
            f"weights with arzoo.interop.llamagen.load_vq_tokenizer / arzoo.interop.var.load_vqvae"
        )
    cls = resolve_tokenizer_class(spec["class_path"], source=str(path))
    if expected is not None and not issubclass(cls, expected):
        raise TypeError(
            f"{str(path)!r} holds a {cls.__name__}, but a {expected.__name__} is required here "
            f"(train the matching tokenizer recipe, or point to its checkpoint)"
        )
    tokenizer = build_tokenizer(spec, source=str(path))
    prefix = "tokenizer."
    state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    load_state_dict_checked(tokenizer, state, f"tokenizer checkpoint {str(path)!r}")
    return tokenizer.freeze()


def save_tokenizer_checkpoint(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write `tokenizer` as a checkpoint that `load_tokenizer` (and `tokenizer_path=`) reads back.

    Holds only plain data: `{"hyper_parameters": {"tokenizer": tokenizer.spec()}, "state_dict":
    {"tokenizer.<key>": tensor}}`, as a `TokenizerModule` checkpoint stores them. Parent folders are
    created; the file is written to a temporary file in the same folder and moved into place, so an
    interrupted or failed write never leaves a partial checkpoint (an existing one stays intact).
    Returns the path written.
    """
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"save_tokenizer_checkpoint needs an arzoo Tokenizer, got {type(tokenizer).__name__}")
    path = Path(path).expanduser()
    checkpoint = {
        "hyper_parameters": {"tokenizer": tokenizer.spec()},
        "state_dict": {f"tokenizer.{k}": v.detach().cpu() for k, v in tokenizer.state_dict().items()},
    }
    return atomic_torch_save(checkpoint, path)
