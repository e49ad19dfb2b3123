"""User mistakes and hostile files through the real command: `python -m arzoo ...` in a subprocess.

Each case asserts the exit code (2: a usage mistake, 1: any other failure), that the last line of
stderr is arzoo's one-line message naming the value, and that no traceback is shown. The malicious
module tests put an `evil.py` that writes a marker file beside a checkpoint (or export) that names
it, run the command from that folder (so the module is importable) and check the marker is absent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from arzoo.checkpoint_plugin import AtomicCheckpointIO
from arzoo.data import ImageDataModule
from arzoo.generators import RasterGenerator
from arzoo.tokenizers import VQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_VQ = dict(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
               decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
TINY_NET = dict(dim=32, n_layer=1, n_head=2, multiple_of=32, warmup_steps=0)
EVIL = "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('code ran')\nclass X: pass\n"


def arzoo(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m arzoo *args` in `cwd`, as a user would."""
    environ = {k: v for k, v in os.environ.items() if k != "ARZOO_DEBUG"}
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "arzoo", *args], cwd=cwd, capture_output=True, text=True,
                          env=environ, timeout=300, stdin=subprocess.DEVNULL)


def fails(result: subprocess.CompletedProcess, code: int, pattern: str) -> str:
    """Assert a one-line failure: exit `code`, last stderr line matching `pattern`, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines and re.search(pattern, lines[-1]), result.stderr[-3000:]
    assert "weights_only=False" not in result.stderr  # never torch's advice to unpickle
    return lines[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny tokenizer, a raster generator checkpoint on it, and a recipe that trains such a generator."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    tok = save_tokenizer_checkpoint(VQTokenizer(**TINY_VQ), root / "vq.ckpt")
    model = RasterGenerator(tokenizer_path=str(tok), **TINY_NET)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=root, plugins=[AtomicCheckpointIO()])  # checksummed, as `arzoo fit` writes
    trainer.fit(model, ImageDataModule(image_size=16, batch_size=8))
    trainer.save_checkpoint(root / "raster.ckpt")
    recipe = yaml.safe_load((ROOT / "recipes/digits/raster.yaml").read_text())
    recipe["trainer"].update(max_epochs=1, limit_train_batches=2, limit_val_batches=0, log_every_n_steps=1)
    recipe["trainer"]["callbacks"] = recipe["trainer"]["callbacks"][:2]  # progress bar + checkpoint, no grids
    recipe["model"]["init_args"].update(tokenizer_path=str(tok), **TINY_NET)
    recipe["data"]["init_args"].update(image_size=16, batch_size=8)
    (root / "raster.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": root, "tokenizer": tok, "generator": root / "raster.ckpt", "recipe": root / "raster.yaml"}


def _copy(src: Path, dst: Path, edit=None) -> Path:
    data = src.read_bytes()
    dst.write_bytes(edit(data) if edit else data)
    return dst


# ---- arzoo sample: arguments, output file, checkpoints ------------------------------------------


@pytest.mark.parametrize(
    "args, code, pattern",
    [
        (["--num", "0"], 2, r"num must be a positive number of images, got 0"),
        (["--batch_size", "0"], 2, r"batch_size must be positive, got 0"),
        (["--labels", "[1, 12]"], 2, r"class id 12 is out of range"),
        (["--labels", "[]"], 2, r"labels must list at least one class id"),
        (["--cfg", "-0.5"], 2, r"cfg must be >= 0 \(1 = no guidance\), got -0.5"),
        (["--top_p", "0"], 2, r"top_p must be in \(0, 1\], got 0"),
        (["--top_k", "0"], 2, r"top_k must be between 1 and the vocabulary size 32, got 0"),
        (["--temperature", "-1"], 2, r"temperature must be > 0"),
        (["--options", '{"nope": 1}'], 2, r"options \['nope'\] are not arguments of RasterGenerator.generate\(\)"),
        (["--out", ""], 2, r"--out is empty; give an image file name"),
        (["--out", "."], 2, r"--out '.' is a folder"),
        (["--out", "grid.gif"], 2, r"--out 'grid.gif' has extension '.gif'; expected one of .*\.jpg.*\.png"),
        (["--out", "vq.ckpt/grid.png"], 2, r"'vq.ckpt' is a file, not a folder"),
    ],
    ids=["num", "batch", "class-id", "no-labels", "cfg", "top_p", "top_k", "temperature", "options", "out-empty",
         "out-folder", "out-extension", "out-parent-file"],
)
def test_sample_argument_mistakes(files, args, code, pattern):
    fails(arzoo("sample", "--ckpt_path", str(files["generator"]), *args, cwd=files["root"]), code, pattern)


def test_sample_out_is_checked_before_any_sampling(files):
    """A bad --out costs nothing: it is refused before the checkpoint is even read."""
    fails(arzoo("sample", "--ckpt_path", "missing.ckpt", "--out", "", cwd=files["root"]), 2, "--out is empty")


@pytest.mark.parametrize(
    "make, code, pattern",
    [
        (lambda f, d: d / "missing.ckpt", 2, r"generator checkpoint .*missing.ckpt.* does not exist"),
        (lambda f, d: f["tokenizer"], 2, r"is a tokenizer checkpoint, but a generator checkpoint is needed"),
        (lambda f, d: _copy(f["generator"], d / "cut.ckpt", lambda b: b[: len(b) // 2]), 1, r"cut.ckpt.* could not be read"),
        (lambda f, d: _copy(f["generator"], d / "empty.ckpt", lambda b: b""), 1, r"empty.ckpt.* could not be read.*empty"),
        (lambda f, d: d, 2, r"is a folder, not a checkpoint file"),
    ],
    ids=["missing", "tokenizer", "truncated", "empty", "folder"],
)
def test_sample_checkpoint_mistakes(files, tmp_path, make, code, pattern):
    fails(arzoo("sample", "--ckpt_path", str(make(files, tmp_path)), "--num", "2", cwd=tmp_path), code, pattern)


def test_flipped_bytes_are_caught_by_the_checksum(files, tmp_path):
    """A few KiB flipped in the middle of the weights: the checkpoint is refused, not sampled from."""
    state = torch.load(files["generator"], weights_only=True)
    name = max(state["state_dict"], key=lambda k: state["state_dict"][k].numel())
    state["state_dict"][name] = state["state_dict"][name].clone()
    state["state_dict"][name].view(-1)[:1024] += 1.0  # what bit rot or a bad copy does to the tensor data
    torch.save(state, tmp_path / "flipped.ckpt")  # keeps the old checksum, as a damaged copy would
    fails(arzoo("sample", "--ckpt_path", str(tmp_path / "flipped.ckpt"), cwd=tmp_path), 1,
          r"flipped.ckpt. is damaged: its content does not match the checksum written with it")


def test_sample_writes_the_format_of_the_extension_with_the_umask_mode(files, tmp_path):
    result = arzoo("sample", "--ckpt_path", str(files["generator"]), "--num", "15", "--out", "out/grid.jpg",
                   cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    path = tmp_path / "out/grid.jpg"
    assert path.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG bytes in a .jpg (the parent folder was created)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    from PIL import Image

    with Image.open(path) as image:  # 10 rows (one per class) of 2 images (15 = 5 x 2 + 5 x 1, padded)
        assert image.size == (2 * (16 + 2) * 4 + 2 * 4, 10 * (16 + 2) * 4 + 2 * 4)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- malicious modules: nothing a file names is imported ---------------------------------------


def test_checkpoint_naming_a_module_beside_it_is_refused(files, tmp_path):
    (tmp_path / "evil.py").write_text(EVIL)
    state = torch.load(files["generator"], weights_only=True)
    state.pop("arzoo_checksum", None)
    key = next(k for k, v in state.items() if isinstance(v, str) and v.endswith("RasterGenerator"))
    state[key] = "evil.X"
    torch.save(state, tmp_path / "model.ckpt")
    fails(arzoo("sample", "--ckpt_path", "model.ckpt", cwd=tmp_path), 1,
          r"'evil.X' .* is not an arzoo class .*--plugin evil")
    assert not (tmp_path / "IMPORTED").exists()


def test_ckpt_path_hyper_parameters_naming_a_module_are_refused(files, tmp_path):
    (tmp_path / "evil.py").write_text(EVIL)
    state = torch.load(files["generator"], weights_only=True)
    state.pop("arzoo_checksum", None)
    state["hyper_parameters"]["_class_path"] = "evil.X"
    torch.save(state, tmp_path / "model.ckpt")
    for verb in ("validate", "fit"):
        fails(arzoo(verb, "--config", str(files["recipe"]), "--ckpt_path", "model.ckpt", cwd=tmp_path), 1,
              r"'evil.X' .* is not an arzoo class")
    assert not (tmp_path / "IMPORTED").exists()


def test_export_config_naming_a_module_is_refused(files, tmp_path):
    assert arzoo("export", "--ckpt_path", str(files["generator"]), "--out", "export", cwd=tmp_path).returncode == 0
    (tmp_path / "evil.py").write_text(EVIL)
    config_path = tmp_path / "export/config.json"
    config = json.loads(config_path.read_text())
    config["class_path"] = "evil.X"
    config_path.write_text(json.dumps(config))
    result_api = subprocess.run([sys.executable, "-c", "import arzoo; arzoo.from_pretrained('export')"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result_api.returncode != 0 and re.search(r"'evil.X' .* is not an arzoo class", result_api.stderr)
    assert not (tmp_path / "IMPORTED").exists()


def test_a_plugin_the_user_names_is_imported(files, tmp_path):
    """The way to allow a module is the user's own flag, and a bad one is one line."""
    fails(arzoo("--plugin", "no_such_module", "sample", "--ckpt_path", "x.ckpt", cwd=tmp_path), 2,
          r"--plugin 'no_such_module' could not be imported")


