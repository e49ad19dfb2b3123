"""Tokenizer speed on this machine: training steps/s, encode and decode images/s.

    python benchmarks/tokenizer_speed.py [--recipes recipes/digits/tokenizer_vq.yaml ...] [--batch 64]

Builds each recipe's tokenizer (random weights: speed does not depend on them) and times plain
PyTorch steps, without Lightning, after a warm-up. Prints a Markdown table with the load average.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from arzoo.metrics.meters import median_seconds
from arzoo.tokenizers.base import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "recipes/digits/tokenizer_vq.yaml", ROOT / "recipes/digits/tokenizer_msvq.yaml"]


def tokenizer_from_recipe(path: Path):
    """The tokenizer a TokenizerModule recipe builds."""
    config = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return build_tokenizer(config["model"]["init_args"]["tokenizer"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    print("| recipe | params | train steps/s | train images/s | encode images/s | decode images/s |")
    print("|---|---|---|---|---|---|")
    for recipe in args.recipes:
        tok = tokenizer_from_recipe(recipe)
        x = torch.rand(args.batch, 3, tok.image_size, tok.image_size) * 2 - 1
        opt = torch.optim.AdamW(tok.parameters(), lr=1e-4)

        def train_step() -> None:
            out = tok(x)
            loss = (out.recon - x).square().mean() + out.quant_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t_train = median_seconds(train_step, args.repeats, warmup=2)
        tok.eval()
        with torch.no_grad():
            maps = tok.encode(x)
            t_enc = median_seconds(lambda: tok.encode(x), args.repeats, warmup=2)
            t_dec = median_seconds(lambda: tok.decode(maps), args.repeats, warmup=2)
        params = sum(p.numel() for p in tok.parameters())
        print(f"| {recipe.name} | {params:,} | {1 / t_train:.2f} | {args.batch / t_train:.0f} | "
              f"{args.batch / t_enc:.0f} | {args.batch / t_dec:.0f} |")


if __name__ == "__main__":
    main()
