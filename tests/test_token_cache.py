"""Token caches: `arzoo tokenize` writes one; training from it equals training from images."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from arzoo.cli import run as arzoo_run
from arzoo.data import ImageDataModule
from arzoo.data.datasets import collate_images
from arzoo.data.token_cache import TokenCacheDataset, collate_tokens
from arzoo.generators import RasterGenerator
from arzoo.tokenizers import VQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

TINY_NET = dict(dim=32, n_layer=1, n_head=2, multiple_of=32, warmup_steps=0)


def tiny_vq(seed: int) -> VQTokenizer:
    torch.manual_seed(seed)
    return VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                       decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)


def recipe(tok_path: Path, hflip: bool) -> dict:
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 2, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "limit_val_batches": 1},
        "model": {"class_path": "arzoo.generators.RasterGenerator",
                  "init_args": {"tokenizer_path": str(tok_path), **TINY_NET}},
        "data": {"class_path": "arzoo.data.ImageDataModule",
                 "init_args": {"source": "digits", "image_size": 16, "batch_size": 16, "hflip": hflip}},
    }


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])


@pytest.fixture(scope="module")
def cached(tmp_path_factory) -> dict:
    """A tiny tokenizer, a digits recipe that flips, and the token cache `arzoo tokenize` writes for it."""
    root = tmp_path_factory.mktemp("cache")
    tok_path = save_tokenizer_checkpoint(tiny_vq(0), root / "vq.ckpt")
    config = root / "recipe.yaml"
    config.write_text(yaml.safe_dump(recipe(tok_path, hflip=True)))
    arzoo_run(["tokenize", "--config", str(config), "--out", str(root / "tokens"), "--batch_size", "512"])
    return {"root": root, "tok_path": tok_path, "config": config, "cache": root / "tokens"}


def test_cache_holds_the_tokens_of_every_image_and_its_flip(cached):
    meta = json.loads((cached["cache"] / "token_cache.json").read_text())
    assert meta["num_rows"] == 1617 and meta["flips"] and meta["num_tokens"] == 16 and meta["source"] == "digits"
    model = RasterGenerator(tokenizer_path=str(cached["tok_path"]), **TINY_NET)
    data = ImageDataModule(image_size=16, batch_size=16)  # the same seeded train split, unflipped
    data.setup("fit")
    images = torch.stack([data.train_set[i]["image"] for i in range(40)])
    cache = TokenCacheDataset(cached["cache"], hflip=True)
    rows = cache.table[:40]
    assert torch.equal(rows["tokens"].long(), model.tokenize(images))
    assert torch.equal(rows["tokens_flip"].long(), model.tokenize(images.flip(-1)))
    assert rows["label"].tolist() == [data.train_set[i]["label"] for i in range(40)]


def test_training_from_the_cache_gives_the_loss_of_training_from_images(cached):
    torch.manual_seed(0)
    model = RasterGenerator(tokenizer_path=str(cached["tok_path"]), **TINY_NET).eval()
    data = ImageDataModule(image_size=16, batch_size=16)
    data.setup("fit")
    from_images = collate_images([data.train_set[i] for i in range(16)])
    from_cache = collate_tokens([TokenCacheDataset(cached["cache"])[i] for i in range(16)])
    assert "image" not in from_cache
    with torch.no_grad():
        loss_images = model._shared_step(from_images, "test")
        loss_cache = model._shared_step(from_cache, "test")
    assert torch.isfinite(loss_images) and loss_cache.item() == loss_images.item()


def test_fit_from_the_cache(cached):
    """`arzoo fit ... --data.init_args.token_cache DIR` trains from the cache (with flips) and validates on images."""
    arzoo_run(["fit", "--config", str(cached["config"]), "--data.init_args.token_cache", str(cached["cache"]),
          "--trainer.default_root_dir", str(cached["root"] / "fit")])


def test_a_cache_from_another_tokenizer_is_refused(cached):
    other = save_tokenizer_checkpoint(tiny_vq(1), cached["root"] / "other.ckpt")
    with pytest.raises(ValueError, match="encoded by another tokenizer"):
        arzoo_run(["fit", "--config", str(cached["config"]), "--data.init_args.token_cache", str(cached["cache"]),
              "--model.init_args.tokenizer_path", str(other)])


def test_cache_mismatches_are_clear_errors(cached, tmp_path):
    with pytest.raises(ValueError, match="made with image_size=16, but this run has image_size=32"):
        ImageDataModule(image_size=32, token_cache=str(cached["cache"])).setup("fit")
    with pytest.raises(FileNotFoundError, match="is not a token cache"):
        ImageDataModule(image_size=16, token_cache=str(tmp_path)).setup("fit")
    # a cache without flips cannot feed a flipping data module
    config = tmp_path / "noflip.yaml"
    config.write_text(yaml.safe_dump(recipe(cached["tok_path"], hflip=False)))
    arzoo_run(["tokenize", "--config", str(config), "--out", str(tmp_path / "noflip"), "--batch_size", "512"])
    with pytest.raises(ValueError, match="holds no flipped tokens"):
        ImageDataModule(image_size=16, hflip=True, token_cache=str(tmp_path / "noflip")).setup("fit")
    with pytest.raises(FileExistsError, match="add --overwrite"):
        arzoo_run(["tokenize", "--config", str(config), "--out", str(tmp_path / "noflip")])


def test_tokenize_needs_a_generator_recipe(tmp_path):
    config = tmp_path / "tok.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "arzoo.tokenizers.TokenizerModule", "init_args": {
        "tokenizer": {"class_path": "arzoo.tokenizers.VQTokenizer", "init_args": {"image_size": 16}}}}}))
    with pytest.raises(ValueError, match="needs a generator recipe"):
        arzoo_run(["tokenize", "--config", str(config), "--out", str(tmp_path / "out")])
