"""LlamaGen's class-conditional GPT (`Transformer` of `autoregressive/models/gpt.py` in
FoundationVision/LlamaGen, `model_type='c2i'`), with the official state-dict keys so official
checkpoints load unchanged (`arzoo.interop.llamagen.load_gpt`). Facts: docs/parity/llamagen.md
sections 1-4 and 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from arzoo.networks.config import check_positive_ints, config_to_dict, network_config
from arzoo.nn.llama import RMSNorm, TransformerBlock
from arzoo.nn.rope import rope_2d_table

__all__ = ["ClassEmbedding", "LlamaGenConfig", "LlamaGenTrunk", "RasterTransformer"]


@dataclass(frozen=True, kw_only=True)
class LlamaGenConfig:
    """LlamaGen's GPT arguments, written once (upstream's `ModelArgs`, c2i); checked on construction.

    `class_dropout_prob > 0` adds the null-class row used by CFG (the dropout itself is the caller's).
    """

    dim: int
    n_layer: int
    n_head: int
    vocab_size: int
    num_classes: int
    grid_size: int
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    class_dropout_prob: float = 0.1
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive_ints(name, dim=self.dim, n_layer=self.n_layer, n_head=self.n_head, vocab_size=self.vocab_size,
                            num_classes=self.num_classes, grid_size=self.grid_size)  # fmt: skip
        if self.dim % self.n_head != 0:
            raise ValueError(f"{name}: dim {self.dim} is not divisible by n_head {self.n_head}")
        if (self.dim // self.n_head) % 4 != 0:
            raise ValueError(
                f"{name}: head dim {self.dim // self.n_head} (dim {self.dim} / n_head {self.n_head}) must be a "
                "multiple of 4 for the 2-D RoPE"
            )
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"{name}: class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")

    @property
    def num_blocks(self) -> int:
        """Transformer blocks in the trunk (`layers.{i}`)."""
        return self.n_layer

    def to_dict(self) -> dict[str, Any]:
        """The arguments as a plain dict, e.g. for JSON."""
        return config_to_dict(self)


class ClassEmbedding(nn.Module):
    """LlamaGen's `LabelEmbedder` table: `embedding_table` has `num_classes + 1` rows (row
    `num_classes` = the null class used for CFG) iff `with_null_class`. No dropout in here."""

    def __init__(self, num_classes: int, dim: int, with_null_class: bool) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(with_null_class), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)


def _round_up(value: int, multiple: int) -> int:
    return value if value % multiple == 0 else value + multiple - value % multiple


class LlamaGenTrunk(nn.Module):
    """LlamaGen's class-conditional GPT without a decoding scheme: embeddings, RoPE rows, blocks
    with KV caches, head. `RasterTransformer` decodes it one token per step; NAR's network decodes a
    diagonal per step on the same trunk.

    State-dict keys are the official ones: `cls_embedding.embedding_table.weight`,
    `tok_embeddings.weight`, `layers.{i}.{attention.wqkv, attention.wo, feed_forward.w1/w3/w2,
    attention_norm, ffn_norm}.weight`, `norm.weight`, `output.weight` (no biases).

    Upstream's `cls_token_num` and `n_kv_head` are not arguments: c2i needs `cls_token_num == 1`
    (the label embedder yields one token while the RoPE table gets `cls_token_num` zero rows) and
    grouped-query attention (`n_kv_head < n_head`) is broken in upstream's cached generation, so
    `n_kv_head` must be None (SPEC section 6).

    Sequence slot 0 holds the class token, whose RoPE row is all zeros (its rotated q and k vanish);
    slot s >= 1 holds token s-1 with the RoPE row of the grid cell that token occupies
    (`cell_positions`, raster indices r*g + c; raster order by default). The RoPE table is a plain
    float32 attribute (`freqs_cis`, built on the CPU as upstream and moved on use), never a buffer, so
    it neither enters the state dict nor follows `.to(dtype)`.

    Label dropout is the caller's job (`drop_labels` reproduces upstream's); `class_dropout_prob`
    here only decides whether the null-class row exists.
    """

    config_cls: ClassVar[type[LlamaGenConfig]] = LlamaGenConfig  # a subclass with more arguments extends it

    def __init__(self, config: LlamaGenConfig | None = None, **kwargs: Any) -> None:
        """Built from `config`, or from its fields as keyword arguments (`RasterTransformer(dim=64, ...)`)."""
        super().__init__()
        c = self.config = network_config(self.config_cls, config, kwargs, type(self).__name__)
        dim, n_layer, n_head, vocab_size = c.dim, c.n_layer, c.n_head, c.vocab_size
        num_classes, grid_size, class_dropout_prob = c.num_classes, c.grid_size, c.class_dropout_prob
        multiple_of, ffn_dim_multiplier, norm_eps = c.multiple_of, c.ffn_dim_multiplier, c.norm_eps
        self.dim = dim
        self.n_layer = n_layer
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.grid_size = grid_size
        self.num_tokens = grid_size * grid_size
        self.class_dropout_prob = class_dropout_prob
        self.has_null_class = class_dropout_prob > 0
        self.null_class = num_classes  # valid only when has_null_class
        self.initializer_range = c.initializer_range

        # Same construction order as upstream (so the default-init RNG stream matches too).
        self.cls_embedding = ClassEmbedding(num_classes, dim, self.has_null_class)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        rates = [r.item() for r in torch.linspace(0, c.drop_path_rate, c.num_blocks, device="cpu")]
        self.layers = nn.ModuleList(
            TransformerBlock(
                dim,
                n_head,
                multiple_of=multiple_of,
                ffn_dim_multiplier=ffn_dim_multiplier,
                norm_eps=norm_eps,
                attn_dropout_p=c.attn_dropout_p,
                resid_dropout_p=c.resid_dropout_p,
                ffn_dropout_p=c.ffn_dropout_p,
                drop_path=rate,
            )
            for rate in rates
        )
        self.norm = RMSNorm(dim, eps=norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)

        # (1 + N, hd/2, 2) float32; plain attribute (see the class docstring).
        self.freqs_cis = rope_2d_table(grid_size, self.head_dim, c.rope_base, cls_token_num=1, device="cpu")
        # Set by setup_cache.
        self.causal_mask: torch.Tensor | None = None
        self._slots: torch.Tensor | None = None
        self.max_batch_size = 0
        self.max_seq_len = 0

        self.apply(self._init_weights)
        nn.init.constant_(self.output.weight, 0)

    def _init_weights(self, module: nn.Module) -> None:
        """Upstream init: N(0, initializer_range) for every Linear and Embedding weight."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)

    # -- embeddings and RoPE rows ----------------------------------------------------------------

    def embed_class(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) int64 in [0, num_classes] (num_classes = null class) -> class tokens (B, 1, D).

        No label dropout here: use `drop_labels` (or your own) before calling."""
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
        return self.cls_embedding(labels)

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Upstream's training label dropout: one `torch.rand(B)` draw on the labels' device; labels
        whose draw is < class_dropout_prob become the null class. No-op when class_dropout_prob == 0."""
        if not self.has_null_class:
            return labels
        draws = torch.rand(labels.shape[0], device=labels.device, generator=generator)
        drop = draws < self.class_dropout_prob
        return torch.where(drop, self.null_class, labels)

    def _rope_table(self, device: torch.device) -> torch.Tensor:
        if self.freqs_cis.device != device:
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    def rope_rows(
        self,
        num_tokens: int,
        cell_positions: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """RoPE rows (1 + num_tokens, hd/2, 2) for [class slot] + num_tokens image tokens.

        Row 0 is the class row (zeros); row s >= 1 is the row of grid cell `cell_positions[s-1]`
        (raster index r*g + c; default: cell s-1, i.e. raster order). `cell_positions` of shape
        (B, num_tokens) gives every batch row its own cells: rows (B, 1 + num_tokens, hd/2, 2).
        """
        device = torch.device(device) if device is not None else self.tok_embeddings.weight.device
        table = self._rope_table(device)
        if not 0 <= num_tokens <= self.num_tokens:
            raise ValueError(
                f"{num_tokens} image tokens do not fit the {self.grid_size}x{self.grid_size} grid "
                f"(at most {self.num_tokens})"
            )
        if cell_positions is None:
            return table[: 1 + num_tokens]
        if cell_positions.shape[-1:] != (num_tokens,) or cell_positions.dim() > 2 or cell_positions.is_floating_point():
            raise ValueError(
                f"cell_positions must be an integer tensor of shape ({num_tokens},) or (B, {num_tokens}) (one "
                f"grid cell per token), got {cell_positions.dtype} {tuple(cell_positions.shape)}"
            )
        if num_tokens and (int(cell_positions.min()) < 0 or int(cell_positions.max()) >= self.num_tokens):
            raise ValueError(f"cell_positions must lie in [0, {self.num_tokens}) (raster indices r*g + c)")
        class_row = cell_positions.new_zeros(*cell_positions.shape[:-1], 1)
        index = torch.cat([class_row, cell_positions + 1], dim=-1).to(device)
        return table[index]  # (1 + T, hd/2, 2), or per row (B, 1 + T, hd/2, 2)

    # -- full-sequence forward -------------------------------------------------------------------

    def run_blocks(
        self,
        x_BLD: torch.Tensor,
        freqs: torch.Tensor,
        mask: torch.Tensor | None,
        input_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The transformer blocks: slots x (B, L, D) with RoPE rows `freqs` ((L, hd/2, 2), or per row
        (B, L, hd/2, 2)) -> hidden states (B, L, D). With `input_pos` (L,) the k/v are written into the
        KV cache at those slots and attention runs over the cache."""
        for layer in self.layers:
            x_BLD = layer(x_BLD, freqs, mask, input_pos)
        return x_BLD

    def head(self, h_BLD: torch.Tensor) -> torch.Tensor:
        """Hidden states (B, L, D) -> float32 logits (B, L, V)."""
        return self.output(self.norm(h_BLD)).float()

    def cached_step(self, x_BLD: torch.Tensor, freqs: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Write slots x (B, L, D) (any number) at sequence positions `slots` (L,) of the KV cache and
        attend causally over the cache -> logits (B, L, V)."""
        causal = self._require_cache(x_BLD.shape[0])
        return self.head(self.run_blocks(x_BLD, freqs, causal[slots][None, None], slots))

    # -- KV-cached decoding ------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate every layer's KV cache for `batch_size` rows (the CFG-doubled batch when guiding)
        and `max_seq_len` slots rounded up to a multiple of 8 (as upstream; 1 + N slots hold a class
        token and a full image), plus the boolean lower-triangular causal mask (S, S).

        dtype and device default to those of `tok_embeddings`.
        """
        if batch_size <= 0 or max_seq_len <= 0:
            raise ValueError(f"batch_size and max_seq_len must be positive, got {batch_size}, {max_seq_len}")
        weight = self.tok_embeddings.weight
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else torch.device(device)
        seq_len = _round_up(max_seq_len, 8)
        for layer in self.layers:
            layer.attention.setup_cache(batch_size, seq_len, dtype=dtype, device=device)
        self.causal_mask = torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))
        self._slots = torch.arange(seq_len, device=device)
        self.max_batch_size = batch_size
        self.max_seq_len = seq_len

    def clear_cache(self) -> None:
        """Free the KV caches and the causal mask."""
        for layer in self.layers:
            layer.attention.clear_cache()
        self.causal_mask = None
        self._slots = None
        self.max_batch_size = 0
        self.max_seq_len = 0

    def _require_cache(self, batch_size: int) -> torch.Tensor:
        if self.causal_mask is None:
            raise RuntimeError("no KV cache: call setup_cache(batch_size, max_seq_len) first")
        if batch_size > self.max_batch_size:
            raise ValueError(f"batch of {batch_size} exceeds the KV cache's {self.max_batch_size} rows")
        return self.causal_mask


class RasterTransformer(LlamaGenTrunk):
    """LlamaGen's GPT as LlamaGen uses it: teacher forcing over [class] + tokens, and one token per
    cached decoding step (`prefill`, then `decode_step`)."""

    def forward(
        self,
        tokens: torch.Tensor,
        labels: torch.Tensor,
        cell_positions: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int64 with T <= g*g, labels (B,) -> logits (B, 1 + T, V) float32.

        Logits at slot s predict the token after slot s: slot 0 (class) predicts token 0, slot s
        predicts token s. Teacher forcing as upstream's training call (`idx = z[:, :-1]`) is
        `forward(z[:, :-1], labels)` -> (B, N, V), position i predicting z[:, i]; upstream's eval
        call with full-length idx is `forward(z, labels)` -> (B, N + 1, V). No slicing happens here.

        * `cell_positions` (T,): the raster cell (r*g + c) of each token (default: raster order).
        * `mask`: optional boolean attention mask (B or 1, H or 1, 1+T, 1+T), replacing causality.
        * `input_pos` (1+T,): write k/v into the KV cache at these slots (after `setup_cache`) and
          attend over the cache; `mask` then defaults to the causal-mask rows at `input_pos`.
        """
        if tokens.dim() != 2 or labels.shape != (tokens.shape[0],):
            raise ValueError(
                f"expected tokens (B, T) and labels (B,), got {tuple(tokens.shape)} and {tuple(labels.shape)}"
            )
        num_tokens = tokens.shape[1]
        x = torch.cat([self.embed_class(labels), self.tok_embeddings(tokens)], dim=1)
        x = self.tok_dropout(x)
        freqs = self.rope_rows(num_tokens, cell_positions, device=x.device)
        if input_pos is not None:
            if input_pos.shape != (1 + num_tokens,):
                raise ValueError(
                    f"input_pos must have shape ({1 + num_tokens},) (class slot + tokens), got "
                    f"{tuple(input_pos.shape)}"
                )
            causal = self._require_cache(tokens.shape[0])
            if mask is None:
                mask = causal[input_pos][None, None]
        return self.head(self.run_blocks(x, freqs, mask, input_pos))

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Write the class tokens of `labels` (B,) at slot 0 of the cache -> logits (B, V) float32
        predicting token 0."""
        causal = self._require_cache(labels.shape[0])
        assert self._slots is not None
        x = self.tok_dropout(self.embed_class(labels))
        freqs = self._rope_table(x.device)[:1]
        return self.head(self.run_blocks(x, freqs, causal[:1][None, None], self._slots[:1]))[:, -1]

    def decode_step(self, tokens: torch.Tensor, slot_pos: int, cell: int) -> torch.Tensor:
        """Feed `tokens` (B, 1) at sequence slot `slot_pos` with the RoPE row of grid cell `cell`
        (raster index r*g + c) -> logits (B, V) float32 predicting the next token.

        Attends over all cache slots under the causal-mask row `slot_pos`, so slots 0..slot_pos
        must have been written (prefill wrote slot 0). In raster order token i sits at slot 1 + i
        and cell i.
        """
        if tokens.dim() != 2 or tokens.shape[1] != 1:
            raise ValueError(f"decode_step takes one token per row, shape (B, 1); got {tuple(tokens.shape)}")
        causal = self._require_cache(tokens.shape[0])
        assert self._slots is not None
        if not 0 <= slot_pos < self.max_seq_len:
            raise ValueError(f"slot_pos {slot_pos} is outside the KV cache's {self.max_seq_len} slots")
        if not 0 <= cell < self.num_tokens:
            raise ValueError(f"cell {cell} is outside the {self.grid_size}x{self.grid_size} grid")
        x = self.tok_dropout(self.tok_embeddings(tokens))
        freqs = self._rope_table(x.device)[1 + cell : 2 + cell]
        mask = causal[slot_pos : slot_pos + 1][None, None]
        return self.head(self.run_blocks(x, freqs, mask, self._slots[slot_pos : slot_pos + 1]))[:, -1]
