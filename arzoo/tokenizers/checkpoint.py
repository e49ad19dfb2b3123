"""Load a trained tokenizer back from a `TokenizerModule` checkpoint, without unpickling code."""

from __future__ import annotations

from pathlib import Path

from arzoo.checkpoint_io import read_checkpoint
from arzoo.tokenizers.base import Tokenizer, resolve_tokenizer_class


def load_tokenizer(path: str | Path, expected: type[Tokenizer] | None = None) -> Tokenizer:
    """The frozen tokenizer saved in a TokenizerModule checkpoint; `expected` checks its kind."""
    ckpt = read_checkpoint(path, "tokenizer checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(
            f"tokenizer checkpoint {str(path)!r} holds a {type(ckpt).__name__}, expected a checkpoint dict"
        )
    spec = (ckpt.get("hyper_parameters") or {}).get("tokenizer")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(
            f"{str(path)!r} is not an arzoo tokenizer checkpoint (no hyper_parameters['tokenizer']); "
            f"train one with `arzoo fit --config recipes/<data>/tokenizer_*.yaml`, or convert official "
            f"weights with arzoo.interop.llamagen.load_vq_tokenizer / arzoo.interop.var.load_vqvae"
        )
    cls = resolve_tokenizer_class(spec["class_path"])
    if expected is not None and not issubclass(cls, expected):
        raise TypeError(
            f"{str(path)!r} holds a {cls.__name__}, but a {expected.__name__} is required here "
            f"(train the matching tokenizer recipe, or point to its checkpoint)"
        )
    tokenizer = cls(**dict(spec.get("init_args") or {}))
    prefix = "tokenizer."
    state = {k[len(prefix) :]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(prefix)}
    tokenizer.load_state_dict(state)
    return tokenizer.freeze()
