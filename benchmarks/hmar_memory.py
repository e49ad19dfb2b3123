"""Peak memory of HMAR sampling against next-scale (VAR) sampling of the same size (a script, not a test).

VAR's sampler keeps every block's keys and values of all coarser scales (its KV cache grows with the
number of tokens generated so far); HMAR's scales attend only to themselves, so it keeps nothing
from scale to scale and its peak is set by the largest scale alone. This script measures that.

What is measured: each (model, schedule) runs in a fresh Python process. After the model and its
tokenizer are built (random weights) and a garbage collection, a thread samples the process's
resident set size (/proc/self/statm) every millisecond while `generate()` runs; the reported
number is the peak RSS during generation minus the RSS just before it ("RSS growth"). On CUDA
(`--device cuda`) it is `torch.cuda.max_memory_allocated` growth instead. The size of VAR's KV
cache at the end of sampling (2 x blocks x rows x L x width x 4 bytes) is printed for reference.

    flock /tmp/arzoo-cpu.lock python benchmarks/hmar_memory.py             # CPU, both schedules
    python benchmarks/hmar_memory.py --device cuda --depth 16 --width 1024  # the real d16 on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

SCHEDULES = {
    "256px (10 scales, 680 tokens)": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
    "512px (10 scales, 2240 tokens)": [1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
    "256px, first 6 scales (91 tokens)": [1, 2, 3, 4, 5, 6],
    "256px, 1x1 and 16x16 only (257 tokens)": [1, 16],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> dict:
    """Build one model, sample once, return its peak memory growth (runs in its own process)."""
    import torch

    from arzoo.generators import MaskedHierarchicalGenerator, NextScaleGenerator
    from arzoo.tokenizers import MultiScaleVQTokenizer
    from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    patch_nums = json.loads(args.patch_nums)
    with tempfile.TemporaryDirectory() as tmp:
        tok = MultiScaleVQTokenizer(image_size=patch_nums[-1] * 16, vocab_size=4096, z_channels=32, ch=32,
                                    ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1, patch_nums=patch_nums)  # fmt: skip
        path = save_tokenizer_checkpoint(tok, os.path.join(tmp, "tok.ckpt"))
        del tok
        common = dict(tokenizer_path=str(path), depth=args.depth, embed_dim=args.width, num_heads=args.width // 64,
                      num_classes=1000)  # fmt: skip
        if args.model == "hmar":
            model = MaskedHierarchicalGenerator(n_layers_train=args.depth // 2, **common)
        else:
            model = NextScaleGenerator(**common)
    model = model.to(args.device).eval()
    labels = torch.arange(args.batch) % 1000
    gen = torch.Generator(device=args.device).manual_seed(0)
    gc.collect()
    peak, stop = [_rss_bytes()], threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.001)

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
    start = time.perf_counter()
    model.generate(labels, cfg=2.0, top_k=600, generator=gen)
    if args.device == "cuda":
        torch.cuda.synchronize()
        growth = torch.cuda.max_memory_allocated() - base
    else:
        stop.set()
        thread.join()
        growth = max(peak[0], _rss_bytes()) - base
    rows, L = 2 * args.batch, sum(p * p for p in patch_nums)
    return dict(growth=growth, seconds=time.perf_counter() - start, params=model.num_params(),
                kv_bytes=2 * args.depth * rows * L * args.width * 4 if args.model == "var" else 0)  # fmt: skip


def main() -> None:
    """Run every (schedule, model) in its own process and print a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=256, help="embed_dim (heads = width / 64)")
    parser.add_argument("--batch", type=int, default=8, help="labels per generation (rows = 2 x batch with CFG)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="run only the schedules whose name contains this text")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="var", help=argparse.SUPPRESS)
    parser.add_argument("--patch_nums", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    unit = "CUDA max_memory_allocated growth" if args.device == "cuda" else "peak RSS growth"
    print(f"depth {args.depth}, width {args.width}, {args.batch} labels x 2 (CFG) rows, device {args.device}, "
          f"{args.threads} threads; /proc/loadavg: {open('/proc/loadavg').read().strip()}\n")  # fmt: skip
    print(f"| schedule | model | params | {unit} (MiB) | VAR KV cache at the end (MiB) | time (s) |")
    print("|---|---|---|---|---|---|")
    for name, patch_nums in SCHEDULES.items():
        if args.only not in name:
            continue
        for model in ("var", "hmar"):
            cmd = [sys.executable, __file__, "--child", "--model", model, "--patch_nums", json.dumps(patch_nums),
                   "--depth", str(args.depth), "--width", str(args.width), "--batch", str(args.batch),
                   "--device", args.device, "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            kv = f"{r['kv_bytes'] / 2**20:.0f}" if r["kv_bytes"] else "none"
            label = "next-scale (VAR)" if model == "var" else "HMAR"
            print(f"| {name} | {label} | {r['params']:,} | {r['growth'] / 2**20:.0f} | {kv} | {r['seconds']:.1f} |",
                  flush=True)  # fmt: skip
    print(f"\n/proc/loadavg after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