# ---- arzoo fit / validate ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--model.init_args.class_dropout_prob", "1.0"], r"class_dropout_prob must be in \[0, 1\), got 1.0"),
        (["--model.init_args.min_lr_ratio", "-0.5"], r"min_lr_ratio must be in \[0, 1\] .*, got -0.5"),
        (["--model.init_args.lr", "-1"], r"lr must be a positive number, got -1"),
        (["--model.init_args.betas", "[1.5, 0.9]"], r"betas must be two numbers in \[0, 1\) .*, got \[1.5, 0.9\]"),
        (["--data.init_args.num_workers", "-1"], r"num_workers must be an int >= 0 .*, got -1"),
        (["--data.init_args.source", "folder:vq.ckpt"], r"image folder 'vq.ckpt' .* is a file"),
    ],
    ids=["dropout", "min_lr_ratio", "lr", "betas", "num_workers", "folder-is-file"],
)
def test_fit_value_mistakes_end_in_the_constructors_message(files, args, pattern):
    fails(arzoo("fit", "--config", str(files["recipe"]), *args, cwd=files["root"]), 2, pattern)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--model.init_args.depthh", "3"], r"Parser key \"model\": arzoo.generators.RasterGenerator: Option 'depthh' is "
                                            r"not accepted$"),
        (["--model.init_args.dim", "x"], r"arzoo.generators.RasterGenerator: Parser key \"dim\": Expected a <class 'int'>"),
        (["--trainer.max_steps", "abc"], r"Parser key \"trainer.max_steps\": Expected a <class 'int'>. Got value: abc"),
        (["--model.init_args.inter_scale", "mamba"], r"Option 'inter_scale' is not accepted \(M-VAR is now its own "
                                                     r"class: class_path: arzoo.generators.MambaScaleGenerator"),
    ],
    ids=["unknown-key", "wrong-type", "trainer-type", "old-m-var-recipe"],
)
def test_fit_parse_mistakes_are_one_line_not_the_union_dump(files, args, pattern):
    result = arzoo("fit", "--config", str(files["recipe"]), *args, "--print_config", cwd=files["root"])
    fails(result, 2, pattern)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # no usage text, no Union dump


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda b: b[: len(b) // 2], r"cut.ckpt.* could not be read"),
        (lambda b: b"", r"cut.ckpt.* could not be read"),
    ],
    ids=["truncated", "empty"],
)
def test_fit_ckpt_path_that_cannot_be_read(files, tmp_path, edit, pattern):
    _copy(files["generator"], tmp_path / "cut.ckpt", edit)
    fails(arzoo("fit", "--config", str(files["recipe"]), "--ckpt_path", "cut.ckpt", cwd=tmp_path), 1, pattern)


