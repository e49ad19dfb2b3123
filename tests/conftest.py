"""Shared test setup: offline HF hub, a temporary HF_HOME, and the parity fixture folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Set before anything imports `datasets`/`huggingface_hub`, which read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="arzoo-hf-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402

PARITY_DIR = Path(os.environ.get("ARZOO_PARITY_DIR", Path(__file__).parent / "fixtures" / "parity"))


def load_parity(family: str, name: str) -> dict:
    """Load `<ARZOO_PARITY_DIR>/<family>/<name>` with weights_only=True; fail loudly if missing."""
    path = PARITY_DIR / family / name
    if not path.is_file():
        pytest.fail(f"parity fixture {path} is missing (ARZOO_PARITY_DIR={PARITY_DIR})")
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    """Parity tolerances in the fixture READMEs were measured with 1-2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, 2))
    yield
    torch.set_num_threads(before)
