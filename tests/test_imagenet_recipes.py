"""The ImageNet 256 LlamaGen recipes: they parse through the CLI and build the official sizes.

Nothing here trains or reads ImageNet: `--print_config` only parses, and the models are built on
the meta device with the VQ-16 tokenizer's vocabulary and grid given explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from arzoo.cli import run as arzoo_run
from arzoo.generators import RasterGenerator, generator_config
from arzoo.tokenizers import VQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes/imagenet256"
# LlamaGen's GPT-B ... GPT-3B (c2i, 16384 codes, 16x16 tokens, 1000 classes)
OFFICIAL_PARAMS = {
    "b": 110_888_448,
    "l": 342_910_976,
    "xl": 774_699_520,
    "xxl": 1_410_972_672,
    "3b": 3_096_659_200,
}
VQ16_SIZES = dict(vocab_size=16384, grid_size=16)  # what checkpoints/llamagen_vq16.ckpt would supply
_PARSED: dict[str, dict] = {}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when sys.argv (pytest's) and args are both given."""
    monkeypatch.setattr(sys, "argv", ["arzoo"])


def print_config(size: str, capsys, *extra: str) -> dict:
    """The config `arzoo fit --config raster_<size>.yaml --print_config` prints, parsed."""
    with pytest.raises(SystemExit) as exit_info:
        arzoo_run(["fit", "--config", str(RECIPES / f"raster_{size}.yaml"), *extra, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def parsed(size: str, capsys) -> dict:
    if size not in _PARSED:
        _PARSED[size] = print_config(size, capsys)
    return _PARSED[size]


def test_the_five_recipes_are_there():
    assert sorted(p.stem for p in RECIPES.glob("raster_*.yaml")) == sorted(f"raster_{s}" for s in OFFICIAL_PARAMS)


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMS))
def test_print_config(size, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = parsed(size, capsys)
    model, trainer, data = config["model"], config["trainer"], config["data"]
    assert model["class_path"] == "arzoo.generators.RasterGenerator"
    assert trainer["strategy"] == "ddp" and trainer["precision"] == "bf16-mixed"
    assert trainer["accelerator"] == "gpu" and trainer["devices"] == -1
    assert trainer["max_epochs"] == 300 and trainer["gradient_clip_val"] == 1.0
    args = model["init_args"]
    assert args["tokenizer_path"] == "checkpoints/llamagen_vq16.ckpt"
    assert args["vocab_size"] is None and args["grid_size"] is None  # both come from the tokenizer
    # LlamaGen's train_c2i.py
    assert args["num_classes"] == 1000 and args["class_dropout_prob"] == 0.1
    assert args["lr"] == 1e-4 and list(args["betas"]) == [0.9, 0.95] and args["weight_decay"] == 0.05
    assert args["token_dropout_p"] == args["resid_dropout_p"] == args["ffn_dropout_p"] == 0.1
    assert args["drop_path_rate"] == 0.0 and args["multiple_of"] == 256 and args["ema_decay"] == 0.9999
    assert args["warmup_steps"] == 0 and args["min_lr_ratio"] == 1.0  # constant LR, as upstream
    registered = generator_config(f"raster-{size}")[1]
    for key in ("dim", "n_layer", "n_head"):
        assert args[key] == registered[key], key
    assert data["class_path"] == "arzoo.data.ImageDataModule"
    assert data["init_args"]["source"] == "hf:ILSVRC/imagenet-1k"
    assert data["init_args"]["image_size"] == 256 and data["init_args"]["hflip"] is True
    assert data["init_args"]["num_workers"] == 8
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == f"runs/imagenet256/raster_{size}"
    assert callbacks["ModelCheckpoint"]["save_last"] is True
    assert "SampleGrid" in callbacks
    assert trainer["logger"]["init_args"]["name"] == f"raster_{size}"


@pytest.mark.parametrize("size", list(OFFICIAL_PARAMS))
def test_builds_the_official_size(size, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    init_args = dict(parsed(size, capsys)["model"]["init_args"], tokenizer_path=None, **VQ16_SIZES)
    with torch.device("meta"):
        model = RasterGenerator(**init_args)
    assert model.num_params() == OFFICIAL_PARAMS[size]
    assert model.ema is not None  # ema_decay 0.9999


def test_recipes_differ_only_in_size_and_output_folder(tmp_path, monkeypatch, capsys):
    """Five hand-written files, one setup: everything but the width/depth and the run names agrees."""
    monkeypatch.chdir(tmp_path)

    def normalised(size: str) -> dict:
        config = yaml.safe_load(yaml.safe_dump(parsed(size, capsys)))  # a deep copy
        for key in ("dim", "n_layer", "n_head"):
            config["model"]["init_args"].pop(key)
        text = yaml.safe_dump(config)
        assert text.count(f"raster_{size}") == 2  # the logger name and the checkpoint folder
        return yaml.safe_load(text.replace(f"raster_{size}", "raster_SIZE"))

    reference = normalised("b")
    for size in OFFICIAL_PARAMS:
        assert normalised(size) == reference, size


# the tokenizer's weights are not copied into the meta model: only its sizes matter here
@pytest.mark.filterwarnings("ignore:.*copying from a non-meta parameter:UserWarning")
def test_vocab_and_grid_come_from_the_tokenizer_checkpoint(tmp_path, monkeypatch, capsys):
    """A stand-in for checkpoints/llamagen_vq16.ckpt: VQ-16's codebook and 16x downsampling at 256 px
    with narrow convolutions (random weights), written by save_tokenizer_checkpoint as the recipes' comments say."""
    monkeypatch.chdir(tmp_path)
    stand_in = VQTokenizer(image_size=256, codebook_size=16384, codebook_embed_dim=8, encoder_ch_mult=[1, 1, 1, 1, 1],
                           decoder_ch_mult=[1, 1, 1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
    save_tokenizer_checkpoint(stand_in, "checkpoints/llamagen_vq16.ckpt")
    init_args = print_config("b", capsys)["model"]["init_args"]
    assert init_args["tokenizer_path"] == "checkpoints/llamagen_vq16.ckpt"
    with torch.device("meta"):
        model = RasterGenerator(**init_args)
    assert (model.vocab_size, model.grid_size, model.num_classes) == (16384, 16, 1000)
    assert model.num_params() == OFFICIAL_PARAMS["b"]


# ---- HMAR-d16: both stages parse and build the official size (trainable counts of SPEC 7) ----------

HMAR_STAGES = {"hmar_d16": (1, 310_283_520), "hmar_d16_stage2": (2, 157_408_384)}


@pytest.mark.parametrize("recipe", list(HMAR_STAGES))
def test_hmar_recipes_parse_and_build_the_official_size(recipe, tmp_path, monkeypatch, capsys):
    from arzoo.generators import MaskedHierarchicalGenerator

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        arzoo_run(["fit", "--config", str(RECIPES / f"{recipe}.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    model, trainer = config["model"], config["trainer"]
    assert model["class_path"] == "arzoo.generators.MaskedHierarchicalGenerator"
    assert trainer["precision"] == "bf16-mixed" and trainer["strategy"] == "ddp"
    stage, trainable = HMAR_STAGES[recipe]
    args = dict(model["init_args"], tokenizer_path=None, vocab_size=4096, codebook_dim=32,
                patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])  # what checkpoints/var_vqvae.ckpt would supply
    assert args["stage"] == stage and model["init_args"]["tokenizer_path"] == "checkpoints/var_vqvae.ckpt"
    with torch.device("meta"):
        built = MaskedHierarchicalGenerator(**args)
    assert built.num_params() == 467_691_904 and built.num_trainable_params() == trainable
    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in trainer["callbacks"]}
    assert callbacks["ModelCheckpoint"]["dirpath"] == f"runs/imagenet256/{recipe}"
