"""Resume: a fit killed with SIGKILL and restarted with `--ckpt_path last` ends where an uninterrupted one does;
checkpoints are written atomically (a kill during a save leaves the previous one valid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from arzoo.checkpoint_io import atomic_torch_save, read_checkpoint
from arzoo.checkpoint_plugin import AtomicCheckpointIO
from arzoo.tokenizers import VQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


class KillAt(L.Callback):
    """Test helper run inside the `arzoo fit` subprocess: SIGKILL the process when `global_step` reaches `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _recipe(tmp_path: Path, tokenizer: Path, out: str, kill_at: int | None) -> Path:
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(tmp_path / out), "save_last": True, "save_top_k": 0,
                                "every_n_train_steps": 4}}]
    if kill_at is not None:
        callbacks.append({"class_path": "test_resume.KillAt", "init_args": {"step": kill_at}})
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "deterministic": True, "max_steps": 12,
                    "limit_train_batches": 5, "limit_val_batches": 1, "check_val_every_n_epoch": 1,
                    "num_sanity_val_steps": 1, "logger": False, "enable_progress_bar": False,
                    "enable_model_summary": False, "callbacks": callbacks},
        "model": {"class_path": "arzoo.generators.RasterGenerator",
                  "init_args": {"tokenizer_path": str(tokenizer), "dim": 32, "n_layer": 1, "n_head": 2,
                                "multiple_of": 32, "lr": 3e-3, "warmup_steps": 3, "ema_decay": 0.9,
                                "class_dropout_prob": 0.2}},  # label dropout draws from the global RNG
        "data": {"class_path": "arzoo.data.ImageDataModule",
                 "init_args": {"source": "digits", "image_size": 16, "batch_size": 16}},
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "arzoo", "fit", "--config", str(config), *extra], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_sigkilled_fit_resumes_to_the_same_weights(tmp_path):
    torch.manual_seed(0)
    tokenizer = save_tokenizer_checkpoint(
        VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                    decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1), tmp_path / "vq.ckpt")

    straight = _fit(_recipe(tmp_path, tokenizer, "straight", None), cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]

    # epochs are 5 steps; checkpoints at steps 4 and 8; killed at step 10, after the epoch-1 checkpoint
    killed_config = _recipe(tmp_path, tokenizer, "resumed", kill_at=10)
    killed = _fit(killed_config, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert read_checkpoint(tmp_path / "resumed/last.ckpt")["global_step"] == 8  # mid-epoch: 3 of 5 batches done

    resumed = _fit(_recipe(tmp_path, tokenizer, "resumed", None), "--ckpt_path", "last", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert "dataloader is not resumable" not in resumed.stderr  # the data module does continue the order

    a, b = read_checkpoint(tmp_path / "straight/last.ckpt"), read_checkpoint(tmp_path / "resumed/last.ckpt")
    assert a["global_step"] == b["global_step"] == 12 and a["epoch"] == b["epoch"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema.") for k in a["state_dict"])  # the EMA weights are checkpointed...
    for key, value in a["state_dict"].items():  # ...and, like the network, equal to the uninterrupted run's
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert torch.equal(a["callbacks"]["RNGResumeState"]["torch"], b["callbacks"]["RNGResumeState"]["torch"])


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def half_write_then_die(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a kill looks like from inside the save

    monkeypatch.setattr(torch, "save", half_write_then_die)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert AtomicCheckpointIO().load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    script = textwrap.dedent(f"""
        import sys, torch
        from arzoo.checkpoint_io import atomic_torch_save
        for step in range(10_000):  # 16 MB per save: the kill lands inside one
            atomic_torch_save({{"step": step, "w": torch.full((4_000_000,), float(step))}}, {str(path)!r})
            if step == 0:
                print("saved", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "saved"
        time.sleep(0.3)  # somewhere inside a later save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    ckpt = read_checkpoint(path)  # complete: either the last finished save or the one before
    assert ckpt["w"].shape == (4_000_000,) and bool((ckpt["w"] == ckpt["step"]).all())


def test_arzoo_trainer_uses_atomic_io_and_safety_callbacks():
    from arzoo.callbacks import NonFiniteGuard, RNGResumeState
    from arzoo.cli import ArzooTrainer

    trainer = ArzooTrainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(c, NonFiniteGuard) for c in trainer.callbacks) == 1
    assert sum(isinstance(c, RNGResumeState) for c in trainer.callbacks) == 1
    mine = NonFiniteGuard()
    trainer = ArzooTrainer(accelerator="cpu", logger=False, callbacks=[mine])
    assert [c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)] == [mine]


def test_atomic_torch_save_creates_parent_folders(tmp_path):
    path = atomic_torch_save({"a": torch.ones(1)}, tmp_path / "x" / "y.pt")
    assert read_checkpoint(path)["a"].item() == 1.0


def test_resumable_sampler_order_depends_only_on_seed_and_epoch():
    from arzoo.data.sampler import ResumableRandomSampler

    sampler = ResumableRandomSampler(20, seed=2**64 - 1)  # torch.initial_seed() can be this large
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == sorted(epoch1) == list(range(20)) and epoch0 != epoch1
    sampler.resume_at(1, 8)
    assert list(sampler) == epoch1[8:]  # the rest of epoch 1 ...
    assert list(sampler) == epoch1  # ... then whole epochs again
    assert list(ResumableRandomSampler(20, seed=2**64 - 1)) == epoch0
