"""TokenizerModule through the `arzoo` CLI: fit, validate, test, predict, --print_config, reloading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from arzoo.cli import run as arzoo_run
from arzoo.tokenizers import MultiScaleVQTokenizer, TokenizerModule, VQTokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"vq": ROOT / "recipes/digits/tokenizer_vq.yaml", "msvq": ROOT / "recipes/digits/tokenizer_msvq.yaml"}
KINDS = {"vq": VQTokenizer, "msvq": MultiScaleVQTokenizer}
EVAL = ["--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1"]
QUICK = ["--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--trainer.limit_train_batches", "2", "--trainer.check_val_every_n_epoch", "1",
         *EVAL]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when sys.argv (pytest's) and args are both given."""
    monkeypatch.setattr(sys, "argv", ["arzoo"])


@pytest.mark.parametrize("name", ["vq", "msvq"])
def test_fit_writes_checkpoint_grid_and_reloads(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    arzoo_run(["fit", "--config", str(RECIPES[name]), *QUICK])
    run = tmp_path / f"runs/digits/tokenizer_{name}"
    logs = run / "version_0"
    assert (run / "last.ckpt").is_file() and (logs / "recon.png").is_file() and (logs / "config.yaml").is_file()
    assert "version_0/recon.png" in capsys.readouterr().out
    metrics = (logs / "metrics.csv").read_text()
    assert "train/loss" in metrics and "val/psnr" in metrics and "val/codebook_usage" in metrics

    tokenizer = load_tokenizer(run / "last.ckpt", expected=KINDS[name])
    assert isinstance(tokenizer, KINDS[name]) and not tokenizer.training
    assert not any(p.requires_grad for p in tokenizer.parameters())
    ckpt = torch.load(run / "last.ckpt", weights_only=True)
    saved = {k.removeprefix("tokenizer."): v for k, v in ckpt["state_dict"].items() if k.startswith("tokenizer.")}
    for key, value in tokenizer.state_dict().items():
        assert torch.equal(value, saved[key]), key
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    maps = tokenizer.encode(images)
    assert [tuple(m.shape[1:]) for m in maps] == list(tokenizer.scales)
    assert tokenizer.decode(maps).shape == images.shape

    # the other verbs, from the same recipe and checkpoint; a second run in the folder must not fail
    for verb in ("validate", "test", "predict"):
        arzoo_run([verb, "--config", str(RECIPES[name]), "--ckpt_path", str(run / "last.ckpt"), *EVAL])
    # a new fit in the same folder (config.yaml already there) works, and resumes from the checkpoint
    arzoo_run(["fit", "--config", str(RECIPES[name]), *QUICK, "--trainer.max_steps", "6",
          "--ckpt_path", str(run / "last.ckpt")])
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 6
    assert (logs / "metrics.csv").read_text() == metrics  # later runs log elsewhere, nothing is deleted


def test_wrong_tokenizer_kind_and_missing_checkpoint(tmp_path):
    module = TokenizerModule(VQTokenizer(image_size=16, codebook_size=8, codebook_embed_dim=4,
                                         encoder_ch_mult=[1, 1], decoder_ch_mult=[1, 1], z_channels=32, ch=32,
                                         num_res_blocks=1))
    path = tmp_path / "vq.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams),
                "state_dict": {f"tokenizer.{k}": v for k, v in module.tokenizer.state_dict().items()}}, path)
    assert isinstance(load_tokenizer(path, expected=VQTokenizer), VQTokenizer)
    with pytest.raises(TypeError, match="holds a VQTokenizer, but a MultiScaleVQTokenizer is required"):
        load_tokenizer(path, expected=MultiScaleVQTokenizer)
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_tokenizer(tmp_path / "nowhere.ckpt")
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.ckpt.*could not be read"):
        load_tokenizer(tmp_path / "garbage.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an arzoo tokenizer checkpoint"):
        load_tokenizer(tmp_path / "other.ckpt")


def test_data_and_tokenizer_image_size_must_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(RECIPES["vq"]), *QUICK, "--model.init_args.tokenizer.init_args.image_size", "16"]
    with pytest.raises(ValueError, match="image_size is 32 but the tokenizer was built for image_size 16"):
        arzoo_run(args)


def test_print_config_resolves_interpolation(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        arzoo_run(["fit", "--config", str(RECIPES["msvq"]), "--data.init_args.image_size", "64",
              "--model.init_args.tokenizer.init_args.patch_nums", "[1,2,4,8,16]", "--print_config"])
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    tok = config["model"]["init_args"]["tokenizer"]
    assert tok["class_path"].endswith("MultiScaleVQTokenizer")
    assert tok["init_args"]["image_size"] == 64 and tok["init_args"]["patch_nums"] == [1, 2, 4, 8, 16]


def test_python_dash_m_arzoo_help():
    out = subprocess.run([sys.executable, "-m", "arzoo", "fit", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--trainer.max_steps" in out.stdout
