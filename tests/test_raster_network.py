"""RasterTransformer (LlamaGen's c2i GPT) and its pieces: sizes, RoPE, cell orderings, KV cache."""

from __future__ import annotations

import pytest
import torch

from arzoo.generators.raster import RasterTransformer
from arzoo.interop.llamagen import GPT_PRESETS, gpt_kwargs_from_official
from arzoo.nn.attention import KVCache, attend
from arzoo.nn.llama import swiglu_hidden_dim
from arzoo.nn.rope import apply_rope, rope_2d_for_cells, rope_2d_table

# SPEC section 8: counted by instantiating the official presets (vocab 16384, 1000 classes).
OFFICIAL_PARAMS = {
    "GPT-B": 110_888_448,
    "GPT-L": 342_910_976,
    "GPT-XL": 774_699_520,
    "GPT-XXL": 1_410_972_672,
    "GPT-3B": 3_096_659_200,
}

TINY = dict(dim=32, n_layer=2, n_head=2, vocab_size=24, num_classes=5, grid_size=4, multiple_of=16)


def _tiny(**overrides) -> RasterTransformer:
    torch.manual_seed(0)
    net = RasterTransformer(**{**TINY, **overrides})
    with torch.no_grad():  # the official init zeroes the head; make the logits informative
        net.output.weight.normal_(0.0, 0.5)
    return net.eval()


def _official_rope_table(grid_size: int, n_elem: int, base: float, cls_token_num: int) -> torch.Tensor:
    """Upstream `precompute_freqs_cis_2d` (LlamaGen gpt.py), transcribed."""
    half_dim = n_elem // 2
    freqs = 1.0 / (base ** (torch.arange(0, half_dim, 2)[: (half_dim // 2)].float() / half_dim))
    t = torch.arange(grid_size)
    freqs = torch.outer(t, freqs)
    freqs_grid = torch.concat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )
    cache_grid = torch.stack([torch.cos(freqs_grid), torch.sin(freqs_grid)], dim=-1)
    cache = cache_grid.flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


# -- sizes -----------------------------------------------------------------------------------------


def test_presets_are_the_five_c2i_sizes() -> None:
    assert list(GPT_PRESETS) == list(OFFICIAL_PARAMS)
    assert dict(GPT_PRESETS["GPT-B"]) == dict(dim=768, n_layer=12, n_head=12)
    assert dict(GPT_PRESETS["GPT-3B"]) == dict(dim=3200, n_layer=24, n_head=32)


@pytest.mark.parametrize("preset", list(OFFICIAL_PARAMS))
def test_official_parameter_counts(preset: str) -> None:
    with torch.device("meta"):
        net = RasterTransformer(**GPT_PRESETS[preset], vocab_size=16384, num_classes=1000, grid_size=16)
    count = sum(p.numel() for p in net.parameters())
    assert count == OFFICIAL_PARAMS[preset]
    d, v, c, f = net.dim, 16384, 1000, swiglu_hidden_dim(net.dim)
    assert count == (c + 1) * d + 2 * v * d + d + net.n_layer * (4 * d * d + 3 * d * f + 2 * d)
    assert len(net.state_dict()) == 4 + 7 * net.n_layer


@pytest.mark.parametrize(
    ("dim", "multiple_of", "multiplier", "width"),
    [
        (768, 256, None, 2048),
        (1024, 256, None, 2816),
        (1280, 256, None, 3584),
        (1536, 256, None, 4096),
        (3200, 256, None, 8704),
        (64, 32, None, 192),  # 170 -> 192
        (48, 32, 1.3, 192),  # 128 -> 166 -> 192
        (96, 256, None, 256),  # 256 already a multiple: unchanged
    ],
)
def test_swiglu_width(dim: int, multiple_of: int, multiplier: float | None, width: int) -> None:
    assert swiglu_hidden_dim(dim, multiple_of, multiplier) == width


def test_class_table_has_null_row_iff_class_dropout() -> None:
    assert _tiny().cls_embedding.embedding_table.weight.shape == (TINY["num_classes"] + 1, TINY["dim"])
    net = _tiny(class_dropout_prob=0.0)
    assert net.cls_embedding.embedding_table.weight.shape == (TINY["num_classes"], TINY["dim"])
    assert not net.has_null_class
    labels = torch.tensor([0, 1, 2])
    assert torch.equal(net.drop_labels(labels), labels)


def test_init_follows_upstream() -> None:
    torch.manual_seed(0)
    net = RasterTransformer(**{**TINY, "dim": 64, "vocab_size": 256})
    assert torch.count_nonzero(net.output.weight) == 0
    norms = [p for name, p in net.named_parameters() if name.endswith("norm.weight")]
    assert len(norms) == 2 * net.n_layer + 1 and all(torch.equal(p, torch.ones_like(p)) for p in norms)
    assert abs(net.tok_embeddings.weight.std().item() - 0.02) < 0.002
    assert abs(net.layers[0].attention.wqkv.weight.std().item() - 0.02) < 0.002
    assert all(b is None for m in net.modules() for b in [getattr(m, "bias", None)])


def test_drop_path_ramp() -> None:
    net = RasterTransformer(**{**TINY, "n_layer": 3, "drop_path_rate": 0.2})
    assert isinstance(net.layers[0].drop_path, torch.nn.Identity)
    assert [round(layer.drop_path.drop_prob, 6) for layer in net.layers[1:]] == [0.1, 0.2]


# -- config mapping --------------------------------------------------------------------------------


def test_official_config_mapping_and_errors() -> None:
    kwargs = gpt_kwargs_from_official({"dim": 64, "n_layer": 2, "n_head": 4, "block_size": 576})
    assert kwargs["grid_size"] == 24 and kwargs["vocab_size"] == 16384 and kwargs["num_classes"] == 1000
    assert kwargs["rope_base"] == 10000.0 and kwargs["token_dropout_p"] == 0.1
    for bad, match in [
        ({"model_type": "t2i"}, "model_type"),
        ({"cls_token_num": 120}, "cls_token_num"),
        ({"n_kv_head": 2}, "n_kv_head"),
        ({"block_size": 250}, "perfect square"),
        ({"dimm": 64}, "unknown"),
    ]:
        with pytest.raises(ValueError, match=match):
            gpt_kwargs_from_official({"dim": 64, "n_layer": 2, "n_head": 4, **bad})
    # n_kv_head equal to n_head is plain multi-head attention.
    assert gpt_kwargs_from_official({"n_head": 32, "n_kv_head": 32})["n_head"] == 32


# -- RoPE ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("grid_size", "head_dim"), [(4, 16), (16, 64), (24, 64), (16, 100), (16, 128)])
def test_rope_table_matches_upstream_bit_for_bit(grid_size: int, head_dim: int) -> None:
    expected = _official_rope_table(grid_size, head_dim, 10000, 1)
    table = rope_2d_table(grid_size, head_dim, 10000.0)
    assert table.dtype == torch.float32 and torch.equal(table, expected)
    assert torch.count_nonzero(table[0]) == 0  # the class row is zeros, not the identity


def test_rope_needs_head_dim_multiple_of_4() -> None:
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_table(4, 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_for_cells(torch.tensor([0]), torch.tensor([0]), 10)
    with pytest.raises(ValueError, match="multiple of 4"):
        RasterTransformer(**{**TINY, "dim": 24, "n_head": 4})


def test_apply_rope_rotates_interleaved_pairs_in_float32() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3, 8)
    freqs = rope_2d_for_cells(torch.tensor([0, 1, 2, 3, 1]), torch.tensor([3, 0, 2, 1, 1]), 8)
    angles = torch.atan2(freqs[..., 1], freqs[..., 0])  # (L, hd/2)
    as_complex = torch.view_as_complex(x.reshape(2, 5, 3, 4, 2).contiguous())
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angles), angles)[None, :, None])
    torch.testing.assert_close(apply_rope(x, freqs), expected.flatten(3), atol=1e-6, rtol=0)
    out = apply_rope(x.to(torch.bfloat16), freqs)
    assert out.dtype == torch.bfloat16
    zero_rows = torch.zeros(5, 4, 2)
    assert torch.count_nonzero(apply_rope(x, zero_rows)) == 0


