"""The benchmark harness's pieces: suite parsing and hashing, budgets, leaderboard files, plots."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from arzoo.bench.leaderboard import markdown, ranked, write_leaderboard
from arzoo.bench.plots import scatter_svg
from arzoo.bench.suite import Budget, load_suite, resolve_suite_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # suites name recipes relative to the repository root


def write_suite(tmp_path: Path, **fields) -> Path:
    suite = {
        "name": "t",
        "budget": {"train_images": 640},
        "tokenizers": {"vq": {"recipe": "recipes/digits/tokenizer_vq.yaml"}},
        "entries": [{"name": "raster", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq"}],
    }
    suite.update(fields)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_named_suites_resolve_and_parse() -> None:
    for name in ("quick", "digits"):
        suite = load_suite(name)
        assert suite.path == resolve_suite_path(name)
        assert {r.tokenizer for r in suite.entries} <= set(suite.tokenizers)
        for run in suite.entries:
            # every generator entry is pointed at its suite tokenizer's run folder
            tok = suite.tokenizers[run.tokenizer]
            assert run.config["model"]["init_args"]["tokenizer_path"] == f"tokenizers/{tok.folder_name}/last.ckpt"
            assert "logger" not in run.config["trainer"] and "callbacks" not in run.config["trainer"]


def test_unknown_suite_names_the_known_ones() -> None:
    with pytest.raises(FileNotFoundError, match=r"no suite named 'nope'.*quick"):
        load_suite("nope")


def test_budget_in_images_sets_max_steps_from_the_batch_size(tmp_path: Path) -> None:
    suite = load_suite(str(write_suite(tmp_path, budget={"train_images": 650})))
    trainer = suite.entries[0].config["trainer"]
    assert trainer["max_steps"] == 11 and trainer["max_epochs"] == -1  # ceil(650 / 64)
    wall = load_suite(str(write_suite(tmp_path, budget={"wall_clock_s": 30})))
    assert wall.entries[0].config["trainer"]["max_time"] == {"seconds": 30}
    assert wall.tokenizers["vq"].config["trainer"]["max_time"] == {"seconds": 30}  # tokenizer_budget defaults to budget


@pytest.mark.parametrize("budget", [{}, {"train_images": 1, "wall_clock_s": 1}, {"epochs": 3}, {"train_images": 0}])
def test_bad_budgets_are_refused(budget: dict) -> None:
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(budget, "budget")


def test_hash_is_stable_and_follows_overrides(tmp_path: Path) -> None:
    a = load_suite(str(write_suite(tmp_path)))
    b = load_suite(str(write_suite(tmp_path)))
    assert a.entries[0].folder_name == b.entries[0].folder_name
    over = load_suite(
        str(write_suite(tmp_path, entries=[{"name": "raster", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq",
                                            "overrides": {"model.init_args.n_layer": 2}}]))
    )
    assert over.entries[0].config["model"]["init_args"]["n_layer"] == 2
    assert over.entries[0].config_hash != a.entries[0].config_hash
    assert over.tokenizers["vq"].config_hash == a.tokenizers["vq"].config_hash  # the shared tokenizer is reused


def test_two_stage_entries_share_one_budget(tmp_path: Path) -> None:
    first = {"name": "s1", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq", "budget_share": 0.75, "evaluate": False}
    second = {"name": "s2", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq", "budget_share": 0.25, "init_from": "s1"}
    suite = load_suite(str(write_suite(tmp_path, budget={"train_images": 6400}, entries=[first, second])))
    s1, s2 = suite.entries
    assert (s1.config["trainer"]["max_steps"], s2.config["trainer"]["max_steps"]) == (75, 25)
    assert not s1.evaluate and s2.evaluate
    assert s2.config["model"]["init_args"]["init_from"] == f"entries/{s1.folder_name}/last.ckpt"
    with pytest.raises(ValueError, match=r"starts from 's1', which is not an earlier entry"):
        load_suite(str(write_suite(tmp_path, entries=[second, first])))
    with pytest.raises(ValueError, match="budget_share 2.0"):
        load_suite(str(write_suite(tmp_path, entries=[dict(first, budget_share=2.0)])))


def test_suite_mistakes_name_the_entry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"entry 'raster' uses tokenizer 'msvq'.*\['vq'\]"):
        load_suite(str(write_suite(tmp_path, entries=[{"name": "raster", "recipe": "recipes/digits/raster.yaml", "tokenizer": "msvq"}])))
    with pytest.raises(FileNotFoundError, match="recipes/digits/nope.yaml"):
        load_suite(str(write_suite(tmp_path, entries=[{"name": "x", "recipe": "recipes/digits/nope.yaml"}])))
    with pytest.raises(ValueError, match=r"evaluation has unknown key 'cfgg' \(did you mean 'cfg'\?\)"):
        load_suite(str(write_suite(tmp_path, evaluation={"cfgg": 2})))
    with pytest.raises(ValueError, match="unique `name`"):
        entry = {"name": "a", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq"}
        load_suite(str(write_suite(tmp_path, entries=[entry, entry])))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(evalution={"num_samples": 3}), r"suite .* has unknown key 'evalution' \(did you mean 'evaluation'\?\)"),
        (dict(budget={"train_images": True}), r"budget: key 'train_images': Value 'True' of type 'bool' could not"),
        (dict(budget={"train_images": 64, "wall_clock_s": 3}), "exactly one of train_images / wall_clock_s"),
        (dict(budget={"images": 64}), r"budget has unknown key 'images'"),
        (dict(evaluation={"num_samples": "lots"}), r"evaluation: key 'num_samples': Value 'lots' of type 'str'"),
        (dict(entries=[{"name": "a", "recipe": "recipes/digits/raster.yaml", "tokenizr": "vq"}]),
         r"entry 'a' has unknown key 'tokenizr' \(did you mean 'tokenizer'\?\)"),
        (dict(entries=[{"recipe": "recipes/digits/raster.yaml"}]), r"entry 0 has no 'name', which is required"),
        (dict(entries=[{"name": "a", "recipe": "recipes/digits/raster.yaml", "budget_share": "half"}]),
         r"entry 'a': key 'budget_share': Value 'half'"),
        (dict(entries=[{"name": "a", "recipe": "recipes/digits/raster.yaml", "evaluation": {"top_k": 1.5}}]),
         r"entry 'a': evaluation: key 'top_k': Value '1.5' of type 'float'"),
        (dict(tokenizers={"vq": {"recipe": "recipes/digits/tokenizer_vq.yaml", "overides": {}}}),
         r"tokenizer 'vq' has unknown key 'overides' \(did you mean 'overrides'\?\)"),
    ],
    ids=["top-key", "bool-budget", "two-budgets", "budget-key", "eval-type", "entry-key", "no-name", "share-type",
         "entry-eval-type", "tokenizer-key"],
)
def test_suite_schema_refuses_unknown_keys_and_wrong_types(tmp_path: Path, change: dict, message: str) -> None:
    """A typo or a wrong type in a suite file is refused before anything trains, naming the suite, entry and key."""
    path = write_suite(tmp_path, entries=[{"name": "r", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq"}])
    raw = yaml.safe_load(path.read_text())
    raw.update(change)
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_suite(str(path))


def _row(name: str, fid: float | None, **extra) -> dict:
    return {
        "name": name, "paradigm": name, "fid": fid, "is_mean": 2.0, "precision": 0.5, "recall": 0.4,
        "class_accuracy": 0.9, "val_loss": 1.5, "val_unigram_loss": 3.0, "forward_passes": 10.0,
        "sampling_images_per_s": 100.0, "latency_s": 0.2, "latency_batch": 16, "params": 1_234_567,
        "recipe": f"recipes/{name}.yaml", "config_hash": "abc", "seed": 0, "entry_folder": f"entries/{name}",
        "grid": "samples.png", **extra,
    }


def _board(rows: list[dict]) -> dict:
    return {
        "suite": "t", "created": "2026-11-25 00:00 UTC", "arzoo_version": "0.1.0", "torch_version": "2",
        "machine": {"device": "cpu", "cpu_count": 2}, "feature_net": {"name": "digits"},
        "fairness": ["same budget"], "rows": ranked(rows),
        "reference_rows": [{"tokenizer": "vq", "kind": "reconstruction", "fid": 0.5, "psnr_db": 30.0}],
        "reported": [{"model": "VAR-d16", "paradigm": "next-scale", "fid": 3.55, "citation": "paper"}],
    }


def test_leaderboard_ranks_by_fid_and_keeps_reported_rows_apart(tmp_path: Path) -> None:
    rows = [_row("b", 9.0), _row("a", 3.0, overrides={"model.init_args.depth": 2}), _row("c", None)]
    text = markdown(_board(rows))
    ranked_names = re.findall(r"^\| (\d) \| (\w) \|", text, flags=re.M)
    assert ranked_names == [("1", "a"), ("2", "b"), ("3", "c")]
    assert "model.init_args.depth=2" in text
    by_step = markdown(_board([_row("a", 3.0, val_loss_q1=3.0, val_loss_q2=2.5, val_context_gain=0.25)]))
    assert "| 3.00 → 2.50 | 0.250 |" in by_step and "Context gain: how many nats" in by_step
    measured, reported = text.split("## Reported by the papers")
    assert "VAR-d16" in reported and "VAR-d16" not in measured


def test_leaderboard_files_and_a_self_contained_page(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "entries" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8), "white").save(tmp_path / "entries" / "a" / "samples.png")
    board = _board([_row("a", 3.0)])
    md, js, page = write_leaderboard(board, tmp_path)
    assert json.loads(js.read_text())["rows"][0]["name"] == "a"
    html = page.read_text()
    assert "data:image/png;base64," in html and html.count("<svg") == 2
    assert not re.search(r"(src|href)=['\"]https?://", html)  # nothing fetched from the network
    assert md.read_text().startswith("# arzoo leaderboard")


def test_scatter_plot_handles_missing_and_log_values() -> None:
    svg = scatter_svg([("a", 10.0, 3.0), ("b", 1000.0, 5.0), ("c", None, 1.0)], "x", "y", "t", log_x=True)
    assert svg.count("<circle") == 2 and "<title>a</title>" in svg
    assert "no data" in scatter_svg([], "x", "y", "t")


COLUMN_MAJOR = """
import torch
from arzoo.generators import RasterGenerator


