"""Unit tests of `FrequencyVQTokenizer` (NFIG's FR-VAE: next-frequency residual VQ)."""

from __future__ import annotations

import math

import pytest
import torch

from arzoo.tokenizers import FrequencyVQTokenizer, MultiScaleVQTokenizer, TokenizerModule, load_tokenizer
from arzoo.tokenizers.base import TokenizerOutput, build_tokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint
from arzoo.tokenizers.frequency_vq import frequency_band_masks

# 16x16 images -> 8x8 latent, four bands.
TINY = dict(ch=32, ch_mult=(1, 2), z_channels=8, vocab_size=16, image_size=16, band_grids=(1, 2, 4, 8))
MODES = ["bandpass", "lowpass"]


def _tiny(**overrides) -> FrequencyVQTokenizer:
    torch.manual_seed(0)
    return FrequencyVQTokenizer(**{**TINY, **overrides})


def _images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1


def _energy_outside(x_BCPP: torch.Tensor, mask_PP: torch.Tensor) -> float:
    """Largest |FFT coefficient| of x outside `mask`, relative to the largest inside or outside."""
    spectrum = torch.fft.fft2(x_BCPP.double()).abs()
    return float((spectrum * (1 - mask_PP.double())).max() / spectrum.max().clamp_min(1e-30))


# ---- masks -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, grids",
    [("radial", (1, 2, 4, 8)), ("radial", (1, 2, 3, 4, 5, 6, 8)), ("radial", (1, 4, 8, 16)), ("radial", (1, 3, 5, 7)),
     ("square", (1, 2, 4, 8)), ("square", (1, 2, 4, 6, 8)), ("square", (1, 4, 8, 16))],
)
def test_masks_partition_the_spectrum(shape, grids) -> None:
    masks = frequency_band_masks(grids, shape)
    P = grids[-1]
    assert masks.shape == (len(grids), P, P)
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(masks.sum(0), torch.ones(P, P))  # disjoint and covering
    assert (masks.sum((1, 2)) > 0).all()  # no empty band
    assert masks[0, 0, 0] == 1 and masks[0].sum() == 1  # a 1x1 first grid is the DC component
    flipped = torch.roll(masks.flip(1, 2), shifts=(1, 1), dims=(1, 2))  # M[-u, -v]: real band components
    assert torch.equal(masks, flipped)


def test_radial_cutoffs_follow_the_band_grids() -> None:
    masks = frequency_band_masks((1, 2, 3, 4, 5, 6, 8), "radial")
    freq = torch.fft.fftfreq(8, d=1 / 8).abs()
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    for k, g in enumerate((1, 2, 3, 4, 5, 6)):
        below = masks[: k + 1].sum(0).bool()
        assert torch.equal(below, radius <= g / 2), k  # band 0..k = everything up to the grid's Nyquist
    assert masks.sum((1, 2)).tolist() == [1, 4, 4, 4, 8, 8, 35]


# ---- band decomposition ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["radial", "square"])
def test_band_components_sum_to_the_features(shape) -> None:
    tok = _tiny(mask_shape=shape)
    f = tok.features(_images())
    bands = tok.split_bands(f)
    assert len(bands) == tok.num_bands == 4
    assert all(b.shape == f.shape and b.dtype == torch.float32 for b in bands)
    torch.testing.assert_close(sum(bands), f, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["radial", "square"])
def test_band_components_have_no_energy_outside_their_mask(shape) -> None:
    tok = _tiny(mask_shape=shape)
    f = torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(2))
    for k, band in enumerate(tok.split_bands(f)):
        assert band.abs().max() > 1e-3, k  # not trivially empty
        assert _energy_outside(band, tok.band_masks[k]) < 1e-6, k
        torch.testing.assert_close(tok.split_bands(band)[k], band, atol=1e-5, rtol=0)  # idempotent


