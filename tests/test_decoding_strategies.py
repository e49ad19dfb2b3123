"""Decoding strategies are objects the generation loop calls: the default one per paradigm, a user's own."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from arzoo.generators import NextScaleGenerator, RasterGenerator, TokenSampler, TopKTopPSampler, VARSampler
from arzoo.tokenizers import MultiScaleVQTokenizer, VQTokenizer
from arzoo.tokenizers.checkpoint import save_tokenizer_checkpoint


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> RasterGenerator:
    torch.manual_seed(0)
    tok = VQTokenizer(image_size=16, codebook_size=32, codebook_embed_dim=4, encoder_ch_mult=[1, 1, 1],
                      decoder_ch_mult=[1, 1, 1], z_channels=32, ch=32, num_res_blocks=1)
    path = save_tokenizer_checkpoint(tok, tmp_path_factory.mktemp("tok") / "vq.ckpt")
    return RasterGenerator(tokenizer_path=str(path), dim=32, n_layer=1, n_head=2, multiple_of=32)


@pytest.fixture(scope="module")
def next_scale(tmp_path_factory) -> NextScaleGenerator:
    torch.manual_seed(0)
    tok = MultiScaleVQTokenizer(image_size=16, vocab_size=32, z_channels=8, ch=32, ch_mult=[1, 1, 1],
                                num_res_blocks=1, patch_nums=[1, 2, 4], codebook_init=0.02)
    path = save_tokenizer_checkpoint(tok, tmp_path_factory.mktemp("tok") / "msvq.ckpt")
    return NextScaleGenerator(tokenizer_path=str(path), depth=1, embed_dim=32, num_heads=2)


@dataclass(frozen=True)
class LowestId(TokenSampler):
    """A toy strategy: the smallest token id that survives top-k (consumes no randomness)."""

    def filter(self, logits: torch.Tensor) -> torch.Tensor:
        return TopKTopPSampler(top_k=self.top_k).filter(logits)

    def draw(self, filtered: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return filtered.isfinite().int().argmax(dim=-1)


def _seeded(model, **kwargs) -> torch.Tensor:
    return model.generate([1, 3], cfg=2.0, generator=torch.Generator().manual_seed(7), **kwargs)


def test_each_paradigm_has_its_default_strategy(raster, next_scale):
    assert raster.sampler_cls is TopKTopPSampler and next_scale.sampler_cls is VARSampler
    seen = []
    for model in (raster, next_scale):
        step = model.update_state
        model.update_state = lambda state, ids, logits, step=step: seen.append(state.sampler) or step(state, ids, logits)
        _seeded(model, top_k=5)
        del model.update_state
    assert {type(s) for s in seen} == {TopKTopPSampler, VARSampler}
    assert all(s.top_k == 5 for s in seen)


@pytest.mark.parametrize("which", ["raster", "next_scale"])
def test_a_sampler_object_equals_the_keyword_arguments(which, request):
    model = request.getfixturevalue(which)
    by_keywords = _seeded(model, temperature=0.8, top_k=6, top_p=0.9)
    by_object = _seeded(model, sampler=model.sampler_cls(temperature=0.8, top_k=6, top_p=0.9))
    assert torch.equal(by_keywords, by_object)
    greedy = model.generate([1, 3], sampler=model.sampler_cls(greedy=True))
    assert torch.equal(greedy, model.generate([1, 3], greedy=True))


@pytest.mark.parametrize("which", ["raster", "next_scale"])
def test_a_users_own_strategy_is_called_every_step(which, request):
    model = request.getfixturevalue(which)
    tokens = _seeded(model, sampler=LowestId(top_k=3))
    logits = torch.randn(4, model.vocab_size)
    assert torch.equal(LowestId(top_k=3)(logits), TopKTopPSampler(top_k=3).filter(logits).isfinite().int().argmax(-1))
    assert tokens.shape == (2, model.num_tokens)
    assert torch.equal(tokens, _seeded(model, sampler=LowestId(top_k=3)))  # no randomness consumed


def test_strategy_errors_name_the_value(raster):
    with pytest.raises(ValueError, match="pass either sampler=TopKTopPSampler.*or temperature.*top_k=4"):
        raster.generate([1], sampler=TopKTopPSampler(), top_k=4)
    with pytest.raises(ValueError, match="top_k must be between 1 and the vocabulary size 32, got 40"):
        raster.generate([1], sampler=TopKTopPSampler(top_k=40))
    with pytest.raises(TypeError, match="abstract"):
        TokenSampler()  # type: ignore[abstract]
