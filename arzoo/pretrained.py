"""Self-contained, pickle-free model folders: `export_checkpoint` writes them, `from_pretrained` reads them.

A folder holds `model.safetensors` (every weight: a generator's network, EMA copy and frozen
tokenizer, or a tokenizer's weights) and `config.json` (`kind`, the class path and the resolved
constructor arguments). Nothing in it is unpickled: safetensors is raw tensors, the config is JSON.
The two files check each other: `config.json` holds the SHA-256 of `model.safetensors`, whose
metadata holds the SHA-256 of the config, so a damaged or mismatched file is refused on load. The
class a config names is used only if it is arzoo's or already imported (`arzoo.class_paths`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from arzoo.checkpoint_io import load_state_dict_checked, read_checkpoint
from arzoo.class_paths import check_class_paths, resolve_class
from arzoo.errors import CorruptFileError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "arzoo-pretrained"
FORMAT_VERSION = 1
GENERATOR_CLASS_KEY = "arzoo_generator_class"  # as written by BaseGenerator.on_save_checkpoint


def _config_digest(config: dict[str, Any]) -> str:
    """SHA-256 of a config without its `weights_sha256` entry (canonical JSON)."""
    body = {k: v for k, v in config.items() if k != "weights_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain(value: Any, key: str) -> Any:
    """`value` as JSON data (tuples become lists), or a clear error naming the hyper-parameter."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{key}.{k}") for k, v in value.items()}
    raise ValueError(f"hyper-parameter {key!r} holds a {type(value).__name__}, which a JSON config cannot store")


def checkpoint_contents(ckpt: dict[str, Any], path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, weights) of an arzoo generator or tokenizer checkpoint, as `export_checkpoint` writes them."""
    hparams = ckpt.get("hyper_parameters") or {}
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} has no state_dict; expected a checkpoint written by `arzoo fit`")
    class_path = ckpt.get(GENERATOR_CLASS_KEY)
    if class_path is not None:
        init_args = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        if init_args.get("tokenizer_spec") is None and any(k.startswith("tokenizer.") for k in state):
            raise ValueError(f"generator checkpoint {path!r} has tokenizer weights but no tokenizer_spec")
        init_args["tokenizer_path"] = None  # the tokenizer travels in the export (spec + weights)
        config = {"kind": "generator", "class_path": class_path, "init_args": _plain(init_args, "init_args")}
        return config, dict(state)
    spec = hparams.get("tokenizer")
    if isinstance(spec, dict) and "class_path" in spec:
        prefix = "tokenizer."
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        config = {"kind": "tokenizer", "class_path": spec["class_path"],
                  "init_args": _plain(dict(spec.get("init_args") or {}), "tokenizer.init_args")}
        return config, weights
    raise ValueError(
        f"{path!r} is neither an arzoo generator checkpoint (no {GENERATOR_CLASS_KEY!r} entry) nor a tokenizer "
        f"checkpoint (no hyper_parameters['tokenizer']); expected a checkpoint written by `arzoo fit`"
    )


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path) -> Path:
    """Write `<out_dir>/model.safetensors` and `<out_dir>/config.json` from an arzoo checkpoint; returns the folder."""
    from safetensors.torch import save_file

    ckpt = read_checkpoint(ckpt_path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {str(ckpt_path)!r} holds a {type(ckpt).__name__}, expected a checkpoint dict")
    config, weights = checkpoint_contents(ckpt, str(ckpt_path))
    import arzoo

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "arzoo_version": arzoo.__version__,
              "global_step": ckpt.get("global_step"), **config}
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"export folder {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share memory; contiguous copies of each are always accepted
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items() if isinstance(v, torch.Tensor)}
    tmp = out / f".{WEIGHTS_NAME}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt", "config_sha256": _config_digest(config)})
    config["weights_sha256"] = _file_digest(tmp)
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp_config = out / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_config, out / CONFIG_NAME)
    return out


def read_pretrained_config(folder: str | Path) -> dict[str, Any]:
    """The `config.json` of an exported folder, checked."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"pretrained folder {str(folder)!r} does not exist; create one with `arzoo export`")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"pretrained folder {str(folder)!r} has no {name}; expected the output of "
                f"`arzoo export --ckpt_path <checkpoint> --out {folder}`"
            )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"{str(folder / CONFIG_NAME)!r} is not valid JSON ({err}); is it cut short? Export again with `arzoo export`"
        ) from None
    kind = config.get("kind") if isinstance(config, dict) else None
    if not isinstance(config, dict) or config.get("format") != FORMAT or kind not in ("generator", "tokenizer"):
        raise CorruptFileError(f"{str(folder / CONFIG_NAME)!r} is not an arzoo export config (format {FORMAT!r})")
    if not isinstance(config.get("init_args"), dict) or not isinstance(config.get("class_path"), str):
        raise CorruptFileError(f"{str(folder / CONFIG_NAME)!r} has no class_path / init_args; export again")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(folder)!r} was exported in format version {config['format_version']}; this arzoo reads "
            f"up to {FORMAT_VERSION} (upgrade arzoo)"
        )
    return config


def read_pretrained_weights(folder: str | Path, config: dict[str, Any], device: str = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of `<folder>/model.safetensors`, checked against the config's checksums."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(folder).expanduser() / WEIGHTS_NAME
    stored = config.get("weights_sha256")
    if stored is not None and _file_digest(path) != stored:
        raise CorruptFileError(
            f"{str(path)!r} is damaged or does not belong to its config.json: its SHA-256 differs from the one the "
            f"export recorded; export the checkpoint again"
        )
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        weights = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(
            f"{str(path)!r} could not be read as safetensors ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"is it cut short? Export the checkpoint again"
        ) from None
    config_digest = metadata.get("config_sha256")
    if config_digest is not None and config_digest != _config_digest(config):
        raise CorruptFileError(
            f"{str(Path(folder) / CONFIG_NAME)!r} was changed after the export (it no longer matches "
            f"{WEIGHTS_NAME}); export the checkpoint again"
        )
    return weights


def from_pretrained(folder: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The generator (eval mode) or frozen tokenizer saved by `arzoo export` in `folder`."""
    from arzoo.generators.base import BaseGenerator
    from arzoo.tokenizers.base import build_tokenizer

    config = read_pretrained_config(folder)
    source = str(Path(folder).expanduser() / CONFIG_NAME)
    if config["kind"] == "tokenizer":
        tokenizer = build_tokenizer(config, source=source)
        weights = read_pretrained_weights(folder, config, str(map_location))
        load_state_dict_checked(tokenizer, weights, f"{str(folder)!r}")
        return tokenizer.to(map_location).freeze()
    # the classes the config names are checked before anything else is read from the folder
    cls = resolve_class(config["class_path"], what="generator class", source=source, base=BaseGenerator)
    check_class_paths(config["init_args"], source=source)
    weights = read_pretrained_weights(folder, config, str(map_location))
    cls, init_args = cls.migrate_arguments(config["init_args"])
    model = cls(**init_args)
    load_state_dict_checked(model, weights, f"{str(folder)!r}")
    return model.to(map_location).eval()