def test_fit_ckpt_path_with_a_code_payload(files, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'IMPORTED'}",))

    torch.save({"state_dict": {}, "extra": Payload()}, tmp_path / "evil.ckpt")
    fails(arzoo("fit", "--config", str(files["recipe"]), "--ckpt_path", "evil.ckpt", cwd=tmp_path), 1,
          r"could not be read: it pickles objects other than tensors")
    assert not (tmp_path / "IMPORTED").exists()


def test_validate_a_generator_checkpoint_with_a_tokenizer_recipe_is_refused(files, tmp_path):
    recipe = str(ROOT / "recipes/digits/tokenizer_vq.yaml")
    fails(arzoo("validate", "--config", recipe, "--ckpt_path", str(files["generator"]), cwd=tmp_path), 2,
          r"raster.ckpt' holds a RasterGenerator .*, but the recipe builds a TokenizerModule")


def test_unreadable_data_trains_nothing(files, tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "imgs" / cls / f"{i}.png").write_bytes(b"not a png")
    fails(arzoo("fit", "--config", str(files["recipe"]), "--data.init_args.source", "folder:imgs", cwd=tmp_path),
          1, r"no training image of source 'folder:imgs' could be read: \d+ unreadable image\(s\) skipped")
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_folder_with_one_class_subfolder_says_so(files, tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "cats").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / "imgs" / "cats" / f"{i}.png")
    fails(arzoo("fit", "--config", str(files["recipe"]), "--data.init_args.source", "folder:imgs", cwd=tmp_path),
          2, r"has a single class sub-folder \('cats'\)")


