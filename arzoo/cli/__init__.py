"""The `arzoo` command: `main` dispatches; one module per command (`sample`, `tokenize`, `export`),
LightningCLI's `fit | validate | test | predict` in `lightning_cli`; `arzoo bench` is `arzoo.bench.command`."""

from __future__ import annotations

from typing import Any

from arzoo.cli.main import main, run

__all__ = ["ArzooCLI", "ArzooTrainer", "main", "run"]


def __getattr__(name: str) -> Any:
    # LightningCLI pieces import lightning (seconds): only when asked for
    if name in ("ArzooCLI", "ArzooTrainer"):
        from arzoo.cli import lightning_cli

        return getattr(lightning_cli, name)
    raise AttributeError(f"module 'arzoo.cli' has no attribute {name!r}")
