"""Reading torch checkpoint files safely and finding / checking the state dict inside them.

A bottom-layer module (imports only torch and the standard library), shared by the interop loaders
(`arzoo.interop.*`) and `arzoo.tokenizers.checkpoint`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "STATE_DICT_KEYS",
    "WRAPPER_PREFIXES",
    "atomic_torch_save",
    "describe_state_dict_mismatch",
    "extract_state_dict",
    "read_checkpoint",
]

# Where training scripts put the weights; the official LlamaGen samplers try "model", then
# "module", then "state_dict". "ema" (written next to "model" by EMA runs) is the last resort.
STATE_DICT_KEYS = ("model", "module", "state_dict", "ema")
# Added by DDP (`module.`) and by saving a `torch.compile`d module (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with clear errors for bad files.

    `what` names the file in error messages ("tokenizer checkpoint"...). `argparse.Namespace` is
    allow-listed: LlamaGen's DDP checkpoints store the training `args` as one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file)")
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
            f"{what} {str(path)!r} could not be read: it is not a readable torch checkpoint "
            f"(torch.load with weights_only=True failed: {type(err).__name__}: {first_line}).{hint}"
        ) from err


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` that never leaves a partial file: an interrupted save keeps the old one.

    Writes a uniquely named temporary file in the target folder (same file system, so `os.replace`
    is atomic), flushes it to disk, moves it into place and syncs the folder entry. Returns the path.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Persist a rename (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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


def describe_state_dict_mismatch(
    expected: Mapping[str, Sequence[int]],
    got: Mapping[str, torch.Tensor],
    *,
    context: str,
    hint: str = "",
    optional: Collection[str] = (),
    any_shape: Collection[str] = (),
    limit: int = 5,
) -> str | None:
    """An error message for missing / unexpected / wrongly shaped keys, or None when `got` fits.

    `expected` maps the model's keys to their shapes. Keys in `optional` may be absent from (or
    surplus in) `got`; keys in `any_shape` may have another shape. The message reads
    "{context} (N keys expected, M given): <problems>. {hint}", listing at most `limit` keys of a kind.
    """
    missing = [k for k in expected if k not in got and k not in optional]
    unexpected = [k for k in got if k not in expected and k not in optional]
    shapes = [
        f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in got and k not in any_shape and tuple(got[k].shape) != tuple(expected[k])
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{len(items)} {title}: {items[:limit]}{more}")
    if not problems:
        return None
    message = f"{context} ({len(expected)} keys expected, {len(got)} given): " + "; ".join(problems) + "."
    return f"{message} {hint}" if hint else message
