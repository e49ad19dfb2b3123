"""Unit tests of the LlamaGen-style VQTokenizer and its interop loader (tiny configs, CPU, fast)."""

from __future__ import annotations

import argparse

import pytest
import torch

from arzoo.interop.llamagen import (
    VQ_8,
    VQ_16,
    extract_state_dict,
    load_vq_tokenizer,
    vq_kwargs_from_official,
)
from arzoo.tokenizers.base import build_tokenizer
from arzoo.tokenizers.vq import USAGE_HISTORY, VQTokenizer, VectorQuantizer

TINY = dict(
    image_size=8,
    codebook_size=16,
    codebook_embed_dim=4,
    encoder_ch_mult=[1, 2],
    decoder_ch_mult=[1, 2],
    z_channels=32,
    ch=32,
    num_res_blocks=1,
)


def tiny(**overrides) -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer(**{**TINY, **overrides})


def images(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def test_encode_decode_shapes_and_dtypes() -> None:
    tok = tiny().eval()
    g = TINY["image_size"] // 2
    assert tok.scales == ((g, g),) and tok.grid == (g, g) and tok.downsample == 2
    assert tok.vocab_size == TINY["codebook_size"] and tok.codebook_dim == TINY["codebook_embed_dim"]
    (tokens,) = tok.encode(images())
    assert tokens.shape == (2, g, g) and tokens.dtype == torch.int64
    assert 0 <= int(tokens.min()) and int(tokens.max()) < tok.vocab_size
    assert tok.embed(tokens).shape == (2, TINY["codebook_embed_dim"], g, g)
    with torch.no_grad():
        out = tok.decode([tokens.to(torch.int32)])  # generators hand back int32 tokens
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert float(out.abs().max()) <= 1.0
    # encode == the indices of the training-path quantiser
    _, indices, _ = tok.quantize_features(tok.features(images()))
    assert torch.equal(indices, tokens)


def test_forward_losses_and_gradients() -> None:
    tok = tiny().train()
    out = tok(images())
    assert out.recon.shape == (2, 3, 8, 8) and len(out.token_maps) == 1
    assert out.extra_losses == {}
    for loss in (out.codebook_loss, out.commit_loss):
        assert loss.ndim == 0 and torch.isfinite(loss)
    (out.recon.square().mean() + out.quant_loss).backward()
    encoder_grad = tok.encoder.conv_in.weight.grad
    codebook_grad = tok.quantize.embedding.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert codebook_grad is not None and codebook_grad.abs().sum() > 0
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0


def test_entropy_loss_reported_when_enabled() -> None:
    tok = tiny(entropy_loss_ratio=0.1).train()
    out = tok(images())
    assert set(out.extra_losses) == {"entropy"}
    entropy = out.extra_losses["entropy"]
    assert torch.isfinite(entropy)
    entropy.backward()
    assert tok.quant_conv.weight.grad.abs().sum() > 0


def test_eval_forward_still_returns_losses_and_leaves_usage_alone() -> None:
    tok = tiny().eval()
    with torch.no_grad():
        out = tok(images())
    assert torch.isfinite(out.codebook_loss) and torch.isfinite(out.commit_loss)
    assert torch.count_nonzero(tok.quantize.codebook_used) == 0
    _, _, losses = tok.quantize_features(tok.features(images()))
    assert losses.codebook_usage == 0.0


def test_usage_register_shifts_in_training_mode() -> None:
    quantizer = VectorQuantizer(16, 4, beta=0.25, entropy_loss_ratio=0.0, l2_norm=True, show_usage=True)
    quantizer.train()
    _, indices, losses = quantizer(torch.randn(1, 4, 3, 3))
    assert torch.equal(quantizer.codebook_used[-9:], indices.flatten().float())
    register = torch.cat([torch.zeros(1), indices.flatten().float()])  # initial zeros count as code 0
    assert losses.codebook_usage == len(torch.unique(register)) / 16
    # More indices than the register holds: keep the newest 65536 (upstream would crash).
    _, indices, _ = quantizer(torch.randn(1, 4, 1, USAGE_HISTORY + 7))
    assert torch.equal(quantizer.codebook_used, indices.flatten()[-USAGE_HISTORY:].float())


def test_no_usage_buffer_without_show_usage() -> None:
    tok = tiny(codebook_show_usage=False)
    assert "quantize.codebook_used" not in tok.state_dict()
    _, _, losses = tok.train().quantize_features(tok.features(images()))
    assert losses.codebook_usage == 0.0


def test_spec_round_trip() -> None:
    tok = tiny(entropy_loss_ratio=0.05).eval()
    spec = tok.spec()
    assert spec["class_path"].endswith(".VQTokenizer")
    assert spec["init_args"]["encoder_ch_mult"] == [1, 2]
    rebuilt = build_tokenizer(spec).eval()
    assert isinstance(rebuilt, VQTokenizer) and rebuilt.spec() == spec
    rebuilt.load_state_dict(tok.state_dict())
    assert torch.equal(rebuilt.encode(images())[0], tok.encode(images())[0])


def test_parameter_counts_of_official_presets() -> None:
    # SPEC section 5.2 / 8: counted on the official presets.
    for preset, expected in ((VQ_16, 71_883_403), (VQ_8, 70_109_835)):
        with torch.device("meta"):
            tok = VQTokenizer(**preset)
        assert sum(p.numel() for p in tok.parameters()) == expected
        assert tok.quantize.codebook_used.shape == (USAGE_HISTORY,)
    with torch.device("meta"):  # the constructor defaults are the VQ-16 preset
        assert VQTokenizer().spec()["init_args"] == VQTokenizer(**VQ_16).spec()["init_args"]


# -- errors -----------------------------------------------------------------------------------------


def test_image_size_not_divisible() -> None:
    with pytest.raises(ValueError, match=r"image_size 10 .* factor 4"):
        tiny(image_size=10, encoder_ch_mult=[1, 1, 1], decoder_ch_mult=[1, 1, 1])


def test_wrong_image_size_to_encode() -> None:
    tok = tiny()
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\).*got \(2, 3, 16, 16\)"):
        tok.encode(images(size=16))