@pytest.mark.parametrize("mode", MODES)
def test_quantised_contributions_stay_in_band(mode) -> None:
    tok = _tiny(band_mode=mode)
    f = tok.features(_images())
    with torch.no_grad():
        f_hats = tok.features_to_fhats(f)
    previous = torch.zeros_like(f_hats[0])
    cumulative = tok.band_masks.cumsum(0)
    for k, f_hat in enumerate(f_hats):
        contribution = f_hat - previous
        allowed = tok.band_masks[k] if mode == "bandpass" else cumulative[k]
        assert contribution.abs().max() > 1e-4, k
        assert _energy_outside(contribution, allowed) < 1e-5, k
        assert _energy_outside(f_hat, cumulative[k]) < 1e-5, k  # partial sums are low-pass
        previous = f_hat
    if mode == "bandpass":  # band k of the reconstruction comes from token map k alone
        for k, band in enumerate(tok.split_bands(f_hats[-1])):
            expected = f_hats[k] - (f_hats[k - 1] if k else 0)
            torch.testing.assert_close(band, expected, atol=1e-5, rtol=0)


def test_bandpass_residual_of_a_band_is_the_band_of_the_features() -> None:
    # Earlier contributions have no energy in band k, so band k is picked from f's own band k:
    # the ids equal quantising each band of f alone.
    tok = _tiny(band_mode="bandpass")
    f = tok.features(_images()).detach()
    ids = tok.features_to_token_maps(f)
    for k, band in enumerate(tok.split_bands(f)):
        g = tok.band_grids[k]
        z = band if g == 8 else torch.nn.functional.interpolate(band, size=(g, g), mode="area")
        expected = tok.quantize.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, 8)).view(-1, g, g)
        assert torch.equal(ids[k], expected), k


# ---- tokenizer interface -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_encode_decode_forward_shapes(mode) -> None:
    tok = _tiny(band_mode=mode)
    images = _images()
    assert isinstance(tok, MultiScaleVQTokenizer)  # the next-scale generator machinery accepts it
    assert tok.scales == ((1, 1), (2, 2), (4, 4), (8, 8)) and tok.patch_nums == tok.band_grids == (1, 2, 4, 8)
    assert tok.num_tokens == 1 + 4 + 16 + 64 and tok.first_l == 1 and tok.grid == (8, 8)
    assert tok.vocab_size == 16 and tok.codebook_dim == 8
    maps = tok.encode(images)
    assert [tuple(m.shape) for m in maps] == [(2, 1, 1), (2, 2, 2), (2, 4, 4), (2, 8, 8)]
    assert all(m.dtype == torch.int64 and 0 <= m.min() and m.max() < 16 for m in maps)
    recon = tok.decode(maps)
    assert recon.shape == images.shape and recon.abs().max() <= 1
    assert len(tok.decode_per_scale(maps)) == 4
    out = tok(images)
    assert isinstance(out, TokenizerOutput) and out.recon.shape == images.shape
    assert all(torch.equal(a, b) for a, b in zip(out.token_maps, maps))
    assert torch.isfinite(out.quant_loss) and out.quant_loss > 0
    # the decode path (ids -> f_hat) agrees with the quantiser's own pass
    torch.testing.assert_close(tok.token_maps_to_fhat(maps), tok.features_to_fhats(tok.features(images))[-1])


def test_gradients_reach_encoder_codebook_and_phi() -> None:
    tok = _tiny()
    out = tok(_images())
    (out.recon.square().mean() + out.quant_loss).backward()
    assert tok.encoder.conv_in.weight.grad.abs().sum() > 0
    assert tok.quantize.embedding.weight.grad.abs().sum() > 0
    assert tok.quantize.phi(0).weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", MODES)
