"""`arzoo tokenize`: encode a generator recipe's training images once into an on-disk token cache.

    arzoo tokenize --config recipes/digits/raster.yaml [--out DIR] [--device cuda] [--data.init_args.X ...]
    arzoo fit --config recipes/digits/raster.yaml --data.init_args.token_cache DIR

The recipe is parsed by the same `ArzooCLI` parser as `arzoo fit` (interpolations and overrides
included), its data module is built from it, and the tokenizer is loaded from the model's
`tokenizer_path` exactly as the generator loads it. The generator itself is not built.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

DEFAULT_OUT = "runs/token_caches/{recipe}"


def parse_recipe(config: str, overrides: list[str]) -> tuple[Any, Any]:
    """(model config namespace, instantiated data module) of a recipe, parsed as `arzoo fit` parses it."""
    import lightning as L

    from arzoo.cli.lightning_cli import ArzooCLI, ArzooTrainer

    class RecipeOnly(ArzooCLI):
        """Parses and builds the data module only: no model, trainer, callbacks or loggers."""

        def instantiate_classes(self) -> None:
            self.model_config = self.config.get("model")
            config = self.config.clone()
            config.model = None
            config.trainer.callbacks = None
            config.trainer.logger = None
            self.datamodule = self.parser.instantiate(config).get("data")

    if not Path(config).is_file():
        raise FileNotFoundError(
            f"recipe {config!r} does not exist; pass a generator recipe, e.g. recipes/digits/raster.yaml"
        )
    with warnings.catch_warnings():  # LightningCLI warns that sys.argv (`arzoo tokenize ...`) differs from args
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python")
        cli = RecipeOnly(
            L.LightningModule, None, trainer_class=ArzooTrainer, subclass_mode_model=True, subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf+", "prog": "arzoo tokenize"}, auto_configure_optimizers=False,
            run=False, args=["--config", config, *overrides],
        )
    return cli.model_config, cli.datamodule


def load_recipe_tokenizer(model_config: Any, recipe: str) -> Any:
    """The frozen tokenizer a generator recipe trains over, loaded as the generator loads it."""
    from arzoo.class_paths import resolve_class
    from arzoo.generators.base import BaseGenerator
    from arzoo.tokenizers.checkpoint import load_tokenizer

    class_path = getattr(model_config, "class_path", None)
    cls = resolve_class(class_path, what="model class", trusted=True)  # the user's own recipe
    if not issubclass(cls, BaseGenerator):
        raise ValueError(
            f"arzoo tokenize needs a generator recipe; {recipe!r} trains {class_path!r} "
            f"(tokenizer recipes have nothing to cache)"
        )
    path = model_config.init_args.get("tokenizer_path")
    if not path:
        raise ValueError(
            f"recipe {recipe!r} sets no model.init_args.tokenizer_path: there is no tokenizer to encode with"
        )
    return load_tokenizer(path, expected=cls.tokenizer_kind), path


def tokenize(
    config: str,
    out: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    overwrite: bool = False,
    overrides: list[str] | None = None,
) -> Path:
    """Encode the training split of `config`'s data (and its flips, if the recipe flips) into `out`."""
    from torch.utils.data import DataLoader

    from arzoo.data.datasets import collate_images
    from arzoo.data.token_cache import META_FILE, tokenizer_fingerprint, write_token_cache

    out_dir = Path(out or DEFAULT_OUT.format(recipe=Path(config).stem)).expanduser()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (overwrite and (out_dir / META_FILE).is_file()):
            what = "a token cache: add --overwrite to replace it" if (out_dir / META_FILE).is_file() else (
                "not a token cache; choose an empty or new folder")
            raise FileExistsError(f"--out {str(out_dir)!r} already exists and is {what}")
    if batch_size is not None and batch_size <= 0:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    model_config, data = parse_recipe(config, list(overrides or []))
    tokenizer, tokenizer_path = load_recipe_tokenizer(model_config, config)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = tokenizer.to(device)

    flips = bool(getattr(data, "hflip", False))
    data.hflip = False  # encode every image as it is (and, with flips, its mirror), not a random draw
    data.token_cache = None
    data.setup("fit")
    loader = DataLoader(data.train_set, batch_size=batch_size or data.batch_size, shuffle=False,
                        num_workers=data.num_workers, collate_fn=collate_images)

    @torch.no_grad()
    def encode(images: torch.Tensor) -> torch.Tensor:
        # the layout of BaseGenerator.tokenize: every scale's map flattened row-major, coarse to fine
        return torch.cat([m.flatten(1) for m in tokenizer.encode(images.to(device).float())], dim=1)

    meta = {
        "recipe": str(config),
        "tokenizer_path": str(tokenizer_path),
        "tokenizer": tokenizer.spec(),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "scales": [list(s) for s in tokenizer.scales],
        "num_tokens": sum(h * w for h, w in tokenizer.scales),
        "source": data.source,
        "image_size": data.image_size,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
    }
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)  # only ever a token cache (checked above)
    start = time.perf_counter()
    path = write_token_cache(loader, encode, out_dir, flips=flips, vocab_size=tokenizer.vocab_size, meta=meta)
    rows = json.loads((path / META_FILE).read_text())["num_rows"]
    print(f"wrote {rows} rows of {meta['num_tokens']} tokens{' (+ flipped)' if flips else ''} to {path} "
          f"in {time.perf_counter() - start:.1f} s; train from it with\n"
          f"  arzoo fit --config {config} --data.init_args.token_cache {path}")
    return path


def main(argv: list[str]) -> None:
    """Parse `arzoo tokenize ...`; options not listed here are recipe overrides, as for `arzoo fit`."""
    parser = argparse.ArgumentParser(
        prog="arzoo tokenize",
        description="Encode a generator recipe's training images once with its frozen tokenizer into a token "
        "cache (an HF datasets table); then train with --data.init_args.token_cache <out>. Other options "
        "(e.g. --data.init_args.source ...) override the recipe as in `arzoo fit`.",
    )
    parser.add_argument("--config", required=True, help="a generator recipe, e.g. recipes/digits/raster.yaml")
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--batch_size", type=int, default=None, help="images per encode batch (default: the recipe's)")
    parser.add_argument("--device", default="auto", help="torch device for the tokenizer (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing token cache at --out")
    args, overrides = parser.parse_known_args(argv)
    tokenize(args.config, args.out, args.batch_size, args.device, args.overwrite, overrides)