def test_mismatched_ch_mult() -> None:
    with pytest.raises(ValueError, match=r"\[1, 2\] downsamples by 2 .* \[1, 2, 2\] upsamples by 4"):
        tiny(decoder_ch_mult=[1, 2, 2])


def test_bad_token_maps() -> None:
    tok = tiny()
    with pytest.raises(ValueError, match="token map 0 should have shape"):
        tok.decode([torch.zeros(1, 3, 3, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"\[0, 16\).*max 16"):
        tok.decode([torch.full((1, 4, 4), 16)])


def test_load_missing_path(tmp_path) -> None:
    missing = tmp_path / "nope" / "vq_ds16_c2i.pt"
    with pytest.raises(FileNotFoundError, match="vq_ds16_c2i.pt"):
        load_vq_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="vq_ds16_c2i.pt"):
        load_vq_tokenizer(str(missing))


def test_load_garbage_file(tmp_path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint\n" * 10)
    with pytest.raises(ValueError, match="garbage.pt.*not a readable torch checkpoint"):
        load_vq_tokenizer(garbage, **TINY)


# -- interop ----------------------------------------------------------------------------------------


def test_load_official_style_checkpoint(tmp_path) -> None:
    tok = tiny().eval()
    state = {f"module.{k}": v for k, v in tok.state_dict().items() if k != "quantize.codebook_used"}
    path = tmp_path / "vq.pt"
    # DDP-style file: weights under "model" with a `module.` prefix, args as an argparse.Namespace.
    torch.save({"model": state, "steps": 3, "args": argparse.Namespace(vq_model="VQ-16")}, path)
    loaded = load_vq_tokenizer(path, **TINY)
    assert not loaded.training
    assert torch.equal(loaded.encode(images())[0], tok.encode(images())[0])
    torch.testing.assert_close(loaded.decode(tok.encode(images())), tok.decode(tok.encode(images())))


def test_load_mismatch_lists_keys_and_preset() -> None:
    state = tiny().state_dict()
    with pytest.raises(ValueError, match=r"preset 'VQ-8'.*missing.*encoder\.") as err:
        load_vq_tokenizer(state, preset="VQ-8", image_size=8, codebook_size=16)
    assert "shape mismatch" in str(err.value) and "codebook_size" in str(err.value)
    wrong = dict(TINY, codebook_size=32)
    expected = r"quantize\.embedding\.weight: checkpoint \(16, 4\) vs model \(32, 4\)"
    with pytest.raises(ValueError, match=expected):
        load_vq_tokenizer(state, **wrong)


def test_vq_kwargs_from_official() -> None:
    config = {"codebook_size": 64, "dropout_p": 0.1, "encoder_ch_mult": (1, 2)}
    config.update(downsample=2, grid_size=4)  # informational, ignored
    expected = {"codebook_size": 64, "dropout": 0.1, "encoder_ch_mult": [1, 2]}
    assert vq_kwargs_from_official(config) == expected
    with pytest.raises(ValueError, match="codebook_sizes"):
        vq_kwargs_from_official({"codebook_sizes": 64})


def test_extract_state_dict_variants() -> None:
    weights = {"a.weight": torch.ones(1), "b": torch.zeros(2)}
    assert extract_state_dict(weights) == weights
    for key in ("model", "ema", "state_dict", "module"):
        assert list(extract_state_dict({key: weights, "steps": 1})) == list(weights)
    prefixed = {"module._orig_mod.a.weight": torch.ones(1), "_orig_mod.b": torch.zeros(2)}
    assert list(extract_state_dict(prefixed)) == ["a.weight", "b"]
    both = {"model": weights, "ema": {"x": torch.zeros(1)}}
    assert extract_state_dict(both) == weights  # "model" first, as the official samplers
    assert extract_state_dict(both, key="ema").keys() == {"x"}
    with pytest.raises(ValueError, match="could not find a state dict"):
        extract_state_dict({"steps": 1, "args": "x"})
