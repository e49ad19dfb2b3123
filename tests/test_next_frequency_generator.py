"""NextFrequencyGenerator (NFIG): the next-scale machinery driven by a frequency-split tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

import arzoo
from arzoo.cli import run as arzoo_run
from arzoo.data import ImageDataModule
from arzoo.generators import NextFrequencyGenerator, NextScaleGenerator
from arzoo.tokenizers import FrequencyVQTokenizer, MultiScaleVQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOK = dict(image_size=16, vocab_size=32, z_channels=32, ch=32, ch_mult=[1, 1, 1], num_res_blocks=1)
NET = dict(depth=1, embed_dim=32, num_heads=2, warmup_steps=0)


@pytest.fixture(scope="module")
def fvq_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = FrequencyVQTokenizer(band_grids=[1, 2, 4], codebook_init=0.02, **TOK)
    return save_tokenizer_checkpoint(tok, tmp_path_factory.mktemp("fvq") / "fvq.ckpt")


def test_trains_and_samples_one_step_per_band(fvq_path, tmp_path):
    torch.manual_seed(0)
    model = NextFrequencyGenerator(tokenizer_path=str(fvq_path), lr=3e-3, **NET)
    assert model.paradigm == "next-frequency" and model.band_grids == (1, 2, 4) and model.num_steps == 3
    assert [len(s) for s in model.schedule] == [1, 4, 16]
    trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=16))
    images = model.sample_images([0, 5], cfg=2.0, top_k=8, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1
    trainer.save_checkpoint(tmp_path / "nfig.ckpt")
    assert type(arzoo.Generator.load_from_checkpoint(tmp_path / "nfig.ckpt")) is NextFrequencyGenerator


def test_a_scale_tokenizer_is_refused(tmp_path):
    msvq = MultiScaleVQTokenizer(patch_nums=[1, 2, 4], **TOK)
    path = save_tokenizer_checkpoint(msvq, tmp_path / "msvq.ckpt")
    with pytest.raises(TypeError, match="holds a MultiScaleVQTokenizer, but a FrequencyVQTokenizer is required"):
        NextFrequencyGenerator(tokenizer_path=str(path), **NET)
    NextScaleGenerator(tokenizer_path=str(path), **NET)  # the scale tokenizer is the next-scale generator's


def test_named_sizes_reuse_the_next_scale_transformer():
    with torch.device("meta"):
        nfig, var = arzoo.create_generator("nfig-d20"), arzoo.create_generator("var-d20")
    assert type(nfig.net) is type(var.net) and nfig.num_params() == var.num_params() == 600_917_136
    with pytest.raises(ValueError, match="band_grids or patch_nums, not both"):
        NextFrequencyGenerator(band_grids=[1, 2], patch_nums=[1, 2], vocab_size=8, codebook_dim=4)


@pytest.mark.parametrize("recipe", ["digits/next_frequency.yaml", "imagenet256/nfig_d20.yaml"])
def test_recipes_parse(recipe, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])
    with pytest.raises(SystemExit) as exit_info:
        arzoo_run(["fit", "--config", str(ROOT / "recipes" / recipe), "--print_config"])
    assert exit_info.value.code == 0
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"].endswith("NextFrequencyGenerator")
    if recipe.startswith("imagenet256"):
        args = dict(model["init_args"], tokenizer_path=None, vocab_size=4096, codebook_dim=32,
                    band_grids=[1, 2, 3, 4, 5, 6, 8, 10, 13, 16])
        with torch.device("meta"):
            assert NextFrequencyGenerator(**args).num_params() == 600_917_136
