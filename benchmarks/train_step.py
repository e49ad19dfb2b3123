"""Where a generator's training step goes: data, tokenizer, forward, backward, optimizer, EMA, Lightning.

    python benchmarks/train_step.py [--config recipes/digits/raster.yaml ...] [--steps 30] [--warmup 5]

For each recipe (built by the same parser as `arzoo fit`; needs its tokenizer checkpoint), times
the phases of a training step by hand on the recipe's own model, data and optimizer, then runs
`trainer.fit` for the same number of steps (no logger, checkpoints, callbacks or validation): the
difference is what Lightning's loop adds. Counts the FLOPs of forward + backward
(`torch.utils.flop_counter`) and sets the achieved FLOP/s against this machine's torch.mm peak
(a 1024^3 fp32 matmul, measured here). Prints Markdown tables and the load average: the machines
are shared, so read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from token_cache_speed import ROOT, build  # noqa: E402  (the recipe -> trainer/model/data builder)

PHASES = ("data", "tokenizer", "forward", "backward", "optimizer", "ema")
DIGITS = ["raster", "next_neighbor", "random_order", "next_scale", "next_scale_mamba", "next_frequency"]


def matmul_peak_gflops(n: int = 1024, repeats: int = 10) -> float:
    """Best-of-`repeats` fp32 torch.mm throughput (GFLOP/s) of an n x n x n product."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def phase_times(config: str, steps: int, warmup: int) -> tuple[dict[str, float], float, int]:
    """(median seconds per phase, forward+backward FLOPs of one step, batch size) outside Lightning."""
    trainer, model, data, _ = build(config, 1, None)
    data.setup("fit")
    loader = data.train_dataloader()
    model.train()
    optimizer = model.configure_optimizers()["optimizer"]
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    batches = iter(loader)
    flops = 0
    for step in range(steps + warmup):
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        t1 = time.perf_counter()
        tokens = model.batch_tokens(batch)
        t2 = time.perf_counter()
        labels = model.drop_labels(model.check_labels(batch["label"]))
        if step == 0:
            with FlopCounterMode(display=False) as counter:
                model.sequence_loss(tokens, labels).backward()
            flops = counter.get_total_flops()
            optimizer.zero_grad(set_to_none=True)
        loss = model.sequence_loss(tokens, labels)
        t3 = time.perf_counter()
        loss.backward()
        t4 = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        if model.ema is not None:
            model.ema.update_parameters(model.net)
        t6 = time.perf_counter()
        if step >= warmup:
            for name, (a, b) in zip(PHASES, [(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t5, t6)]):
                times[name].append(b - a)
    return {p: statistics.median(v) for p, v in times.items()}, flops, int(batch["label"].shape[0])


def lightning_step(config: str, steps: int, warmup: int) -> float:
    """Median seconds per step of `trainer.fit` on the same recipe."""
    trainer, model, data, timer = build(config, steps + warmup, None)
    trainer.fit(model, data)
    return statistics.median(timer.times[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", nargs="*", default=[str(ROOT / f"recipes/digits/{n}.yaml") for n in DIGITS])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    args = parser.parse_args()
    sys.argv = sys.argv[:1]
    load_before = os.getloadavg()
    peak = matmul_peak_gflops()
    rows = []
    for config in args.config:
        phases, flops, batch = phase_times(config, args.steps, args.warmup)
        fit = lightning_step(config, args.steps, args.warmup)
        rows.append((Path(config).stem, phases, flops, batch, fit))
    load_after = os.getloadavg()
    print(f"\n{args.steps} timed steps after {args.warmup} warm-up; torch threads {torch.get_num_threads()}; "
          f"torch.mm peak {peak:.0f} GFLOP/s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after\n")
    print("| recipe | batch | " + " | ".join(f"{p} ms" for p in PHASES)
          + " | sum ms | trainer.fit ms | Lightning share | fwd+bwd GFLOP | fwd+bwd GFLOP/s | of mm peak | steps/s (fit) |")
    print("|---" * (len(PHASES) + 10) + "|")
    for name, phases, flops, batch, fit in rows:
        total = sum(phases.values())
        compute = phases["forward"] + phases["backward"]
        rate = flops / compute / 1e9
        print(f"| {name} | {batch} | " + " | ".join(f"{phases[p] * 1e3:.1f}" for p in PHASES)
              + f" | {total * 1e3:.1f} | {fit * 1e3:.1f} | {max(fit - total, 0) / fit:.0%} | {flops / 1e9:.2f}"
              f" | {rate:.0f} | {rate / peak:.0%} | {1 / fit:.2f} |")


if __name__ == "__main__":
    main()
