"""Shared test setup: offline HF hub, a temporary HF_HOME, the parity fixture folder, a one-thread
fixture and the small multi-scale VQ tokenizers several generator tests build."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

# Set before anything imports `datasets`/`huggingface_hub`, which read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="arzoo-hf-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402

if TYPE_CHECKING:
    from arzoo.tokenizers import MultiScaleVQTokenizer

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


@pytest.fixture()
def one_thread():
    """Tiny tensors: a second intra-op thread only adds barrier waits (very slow on a shared CPU).

    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def parity_msvq_tokenizer(fixture: dict) -> "MultiScaleVQTokenizer":
    """A small untrained `MultiScaleVQTokenizer` (eval) with a parity fixture's quantiser weights.

    The VAR-family fixtures ship only the quantiser (`vq_quantizer_state`: codebook and phi convs);
    sampled ids and f_hat depend on nothing else, so encoder and decoder stay small.
    """
    from arzoo.tokenizers import MultiScaleVQTokenizer  # here, not at the top: most tests never need it

    cfg, vq = fixture["config"], fixture["config"]["vq"]
    patch_nums = list(cfg["patch_nums"])
    ch_mult = [1] * 3  # downsampling 4: the image is patch_nums[-1] * 4 px
    tok = MultiScaleVQTokenizer(
        image_size=patch_nums[-1] * 2 ** (len(ch_mult) - 1), vocab_size=vq["vocab_size"], z_channels=vq["Cvae"],
        ch=vq["ch"], ch_mult=ch_mult, num_res_blocks=1, using_znorm=vq["using_znorm"], quant_resi=vq["quant_resi"],
        share_quant_resi=vq["share_quant_resi"], patch_nums=patch_nums,
    )  # fmt: skip
    missing, unexpected = tok.quantize.load_state_dict(fixture["vq_quantizer_state"], strict=False)
    assert not unexpected and set(missing) <= {"ema_vocab_hit_SV"}, (missing, unexpected)
    return tok.eval()


def save_tiny_msvq(directory: Path, patch_nums: list[int]) -> Path:
    """An untrained 16x16 multi-scale VQ tokenizer (32 codes of width 8) saved as `directory/msvq.ckpt`."""
    from arzoo.tokenizers import MultiScaleVQTokenizer
    from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint

    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(image_size=16, vocab_size=32, z_channels=8, ch=32, ch_mult=[1, 1, 1],
                                num_res_blocks=1, patch_nums=patch_nums, codebook_init=0.02)  # fmt: skip
    return save_tokenizer_checkpoint(tok, directory / "msvq.ckpt")
