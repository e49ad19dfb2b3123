"""A real 2-process DDP fit on CPU (gloo): the ranks see different data and end with equal weights.

`python -m arzoo fit` runs as a subprocess; Lightning's subprocess launcher starts the second rank.
`RankProbe` (a callback named by class path in the config, imported from this file through
PYTHONPATH) writes what each rank saw and the weights it ended with into `ARZOO_PROBE_DIR`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


class RankProbe(L.Callback):
    """Record every training batch (image fingerprints, labels) and the final state dict of this rank."""

    def __init__(self) -> None:
        self.batches: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        key = "image" if "image" in batch else "tokens"
        fingerprints = [hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest() for x in batch[key]]
        self.batches.append({"fingerprints": fingerprints, "labels": batch["label"].tolist()})

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        out = Path(os.environ["ARZOO_PROBE_DIR"])
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        extra = {"token_counts": module.train_token_counts.cpu()} if hasattr(module, "train_token_counts") else {}
        torch.save({"batches": self.batches, "state": state, "metrics": metrics, "world_size": trainer.world_size,
                    "strategy": type(trainer.strategy).__name__, **extra}, out / f"rank{trainer.global_rank}.pt")


def tiny_vq_checkpoint(path: Path) -> Path:
    """An untrained 16x16 -> 4x4 VQ tokenizer with 32 codes, as a tokenizer checkpoint."""
    from arzoo.tokenizers import VQTokenizer
    from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

    torch.manual_seed(0)
    tok = VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                      decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
    return save_tokenizer_checkpoint(tok, path)


def run_fit(config: dict, tmp_path: Path, timeout: int = 180) -> list[dict]:
    """`python -m arzoo fit --config <config>` in a subprocess; the probe files of every rank."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    env = dict(os.environ, ARZOO_PROBE_DIR=str(probe), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "arzoo", "fit", "--config", str(tmp_path / "config.yaml")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    world = config["trainer"]["devices"]
    return [torch.load(probe / f"rank{r}.pt", weights_only=True) for r in range(world)]


def trainer_config(strategy: str = "ddp") -> dict:
    return {
        "accelerator": "cpu", "devices": 2, "strategy": strategy, "max_steps": STEPS,
        "val_check_interval": 2, "limit_val_batches": 2, "num_sanity_val_steps": 0,
        "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
        "enable_model_summary": False, "callbacks": [{"class_path": "test_ddp.RankProbe"}],
    }


DIGITS_16 = {"class_path": "arzoo.data.ImageDataModule", "init_args": {"source": "digits", "image_size": 16,
                                                                        "batch_size": 8, "hflip": True}}


def assert_ranks_agree(ranks: list[dict], strategy: str) -> None:
    """Different batches on each rank, identical weights at the end."""
    r0, r1 = ranks
    assert r0["world_size"] == r1["world_size"] == 2 and r0["strategy"] == strategy
    assert len(r0["batches"]) == len(r1["batches"]) == STEPS
    for b0, b1 in zip(r0["batches"], r1["batches"]):
        assert b0["fingerprints"] != b1["fingerprints"]  # each step, the ranks trained on different images
    seen0 = {f for b in r0["batches"] for f in b["fingerprints"]}
    seen1 = {f for b in r1["batches"] for f in b["fingerprints"]}
    assert len(seen0 & seen1) <= 2, "the ranks' samples should be (almost: digits repeat) disjoint"
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{key} differs between the ranks"


@pytest.fixture(scope="module")
def vq_path(tmp_path_factory) -> Path:
    return tiny_vq_checkpoint(tmp_path_factory.mktemp("tok") / "vq.ckpt")


def test_generator_ddp_two_processes(vq_path, tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": trainer_config("ddp"),
        "model": {"class_path": "arzoo.generators.RasterGenerator",
                  "init_args": {"tokenizer_path": str(vq_path), "dim": 32, "n_layer": 1, "n_head": 2,
                                "multiple_of": 32, "warmup_steps": 0, "lr": 3e-3, "ema_decay": 0.9}},
        "data": DIGITS_16,
    }
    # samples are drawn on rank 0 only (at the end of fit): that must not wait for the other rank
    config["trainer"]["callbacks"].append({"class_path": "arzoo.generators.SampleGrid",
                                           "init_args": {"every_n_steps": 100, "per_class": 1, "max_classes": 2}})
    ranks = run_fit(config, tmp_path)
    assert (tmp_path / "samples.png").is_file()
    assert_ranks_agree(ranks, "DDPStrategy")
    r0, r1 = ranks
    # the learnt weights moved, and the EMA copy (outside DDP's gradient sync) agrees too
    assert any(k.startswith("ema.") for k in r0["state"])
    # validation losses are reduced over the ranks (sync_dist), so both ranks log the same value
    for key in ("val/loss", "val/unigram_loss"):
        assert r0["metrics"][key] == pytest.approx(r1["metrics"][key]), key
    # each rank counted only its own training tokens (4 steps x 8 images x 16 tokens)
    assert r0["token_counts"].sum() == r1["token_counts"].sum() == STEPS * 8 * 16
    assert not torch.equal(r0["token_counts"], r1["token_counts"])


def test_tokenizer_ddp_two_processes(tmp_path):
    config = {
        "seed_everything": 0,
        "trainer": trainer_config("ddp"),
        "model": {"class_path": "arzoo.tokenizers.TokenizerModule",
                  "init_args": {"tokenizer": {"class_path": "arzoo.tokenizers.VQTokenizer", "init_args": {
                      "image_size": 16, "codebook_size": 32, "codebook_embed_dim": 4, "encoder_ch_mult": [1, 1, 1],
                      "decoder_ch_mult": [1, 1, 1], "z_channels": 32, "ch": 32, "num_res_blocks": 1}}}},
        "data": DIGITS_16,
    }
    ranks = run_fit(config, tmp_path)
    assert (tmp_path / "recon.png").is_file()  # written by rank 0 alone after validation
    assert_ranks_agree(ranks, "DDPStrategy")
    assert ranks[0]["metrics"]["val/loss"] == pytest.approx(ranks[1]["metrics"]["val/loss"])

