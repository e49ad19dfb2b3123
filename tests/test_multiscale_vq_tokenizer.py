"""Unit tests of `MultiScaleVQTokenizer` (VAR's VQVAE) and the VAR tokenizer interop helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from arzoo.interop.var import VAR_VQVAE_256, extract_state_dict, load_vqvae, vqvae_kwargs_from_official
from arzoo.tokenizers.base import build_tokenizer
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer, phi_index, phi_ticks

TINY = dict(ch=32, ch_mult=(1, 2), z_channels=8, vocab_size=16, image_size=8, patch_nums=(1, 2, 4))

# SPEC 2.1: Phi index per scale with K = 4 (the official setting).
PHI_TABLE_K4 = {
    2: "0 3",
    3: "0 2 3",
    4: "0 1 2 3",
    5: "0 1 2 2 3",
    6: "0 0 1 2 3 3",
    7: "0 0 1 2 2 3 3",
    8: "0 0 1 1 2 2 3 3",
    9: "0 0 1 1 2 2 2 3 3",
    10: "0 0 1 1 1 2 2 3 3 3",
    11: "0 0 0 1 1 2 2 2 3 3 3",
    13: "0 0 0 1 1 1 2 2 2 2 3 3 3",
}


def _tiny(**overrides) -> MultiScaleVQTokenizer:
    torch.manual_seed(0)
    return MultiScaleVQTokenizer(**{**TINY, **overrides})


def _images(batch: int = 2, size: int = 8) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _spec_keys(
    ch_mult, num_res_blocks, num_scales, share_quant_resi=4, default_qresi_counts=0, quant_resi=0.5,
    using_sa=True, using_mid_sa=True,
) -> list[str]:
    """The official key list of SPEC 1.3, in state-dict order."""
    n, R = len(ch_mult), num_res_blocks
    widths = [1, *ch_mult]  # c_{i-1} in units of ch

    def rb(prefix: str, c_in: int, c_out: int) -> list[str]:
        names = ["norm1.weight", "norm1.bias", "conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias",
                 "conv2.weight", "conv2.bias"]
        if c_in != c_out:
            names += ["nin_shortcut.weight", "nin_shortcut.bias"]
        return [f"{prefix}.{name}" for name in names]

    def ab(prefix: str) -> list[str]:
        names = ["norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "proj_out.weight", "proj_out.bias"]
        return [f"{prefix}.{name}" for name in names]

    def mid(prefix: str) -> list[str]:
        attn = ab(f"{prefix}.attn_1") if using_mid_sa else []
        return rb(f"{prefix}.block_1", 1, 1) + attn + rb(f"{prefix}.block_2", 1, 1)

    keys = ["encoder.conv_in.weight", "encoder.conv_in.bias"]
    for i in range(n):
        for j in range(R):
            keys += rb(f"encoder.down.{i}.block.{j}", widths[i] if j == 0 else ch_mult[i], ch_mult[i])
        if i == n - 1 and using_sa:
            for j in range(R):
                keys += ab(f"encoder.down.{i}.attn.{j}")
        if i < n - 1:
            keys += [f"encoder.down.{i}.downsample.conv.weight", f"encoder.down.{i}.downsample.conv.bias"]
    keys += mid("encoder.mid") + ["encoder.norm_out.weight", "encoder.norm_out.bias",
                                  "encoder.conv_out.weight", "encoder.conv_out.bias"]
    keys += ["decoder.conv_in.weight", "decoder.conv_in.bias"] + mid("decoder.mid")
    for i in range(n):
        for j in range(R + 1):
            c_in = ch_mult[i] if j > 0 else (ch_mult[i + 1] if i < n - 1 else ch_mult[n - 1])
            keys += rb(f"decoder.up.{i}.block.{j}", c_in, ch_mult[i])
        if i == n - 1 and using_sa:
            for j in range(R + 1):
                keys += ab(f"decoder.up.{i}.attn.{j}")
        if i >= 1:
            keys += [f"decoder.up.{i}.upsample.conv.weight", f"decoder.up.{i}.upsample.conv.bias"]
    keys += ["decoder.norm_out.weight", "decoder.norm_out.bias"]
    keys += ["decoder.conv_out.weight", "decoder.conv_out.bias"]
    keys += ["quantize.ema_vocab_hit_SV"]
    if abs(quant_resi) > 1e-6:
        if share_quant_resi >= 2:
            phis = [f"quantize.quant_resi.qresi_ls.{k}" for k in range(share_quant_resi)]
        elif share_quant_resi == 1:
            phis = ["quantize.quant_resi.qresi"]
        else:
            phis = [f"quantize.quant_resi.{k}" for k in range(default_qresi_counts or num_scales)]
        keys += [f"{p}.{w}" for p in phis for w in ("weight", "bias")]
    keys += ["quantize.embedding.weight", "quant_conv.weight", "quant_conv.bias",
             "post_quant_conv.weight", "post_quant_conv.bias"]
    return keys


# ---- Phi selection -------------------------------------------------------------------------------


@pytest.mark.parametrize("num_scales", sorted(PHI_TABLE_K4))
def test_phi_index_table_of_spec(num_scales: int) -> None:
    expected = [int(k) for k in PHI_TABLE_K4[num_scales].split()]
    assert [phi_index(si, num_scales, 4) for si in range(num_scales)] == expected


def test_phi_ticks_match_numpy_linspace() -> None:
    np = pytest.importorskip("numpy")
    for K in range(1, 17):
        start = 1 / 3 / K if K == 4 else 1 / 2 / K  # the official expressions
        official = np.linspace(start, 1 - start, K)
        assert phi_ticks(K) == tuple(official.tolist()), K  # bit-identical float64
        for SN in range(2, 20):
            for si in range(SN):
                expected = int(np.argmin(np.abs(official - si / (SN - 1)))) if K > 1 else 0
                assert phi_index(si, SN, K) == expected, (K, SN, si)


def test_model_uses_phi_table() -> None:
    tok = MultiScaleVQTokenizer(**{**TINY, "patch_nums": (1, 2, 4)})
    assert tok.quantize.phi_indices == (0, 2, 3)
    assert tok.quantize.phi(1) is tok.quantize.quant_resi.qresi_ls[2]


# ---- shapes, gradients, spec ---------------------------------------------------------------------


def test_tiny_encode_decode_shapes() -> None:
    tok = _tiny().eval()
    B = 2
    assert tok.scales == ((1, 1), (2, 2), (4, 4))
    assert tok.grid == (4, 4)
    sizes = (tok.vocab_size, tok.codebook_dim, tok.num_tokens, tok.first_l, tok.downsample)
    assert sizes == (16, 8, 21, 1, 2)
    with torch.no_grad():
        images = _images(B)
        maps = tok.encode(images)
        assert [tuple(m.shape) for m in maps] == [(B, 1, 1), (B, 2, 2), (B, 4, 4)]
        assert all(m.dtype == torch.int64 and 0 <= int(m.min()) and int(m.max()) < 16 for m in maps)
        recon = tok.decode(maps)
        assert recon.shape == (B, 3, 8, 8) and recon.abs().max() <= 1
        per_scale = tok.decode_per_scale(maps)
        assert len(per_scale) == 3 and torch.equal(per_scale[-1], recon)
        assert tok.features(images).shape == (B, 8, 4, 4)
        assert tok.teacher_forcing_input(maps).shape == (B, 21 - 1, 8)
        assert tok.teacher_forcing_input(maps[:-1]).shape == (B, 20, 8)  # the last scale is not used
        assert tok.embed_tokens(maps[2]).shape == (B, 16, 8)
        # The features' final f_hat equals the f_hat rebuilt from the ids.
        fhats = tok.features_to_fhats(tok.features(images))
        assert torch.allclose(fhats[-1], tok.token_maps_to_fhat(maps), atol=1e-6)
        out = tok(images)
    assert out.recon.shape == (B, 3, 8, 8)
    assert [tuple(m.shape) for m in out.token_maps] == [(B, 1, 1), (B, 2, 2), (B, 4, 4)]
    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, maps))
    assert out.codebook_loss.ndim == 0 and out.commit_loss.ndim == 0 and out.codebook_loss > 0


def test_gradients_reach_encoder_codebook_and_phi() -> None:
    tok = _tiny().train()
    out = tok(_images())
    (out.recon.square().mean() + out.quant_loss).backward()
    assert tok.encoder.conv_in.weight.grad is not None and tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quant_conv.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.decoder.conv_out.weight.grad.abs().sum() > 0
    for k in set(tok.quantize.phi_indices):
        grad = tok.quantize.quant_resi.qresi_ls[k].weight.grad
        assert grad is not None and grad.abs().sum() > 0, f"Phi {k}"


def test_commit_loss_only_moves_encoder_and_codebook_loss_only_codebook() -> None:
    tok = _tiny().train()
    out = tok(_images())
    out.commit_loss.backward(retain_graph=True)
    assert tok.quantize.embedding.weight.grad is None or tok.quantize.embedding.weight.grad.abs().sum() == 0
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    tok.zero_grad(set_to_none=True)
    out.codebook_loss.backward()
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.encoder.conv_in.weight.grad is None


def test_spec_round_trip() -> None:
    tok = _tiny(share_quant_resi=0, using_mid_sa=False).eval()
    spec = json.loads(json.dumps(tok.spec()))  # plain data
    assert spec["class_path"] == "arzoo.tokenizers.multiscale_vq.MultiScaleVQTokenizer"
    rebuilt = build_tokenizer(spec)
    assert isinstance(rebuilt, MultiScaleVQTokenizer)
    assert rebuilt.patch_nums == tok.patch_nums and rebuilt.spec() == tok.spec()
    rebuilt.load_state_dict(tok.state_dict())
    rebuilt.eval()
    images = _images()
    with torch.no_grad():
        assert torch.equal(rebuilt.decode(rebuilt.encode(images)), tok.decode(tok.encode(images)))


def test_znorm_uses_cosine_similarity() -> None:
    tok = _tiny(using_znorm=True).eval()
    z = torch.randn(10, 8)
    codebook = tok.quantize.embedding.weight.detach()
    expected = (F.normalize(z, dim=-1) @ F.normalize(codebook, dim=-1).T).argmax(dim=1)
    assert torch.equal(tok.quantize.nearest_code(z), expected)
    with torch.no_grad():
        assert len(tok.encode(_images())) == 3


# ---- state-dict layout ---------------------------------------------------------------------------


def test_official_default_tokenizer_keys_and_size() -> None:
    with torch.device("meta"):
        tok = MultiScaleVQTokenizer(**VAR_VQVAE_256)
    keys = list(tok.state_dict())
    assert len(keys) == 324
    assert keys == _spec_keys((1, 1, 2, 2, 4), 2, 10)
    shortcuts = {k.rsplit(".nin_shortcut", 1)[0] for k in keys if ".nin_shortcut." in k}
    assert shortcuts == {
        "encoder.down.2.block.0", "encoder.down.4.block.0", "decoder.up.1.block.0", "decoder.up.3.block.0"
    }

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(tok) == 108_948_355
    assert count(tok.encoder) == 44_107_872
    assert count(tok.decoder) == 64_653_923
    assert tok.quantize.embedding.weight.numel() == 131_072
    assert count(tok.quantize.quant_resi) == 36_992
    assert count(tok.quant_conv) + count(tok.post_quant_conv) == 18_496
    assert tok.quantize.ema_vocab_hit_SV.shape == (10, 4096)
    assert tok.image_size == 256 and tok.grid == (16, 16)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(share_quant_resi=1),
        dict(share_quant_resi=0),
        dict(share_quant_resi=0, default_qresi_counts=2),
        dict(share_quant_resi=3),
        dict(quant_resi=0.0),
        dict(using_sa=False, using_mid_sa=False),
        dict(ch_mult=(2, 1), num_res_blocks=1),
    ],
)
def test_key_layout_variants(overrides: dict) -> None:
    args = {**TINY, **overrides}
    with torch.device("meta"):
        tok = MultiScaleVQTokenizer(**args)
    expected = _spec_keys(
        args["ch_mult"], args.get("num_res_blocks", 2), len(args["patch_nums"]),
        share_quant_resi=args.get("share_quant_resi", 4),
        default_qresi_counts=args.get("default_qresi_counts", 0),
        quant_resi=args.get("quant_resi", 0.5), using_sa=args.get("using_sa", True),
        using_mid_sa=args.get("using_mid_sa", True),
    )
    assert list(tok.state_dict()) == expected


@pytest.mark.parametrize(
    "overrides", [dict(share_quant_resi=1), dict(quant_resi=0.0), dict(using_sa=False, using_mid_sa=False)]
)
def test_variants_run(overrides: dict) -> None:
    tok = _tiny(**overrides).eval()
    with torch.no_grad():
        maps = tok.encode(_images())
        assert tok.decode(maps).shape == (2, 3, 8, 8)


def test_ema_buffer_with_other_scale_count_is_replaced() -> None:
    source = _tiny(patch_nums=(1, 2, 4))
    target = _tiny(patch_nums=(1, 2, 3, 4))
    state = source.state_dict()
    target.load_state_dict(state)
    assert target.quantize.ema_vocab_hit_SV.shape == (4, 16)
    assert state["quantize.ema_vocab_hit_SV"].shape == (3, 16)  # the caller's dict is untouched
    assert torch.equal(target.quantize.embedding.weight, source.quantize.embedding.weight)


# ---- interop -------------------------------------------------------------------------------------


def test_kwargs_from_official_config() -> None:
    config = dict(vocab_size=16, z_channels=8, ch=64, v_patch_nums=(1, 2, 4), test_mode=True)
    ddconfig = dict(ch=32, ch_mult=(1, 2), num_res_blocks=2, dropout=0.0, in_channels=3, z_channels=8,
                    using_sa=True, using_mid_sa=False)
    kwargs = vqvae_kwargs_from_official(config, ddconfig)
    assert kwargs["image_size"] == 8 and kwargs["patch_nums"] == (1, 2, 4) and kwargs["ch"] == 32
    assert kwargs["using_mid_sa"] is False and "test_mode" not in kwargs and "v_patch_nums" not in kwargs
    MultiScaleVQTokenizer(**kwargs)
    # Without a ddconfig: the official hard-coded encoder/decoder and official defaults.
    full = vqvae_kwargs_from_official(dict(ch=160, vocab_size=4096, z_channels=32))
    assert full == dict(VAR_VQVAE_256)
    with pytest.raises(ValueError, match="in_channels"):
        vqvae_kwargs_from_official(config, {**ddconfig, "in_channels": 1})
    with pytest.raises(ValueError, match="unknown"):
        vqvae_kwargs_from_official({**config, "typo": 1})


def test_extract_state_dict_prefixes_and_nesting() -> None:
    t = torch.zeros(1)
    assert extract_state_dict({"a.b": t}) == {"a.b": t}
    assert extract_state_dict({"model": {"module._orig_mod.a": t}, "epoch": 3}) == {"a": t}
    assert extract_state_dict({"state_dict": {"module.a": t}}) == {"a": t}
    with pytest.raises(ValueError, match="could not find a state dict"):
        extract_state_dict({"epoch": 3})


def test_load_vqvae_from_file_and_wrapped_dict(tmp_path: Path) -> None:
    tok = _tiny().eval()
    path = tmp_path / "vae.pth"
    torch.save({"model": {f"module.{k}": v for k, v in tok.state_dict().items()}}, path)
    loaded = load_vqvae(path, **TINY)
    assert not loaded.training
    for key, value in tok.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ---- errors --------------------------------------------------------------------------------------


def test_patch_nums_must_end_at_latent_grid() -> None:
    with pytest.raises(ValueError) as err:
        MultiScaleVQTokenizer(**{**TINY, "patch_nums": (1, 2, 3)})
    message = str(err.value)
    for part in ("[1, 2, 3]", "image_size 8", "downsampling 2", "= 4"):
        assert part in message, (part, message)


@pytest.mark.parametrize("patch_nums", [(4,), (1, 3, 2, 4), (1, 1, 4), (0, 2, 4)])
def test_patch_nums_must_be_increasing_with_two_scales(patch_nums) -> None:
    with pytest.raises(ValueError, match="patch_nums"):
        MultiScaleVQTokenizer(**{**TINY, "patch_nums": patch_nums})


def test_image_size_must_be_divisible_by_downsampling() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        MultiScaleVQTokenizer(**{**TINY, "image_size": 9, "patch_nums": (1, 2, 4)})


def test_wrong_image_shape_and_token_maps() -> None:
    tok = _tiny().eval()
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        tok.encode(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="token map"):
        tok.decode([torch.zeros(2, 1, 1, dtype=torch.long), torch.zeros(2, 3, 3, dtype=torch.long),
                    torch.zeros(2, 4, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="scale"):
        tok.next_scale_input(0, torch.zeros(2, 8, 4, 4), torch.zeros(2, 8, 2, 2))


def test_load_vqvae_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vqvae(missing, **TINY)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint\x00\x01")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_vqvae(garbage, **TINY)
    state = _tiny().state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch.*quantize\.embedding\.weight"):
        load_vqvae(state, **{**TINY, "vocab_size": 32})
    del state["quant_conv.bias"]
    with pytest.raises(ValueError, match=r"1 missing: \['quant_conv\.bias'\]"):
        load_vqvae(state, **TINY)


@pytest.mark.parametrize("eini", [0.0, 0.05, -1.0])
def test_codebook_init_follows_official_eini(eini):
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(image_size=8, vocab_size=512, z_channels=8, ch=32, ch_mult=(1, 2),
                                num_res_blocks=1, patch_nums=(1, 2, 4), codebook_init=eini)
    w = tok.quantize.embedding.weight
    if eini == 0:  # nn.Embedding's default N(0, 1)
        assert 0.9 < w.std().item() < 1.1
    elif eini > 0:
        assert abs(w.std().item() - eini) < 0.01 * 2 and w.abs().max().item() <= 2.0
    else:
        assert w.abs().max().item() <= abs(eini) / 512
    assert tok.spec()["init_args"]["codebook_init"] == eini
