"""The NAR recipes: ImageNet 256 NAR-B parses through the CLI and builds the official size; the digits
recipe matches the raster one in everything but the model (same tokenizer, data, budget, width).

Nothing here trains or reads ImageNet: `--print_config` only parses, and NAR-B is built on the meta
device with the VQ-16 tokenizer's vocabulary and grid given explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from arzoo.cli import run as arzoo_run
from arzoo.generators import NextNeighborGenerator, generator_config

ROOT = Path(__file__).resolve().parents[1]
NAR_B_PARAMS = 130_551_552  # SPEC section 6


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["arzoo"])  # LightningCLI warns when sys.argv (pytest's) and args are both given
    monkeypatch.chdir(tmp_path)


def print_config(recipe: str, capsys) -> dict:
    """The config `arzoo fit --config <recipe> --print_config` prints, parsed."""
    with pytest.raises(SystemExit) as exit_info:
        arzoo_run(["fit", "--config", str(ROOT / "recipes" / recipe), "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_imagenet_nar_b_parses_and_builds_the_official_size(capsys):
    config = print_config("imagenet256/nar_b.yaml", capsys)
    model, trainer = config["model"], config["trainer"]
    assert model["class_path"] == "arzoo.generators.NextNeighborGenerator"
    args = model["init_args"]
    registered = generator_config("nar-b")[1]
    for key in ("dim", "n_layer", "n_head", "extra_layers", "multiple_of", "num_classes"):
        assert args[key] == registered[key], key
    assert args["tokenizer_path"] == "checkpoints/llamagen_vq16.ckpt"
    assert args["vocab_size"] is None and args["grid_size"] is None  # both come from the tokenizer
    assert trainer["strategy"] == "ddp" and trainer["precision"] == "bf16-mixed"
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == "runs/imagenet256/nar_b"
    assert trainer["logger"]["init_args"]["name"] == "nar_b"
    with torch.device("meta"):
        built = NextNeighborGenerator(**dict(args, tokenizer_path=None, vocab_size=16384, grid_size=16))
    assert built.num_params() == NAR_B_PARAMS and built.num_steps == 31
    assert built.ema is not None  # ema_decay 0.9999

    # the same training setup as raster_b.yaml: only the model class, the extra block and the names differ
    raster = print_config("imagenet256/raster_b.yaml", capsys)
    args.pop("extra_layers")
    raster["model"]["class_path"] = model["class_path"]
    assert yaml.safe_load(yaml.safe_dump(raster).replace("raster_b", "nar_b")) == config


def test_digits_recipe_compares_with_raster(capsys):
    nar = print_config("digits/next_neighbor.yaml", capsys)
    raster = print_config("digits/raster.yaml", capsys)
    assert nar["model"]["class_path"] == "arzoo.generators.NextNeighborGenerator"
    assert nar["model"]["init_args"].pop("extra_layers") == 1
    assert nar["trainer"]["max_epochs"] == raster["trainer"]["max_epochs"] == 30  # 750 steps
    raster["model"]["class_path"] = nar["model"]["class_path"]
    text = yaml.safe_dump(raster).replace("digits/raster", "digits/next_neighbor")
    text = text.replace("name: raster", "name: next_neighbor")
    assert yaml.safe_load(text) == nar
