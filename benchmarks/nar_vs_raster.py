"""Next-neighbour (NAR) vs raster (LlamaGen) sampling: forward steps and images/s on this machine.

    python benchmarks/nar_vs_raster.py [--grids 8 16] [--batch 16] [--dim 128 --n_layer 4 --n_head 4]

Builds both generators with random weights (speed does not depend on them) without a tokenizer,
and times `generate()` — BaseGenerator's loop with each paradigm's KV cache, classifier-free
guidance as one doubled batch, top-k sampling — after a warm-up. Three rows per grid: raster with
`n_layer` blocks, NAR of the same preset (`n_layer` blocks + one extra block under the second head,
as NAR-B is GPT-B + 1), and NAR with the same total depth (`n_layer - 1` + 1). Token decoding only:
the tokenizer's decoder costs the same for both. Prints a Markdown table with the load average.
"""

from __future__ import annotations

import argparse
import os

import torch

from arzoo.generators import NextNeighborGenerator, RasterGenerator
from arzoo.generators.base import BaseGenerator
from arzoo.metrics.meters import counting_calls, median_seconds


def count_forward_calls(gen: BaseGenerator, labels: list[int], **kwargs) -> int:
    """Network calls one `generate()` makes (counted, not read from the schedule)."""
    with counting_calls(gen, "forward_step") as calls:
        gen.generate(labels, **kwargs)
    return calls[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", nargs="*", type=int, default=[8, 16])
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--cfg", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = dict(dim=args.dim, n_head=args.n_head, multiple_of=32, vocab_size=args.vocab, num_classes=10)
    labels = [i % 10 for i in range(args.batch)]
    sample = dict(cfg=args.cfg, top_k=min(16, args.vocab))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), load average {os.getloadavg()}, "
          f"batch {args.batch}, cfg {args.cfg} (doubled batch), vocab {args.vocab}, dim {args.dim}")  # fmt: skip
    print("| grid | generator | blocks | params | forward steps | s / batch | images/s | speed-up vs raster |")
    print("|---|---|---|---|---|---|---|---|")
    for g in args.grids:
        variants = [
            ("raster", RasterGenerator(n_layer=args.n_layer, grid_size=g, **net)),
            ("nar (+1 block)", NextNeighborGenerator(n_layer=args.n_layer, extra_layers=1, grid_size=g, **net)),
            ("nar (same depth)", NextNeighborGenerator(n_layer=args.n_layer - 1, extra_layers=1, grid_size=g, **net)),
        ]
        raster_seconds = None
        for name, gen in variants:
            gen.eval()
            steps = count_forward_calls(gen, labels, **sample)
            assert steps == gen.num_steps
            seconds = median_seconds(lambda: gen.generate(labels, generator=torch.Generator().manual_seed(0), **sample),
                                     args.repeats)  # fmt: skip
            raster_seconds = raster_seconds or seconds
            print(f"| {g}x{g} | {name} | {len(gen.net.layers)} | {gen.num_params():,} | {steps} | {seconds:.3f} | "
                  f"{args.batch / seconds:.1f} | {raster_seconds / seconds:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
