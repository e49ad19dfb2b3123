"""Self-contained, pickle-free model folders: `export_checkpoint` writes them, `from_pretrained` reads them.

A folder holds `model.safetensors` (every weight: a generator's network, EMA copy and frozen
tokenizer, or a tokenizer's weights) and `config.json` (`kind`, the class path and the resolved
constructor arguments). Nothing in it is unpickled: safetensors is raw tensors, the config is JSON.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from arzoo.checkpoint_io import read_checkpoint

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "arzoo-pretrained"
FORMAT_VERSION = 1
GENERATOR_CLASS_KEY = "arzoo_generator_class"  # as written by BaseGenerator.on_save_checkpoint


def _import_class(class_path: str, what: str) -> type:
    module_name, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{what} class {class_path!r} cannot be imported ({type(err).__name__}: {err})") from err


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
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
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
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(folder / CONFIG_NAME)!r} is not valid JSON ({err})") from err
    kind = config.get("kind") if isinstance(config, dict) else None
    if not isinstance(config, dict) or config.get("format") != FORMAT or kind not in ("generator", "tokenizer"):
        raise ValueError(f"{str(folder / CONFIG_NAME)!r} is not an arzoo export config (format {FORMAT!r})")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{str(folder)!r} was exported in format version {config['format_version']}; this arzoo reads "
            f"up to {FORMAT_VERSION} (upgrade arzoo)"
        )
    return config


def from_pretrained(folder: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The generator (eval mode) or frozen tokenizer saved by `arzoo export` in `folder`."""
    from safetensors.torch import load_file

    from arzoo.generators.base import BaseGenerator
    from arzoo.tokenizers.base import resolve_tokenizer_class

    config = read_pretrained_config(folder)
    weights = load_file(str(Path(folder).expanduser() / WEIGHTS_NAME), device=str(map_location))
    if config["kind"] == "tokenizer":
        tokenizer = resolve_tokenizer_class(config["class_path"])(**config["init_args"])
        tokenizer.load_state_dict(weights)
        return tokenizer.to(map_location).freeze()
    cls = _import_class(config["class_path"], "generator")
    if not (isinstance(cls, type) and issubclass(cls, BaseGenerator)):
        raise ValueError(f"{config['class_path']!r} in {str(folder)!r} is not an arzoo generator class")
    model = cls(**config["init_args"])
    model.load_state_dict(weights)
    return model.to(map_location).eval()
