"""`arzoo fit | validate | test | predict`: LightningCLI over any arzoo model and data.

Models and data are chosen by `class_path` in a recipe (subclass mode), so every tokenizer,
generator and data module is reachable from YAML. On top of LightningCLI:

* `--ckpt_path` is read with arzoo's safe reader (checksum, clear errors) and never replaces the
  recipe: the model is built from the recipe and the command line, and a checkpoint of another
  model class is refused naming both; without a recipe model, the checkpoint's class is used if it
  is arzoo's or already imported (`arzoo.class_paths`).
* A constructor's own error (e.g. `class_dropout_prob must be in [0, 1)`) is what the user sees,
  not jsonargparse's union-type summary.
* Every Trainer gets arzoo's defaults (`ArzooTrainer`).
"""

from __future__ import annotations

import json
import re
import sys
from argparse import ArgumentError
import warnings
from pathlib import Path
from typing import Any

import lightning as L
from jsonargparse import Namespace, set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningCLI

from arzoo.class_paths import check_class_paths, resolve_class

# hyper-parameters a module writes itself (not recipe arguments): never compared with the recipe's
_INTERNAL_HPARAMS = ("tokenizer_spec",)


class ArzooTrainer(L.Trainer):
    """Lightning's Trainer with arzoo's safety defaults.

    * `AtomicCheckpointIO` (crash-safe, checksummed, pickle-free checkpoints) unless a CheckpointIO is given;
    * the `NonFiniteGuard` / `RNGResumeState` / `EmptyDataGuard` callbacks (arzoo/callbacks.py)
      unless callbacks of those classes are configured;
    * a re-run in the same folder replaces `last.ckpt` (ModelCheckpoint's `last-v1.ckpt` versioning is
      off, so `last.ckpt` is always the newest run's);
    * `enable_progress_bar=False` drops a progress-bar callback a recipe lists instead of failing on it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from arzoo.callbacks import default_callbacks

        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        if kwargs.get("enable_progress_bar") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        for callback in callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback._enable_version_counter = False
        have = {type(c) for c in callbacks}
        kwargs["callbacks"] = callbacks + [c for c in default_callbacks() if type(c) not in have]
        kwargs["plugins"] = _with_atomic_checkpoint_io(kwargs.get("plugins"), kwargs.get("strategy"))
        super().__init__(*args, **kwargs)


def _with_atomic_checkpoint_io(plugins: Any, strategy: Any) -> Any:
    """`plugins` plus an AtomicCheckpointIO, unless a CheckpointIO is already set (in plugins or the strategy)."""
    from lightning.pytorch.plugins.io import CheckpointIO

    from arzoo.checkpoint_plugin import AtomicCheckpointIO

    listed = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, CheckpointIO) for p in listed) or getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    return [*listed, AtomicCheckpointIO()]


def _plain(value: Any) -> Any:
    """Namespaces, tuples and dicts as JSON-comparable data."""
    if isinstance(value, Namespace):
        value = value.as_dict()
    return json.loads(json.dumps(value, default=str))


def _constructor_error(err: BaseException) -> BaseException:
    """The error a class constructor raised, found under jsonargparse's wrappers (`raise ... from`)."""
    current = err
    while current.__cause__ is not None and _raised_by_jsonargparse(current):
        current = current.__cause__
    return current


def _raised_by_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "jsonargparse" in last.tb_frame.f_code.co_filename


# Options earlier arzoo versions accepted, and where they went (an old recipe names them).
_MOVED_OPTIONS = {
    "inter_scale": "M-VAR is now its own class: class_path: arzoo.generators.MambaScaleGenerator, without inter_scale",
}


def _parse_error_line(message: str) -> str:
    """jsonargparse's parse error (often a multi-line dump of every Union subtype tried) as one line:
    the key, the class and the specific problem."""
    raw = [line for line in message.splitlines() if line.strip()]
    if not raw:
        return "the command line or the config could not be parsed"
    head = raw[0].strip().rstrip(":")
    for i, line in enumerate(raw):
        named = re.match(r"\s*- Problem with given class_path '([^']+)':", line)
        if named:  # the lines indented under it are that class's own complaint
            depth = len(line) - len(line.lstrip())
            detail = [d.strip().rstrip(":") for d in raw[i + 1 :] if len(d) - len(d.lstrip()) > depth]
            line = f"{head}: {named.group(1)}: " + ": ".join(detail)
            moved = [hint for key, hint in _MOVED_OPTIONS.items() if f"Option '{key}' is not accepted" in line]
            return line + "".join(f" ({hint})" for hint in moved)
    if len(raw) > 1 and raw[0].rstrip().endswith(":"):
        return f"{head}: {raw[1].strip()}"
    return head


