"""The `arzoo` command: LightningCLI's `fit | validate | test | predict` over any arzoo model and data.

Models and data are chosen by `class_path` in a recipe (subclass mode), so every tokenizer,
generator and data module is reachable from YAML. Later subcommands (`sample`, `bench`,
`convert`) are added in `ArzooCLI.subcommands` and as methods of `ArzooTrainer`.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI


class ArzooTrainer(L.Trainer):
    """Lightning's Trainer; arzoo's extra subcommands become methods here (their signature = their options).

    Every run also gets arzoo's safety defaults: `AtomicCheckpointIO` (crash-safe, pickle-free
    checkpoints) unless a CheckpointIO is given, and the `NonFiniteGuard` / `RNGResumeState`
    callbacks (see arzoo/callbacks.py) unless callbacks of those classes are already configured.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from arzoo.callbacks import default_callbacks

        callbacks = kwargs.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
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


class ArzooCLI(LightningCLI):
    """LightningCLI with arzoo's defaults: subclass mode, OmegaConf interpolation, overwrite-safe config saving."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Subcommand name -> the arguments it takes from the model/datamodule (extended by later commands)."""
        return dict(LightningCLI.subcommands())


# Commands that need no Trainer of their own: subcommand -> module with `main(argv: list[str])`.
# They are dispatched before LightningCLI parses anything, and imported only when used.
PLAIN_COMMANDS: dict[str, str] = {
    "sample": "arzoo.sample_command",
    "tokenize": "arzoo.tokenize_command",
    "export": "arzoo.export_command",
    "bench": "arzoo.bench.command",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of the `arzoo` console script and of `python -m arzoo`."""
    if args is None and len(sys.argv) == 1:
        args = ["--help"]
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in PLAIN_COMMANDS:
        importlib.import_module(PLAIN_COMMANDS[argv[0]]).main(argv[1:])
        return
    # Recipes write interpolations from the top of the config (`${data.init_args.image_size}`);
    # under a subcommand the real path starts with `fit.`, so let jsonargparse make them relative.
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    ArzooCLI(
        L.LightningModule,
        None,  # data is optional (`sample` needs none); subclass mode still accepts any LightningDataModule
        trainer_class=ArzooTrainer,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # a second run in the same folder replaces config.yaml instead of failing on it
        save_config_kwargs={"overwrite": True},
        # "omegaconf+" resolves ${...} interpolations after CLI overrides, so overrides propagate
        parser_kwargs={
            "parser_mode": "omegaconf+",
            "description": "arzoo: train and evaluate autoregressive image generators. "
            "Also: `arzoo sample|tokenize|export|bench --help`.",
        },
        auto_configure_optimizers=False,
        args=args,
    )
