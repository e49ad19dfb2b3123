"""save_tokenizer_checkpoint: what load_tokenizer reads back, written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from arzoo.tokenizers import MultiScaleVQTokenizer, Tokenizer, VQTokenizer, load_tokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint


def tiny_vq() -> VQTokenizer:
    return VQTokenizer(image_size=16, codebook_size=8, codebook_embed_dim=4, encoder_ch_mult=(1, 1),
                       decoder_ch_mult=(1, 1), z_channels=32, ch=32, num_res_blocks=1)


def tiny_msvq() -> MultiScaleVQTokenizer:
    return MultiScaleVQTokenizer(image_size=16, vocab_size=8, z_channels=8, ch=32, ch_mult=(1, 1),
                                 num_res_blocks=1, patch_nums=(1, 2, 4, 8))


def perturbed(tokenizer: Tokenizer, seed: int = 0) -> Tokenizer:
    """Weights no fresh build reproduces, so a round trip must really carry them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tokenizer.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return tokenizer


@pytest.mark.parametrize(("make", "kind", "other"), [(tiny_vq, VQTokenizer, MultiScaleVQTokenizer),
                                                     (tiny_msvq, MultiScaleVQTokenizer, VQTokenizer)])
def test_round_trip(make, kind, other, tmp_path):
    tokenizer = perturbed(make()).train()  # saved in training mode: loading still freezes it
    path = save_tokenizer_checkpoint(tokenizer, tmp_path / "a" / "b" / "tok.ckpt")  # parents are created
    assert path == tmp_path / "a" / "b" / "tok.ckpt" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["tok.ckpt"]  # no temp file left behind

    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"hyper_parameters", "state_dict", "arzoo_checksum"}  # the checksum is verified on load
    assert raw["hyper_parameters"]["tokenizer"] == tokenizer.spec()
    assert all(k.startswith("tokenizer.") for k in raw["state_dict"])

    loaded = load_tokenizer(path, expected=kind)
    assert type(loaded) is kind and loaded.spec() == tokenizer.spec()
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert all(not m.training for m in loaded.modules())
    original, restored = tokenizer.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key, value in original.items():
        assert torch.equal(value, restored[key]), key
    # the same codes for the same images
    tokenizer.eval()
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        for a, b in zip(tokenizer.encode(images), loaded.encode(images)):
            assert torch.equal(a, b)

    assert isinstance(load_tokenizer(path, expected=Tokenizer), kind)
    with pytest.raises(TypeError, match=f"holds a {kind.__name__}, but a {other.__name__} is required"):
        load_tokenizer(path, expected=other)


def test_overwrites_an_existing_checkpoint(tmp_path):
    path = tmp_path / "tok.ckpt"
    save_tokenizer_checkpoint(perturbed(tiny_vq(), seed=0), path)
    newer = perturbed(tiny_vq(), seed=1)
    save_tokenizer_checkpoint(newer, str(path))  # str paths work too
    loaded = load_tokenizer(path)
    for key, value in newer.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    assert [p.name for p in tmp_path.iterdir()] == ["tok.ckpt"]


@pytest.mark.parametrize("error", [OSError("No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_checkpoint_and_leaves_no_temp_file(error, tmp_path, monkeypatch):
    path = tmp_path / "tok.ckpt"
    old = perturbed(tiny_vq(), seed=0)
    save_tokenizer_checkpoint(old, path)
    before = path.read_bytes()
    written: list[Path] = []

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # part of the file, then the failure
        written.append(Path(f.name))
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        save_tokenizer_checkpoint(perturbed(tiny_vq(), seed=1), path)
    monkeypatch.undo()

    assert written and written[0] != path and written[0].parent == path.parent  # a temp file next to it
    assert [p.name for p in tmp_path.iterdir()] == ["tok.ckpt"]
    assert path.read_bytes() == before
    loaded = load_tokenizer(path, expected=VQTokenizer)
    for key, value in old.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key

    # and a first write that fails leaves nothing at all
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        save_tokenizer_checkpoint(old, tmp_path / "new" / "tok.ckpt")
    assert list((tmp_path / "new").iterdir()) == []


def test_rejects_what_is_not_a_tokenizer(tmp_path):
    with pytest.raises(TypeError, match="needs an arzoo Tokenizer, got Linear"):
        save_tokenizer_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x.ckpt")
    assert not (tmp_path / "x.ckpt").exists()
