"""Parity of `MultiScaleVQTokenizer` with the official VAR VQVAE (fixture `var/vqvae.pt`).

Every size comes from the fixture (config, ddconfig, image size, patch numbers), so another fixture
of the same format with other values runs unchanged. Tolerances: tests/fixtures/parity/var/README.md.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_parity

from arzoo.interop.var import load_vqvae, vqvae_kwargs_from_official
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

pytestmark = pytest.mark.parity

ATOL_FEATURES = 1e-5
ATOL_IMAGES = 1e-4
RTOL_LOSS = 1e-5


@pytest.fixture(scope="module")
def fx() -> dict:
    return load_parity("var", "vqvae.pt")


@pytest.fixture()
def tok(fx: dict) -> MultiScaleVQTokenizer:
    kwargs = vqvae_kwargs_from_official(fx["config"], fx["ddconfig"], fx["image_size"])
    model = load_vqvae(fx["state_dict"], **kwargs)
    assert not model.training
    return model


def _maps(tok: MultiScaleVQTokenizer, ids_list: list[torch.Tensor]) -> list[torch.Tensor]:
    """Fixture ids (B, pn^2) -> token maps (B, pn, pn)."""
    return [ids.reshape(ids.shape[0], pn, pn) for ids, pn in zip(ids_list, tok.patch_nums)]


def _close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"{what}: max abs diff {diff:.3g} > {atol}"


def test_construction_matches_fixture(fx: dict, tok: MultiScaleVQTokenizer) -> None:
    assert tok.downsample == fx["downsample"]
    assert tok.image_size == fx["image_size"]
    assert tok.patch_nums == tuple(fx["config"]["v_patch_nums"])
    # Same keys, in the official state-dict order, with the same shapes.
    ours = tok.state_dict()
    assert list(ours) == list(fx["state_dict"])
    for key, value in fx["state_dict"].items():
        assert ours[key].shape == value.shape, key


def test_features_ids_and_fhats(fx: dict, tok: MultiScaleVQTokenizer) -> None:
    with torch.no_grad():
        f = tok.features(fx["images"])
        _close(f, fx["f"], ATOL_FEATURES, "f")
        # Quantise the fixture's f, so that the ids do not depend on encoder round-off.
        maps = tok.features_to_token_maps(fx["f"])
        fhats = tok.features_to_fhats(fx["f"])
        encoded = tok.encode(fx["images"])
    assert len(maps) == len(fx["idx_list"])
    for si, (ours, ref, enc) in enumerate(zip(maps, fx["idx_list"], encoded)):
        assert ours.dtype == torch.int64
        assert torch.equal(ours.flatten(1), ref), f"ids of scale {si}"
        assert torch.equal(enc.flatten(1), ref), f"encode() ids of scale {si}"
    for si, (ours, ref) in enumerate(zip(fhats, fx["f_hat_list"])):
        _close(ours, ref, ATOL_FEATURES, f"f_hat after scale {si}")
    _close(fhats[-1], fx["f_hat_final"], ATOL_FEATURES, "f_hat_final")


def test_teacher_forcing_input(fx: dict, tok: MultiScaleVQTokenizer) -> None:
    with torch.no_grad():
        from_flat = tok.teacher_forcing_input(fx["idx_list"])
        from_maps = tok.teacher_forcing_input(_maps(tok, fx["idx_list"]))
    _close(from_flat, fx["x_BLCv_wo_first_l"], ATOL_FEATURES, "x_BLCv_wo_first_l")
    assert torch.equal(from_flat, from_maps)
    assert from_flat.shape[1] == tok.num_tokens - tok.first_l


def test_fhat_from_ids_and_decoding(fx: dict, tok: MultiScaleVQTokenizer) -> None:
    maps = _maps(tok, fx["idx_list"])
    with torch.no_grad():
        f_hat = tok.token_maps_to_fhat(maps)
        partial = tok.token_maps_to_fhat(fx["idx_list"], last_one=False)
        recon = tok.decode(maps)
        recon_from_fhat = tok.decode_fhat(fx["f_hat_final"])
        per_scale = tok.decode_per_scale(maps)
    _close(f_hat, fx["f_hat_from_idx"], ATOL_FEATURES, "f_hat_from_idx")
    for si, (ours, ref) in enumerate(zip(partial, fx["f_hat_list"])):
        _close(ours, ref, ATOL_FEATURES, f"partial f_hat {si}")
    _close(recon, fx["recon"], ATOL_IMAGES, "recon")
    _close(recon_from_fhat, fx["recon_from_fhat"], ATOL_IMAGES, "recon_from_fhat")
    assert len(per_scale) == len(fx["recon_per_scale"])
    for si, (ours, ref) in enumerate(zip(per_scale, fx["recon_per_scale"])):
        _close(ours, ref, ATOL_IMAGES, f"recon_per_scale[{si}]")


def test_next_scale_input_replays_fixture(fx: dict, tok: MultiScaleVQTokenizer) -> None:
    """Stepping scale by scale (as the sampler does) reproduces f_hat_list and the teacher-forcing slices."""
    ids_list, x_ref = fx["idx_list"], fx["x_BLCv_wo_first_l"]
    B, P, SN = ids_list[0].shape[0], tok.patch_nums[-1], len(tok.patch_nums)
    f_hat = torch.zeros(B, tok.codebook_dim, P, P)
    start = 0
    with torch.no_grad():
        for si, ids in enumerate(ids_list):
            h_BlC = tok.embed_tokens(ids)
            assert h_BlC.shape == (B, ids.shape[1], tok.codebook_dim)
            before = f_hat.clone()
            f_hat_new, next_input = tok.next_scale_input(si, f_hat, h_BlC)
            assert torch.equal(f_hat, before), "next_scale_input must not modify f_hat in place"
            f_hat = f_hat_new
            _close(f_hat, fx["f_hat_list"][si], ATOL_FEATURES, f"stepped f_hat {si}")
            if si == SN - 1:
                assert next_input is None
                break
            pn_next = tok.patch_nums[si + 1]
            assert next_input.shape == (B, tok.codebook_dim, pn_next, pn_next)
            stop = start + pn_next * pn_next
            next_BlC = next_input.flatten(2).transpose(1, 2)
            _close(next_BlC, x_ref[:, start:stop], ATOL_FEATURES, f"next input {si}")
            start = stop
        # The (B, Cv, pn, pn) form of the codes gives the same result.
        pn0 = tok.patch_nums[0]
        h_map = tok.embed_tokens(ids_list[0]).transpose(1, 2).reshape(B, tok.codebook_dim, pn0, pn0)
        f0, _ = tok.next_scale_input(0, torch.zeros(B, tok.codebook_dim, P, P), h_map)
    _close(f0, fx["f_hat_list"][0], ATOL_FEATURES, "stepped f_hat 0 from a map")
    assert start == x_ref.shape[1]


def test_quantizer_training_forward(fx: dict, tok: MultiScaleVQTokenizer) -> None:
    """Official `vae.quantize(f)` in training mode: straight-through f_hat and vq_loss = codebook + commit."""
    ref = fx["quantizer_forward"]
    tok.quantize.train()
    out = tok.quantize(fx["f"])
    _close(out.f_hat_BCPP, ref["f_hat"], ATOL_FEATURES, "quantizer f_hat")
    torch.testing.assert_close(out.codebook_loss + out.commit_loss, ref["vq_loss"], rtol=RTOL_LOSS, atol=0.0)
    # The split: commit = beta * codebook in value (both are mean_si mse(f_hat_si, f)).
    beta = fx["config"]["beta"]
    torch.testing.assert_close(out.commit_loss, beta * out.codebook_loss, rtol=1e-6, atol=0.0)
    for ours, ids in zip(out.token_maps, fx["idx_list"]):
        assert torch.equal(ours.flatten(1), ids)


def test_vae_training_forward(fx: dict, tok: MultiScaleVQTokenizer) -> None:
    ref = fx["vae_forward"]
    tok.train()
    out = tok(fx["images"])
    _close(out.recon, ref["rec"], ATOL_IMAGES, "vae_forward rec")
    torch.testing.assert_close(out.quant_loss, ref["vq_loss"], rtol=RTOL_LOSS, atol=0.0)
    # Losses are also computed in eval mode, with the same values.
    tok.eval()
    with torch.no_grad():
        out_eval = tok(fx["images"])
    torch.testing.assert_close(out_eval.quant_loss, ref["vq_loss"], rtol=RTOL_LOSS, atol=0.0)
