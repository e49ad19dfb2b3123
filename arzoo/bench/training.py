"""Train one run of a suite with `arzoo fit` in a child process, showing its progress."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from rich.progress import Progress

from arzoo.bench.suite import Run

DONE_FILE = "train_stats.json"


def runnable_config(run: Run, folder: Path, out_dir: Path) -> dict[str, Any]:
    """The run's resolved config plus where it writes: CSV logs, last.ckpt and progress in `folder`."""
    config = copy.deepcopy(run.config)
    tok_path = config.get("model", {}).get("init_args", {}).get("tokenizer_path")
    if run.tokenizer is not None and tok_path:
        config["model"]["init_args"]["tokenizer_path"] = str(out_dir / tok_path)
    if run.init_from is not None:  # suite-relative like the tokenizer path, so the hash is location-free
        config["model"]["init_args"]["init_from"] = str(out_dir / config["model"]["init_args"]["init_from"])
    trainer = config.setdefault("trainer", {})
    trainer["default_root_dir"] = str(folder)
    trainer["enable_progress_bar"] = False  # the harness shows progress; the child writes a log file
    trainer["logger"] = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(folder), "name": "logs", "version": 0},
    }
    trainer["callbacks"] = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(folder), "save_last": True, "save_top_k": 0},
        },
        {"class_path": "arzoo.bench.callbacks.BenchProgress", "init_args": {"folder": str(folder)}},
    ]
    return config


def is_trained(folder: Path) -> bool:
    """A run is finished when its stats file and checkpoint both exist."""
    return (folder / DONE_FILE).is_file() and (folder / "last.ckpt").is_file()


def train(run: Run, folder: Path, out_dir: Path, progress: Progress, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `arzoo fit` on the run's config in `folder`; return its training stats."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (DONE_FILE, "progress.json", "last.ckpt"):
        (folder / stale).unlink(missing_ok=True)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(runnable_config(run, folder, out_dir), sort_keys=False))
    log_path = folder / "fit.log"
    max_steps = run.config["trainer"].get("max_steps", -1)
    total = max_steps if max_steps and max_steps > 0 else None
    budget_s = (run.config["trainer"].get("max_time") or {}).get("seconds")
    task = progress.add_task(f"train {run.kind} {run.name}", total=total or budget_s or None)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "arzoo", "fit", "--config", str(config_path)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )
        while child.poll() is None:
            time.sleep(0.5)
            if total:
                progress.update(task, completed=_read_step(folder))
            elif budget_s:
                progress.update(task, completed=min(time.perf_counter() - start, budget_s))
    progress.update(task, completed=total or budget_s or 1, total=total or budget_s or 1)
    if child.returncode != 0 or not is_trained(folder):
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"training {run.kind} {run.name!r} failed (exit code {child.returncode}); log {log_path}:\n{tail}")
    stats = json.loads((folder / DONE_FILE).read_text())
    stats["wall_s"] = time.perf_counter() - start
    return stats


def _read_step(folder: Path) -> int:
    try:
        return int(json.loads((folder / "progress.json").read_text())["step"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0
