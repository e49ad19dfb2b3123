"""Loading never unpickles code: a checkpoint with a code payload is refused by every arzoo loader."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

from arzoo.checkpoint_io import read_checkpoint
from arzoo.checkpoint_plugin import AtomicCheckpointIO
from arzoo.cli import run as arzoo_run
from arzoo.generators import BaseGenerator, RasterGenerator
from arzoo.tokenizers import load_tokenizer

ARZOO = Path(__file__).resolve().parents[1] / "arzoo"
REFUSED = r"could not be read: it pickles objects other than tensors"


class Payload:
    """Unpickling this runs a shell command (creates the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """(a checkpoint that looks like an arzoo one but carries a code payload, the marker its payload creates)"""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hyper_parameters": {"x": Payload(marker)},
                "arzoo_generator_class": "arzoo.generators.RasterGenerator"}, path)
    return path, marker


def test_the_payload_is_real(evil):
    path, marker = evil
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists()


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda p: read_checkpoint(p), id="read_checkpoint"),
        pytest.param(lambda p: load_tokenizer(p), id="load_tokenizer"),
        pytest.param(lambda p: RasterGenerator(tokenizer_path=str(p)), id="tokenizer_path"),
        pytest.param(lambda p: BaseGenerator.load_from_checkpoint(p), id="Generator.load_from_checkpoint"),
        pytest.param(lambda p: AtomicCheckpointIO().load_checkpoint(p), id="resume (--ckpt_path)"),
        pytest.param(lambda p: arzoo_run(["sample", "--ckpt_path", str(p)]), id="arzoo sample"),
        pytest.param(lambda p: arzoo_run(["export", "--ckpt_path", str(p), "--out", str(p.parent / "out")]),
                     id="arzoo export"),
    ],
)
def test_code_payload_is_refused(evil, load, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["arzoo"])
    path, marker = evil
    with pytest.raises(ValueError, match=REFUSED):
        load(path)
    assert not marker.exists()


def test_official_checkpoint_loaders_refuse_it_too(evil):
    from arzoo.interop.llamagen import VQ_16, load_vq_tokenizer

    path, marker = evil
    with pytest.raises(ValueError, match=REFUSED):
        load_vq_tokenizer(path, **VQ_16)
    assert not marker.exists()


def test_every_torch_load_in_arzoo_is_weights_only():
    """Source audit: each torch.load call names weights_only=True; nothing calls pickle.load."""
    offenders = []
    for file in ARZOO.rglob("*.py"):
        text = file.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            depth, end = 0, match.end() - 1
            for end in range(match.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            if "weights_only=True" not in text[match.start() : end]:
                offenders.append(f"{file.relative_to(ARZOO.parent)}: {text[match.start() : end + 1]}")
        offenders += [f"{file.name}: pickle.load" for _ in re.finditer(r"pickle\.loads?\(", text)]
    assert not offenders, offenders
