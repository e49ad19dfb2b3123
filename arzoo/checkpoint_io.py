"""Reading torch checkpoint files safely and finding / checking the state dict inside them.

A bottom-layer module (imports only torch and the standard library), shared by the interop loaders
(`arzoo.interop.*`) and `arzoo.tokenizers.checkpoint`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import uuid
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from arzoo.errors import CorruptFileError

__all__ = [
    "CHECKSUM_KEY",
    "STATE_DICT_KEYS",
    "WRAPPER_PREFIXES",
    "atomic_torch_save",
    "check_state_dict_fits",
    "content_checksum",
    "describe_state_dict_mismatch",
    "extract_state_dict",
    "load_state_dict_checked",
    "read_checkpoint",
]

# Top-level entry of every checkpoint dict arzoo writes: a SHA-256 over its whole content (tensors
# byte for byte, plain values by repr), verified when the file is read back.
CHECKSUM_KEY = "arzoo_checksum"

# Where training scripts put the weights; the official LlamaGen samplers try "model", then
# "module", then "state_dict". "ema" (written next to "model" by EMA runs) is the last resort.
STATE_DICT_KEYS = ("model", "module", "state_dict", "ema")
# Added by DDP (`module.`) and by saving a `torch.compile`d module (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def read_checkpoint(path: str | Path, what: str = "checkpoint") -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` with clear errors for bad files.

    `what` names the file in error messages ("tokenizer checkpoint"...). A checkpoint written by
    arzoo carries a content checksum (`CHECKSUM_KEY`), verified here and removed from the result: a
    file damaged after it was written (a few bytes flipped) is refused instead of loading wrong
    weights. `argparse.Namespace` is allow-listed: LlamaGen's DDP checkpoints store the training
    `args` as one.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{what} {str(path)!r} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (or is not a file)")
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{what} {str(path)!r} could not be read: the file is empty")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    # The weights-only unpickler raises almost anything (IndexError, KeyError...) on junk bytes.
    except Exception as err:  # noqa: BLE001
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err).lower():
            # torch's advice (retry with weights_only=False) would run the file's code: not given
            raise CorruptFileError(
                f"{what} {str(path)!r} could not be read: it pickles objects other than tensors and plain "
                f"containers, which arzoo never unpickles (they can run code); re-save just its state dict "
                f"(e.g. torch.save({{'model': ckpt['model']}}, path)) from a trusted environment"
            ) from None
        raise CorruptFileError(
            f"{what} {str(path)!r} could not be read: it is not a readable torch checkpoint "
            f"(torch.load with weights_only=True failed: {type(err).__name__}: {first_line}); is it truncated?"
        ) from err
    if isinstance(obj, dict) and CHECKSUM_KEY in obj:
        stored = obj.pop(CHECKSUM_KEY)
        actual = content_checksum(obj)
        if not isinstance(stored, dict) or stored.get("sha256") != actual:
            raise CorruptFileError(
                f"{what} {str(path)!r} is damaged: its content does not match the checksum written with it "
                f"(sha256 {str(stored.get('sha256') if isinstance(stored, dict) else stored)[:12]}... stored, "
                f"{actual[:12]}... read); copy it again or use an earlier checkpoint"
            )
    return obj


def content_checksum(obj: Any) -> str:
    """SHA-256 hex digest of a checkpoint's content: tensors byte for byte (with dtype and shape),
    mappings in key order, sequences in order, plain values by type and repr."""
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
        if tensor.numel() and tensor.layout == torch.strided and not tensor.is_quantized:
            data = tensor.cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(memoryview(data.numpy()))
        elif tensor.numel():
            digest.update(repr(tensor.tolist()).encode())
    elif isinstance(obj, Mapping):
        items = sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0])))
        digest.update(f"M{len(items)}|".encode())
        for key, value in items:
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"S{len(obj)}|".encode())
        for value in obj:
            _feed(digest, value)
    elif isinstance(obj, argparse.Namespace):
        _feed(digest, vars(obj))
    else:
        digest.update(f"{type(obj).__name__}:{obj!r}|".encode())


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """`torch.save(obj, path)` that never leaves a partial file: an interrupted save keeps the old one.

    A dict gets a content checksum (`CHECKSUM_KEY`, verified by `read_checkpoint`). Writes a
    uniquely named temporary file in the target folder (same file system, so `os.replace` is
    atomic), flushes it to disk, moves it into place and syncs the folder entry; temporary files
    that a killed process left behind are removed first. Returns the path. An OS error (read-only
    folder, full disk) names the target file.
    """
    path = Path(path).expanduser()
    if isinstance(obj, dict):
        obj = {k: v for k, v in obj.items() if k != CHECKSUM_KEY}
        obj[CHECKSUM_KEY] = {"sha256": content_checksum(obj)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        with open(tmp, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())  # the data is on disk before the rename makes it visible
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno is None:
            raise
        raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(path: Path) -> None:
    """Delete `.<name>.<pid>.<id>.tmp` files next to `path` whose writing process no longer runs."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 : -len(".tmp")].split(".")
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        pid = int(parts[0])
        if pid == os.getpid() or not _process_exists(pid):
            tmp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists (owned by another user) or cannot be asked: leave its file alone
    return True


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


def check_state_dict_fits(module: torch.nn.Module, state: Mapping[str, torch.Tensor], context: str) -> None:
    """Raise one clear ValueError unless `state` has exactly `module`'s keys and shapes."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    problem = describe_state_dict_mismatch(
        expected, state, context=f"{context} does not fit this {type(module).__name__}",
        hint="Build the model with the arguments it was trained with (its recipe or config).",
    )
    if problem:
        raise ValueError(problem)


def load_state_dict_checked(module: torch.nn.Module, state: Mapping[str, torch.Tensor], context: str) -> None:
    """`module.load_state_dict(state)` (strict), with one clear line instead of torch's multi-line error."""
    check_state_dict_fits(module, state, context)
    module.load_state_dict(state, strict=True)