def test_next_scale_helpers_agree(mode) -> None:
    tok = _tiny(band_mode=mode).eval()
    maps = tok.encode(_images())
    inputs = tok.teacher_forcing_input(maps)
    assert inputs.shape == (2, tok.num_tokens - tok.first_l, tok.codebook_dim)
    torch.testing.assert_close(tok.teacher_forcing_input(maps[:-1]), inputs)  # the last map is not needed
    f_hat = torch.zeros(2, 8, 8, 8)
    steps = []
    for si, ids in enumerate(maps):
        h = tok.embed_tokens(ids) if si % 2 else tok._embed_map(ids.flatten(1), tok.band_grids[si])
        f_hat, nxt = tok.next_scale_input(si, f_hat, h)
        if nxt is not None:
            steps.append(nxt.flatten(2).transpose(1, 2))
        else:
            assert si == len(maps) - 1
    torch.testing.assert_close(torch.cat(steps, dim=1), inputs)
    torch.testing.assert_close(f_hat, tok.token_maps_to_fhat(maps))
    with pytest.raises(ValueError, match="band index 4 out of range"):
        tok.next_scale_input(4, f_hat, h)
    with pytest.raises(ValueError, match="band 1 codes should have shape"):
        tok.next_scale_input(1, f_hat, torch.zeros(2, 8, 3, 3))


# ---- state dict, spec, checkpoints -------------------------------------------------------------


def test_same_keys_and_initial_weights_as_the_multiscale_tokenizer() -> None:
    tok = _tiny()
    torch.manual_seed(0)
    kwargs = {k: v for k, v in TINY.items() if k != "band_grids"}
    ref = MultiScaleVQTokenizer(**kwargs, patch_nums=TINY["band_grids"])
    ours, theirs = tok.state_dict(), ref.state_dict()
    assert list(ours) == list(theirs)  # masks are not saved: they follow from the arguments
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_spec_round_trip(tmp_path) -> None:
    tok = _tiny(mask_shape="square", band_mode="lowpass", codebook_init=0.02)
    spec = tok.spec()
    assert spec["class_path"] == "arzoo.tokenizers.frequency_vq.FrequencyVQTokenizer"
    args = spec["init_args"]
    assert args["band_grids"] == [1, 2, 4, 8] and args["mask_shape"] == "square" and args["band_mode"] == "lowpass"
    assert "patch_nums" not in args
    rebuilt = build_tokenizer(spec)
    assert type(rebuilt) is FrequencyVQTokenizer and rebuilt.spec() == spec
    assert torch.equal(rebuilt.band_masks, tok.band_masks)
    rebuilt.load_state_dict(tok.state_dict())
    images = _images()
    tok.eval(), rebuilt.eval()
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.encode(images), tok.encode(images)))
    # through a checkpoint file, as a TokenizerModule writes it
    path = save_tokenizer_checkpoint(tok, tmp_path / "fvq.ckpt")
    loaded = load_tokenizer(path, expected=MultiScaleVQTokenizer)
    assert type(loaded) is FrequencyVQTokenizer and loaded.spec() == spec
    torch.testing.assert_close(loaded.decode(loaded.encode(images)), tok.decode(tok.encode(images)))


# ---- errors ------------------------------------------------------------------------------------


def test_last_band_grid_must_be_the_latent_grid() -> None:
    with pytest.raises(ValueError, match=r"band_grids \[1, 2, 4\].*last band grid must equal the latent grid.*= 8"):
        _tiny(band_grids=(1, 2, 4))


@pytest.mark.parametrize("grids", [(1, 4, 2, 8), (1, 2, 2, 8), (0, 2, 8), (8,)])
def test_band_grids_must_be_increasing_with_two_bands(grids) -> None:
    with pytest.raises(ValueError, match="band_grids"):
        _tiny(band_grids=grids)


def test_empty_band_is_an_error_only_for_band_pass() -> None:
    with pytest.raises(ValueError, match=r"band 2 \(grid 3x3, cut-off frequency 1.5\) holds no frequency"):
        _tiny(band_grids=(1, 2, 3, 8), mask_shape="square", band_mode="bandpass")
    assert _tiny(band_grids=(1, 2, 3, 8), mask_shape="radial", band_mode="bandpass").num_bands == 4  # (1, 1) lies in (1, 1.5]
    # low-pass: grid 3 shares grid 2's cut-off and re-quantises the same frequencies on a bigger grid
    quantizer = _tiny(band_grids=(1, 2, 3, 8), mask_shape="square", band_mode="lowpass").quantize
    assert quantizer.band_masks_KPP[2].sum() == 0
    assert torch.equal(quantizer._lowpass_half[2], quantizer._lowpass_half[1])