def test_rope_rows_for_cells_layout() -> None:
    """Row part (first hd/4 angles) from the row index, column part from the column index."""
    freqs = rope_2d_for_cells(torch.tensor([2]), torch.tensor([3]), 16, base=100.0)
    w = 1.0 / 100.0 ** (torch.arange(0, 8, 2).float() / 8)
    angles = torch.cat([2 * w, 3 * w])
    torch.testing.assert_close(freqs[0], torch.stack([angles.cos(), angles.sin()], -1), atol=1e-7, rtol=0)


# -- cell orderings ----------------------------------------------------------------------------------


def _column_major(grid_size: int) -> torch.Tensor:
    """Token k of a column-major scan sits in grid cell (k % g, k // g), raster index r*g + c."""
    return torch.arange(grid_size * grid_size).view(grid_size, grid_size).t().flatten()


def _reference_logits(net: RasterTransformer, tokens, labels, cells) -> torch.Tensor:
    """The network computed by hand, with RoPE angles built explicitly for the given cells."""
    g = net.grid_size
    freqs = torch.cat(
        [torch.zeros(1, net.head_dim // 2, 2), rope_2d_for_cells(cells // g, cells % g, net.head_dim)]
    )
    x = torch.cat([net.embed_class(labels), net.tok_embeddings(tokens)], dim=1)
    for layer in net.layers:
        x = layer(x, freqs)
    return net.output(net.norm(x)).float()


@torch.no_grad()
def test_cell_positions_give_each_token_its_cells_angles() -> None:
    net = _tiny()
    g, n = net.grid_size, net.num_tokens
    torch.manual_seed(1)
    image = torch.randint(0, TINY["vocab_size"], (2, g, g))
    labels = torch.tensor([1, 4])
    order = _column_major(g)
    tokens = image.flatten(1)[:, order]  # the image read column by column

    for length in (n - 1, n):
        cells = order[:length]
        rows = net.rope_rows(length, cells)
        explicit = rope_2d_for_cells(cells // g, cells % g, net.head_dim)
        expected_rows = torch.cat([torch.zeros(1, net.head_dim // 2, 2), explicit])
        torch.testing.assert_close(rows, expected_rows, atol=1e-6, rtol=0)
        assert torch.equal(rows, net.freqs_cis[torch.cat([torch.zeros(1, dtype=torch.long), cells + 1])])

        logits = net(tokens[:, :length], labels, cell_positions=cells)
        assert logits.shape == (2, 1 + length, TINY["vocab_size"])
        reference = _reference_logits(net, tokens[:, :length], labels, cells)
        torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)

    # Raster order is the default, and the ordering matters.
    raster = image.flatten(1)
    assert torch.equal(net(raster, labels), net(raster, labels, cell_positions=torch.arange(n)))
    assert not torch.allclose(net(tokens, labels, cell_positions=order), net(tokens, labels), atol=1e-3)

    with pytest.raises(ValueError, match="cell_positions"):
        net(tokens[:, :3], labels, cell_positions=order[:4])
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        net(tokens[:, :2], labels, cell_positions=torch.tensor([0, 16]))
    with pytest.raises(ValueError, match="do not fit"):
        net(torch.zeros(2, n + 1, dtype=torch.long), labels)


@torch.no_grad()
def test_decode_steps_follow_any_cell_order() -> None:
    net = _tiny()
    g, n = net.grid_size, net.num_tokens
    order = _column_major(g)
    torch.manual_seed(2)
    tokens = torch.randint(0, TINY["vocab_size"], (3, n))
    labels = torch.tensor([0, 2, 5])  # 5 = the null class
    full = net(tokens, labels, cell_positions=order)
    net.setup_cache(4, 1 + n)  # a cache larger than the batch is fine
    steps = [net.prefill(labels)]
    steps += [net.decode_step(tokens[:, i : i + 1], slot_pos=1 + i, cell=int(order[i])) for i in range(n)]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    # A multi-token cached call (class slot + a prefix) agrees too.
    net.setup_cache(3, 1 + n)
    prefix = net(tokens[:, :5], labels, cell_positions=order[:5], input_pos=torch.arange(6))
    torch.testing.assert_close(prefix, full[:, :6], atol=1e-5, rtol=1e-5)
    nxt = net.decode_step(tokens[:, 5:6], slot_pos=6, cell=int(order[5]))
    torch.testing.assert_close(nxt, full[:, 6], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cell"):
        net.decode_step(tokens[:, :1], slot_pos=1, cell=n)
    with pytest.raises(ValueError, match="slot_pos"):
        net.decode_step(tokens[:, :1], slot_pos=net.max_seq_len, cell=0)
    net.clear_cache()
    with pytest.raises(RuntimeError, match="setup_cache"):
        net.prefill(labels)


# -- KV cache and attention ------------------------------------------------------------------------


def test_kv_cache_writes_at_positions() -> None:
    cache = KVCache(2, 3, 8, 4)
    k, v = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4)
    k_all, v_all = cache.update(torch.tensor([1, 5]), k, v)
    assert k_all.shape == v_all.shape == (2, 3, 8, 4)
    assert torch.equal(k_all[:, :, [1, 5]], k) and torch.equal(v_all[:, :, [1, 5]], v)
    assert torch.count_nonzero(k_all[:, :, [0, 2, 3, 4, 6, 7]]) == 0
    assert torch.equal(cache.k_cache[:, :, 5], k[:, :, 1])  # written in place
    k_one, _ = cache.update(torch.tensor([0]), k[:1, :, :1], v[:1, :, :1])  # smaller batch
    assert k_one.shape == (1, 3, 8, 4) and torch.equal(cache.k_cache[0, :, 0], k[0, :, 0])
    assert cache.state_dict() == {}
    with pytest.raises(ValueError, match="input_pos"):
        cache.update(torch.tensor([0]), k, v)
    with pytest.raises(ValueError, match="do not fit"):
        cache.update(torch.tensor([0, 1]), torch.randn(3, 3, 2, 4), torch.randn(3, 3, 2, 4))


def test_kv_cache_never_enters_the_state_dict() -> None:
    net = _tiny()
    keys = list(net.state_dict())
    net.setup_cache(2, 17, dtype=torch.float32)
    assert net.max_seq_len == 24
    caches = [layer.attention.kv_cache for layer in net.layers]
    assert all(c is not None and c.k_cache.shape == (2, TINY["n_head"], 24, 16) for c in caches)
    assert list(net.state_dict()) == keys
    assert net.causal_mask is not None and net.causal_mask.dtype == torch.bool
    net.clear_cache()
    assert all(layer.attention.kv_cache is None for layer in net.layers) and net.causal_mask is None


def test_attend_mask_and_causal() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    causal = attend(q, k, v, is_causal=True)
    mask = torch.tril(torch.ones(5, 5, dtype=torch.bool))[None, None]
    torch.testing.assert_close(attend(q, k, v, mask=mask), causal, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="not both"):
        attend(q, k, v, mask=mask, is_causal=True)
    with pytest.raises(ValueError, match="boolean"):
        attend(q, k, v, mask=mask.float())