def test_an_output_folder_that_cannot_be_written_is_named(files, tmp_path):
    (tmp_path / "blocked").write_text("a file where the run folder should be")
    fails(arzoo("fit", "--config", str(files["recipe"]), "--trainer.callbacks.dirpath", "blocked/run",
                "--trainer.logger.init_args.save_dir", "blocked/logs", cwd=tmp_path), 2,
          r"cannot create .*blocked/(logs|run).*: .*blocked. is a file, not a folder")


def test_rerun_replaces_last_ckpt_and_honours_overrides_with_ckpt_path(files, tmp_path):
    """A second fit of the same recipe replaces last.ckpt (no last-v1.ckpt); with --ckpt_path the command
    line's model arguments are kept (the checkpoint's differing ones are only reported)."""
    run = ["fit", "--config", str(files["recipe"]), "--trainer.enable_progress_bar", "false"]
    assert arzoo(*run, cwd=tmp_path).returncode == 0
    last = tmp_path / "runs/digits/raster/last.ckpt"
    first = torch.load(last, weights_only=True)["global_step"]
    result = arzoo(*run, "--trainer.max_epochs", "2", "--ckpt_path", str(last),
                   "--model.init_args.class_dropout_prob", "0.5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] > first and not (last.parent / "last-v1.ckpt").exists()
    assert saved["hyper_parameters"]["class_dropout_prob"] == 0.5
    assert arzoo(*run, cwd=tmp_path).returncode == 0 and not (last.parent / "last-v1.ckpt").exists()


# ---- token caches, bench suites, the command line ----------------------------------------------


def test_corrupt_token_caches_name_the_file(files, tmp_path):
    from arzoo.data.token_cache import write_token_cache

    batches = [{"image": torch.zeros(4, 3, 16, 16), "label": torch.arange(4)}]
    cache = write_token_cache(batches, lambda x: torch.full((len(x), 16), 40), tmp_path / "cache", flips=False,
                              vocab_size=32, meta={"source": "digits", "image_size": 16})
    args = ["fit", "--config", str(files["recipe"]), "--data.init_args.token_cache", str(cache)]
    fails(arzoo(*args, cwd=tmp_path), 1, r"holds token id 40 .*outside the tokenizer's vocabulary \[0, 32\)")
    meta = cache / "token_cache.json"
    meta.write_text(meta.read_text()[:20])
    fails(arzoo(*args, cwd=tmp_path), 1, r"token_cache.json.* could not be read \(cut or corrupt JSON")


@pytest.mark.parametrize(
    "suite, pattern",
    [
        ("evalution: {num_samples: 3}\n", r"unknown key 'evalution' \(did you mean 'evaluation'\?\)"),
        ("budget: {train_images: true}\n", r"key 'train_images': Value 'True' of type 'bool'"),
    ],
    ids=["unknown-key", "bool-budget"],
)
def test_bench_suite_schema_through_the_command(tmp_path, suite, pattern):
    body = "name: t\nbudget: {train_images: 64}\nentries: [{name: a, recipe: recipes/digits/raster.yaml}]\n"
    lines = dict(line.split(":", 1) for line in body.splitlines())
    lines.update(dict(line.split(":", 1) for line in suite.splitlines()))
    (tmp_path / "s.yaml").write_text("\n".join(f"{k}:{v}" for k, v in lines.items()) + "\n")
    fails(arzoo("bench", "--suite", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), cwd=ROOT), 2, pattern)


def test_debug_shows_the_traceback(files, tmp_path):
    result = arzoo("--debug", "sample", "--ckpt_path", "missing.ckpt", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" in result.stderr
    result = arzoo("sample", "--ckpt_path", "missing.ckpt", cwd=tmp_path, env={"ARZOO_DEBUG": "1"})
    assert "Traceback" in result.stderr