class ColumnMajorRaster(RasterGenerator):
    paradigm = "column-major"

    def build_schedule(self):
        g = self.grid_size
        return [torch.tensor([r * g + c]) for c in range(g) for r in range(g)]
"""


def test_a_tiny_suite_end_to_end_and_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train a tokenizer and two generators for two steps each — one a paradigm the harness has never seen —
    evaluate, write the board; a re-run reuses everything."""
    from arzoo.bench.command import run_suite

    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "column_major.py").write_text(COLUMN_MAJOR)
    monkeypatch.setenv("PYTHONPATH", f"{plugins}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # the fit child
    monkeypatch.syspath_prepend(str(plugins))  # the evaluation, in this process
    tiny = {"model.init_args.n_layer": 1, "model.init_args.dim": 32, "model.init_args.n_head": 2}
    suite = write_suite(
        tmp_path,
        budget={"train_images": 128},
        evaluation={"num_samples": 20, "batch_size": 10, "latency_batch": 4, "cfg": 2.0, "top_k": 16},
        entries=[
            {"name": "raster", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq", "overrides": tiny,
             "evaluation": {"temperature": 0.9}},
            {"name": "columns", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq",
             "overrides": {**tiny, "model.class_path": "column_major.ColumnMajorRaster"}},
            {"name": "raster-t0.5", "recipe": "recipes/digits/raster.yaml", "tokenizer": "vq", "overrides": tiny,
             "model_of": "raster", "evaluation": {"temperature": 0.5}},  # the raster model, sampled otherwise
        ],
    )
    out = tmp_path / "out"
    run_suite(str(suite), out=str(out))
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["name"]: r for r in board["rows"]}
    row = rows["raster"]
    assert rows["columns"]["paradigm"] == "column-major" and rows["columns"]["forward_passes"] == 64
    assert row["paradigm"] == "raster" and row["train_steps"] == 2 and row["train_images"] == 128
    assert row["forward_passes"] == 64  # one network call per token of the 8x8 grid
    assert row["fid"] >= 0 and 0 <= row["precision"] <= 1 and 0 <= row["class_accuracy"] <= 1
    assert row["sampling_images_per_s"] > 0 and row["params"] > 0 and row["val_unigram_loss"] > 0
    assert row["evaluation_overrides"] == {"temperature": 0.9}
    assert isinstance(row["val_context_gain"], float) and all(row[f"val_loss_q{q}"] > 0 for q in (1, 2, 3, 4))
    assert "context gain" in (out / "leaderboard.md").read_text()
    kinds = {(r["tokenizer"], r["kind"]) for r in board["reference_rows"]}
    assert {("vq", "reconstruction"), ("vq", "random tokens")} <= kinds and len(kinds) == 3  # + real images
    assert (out / "leaderboard.md").is_file() and (out / "leaderboard.html").is_file()
    assert len(list((out / "tokenizers").iterdir())) == 1  # one tokenizer run shared by both entries
    cooler = rows["raster-t0.5"]
    assert cooler["train_steps"] == 2 and cooler["evaluation"]["temperature"] == 0.5
    assert not (out / cooler["entry_folder"] / "last.ckpt").exists()  # evaluated, never trained

    stamp = (out / row["entry_folder"] / "last.ckpt").stat().st_mtime_ns
    run_suite(str(suite), out=str(out))  # finished runs are neither retrained nor re-evaluated
    assert (out / row["entry_folder"] / "last.ckpt").stat().st_mtime_ns == stamp
    again = {r["name"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert again["raster"]["fid"] == row["fid"]


def test_sampling_options_are_evaluation_settings_not_training(tmp_path: Path) -> None:
    """An entry with `model_of` evaluates an earlier entry's model under other sampling options."""
    from arzoo.bench.evaluate import _sampling_kwargs

    entry = {"name": "ro", "recipe": "recipes/digits/random_order.yaml", "tokenizer": "vq"}
    raster_order = dict(entry, name="ro-raster", model_of="ro", evaluation={"options": {"order": "raster"}})
    suite = load_suite(str(write_suite(tmp_path, entries=[entry, raster_order])))
    plain, other = suite.entries
    assert other.model_of == "ro" and plain.config_hash == other.config_hash  # one training run
    assert plain.evaluation["options"] == {} and other.evaluation["options"] == {"order": "raster"}
    assert _sampling_kwargs(other.evaluation) == {"cfg": 2.0, "temperature": 1.0, "top_k": None, "top_p": 1.0,
                                                  "order": "raster"}
    with pytest.raises(ValueError, match="entry 'x' evaluates the model of 'nope', which is not an earlier entry"):
        load_suite(str(write_suite(tmp_path, entries=[entry, dict(entry, name="x", model_of="nope")])))
    changed = dict(entry, name="x", model_of="ro", overrides={"model.init_args.n_layer": 2})
    with pytest.raises(ValueError, match="may change only its evaluation settings"):
        load_suite(str(write_suite(tmp_path, entries=[entry, changed])))


def test_a_tokenizer_can_be_an_existing_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "vq.ckpt"
    ckpt.write_bytes(b"a trained tokenizer")
    suite = load_suite(str(write_suite(tmp_path, tokenizers={"vq": {"checkpoint": str(ckpt)}})))
    tok = suite.tokenizers["vq"]
    assert tok.checkpoint == str(ckpt.resolve()) and tok.trained_checkpoint == str(ckpt.resolve())
    assert suite.entries[0].config["model"]["init_args"]["tokenizer_path"] == str(ckpt.resolve())
    both = {"vq": {"checkpoint": str(ckpt), "recipe": "recipes/digits/tokenizer_vq.yaml"}}
    with pytest.raises(ValueError, match="tokenizer 'vq' needs either `recipe:` .* not both"):
        load_suite(str(write_suite(tmp_path, tokenizers=both)))
    with pytest.raises(FileNotFoundError, match="tokenizer 'vq': checkpoint .*nope.ckpt' does not exist"):
        load_suite(str(write_suite(tmp_path, tokenizers={"vq": {"checkpoint": str(tmp_path / "nope.ckpt")}})))
