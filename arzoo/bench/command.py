"""`arzoo bench`: train what a suite is missing, evaluate every generator alike, write the leaderboard."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from arzoo.bench.suite import Run, Suite, config_hash, load_suite

RESULT_FILE = "result.json"
REPORTED_FILE = Path("benchmarks/reported_imagenet256.yaml")
UNIGRAM_IMAGES = 20_000  # training images encoded for the unigram baseline (all of them on small data)


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on: CPU/GPU, threads, load average."""
    info: dict[str, Any] = {
        "device": device,
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _check_same_data(suite: Suite) -> dict[str, Any]:
    """Fairness: every generator entry trains and is scored on the same data (batch size may differ)."""
    def key(run: Run) -> dict[str, Any]:
        data = dict(run.config.get("data") or {})
        args = {k: v for k, v in (data.get("init_args") or {}).items() if k not in ("batch_size", "num_workers")}
        return {"class_path": data.get("class_path"), "init_args": args}

    first = key(suite.entries[0])
    for run in suite.entries[1:]:
        if key(run) != first:
            raise ValueError(
                f"suite {suite.name!r}: entry {run.name!r} uses data {key(run)}, but {suite.entries[0].name!r} "
                f"uses {first}; a leaderboard compares generators on the same data"
            )
    return suite.entries[0].config["data"]


def fairness_rules(suite: Suite, data_config: dict[str, Any], num_real: int) -> list[str]:
    """The rules the harness enforced, printed with the table."""
    tokenizers = sorted({r.tokenizer for r in suite.entries if r.tokenizer})
    ev = {k: v for k, v in suite.entries[0].evaluation.items()}
    return [
        f"training budget: {suite.budget.describe()} (tokenizers: {suite.tokenizer_budget.describe()})",
        f"data: {json.dumps(data_config.get('init_args'))}; scored against {num_real} held-out images",
        f"one tokenizer checkpoint per tokenizer recipe, shared by every entry that names it: {', '.join(tokenizers) or 'none'}",
        f"sampling: {ev['num_samples']} samples per entry (balanced over classes), cfg={ev['cfg']}, "
        f"temperature={ev['temperature']}, top_k={ev['top_k']}, top_p={ev['top_p']}, seed={ev['seed']}, "
        f"batch {ev['batch_size']}; an entry's own settings are listed in its overrides column",
        f"features for FID / IS / precision-recall / class accuracy: {ev['feature']}",
        "forward passes = network calls per generate() batch (classifier-free guidance runs as one doubled batch)",
    ]


def _load_reported() -> list[dict[str, Any]]:
    if not REPORTED_FILE.is_file():
        return []
    from omegaconf import OmegaConf

    rows = OmegaConf.to_container(OmegaConf.load(REPORTED_FILE)).get("rows") or []
    return [dict(r, reported=True) for r in rows]


def run_suite(suite_name: str, out: str | None = None, force: bool = False, device: str = "cpu") -> Path:
    """Run a suite end to end and return the folder holding leaderboard.{md,json,html}."""
    import arzoo
    from arzoo.bench.evaluate import (
        build_datamodule, evaluate_generator, evaluate_real, evaluate_tokenizer, held_out_images,
    )
    from arzoo.bench.leaderboard import ranked, write_leaderboard
    from arzoo.bench.training import is_trained, train
    from arzoo.metrics import GenerativeMetrics

    console = Console()
    suite = load_suite(suite_name)
    out_dir = Path(out or f"runs/bench/{suite.name}").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data_config = _check_same_data(suite)
    console.print(f"[bold]arzoo bench[/bold] suite {suite.name!r} ({suite.path}) -> {out_dir}")

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        # 1. tokenizers, each trained once per resolved config
        train_stats: dict[str, dict[str, Any]] = {}
        for run in list(suite.tokenizers.values()) + suite.entries:
            folder = out_dir / ("tokenizers" if run.kind == "tokenizer" else "entries") / run.folder_name
            if run.kind == "generator" and not run.tokenizer and "tokenizer_path" not in run.config["model"].get("init_args", {}):
                console.print(f"[yellow]{run.name}: no suite tokenizer; using the recipe's own[/yellow]")
            if run.model_of is not None:  # evaluates another entry's model: nothing to train
                train_stats[run.name] = train_stats[run.model_of]
                continue
            if run.checkpoint is not None:  # a tokenizer given as a trained checkpoint
                progress.console.print(f"use tokenizer {run.name} from {run.checkpoint}")
                folder.mkdir(parents=True, exist_ok=True)
                train_stats[run.name] = {}
                continue
            if is_trained(folder) and not force:
                train_stats[run.name] = json.loads((folder / "train_stats.json").read_text())
                progress.console.print(f"reuse trained {run.kind} {run.name} ({folder.name})")
                continue
            train_stats[run.name] = train(run, folder, out_dir, progress)

        # 2. metrics on the held-out images, shared by every row
        settings0 = suite.entries[0].evaluation
        task = progress.add_task("prepare metrics (feature network, real statistics)", total=None)
        real_images, _ = held_out_images(build_datamodule(data_config))
        # training images: the unigram baseline's counts and the "real images" reference row
        torch.manual_seed(int(settings0["seed"]))  # the train loader shuffles: same subset every run
        train_images, train_labels = held_out_images(build_datamodule(data_config), split="train", limit=UNIGRAM_IMAGES)
        metrics = GenerativeMetrics(
            feature=settings0["feature"], image_size=real_images.shape[-1],
            num_classes=_num_classes(suite), device=device,
        )
        metrics.update_real(real_images)
        num = int(settings0["num_samples"])
        reference_rows: list[dict[str, Any]] = [
            {"tokenizer": "–", "kind": f"real training images ({min(num, len(train_images))})",
             **evaluate_real(train_images[:num], train_labels[:num], metrics)}
        ]
        progress.update(task, total=1, completed=1)

        # 3. reference rows per tokenizer
        unigram: dict[str, float] = {}
        for tok_name, run in suite.tokenizers.items():
            folder = out_dir / "tokenizers" / run.folder_name
            cached = folder / "reference.json"
            if cached.is_file() and not force:
                rows = json.loads(cached.read_text())
            else:
                task = progress.add_task(f"evaluate tokenizer {tok_name} (reconstruction, random tokens)", total=None)
                rows = evaluate_tokenizer(
                    out_dir / run.trained_checkpoint, real_images, train_images, metrics, device,
                    int(settings0["seed"]), int(settings0["batch_size"]),
                )
                cached.write_text(json.dumps(rows, indent=1))
                progress.update(task, total=1, completed=1)
            unigram[tok_name] = rows["reconstruction"]["unigram_loss"]
            for kind, row in rows.items():
                reference_rows.append({"tokenizer": tok_name, "kind": kind, **row})

        # 4. every generator under the same settings (an entry's own overrides are shown)
        rows: list[dict[str, Any]] = []
        by_name = {r.name: r for r in suite.entries}
        for run in suite.entries:
            if not run.evaluate:
                continue
            folder = out_dir / "entries" / run.folder_name
            eval_key = config_hash({"evaluation": run.evaluation, "device": device, "real": len(real_images)})
            result_path = folder / RESULT_FILE
            if result_path.is_file() and not force:
                cached_row = json.loads(result_path.read_text())
                if cached_row.get("eval_hash") == eval_key:
                    rows.append(cached_row)
                    progress.console.print(f"reuse evaluated entry {run.name}")
                    continue
            task = progress.add_task(f"evaluate {run.name} ({run.evaluation['num_samples']} samples)", total=None)
            load = load_average()
            trained = out_dir / "entries" / by_name[run.model_of].folder_name if run.model_of else folder
            folder.mkdir(parents=True, exist_ok=True)
            row = evaluate_generator(
                trained / "last.ckpt", data_config, run.evaluation, metrics, device, folder / "samples.png",
                (run.config.get("model") or {}).get("class_path"),
            )
            row["val_unigram_loss"] = unigram.get(run.tokenizer) if run.tokenizer else row.get("val_unigram_loss")
            stats = _chain_stats(suite, by_name[run.model_of] if run.model_of else run, train_stats)
            row.update(
                name=run.name, recipe=run.recipe, config_hash=run.config_hash, eval_hash=eval_key,
                entry_folder=str(folder.relative_to(out_dir)), tokenizer=run.tokenizer,
                seed=run.config.get("seed_everything"), overrides=run.overrides,
                evaluation_overrides=run.evaluation_overrides, evaluation=run.evaluation,
                train_images_per_s=stats.get("train_images_per_s"), train_wall_s=stats.get("elapsed_s"),
                train_images=stats.get("images_seen"), train_steps=stats.get("step"),
                arzoo_version=arzoo.__version__, torch_version=torch.__version__, device=device,
                load_average_before=load, load_average_after=load_average(),
            )
            result_path.write_text(json.dumps(row, indent=1, default=str))
            rows.append(row)
            progress.update(task, total=1, completed=1)

    board = {
        "suite": suite.name,
        "suite_file": str(suite.path),
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "arzoo_version": arzoo.__version__,
        "torch_version": torch.__version__,
        "machine": {**machine_info(device), "load_average_at_end": load_average()},
        "feature_net": metrics.feature_info,
        "fairness": fairness_rules(suite, data_config, len(real_images)),
        "budget": suite.budget.describe(),
        "rows": ranked(rows),
        "reference_rows": reference_rows,
        "reported": _load_reported(),
    }
    paths = write_leaderboard(board, out_dir)
    _print_summary(console, board)
    console.print("wrote " + ", ".join(str(p) for p in paths))
    return out_dir


def _chain_stats(suite: Suite, run: Run, train_stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Training stats of an entry summed over the stages it starts from (`init_from`)."""
    by_name = {r.name: r for r in suite.entries}
    chain, current = [run.name], run
    while current.init_from is not None:
        current = by_name[current.init_from]
        chain.append(current.name)
    parts = [train_stats[name] for name in chain]
    images = sum(p.get("images_seen", 0) for p in parts)
    elapsed = sum(p.get("elapsed_s", 0.0) for p in parts)
    return {"images_seen": images, "elapsed_s": elapsed, "step": sum(p.get("step", 0) for p in parts),
            "train_images_per_s": images / elapsed if elapsed else None}


def _num_classes(suite: Suite) -> int:
    args = suite.entries[0].config["model"].get("init_args", {})
    return int(args.get("num_classes", 10))


def _print_summary(console: Console, board: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"arzoo leaderboard: {board['suite']}")
    for header in ("#", "entry", "paradigm", "FID", "IS", "prec", "rec", "acc", "passes", "img/s"):
        table.add_column(header)

    def f(v: Any, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    for i, r in enumerate(board["rows"], 1):
        table.add_row(
            str(i), r["name"], r["paradigm"], f(r.get("fid"), ".2f"), f(r.get("is_mean"), ".2f"),
            f(r.get("precision"), ".3f"), f(r.get("recall"), ".3f"), f(r.get("class_accuracy"), ".3f"),
            f(r.get("forward_passes"), ".0f"), f(r.get("sampling_images_per_s"), ".1f"),
        )
    console.print(table)


def bench(suite: str = "quick", out: str | None = None, force: bool = False, device: str = "cpu") -> None:
    """Run a benchmark suite and write leaderboard.md / .json / .html.

    Args:
        suite: a suite name (resolved to benchmarks/suites/<name>.yaml) or a path to a suite file.
        out: output folder (default runs/bench/<suite name>); finished runs in it are reused.
        force: retrain and re-evaluate everything, even finished runs.
        device: torch device for evaluation (training uses each recipe's trainer settings).
    """
    run_suite(suite, out=out, force=force, device=device)


def main(argv: list[str]) -> None:
    """Parse `arzoo bench ...` arguments from the signature of `bench`."""
    from jsonargparse import CLI

    CLI(bench, args=argv, prog="arzoo bench", as_positional=False)