def test_unknown_mask_shape_and_band_mode() -> None:
    with pytest.raises(ValueError, match="mask_shape must be one of"):
        _tiny(mask_shape="gaussian")
    with pytest.raises(ValueError, match="band_mode must be one of"):
        _tiny(band_mode="highpass")
    with pytest.raises(ValueError, match="band_grids must be a sequence of ints"):
        _tiny(band_grids="1248")


# ---- a short training run, next to VAR's tokenizer ---------------------------------------------


def test_short_digits_training_next_to_the_multiscale_tokenizer() -> None:
    """40 steps on 32x32 digits: both frequency modes and VAR's tokenizer (same sizes and initial weights) train.

    Only finite, decreasing losses are checked here; the reconstruction comparison after a full run
    is recipes/digits/tokenizer_fvq.yaml against tokenizer_msvq.yaml. (At the recipes' lr 1e-3 and
    no warmup the quantiser loss of every variant first rises while the encoder's features grow, so
    this uses 3e-4.)
    """
    from arzoo.data import ImageDataModule

    data = ImageDataModule(source="digits", image_size=32, batch_size=32)
    data.setup("fit")
    order = torch.randperm(len(data.train_set), generator=torch.Generator().manual_seed(0))[: 40 * 32]
    images = torch.stack([data.train_set[int(i)]["image"] for i in order]).view(40, 32, 3, 32, 32)
    size = dict(image_size=32, vocab_size=64, z_channels=32, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                codebook_init=0.02)
    grids = (1, 2, 3, 4, 5, 6, 8)
    variants = {
        "fvq-bandpass": (FrequencyVQTokenizer, {"band_grids": grids, "band_mode": "bandpass", "mask_shape": "radial"}),
        "fvq-lowpass": (FrequencyVQTokenizer, {"band_grids": grids, "band_mode": "lowpass"}),
        "msvq": (MultiScaleVQTokenizer, {"patch_nums": grids}),
    }
    for name, (cls, extra) in variants.items():
        torch.manual_seed(0)
        module = TokenizerModule(cls(**size, **extra), rec_loss="l1+l2")
        optimizer = torch.optim.AdamW(module.tokenizer.parameters(), lr=3e-4, betas=(0.9, 0.95))
        totals, recs = [], []
        for batch in images:
            out = module.tokenizer(batch)
            rec = module.reconstruction_loss(out.recon, batch)
            loss = rec + out.quant_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            totals.append(loss.item())
            recs.append(rec.item())
        assert all(math.isfinite(x) for x in totals), name
        assert sum(totals[-5:]) < sum(totals[:5]), (name, totals)
        assert sum(recs[-5:]) < 0.5 * sum(recs[:5]), (name, recs)


def test_recipe_fits_and_reloads(tmp_path, monkeypatch) -> None:
    import sys
    from pathlib import Path

    from arzoo.cli import run as arzoo_run

    monkeypatch.setattr(sys, "argv", ["arzoo"])  # LightningCLI warns when sys.argv and args are both given
    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).resolve().parents[1] / "recipes/digits/tokenizer_fvq.yaml"
    arzoo_run(["fit", "--config", str(recipe), "--trainer.max_steps", "2", "--trainer.limit_train_batches", "2",
          "--trainer.limit_val_batches", "1", "--trainer.check_val_every_n_epoch", "1",
          "--trainer.log_every_n_steps", "1"])
    run = tmp_path / "runs/digits/tokenizer_fvq"
    assert (run / "version_0/recon.png").is_file()
    tokenizer = load_tokenizer(run / "last.ckpt", expected=FrequencyVQTokenizer)
    assert tokenizer.band_grids == (1, 2, 3, 4, 5, 6, 8) and tokenizer.quantize.band_mode == "lowpass"
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert tokenizer.decode(tokenizer.encode(images)).shape == images.shape