class ArzooCLI(LightningCLI):
    """LightningCLI with arzoo's defaults: subclass mode, OmegaConf interpolation, overwrite-safe config saving."""

    def init_parser(self, **kwargs: Any) -> Any:
        """LightningCLI's parser, raising its errors (made one line by `run_lightning_cli`) instead of
        printing the usage text and every Union subtype it tried."""
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False
        return parser

    def _parse_ckpt_path(self) -> None:
        """Check `--ckpt_path` against the recipe (see the module docstring) instead of replacing the recipe."""
        from arzoo.checkpoint_io import read_checkpoint

        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return  # "last" / "best" are resolved by the Trainer; a missing file is its clear error
        source = str(ckpt_path)
        ckpt = read_checkpoint(ckpt_path, "--ckpt_path checkpoint")
        if not isinstance(ckpt, dict):
            raise ValueError(f"--ckpt_path {source!r} holds a {type(ckpt).__name__}, not a Lightning checkpoint dict")
        hparams = dict(ckpt.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        saved_class = hparams.pop("_class_path", None) or ckpt.get("arzoo_generator_class")
        model = self.config[subcommand].get("model")
        if model is None or getattr(model, "class_path", None) is None:
            if saved_class is None:
                raise ValueError(
                    f"--ckpt_path {source!r} does not name its model class; give the recipe it was trained with "
                    f"(--config recipes/...yaml)"
                )
            resolve_class(saved_class, what="model class", source=source, base=L.LightningModule)
            check_class_paths(hparams, source=source)
            config = {subcommand: {"model": {"class_path": saved_class, "dict_kwargs": hparams}}}
            self.config = self.parser.parse_object(config, self.config)
            return
        if saved_class is None:
            return
        recipe_cls = resolve_class(model.class_path, what="model class", trusted=True)
        saved_cls = resolve_class(saved_class, what="model class", source=source)
        if recipe_cls is not saved_cls:
            raise ValueError(
                f"--ckpt_path {source!r} holds a {saved_cls.__name__} ({saved_class}), but the recipe builds a "
                f"{recipe_cls.__name__} ({model.class_path}); give the recipe that trained the checkpoint"
            )
        recipe_args = _plain(model.get("init_args") or {})
        saved_args = _plain(hparams)
        differ = [
            f"{key}={recipe_args[key]!r} (checkpoint: {saved_args[key]!r})"
            for key in sorted(set(recipe_args) & set(saved_args))
            if key not in _INTERNAL_HPARAMS and recipe_args[key] != saved_args[key]
        ]
        if differ:
            print(
                f"note: the model is built from the recipe and command line, which differ from --ckpt_path "
                f"{source!r} in: {'; '.join(differ[:6])}{' ...' if len(differ) > 6 else ''}",
                file=sys.stderr,
            )

    def instantiate_classes(self) -> None:
        """LightningCLI's, re-raising a constructor's own error rather than jsonargparse's summary of it."""
        try:
            super().instantiate_classes()
        except Exception as err:  # noqa: BLE001
            inner = _constructor_error(err)
            if inner is err:
                raise
            raise inner from None


def run_lightning_cli(args: list[str]) -> None:
    """`arzoo fit|validate|test|predict ...` (args without the program name)."""
    # Recipes write interpolations from the top of the config (`${data.init_args.image_size}`);
    # under a subcommand the real path starts with `fit.`, so let jsonargparse make them relative.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    with warnings.catch_warnings():  # `args` is how arzoo passes its own argv on; not a mistake here
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        try:
            _run_cli(args)
        except ArgumentError as err:
            raise ValueError(_parse_error_line(str(err))) from None


def _run_cli(args: list[str]) -> None:
    """The LightningCLI run itself (arzoo's parser settings and trainer)."""
    ArzooCLI(
        L.LightningModule,
        None,  # data is optional; subclass mode still accepts any LightningDataModule
        trainer_class=ArzooTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # a second run in the same folder replaces config.yaml instead of failing on it
        save_config_kwargs={"overwrite": True},
        # "omegaconf+" resolves ${...} interpolations after CLI overrides, so overrides propagate
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "prog": "arzoo",
            "description": "arzoo: train and evaluate autoregressive image generators. "
            "Also: `arzoo sample|tokenize|export|bench --help`; global options `--plugin MODULE`, `--debug`.",
        },
        auto_configure_optimizers=False,
        args=args,
    )
