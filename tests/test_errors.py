"""The catalogue of user mistakes: each raises a clear error naming the value and what was expected.

One test per mistake (README "Common errors" lists the same cases), grouped as config, data,
checkpoints, sampling arguments and the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import pytest
import torch

import arzoo
from arzoo.checkpoint_plugin import AtomicCheckpointIO
from arzoo.cli import run as arzoo_run
from arzoo.data import ImageDataModule
from arzoo.generators import RasterGenerator
from arzoo.tokenizers import MultiScaleVQTokenizer, TokenizerModule, VQTokenizer, load_tokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

TINY_VQ = dict(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
               decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
TINY_NET = dict(dim=32, n_layer=1, n_head=2, multiple_of=32, warmup_steps=0)


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A tiny VQ tokenizer checkpoint and a raster generator checkpoint (1 training step) on it."""
    root = tmp_path_factory.mktemp("errors")
    torch.manual_seed(0)
    tok = save_tokenizer_checkpoint(VQTokenizer(**TINY_VQ), root / "vq.ckpt")
    model = RasterGenerator(tokenizer_path=str(tok), **TINY_NET)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root)
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=8))
    trainer.save_checkpoint(root / "raster.ckpt")
    return {"tokenizer": tok, "generator": root / "raster.ckpt"}


@pytest.fixture(scope="module")
def model(ckpts) -> RasterGenerator:
    return RasterGenerator(tokenizer_path=str(ckpts["tokenizer"]), **TINY_NET)


# ---- config ------------------------------------------------------------------------------------


def test_unknown_named_generator_size():
    with pytest.raises(KeyError, match="unknown generator 'raster-huge'; registered names: .*raster-b"):
        arzoo.create_generator("raster-huge")


def test_generator_configured_for_another_vocabulary(ckpts):
    with pytest.raises(ValueError, match="vocab_size 64, but the tokenizer .*vq.ckpt.* has vocab_size 32"):
        RasterGenerator(tokenizer_path=str(ckpts["tokenizer"]), vocab_size=64, **TINY_NET)


def test_tokenizer_of_the_wrong_kind_for_the_generator(tmp_path):
    msvq = MultiScaleVQTokenizer(image_size=16, vocab_size=32, z_channels=32, ch=32, ch_mult=[1, 1, 1],
                                 num_res_blocks=1, patch_nums=[1, 2, 4])
    path = save_tokenizer_checkpoint(msvq, tmp_path / "msvq.ckpt")
    with pytest.raises(ValueError, match=r"single square token grid.*\(1, 1\), \(2, 2\), \(4, 4\)"):
        RasterGenerator(tokenizer_path=str(path), **TINY_NET)


def test_tokenizer_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer checkpoint .*no-such-tokenizer.ckpt.* does not exist"):
        RasterGenerator(tokenizer_path=str(tmp_path / "no-such-tokenizer.ckpt"), **TINY_NET)


def test_generator_checkpoint_given_as_tokenizer_path(ckpts):
    with pytest.raises(ValueError, match="raster.ckpt.* is a generator checkpoint .*tokenizer checkpoint is needed"):
        RasterGenerator(tokenizer_path=str(ckpts["generator"]), **TINY_NET)


def test_generator_without_tokenizer_or_sizes():
    with pytest.raises(ValueError, match="needs a tokenizer_path, or explicit vocab_size and grid sizes"):
        RasterGenerator(**TINY_NET)


def test_tokenizer_widths_that_groupnorm_cannot_split():
    with pytest.raises(ValueError, match="channel count 16 is not a multiple of 32"):
        VQTokenizer(**{**TINY_VQ, "ch": 16, "z_channels": 16})


def test_image_size_not_divisible_by_the_downsampling():
    with pytest.raises(ValueError, match="image_size 18 is not divisible by .* downsampling factor 4.*e.g. 16 or 20"):
        VQTokenizer(**{**TINY_VQ, "image_size": 18})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_dropout_prob=1.0), r"class_dropout_prob must be in \[0, 1\), got 1.0"),
        (dict(ema_decay=1.5), r"ema_decay must be in \[0, 1\) \(0 disables EMA\), got 1.5"),
        (dict(num_classes=0), "num_classes must be >= 1, got 0"),
    ],
)
def test_generator_hyper_parameter_out_of_range(ckpts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        RasterGenerator(tokenizer_path=str(ckpts["tokenizer"]), **TINY_NET, **kwargs)


def test_unknown_reconstruction_loss():
    with pytest.raises(ValueError, match="rec_loss must be 'l1', 'l2' or 'l1\\+l2', got 'l3'"):
        TokenizerModule(VQTokenizer(**TINY_VQ), rec_loss="l3")


# ---- data --------------------------------------------------------------------------------------


def test_unknown_data_source():
    with pytest.raises(ValueError, match="unknown data source 'mnist'; expected 'digits'.*'hf:<dataset name>'"):
        ImageDataModule(source="mnist")


def test_data_folder_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder .*missing-folder.* does not exist"):
        ImageDataModule(source=f"folder:{tmp_path / 'missing-folder'}").setup()


def test_data_folder_without_images(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no pictures")
    with pytest.raises(ValueError, match="contains no images"):
        ImageDataModule(source=f"folder:{tmp_path}").setup()


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=0), "batch_size must be positive, got 0"),
    (dict(image_size=-32), "image_size must be a positive number of pixels, got -32"),
])
def test_data_sizes_that_are_not_positive(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageDataModule(**kwargs)


def test_validation_fraction_out_of_range():
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        ImageDataModule(image_size=8, val_fraction=1.5).setup()


def test_data_image_size_differs_from_the_tokenizer(tmp_path):
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="image_size is 32 but the tokenizer was built for image_size 16"):
        trainer.fit(TokenizerModule(VQTokenizer(**TINY_VQ)), ImageDataModule(image_size=32))


