"""Next-scale prediction (VAR, class-conditional).

The network is VAR's transformer (`VAR` of `models/var.py` with the blocks of `models/basic_var.py`
in FoundationVision/VAR), with the official state-dict keys so official checkpoints load unchanged
(`arzoo.interop.var.load_var_generator`). It predicts the token maps of a multi-scale residual VQ
tokenizer (`MultiScaleVQTokenizer`) coarse to fine: one step per scale, every position of a scale in
parallel, each position seeing the positions of its own and all coarser scales (block-causal). The
input of scale k is the tokenizer's running reconstruction f_hat after scales < k, area-resized to
scale k's grid. Facts: docs/parity/var.md sections 3-8.

M-VAR (Mamba across scales) is `MambaScaleGenerator` in `next_scale_mamba.py`, a subclass that
only changes the network and how scales mix.

Shape letters: B batch, L = sum of pn_k^2 token positions, l one scale's positions, C width,
Cv codebook width (`codebook_dim`), V vocabulary, H heads, hd head width.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F

from arzoo.generators.base import BaseGenerator
from arzoo.generators.registry import register_sizes
from arzoo.generators.sampling import TokenSampler, VARSampler
from arzoo.generators.state import SamplingState
from arzoo.networks.var import NextScaleTransformer
from arzoo.tokenizers.base import Tokenizer
from arzoo.tokenizers.multiscale_vq import MultiScaleVQTokenizer

# ---- generator: one step per scale, coarse to fine ----


# Official VAR optimizer: no weight decay on 1-D parameters, biases and these names (train.py's nowd_keys).
_NO_WEIGHT_DECAY_KEYS = (
    "cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start", "start_pos",
    "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul",
)  # fmt: skip


class NextScaleGenerator(BaseGenerator):
    """VAR as an arzoo paradigm: one step per scale of a `MultiScaleVQTokenizer`, block-causal.

    Step k predicts every position of scale k at once from the class and the tokenizer's running
    reconstruction of scales < k (`teacher_inputs(tokens)` = `tokenizer.teacher_forcing_input`).
    While sampling, `state.carry` holds the running f_hat and the next scale's input; each step's
    tokens are added to f_hat right after they are drawn (`update_state`), and `decode_state`
    decodes the final f_hat (so `more_smooth` images are the official ones).

    Guidance is VAR's, in arzoo's convention that `cfg = 1` means none: the guidance weight grows
    linearly over the scales, `t = (cfg - 1) * k / (K - 1)`, logits `(1 + t) * cond - t * uncond`
    (the conditional logits alone at scale 0). Upstream's `cfg` argument is arzoo's `cfg - 1`.
    The default decoding strategy is `VARSampler` (VAR's filters: top-k ties survive, top-p in VAR's
    sense, then one `torch.multinomial` over all (B*l, V) rows per scale with the given generator). With
    `more_smooth` (upstream's Gumbel-softmax visualisation mode) the ids are still drawn, but each
    scale adds the Gumbel-softmax-weighted mix of codebook vectors to f_hat instead.

    Network arguments are those of `NextScaleTransformer`; `vocab_size`, `patch_nums` and
    `codebook_dim` default to the tokenizer's (given all three, no tokenizer is needed: e.g. to
    count parameters on the meta device). `label_smoothing` is the trainer's `--ls`. The remaining
    keyword arguments (`tokenizer_path`, `num_classes`, `class_dropout_prob` = upstream's
    `cond_drop_rate`, `lr`, `ema_decay`, ...) are `BaseGenerator`'s.
    """

    paradigm = "next-scale"
    tokenizer_kind = MultiScaleVQTokenizer
    sampler_cls = VARSampler
    network_cls: ClassVar[type[NextScaleTransformer]] = NextScaleTransformer

    def __init__(
        self,
        depth: int = 4,
        embed_dim: int = 128,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
        init_std: float = -1.0,
        vocab_size: int | None = None,
        patch_nums: Sequence[int] | None = None,
        codebook_dim: int | None = None,
        label_smoothing: float = 0.0,
        more_smooth: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        patch_nums = None if patch_nums is None else tuple(int(pn) for pn in patch_nums)
        tok = self.tokenizer
        name = type(self).__name__
        if tok is None:
            missing = [k for k, v in (("vocab_size", vocab_size), ("patch_nums", patch_nums),
                                      ("codebook_dim", codebook_dim)) if v is None]  # fmt: skip
            if missing:
                raise ValueError(
                    f"{name} needs a tokenizer_path, or explicit vocab_size, patch_nums and codebook_dim "
                    f"(missing: {', '.join(missing)})"
                )
        else:
            where = self.hparams.get("tokenizer_path") or "the tokenizer spec"
            assert isinstance(tok, MultiScaleVQTokenizer)
            if patch_nums is not None and patch_nums != tuple(tok.patch_nums):
                raise ValueError(
                    f"{name} was configured with patch_nums {list(patch_nums)}, but the tokenizer ({where}) has "
                    f"patch_nums {list(tok.patch_nums)}"
                )
            if codebook_dim is not None and codebook_dim != tok.codebook_dim:
                raise ValueError(
                    f"{name} was configured with codebook_dim {codebook_dim}, but the tokenizer ({where}) has "
                    f"codebook_dim {tok.codebook_dim}"
                )
            codebook_dim = tok.codebook_dim
        scales = None if patch_nums is None else tuple((pn, pn) for pn in patch_nums)
        vocab_size, scales = self.resolve_sizes(vocab_size, scales)
        self.vocab_size, self.scales = vocab_size, scales
        self.patch_nums = tuple(h for h, _ in scales)
        if len(self.patch_nums) < 2:
            raise ValueError(f"{name} needs at least 2 scales (coarse to fine), got patch_nums {list(self.patch_nums)}")
        self.codebook_dim = int(codebook_dim)
        self.label_smoothing = label_smoothing
        self.more_smooth = more_smooth
        self.net = self.build_network(
            vocab_size=vocab_size, codebook_dim=self.codebook_dim, patch_nums=self.patch_nums, num_classes=self.num_classes
        )
        self.configure_ema()

    @classmethod
    def migrate_arguments(cls, init_args: dict[str, Any]) -> tuple[type[BaseGenerator], dict[str, Any]]:
        """Checkpoints saved before M-VAR had its own class carry `inter_scale`: "mamba" loads as
        `MambaScaleGenerator`, "attention" as this class."""
        if "inter_scale" not in init_args:
            return cls, init_args
        init_args = dict(init_args)
        if init_args.pop("inter_scale") == "mamba":
            from arzoo.generators.next_scale_mamba import MambaScaleGenerator

            return MambaScaleGenerator, init_args
        for name in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_headdim"):
            init_args.pop(name, None)
        return cls, init_args

    def _load_tokenizer(self, path: str | None, spec: Mapping | None) -> Tokenizer | None:
        try:
            return super()._load_tokenizer(path, spec)
        except TypeError as err:
            raise TypeError(
                f"next-scale prediction needs a multi-scale tokenizer (MultiScaleVQTokenizer, e.g. from "
                f"recipes/digits/tokenizer_msvq.yaml or arzoo.interop.var.load_vqvae), not a single token grid: {err}"
            ) from err

    # ---- the paradigm ----------------------------------------------------------------------------

    def build_schedule(self) -> list[torch.Tensor]:
        """Step k predicts the positions of scale k (contiguous, row-major)."""
        return [torch.arange(begin, end) for begin, end in self.net.begin_ends]

    @property
    def first_l(self) -> int:
        """Positions of the first scale (predicted from the class alone)."""
        return self.patch_nums[0] ** 2

    def teacher_inputs(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """The next-scale inputs (B, N - first_l, Cv) of all scales but the first: the tokenizer's
        running reconstruction of the coarser scales, area-resized to each scale."""
        tok = self.require_tokenizer()
        # float32 as upstream (its trainer builds the inputs outside the autocast region)
        with torch.autocast(device_type=tokens_BN.device.type, enabled=False):
            return tok.teacher_forcing_input(self.split_scales(tokens_BN))

    def step_inputs(self, state: SamplingState) -> torch.Tensor | None:
        """Step 0: None (class tokens only); step k: the running f_hat after scale k-1 area-resized
        to pn_k (B, Cv, pn, pn), from `state.carry`."""
        if state.step == 0:
            return None
        if state.carry.get("next_input") is None:
            raise RuntimeError(f"step {state.step} has no input yet: the tokens of step {state.step - 1} were not drawn")
        return state.carry["next_input"]

    def forward(self, inputs: torch.Tensor, labels_B: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: next-scale inputs (B, N - first_l, Cv) -> logits (B, N, V); `mask` (N, N)
        bool (True = may attend) becomes an additive mask (default: the network's own, block-causal)."""
        bias = None
        if mask is not None:
            zeros = torch.zeros(mask.shape, device=mask.device)
            bias = zeros.masked_fill(~mask, float("-inf"))[None, None]
        return self.net(labels_B, inputs, attn_bias=bias)

    def start_sampling(self, state: SamplingState) -> SamplingState:
        self.require_tokenizer()
        self.net.sampling_cache(True)
        return state

    def forward_step(self, inputs: torch.Tensor | None, state: SamplingState) -> torch.Tensor:
        """Logits (R, pn_step^2, V) of one scale through the KV caches."""
        return self.net.forward_scale(state.labels, state.step, inputs)

    def end_sampling(self, state: SamplingState) -> SamplingState:
        self.net.sampling_cache(False)
        return state

    def cfg_scale(self, step: int, cfg: float) -> float:
        """The guidance scale `1 + t` of scale `step`, t = (cfg - 1) * step / (num_steps - 1)."""
        return 1.0 + self.cfg_weight(step, cfg)

    def cfg_weight(self, step: int, cfg: float) -> float:
        """VAR's guidance weight t of scale `step`: grows linearly from 0 to cfg - 1 over the scales."""
        return (cfg - 1.0) * (step / (self.num_steps - 1))

    def guide_logits(self, cond_BlV: torch.Tensor, uncond_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """VAR's guidance `(1 + t) * cond - t * uncond` (upstream's op order)."""
        t = self.cfg_weight(state.step, state.cfg)
        return (1 + t) * cond_BlV - t * uncond_BlV

    def logits_to_tokens(self, logits_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """One scale's ids (B, l) from `state.sampler` (VAR's by default: one multinomial over the rows)."""
        if state.sampler.greedy and self.more_smooth:
            raise ValueError("more_smooth adds Gumbel noise to every scale: it cannot be combined with greedy=True")
        return self.draw_scale(logits_BlV, state.sampler, state.generator)[0]

    def update_state(self, state: SamplingState, ids_Bl: torch.Tensor, logits_BlV: torch.Tensor) -> SamplingState:
        """Record the scale's tokens and add its codes to the running f_hat (`state.carry`): the
        codebook vectors of the ids, or with `more_smooth` the Gumbel-softmax mix (noise drawn from
        the generator after the ids, temperature max(0.27 (1 - 0.95 r), 0.005), r = k/(K-1))."""
        state = super().update_state(state, ids_Bl, logits_BlV)
        tok = self.require_tokenizer()
        assert isinstance(tok, MultiScaleVQTokenizer)
        step = state.step
        if state.carry.get("f_hat") is None:
            P = self.patch_nums[-1]
            state.carry["f_hat"] = torch.zeros(ids_Bl.shape[0], self.codebook_dim, P, P, device=logits_BlV.device)
        if self.more_smooth:
            logits = state.sampler.filter(logits_BlV)
            ratio = step / (self.num_steps - 1)
            tau = max(0.27 * (1 - ratio * 0.95), 0.005)
            scaled = logits.mul(1 + ratio)
            noise = -torch.empty_like(scaled).exponential_(generator=state.generator).log()
            weights = ((scaled + noise) / tau).softmax(dim=-1)
            h_BlC = tok.embed_soft(weights)
        else:
            h_BlC = tok.embed_tokens(ids_Bl)
        state.carry["f_hat"], state.carry["next_input"] = tok.next_scale_input(step, state.carry["f_hat"], h_BlC)
        return state

    def draw_scale(
        self, logits_BlV: torch.Tensor, sampler: TokenSampler, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One scale's draw: (ids (B, l), the sampler's temperature-scaled and filtered float logits)."""
        filtered = sampler.filter(logits_BlV)
        return sampler.draw(filtered, generator), filtered

    def sample_random_labels(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`batch_size` class ids drawn uniformly with replacement, as upstream's sampler does for
        `label_B=None` (one `torch.multinomial` on the generator's device, before any token draw)."""
        device = generator.device if generator is not None else self.device
        uniform = torch.full((1, self.num_classes), 1.0 / self.num_classes, dtype=torch.float32, device=device)
        labels = torch.multinomial(uniform, num_samples=batch_size, replacement=True, generator=generator)
        return labels.reshape(batch_size).to(self.device)

    @torch.no_grad()
    def decode_state(self, state: SamplingState) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]: the tokenizer decodes the final f_hat (upstream's image is
        `(img + 1) / 2`)."""
        return self.require_tokenizer().decode_fhat(state.carry["f_hat"])  # type: ignore[attr-defined]

    # ---- training --------------------------------------------------------------------------------

    def token_loss(self, logits_BNV: torch.Tensor, targets_BN: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all positions, with `label_smoothing` (upstream's trainer: `--ls`)."""
        return F.cross_entropy(
            logits_BNV.reshape(-1, logits_BNV.shape[-1]).float(),
            targets_BN.reshape(-1),
            label_smoothing=self.label_smoothing,
        )

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """As upstream's train.py: no weight decay on 1-D parameters, biases, positional / level
        embeddings, `ada_gss` and the attention scales."""
        return param.ndim == 1 or name.endswith("bias") or any(key in name for key in _NO_WEIGHT_DECAY_KEYS)


# Official VAR sizes (ImageNet 256, SPEC 7: width 64*depth, heads = depth, drop path 0.1*depth/24,
# L2-normalised attention, the released VQVAE's 4096 codes of width 32) and a tiny one for the digits.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def official_sizes(depth: int) -> dict[str, Any]:
    """VAR's released ImageNet-256 configuration of depth `depth` (also M-VAR's, which adds Mamba)."""
    return dict(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        drop_path_rate=0.1 * depth / 24,
        attn_l2_norm=True,
        shared_aln=False,
        vocab_size=4096,
        codebook_dim=32,
        patch_nums=list(PATCH_NUMS_256),
        num_classes=1000,
    )


register_sizes(
    NextScaleGenerator,
    {
        "var-d16": official_sizes(16),
        "var-d20": official_sizes(20),
        "var-d24": official_sizes(24),
        "var-d30": official_sizes(30),
        "var-tiny": dict(depth=4, embed_dim=128, num_heads=4),
    },
)