def test_images_of_the_wrong_size_for_the_generator(model):
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 16, 16\).*got \(2, 3, 32, 32\)"):
        model.tokenize(torch.zeros(2, 3, 32, 32))


def test_unlabelled_data_for_a_class_conditional_generator(model):
    with pytest.raises(ValueError, match=r"no class labels \(label -1\).*class-conditional"):
        model.training_step({"image": torch.zeros(2, 3, 16, 16), "label": torch.tensor([-1, -1])}, 0)


# ---- checkpoints -------------------------------------------------------------------------------


def test_checkpoint_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="garbage.ckpt.* could not be read: it is not a readable torch checkpoint"):
        load_tokenizer(tmp_path / "garbage.ckpt")


def test_truncated_checkpoint(ckpts, tmp_path):
    data = ckpts["generator"].read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])  # a copy interrupted half-way
    with pytest.raises(ValueError, match="cut.ckpt.* could not be read"):
        arzoo.Generator.load_from_checkpoint(tmp_path / "cut.ckpt")


def test_tokenizer_checkpoint_given_to_arzoo_sample(ckpts):
    with pytest.raises(ValueError, match="vq.ckpt.* is a tokenizer checkpoint, but a generator checkpoint is needed"):
        arzoo_run(["sample", "--ckpt_path", str(ckpts["tokenizer"])])


def test_sample_checkpoint_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="generator checkpoint .*missing.ckpt.* does not exist"):
        arzoo_run(["sample", "--ckpt_path", str(tmp_path / "missing.ckpt")])


def test_resume_from_a_checkpoint_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint .*gone.ckpt.* does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "gone.ckpt")  # what `fit --ckpt_path` calls


def test_checkpoint_that_would_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))

    torch.save({"state_dict": {}, "extra": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="pickles objects other than tensors .*re-save just its state dict"):
        load_tokenizer(tmp_path / "evil.ckpt")


def test_export_of_a_checkpoint_arzoo_did_not_write(tmp_path):
    torch.save({"state_dict": {"w": torch.ones(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="neither an arzoo generator checkpoint .* nor a tokenizer checkpoint"):
        arzoo_run(["export", "--ckpt_path", str(tmp_path / "other.ckpt"), "--out", str(tmp_path / "out")])


def test_from_pretrained_on_a_folder_that_is_no_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json; expected the output of `arzoo export"):
        arzoo.from_pretrained(tmp_path)


# ---- sampling arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels_B=[10]), r"class id 10 is out of range: .*num_classes=10 \(valid ids 0..9\)"),
        (dict(labels_B=[1], top_k=0), "top_k must be between 1 and the vocabulary size 32, got 0"),
        (dict(labels_B=[1], top_k=33), "top_k must be between 1 and the vocabulary size 32, got 33"),
        (dict(labels_B=[1], top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
        (dict(labels_B=[1], temperature=-1.0), "temperature must be > 0"),
        (dict(labels_B=[1], cfg=-0.5), r"cfg must be >= 0 \(1 = no guidance\), got -0.5"),
        (dict(labels_B=[]), "at least one label"),
    ],
    ids=["class-id", "top_k-0", "top_k-too-big", "top_p", "temperature", "cfg", "no-labels"],
)
def test_bad_sampling_argument(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        model.generate(**kwargs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num", "0"], "num must be a positive number of images, got 0"),
        (["--batch_size", "0"], "batch_size must be positive, got 0"),
        (["--labels", "[]"], r"labels must list at least one class id .*got \[\]"),
        (["--labels", "[1, 12]"], "class id 12 is out of range"),
    ],
)
def test_bad_arzoo_sample_argument(ckpts, args, message):
    with pytest.raises(ValueError, match=message):
        arzoo_run(["sample", "--ckpt_path", str(ckpts["generator"]), *args])


def test_sampling_images_without_a_tokenizer():
    bare = RasterGenerator(vocab_size=32, grid_size=4, **TINY_NET)
    with pytest.raises(RuntimeError, match="RasterGenerator has no tokenizer: build it with tokenizer_path"):
        bare.sample_images([1])


# ---- the command line --------------------------------------------------------------------------


def _cli_error(args: list[str], capsys) -> str:
    from arzoo.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_unknown_subcommand(capsys):
    assert "invalid choice: 'fitt' (choose from 'fit', 'validate', 'test', 'predict')" in _cli_error(["fitt"], capsys)


def test_recipe_file_that_does_not_exist(capsys):
    assert "File does not exist: " in _cli_error(["fit", "--config", "no/such/recipe.yaml"], capsys)


def test_model_class_path_that_does_not_exist(capsys):
    err = _cli_error(["fit", "--model.class_path", "arzoo.generators.Nope"], capsys)
    assert "arzoo.generators.Nope: module 'arzoo.generators' has no attribute 'Nope'" in err


def test_labels_that_are_not_a_list(ckpts, capsys):
    err = _cli_error(["sample", "--ckpt_path", str(ckpts["generator"]), "--labels", "3"], capsys)
    assert "labels" in err and "Expected a <class 'list'>" in err and "Given value: 3" in err
