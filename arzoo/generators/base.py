"""`BaseGenerator`: what every autoregressive paradigm shares, and the contract a new one fills in.

Every paradigm is the same machine with a different *schedule*: a generator predicts the tokens of
a tokenizer in a fixed order of steps; each step predicts a set of token positions in parallel,
seeing only what the paradigm allows it to see.

Token positions index the tokenizer's token maps flattened scale by scale, each map row-major
(`N = sum(h_k * w_k)` positions). The base class owns: the frozen tokenizer (and the check that it
fits), label dropout to the null class, classifier-free guidance as one doubled batch, the
cross-entropy over the predicted positions, the decoding strategy (a `TokenSampler`: temperature /
top-k / top-p by default, any other passed as `sampler=`) with an explicit `torch.Generator`, EMA weights (used for sampling when enabled), AdamW without weight decay on
norms / biases / embeddings, warmup + cosine LR, and the generation loop.

Subclassing contract. A paradigm supplies (abstract methods, so a missing one fails at construction):

1. `build_schedule() -> list[LongTensor]`: the positions predicted at each step, in order. Every
   position appears exactly once; `prediction_order = cat(schedule)`.
2. `teacher_inputs(tokens_BN)`: the network input for every slot (teacher forcing), and
   `step_inputs(state)`: the input of `state.step`'s slots while sampling. Inputs of step k may
   only depend on tokens of steps < k.
3. `forward(inputs, labels_B, mask) -> logits (B, N, V)` in prediction order (teacher forcing) and
   `forward_step(inputs, state) -> logits (R, l, V)` of one step (using the network's cache).

and may override: `visibility_mask() -> BoolTensor (N, N)` over slots in prediction order (True =
may attend; default block-causal over steps), `logits_to_tokens(logits_BlV, state)` (default:
every position of the step drawn independently by `state.sampler`), `sampler_cls` (the default
decoding strategy), `update_state(state, ids_Bl, logits_BlV)`
(default: write the step's tokens; VAR also adds them to its running reconstruction),
`start_sampling(state)` / `end_sampling(state)` (caches), `network_cls` (the network, built
by `build_network` from its config dataclass, whose fields the generator's arguments fill), `cfg_scale(step, cfg)` and
`guide_logits(cond, uncond, state)` (how the conditional and null-class logits combine; applied in
one place, `apply_guidance`), `sampling_options` (declared extra `generate()` keywords with their
defaults, accepted by `arzoo sample --options`), `tokenizer_kind` and `paradigm`. Every sampling
hook gets the explicit `SamplingState` (`arzoo.generators.state`) and returns it where it changes
it; nothing about a generation in progress is kept on the module.
A new ordering of an existing family (say a column-major raster) only overrides `build_schedule`.
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping, TypeVar

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from arzoo.checkpoint_io import check_state_dict_fits, load_state_dict_checked, read_checkpoint
from arzoo.class_paths import check_class_paths, class_path_of, resolve_class
from arzoo.generators.sampling import TokenSampler, TopKTopPSampler, guide
from arzoo.generators.state import SamplingState
from arzoo.optim import check_optimizer_args, warmup_cosine_scheduler
from arzoo.tokenizers.base import Tokenizer, build_tokenizer, resolve_tokenizer_class
from arzoo.tokenizers.checkpoint import load_tokenizer

T = TypeVar("T")
CLASS_KEY = "arzoo_generator_class"  # top-level checkpoint entry naming the concrete class


class BaseGenerator(L.LightningModule, metaclass=ABCMeta):
    """Base LightningModule of all generators; see the module docstring for the subclassing contract."""

    paradigm: ClassVar[str] = "base"
    tokenizer_kind: ClassVar[type[Tokenizer]] = Tokenizer
    # Extra keyword arguments of `generate()` this paradigm reads from `state.options`, with defaults.
    sampling_options: ClassVar[Mapping[str, Any]] = {}
    # The decoding strategy built from `generate(temperature=, top_k=, top_p=, greedy=)`.
    sampler_cls: ClassVar[type[TokenSampler]] = TopKTopPSampler
    net: nn.Module  # the network (the EMA copy and the optimizer see this module only)
    # The network class `build_network` builds from its `config_cls` dataclass (set by each family).
    network_cls: ClassVar[type[nn.Module]]

    def __init__(
        self,
        tokenizer_path: str | None = None,
        num_classes: int = 10,
        class_dropout_prob: float = 0.1,
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        ema_decay: float = 0.0,
        tokenizer_spec: dict | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables EMA), got {ema_decay}")
        check_optimizer_args(lr, betas, weight_decay, warmup_steps, min_lr_ratio)
        self.save_hyperparameters()
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.tokenizer: Tokenizer | None = self._load_tokenizer(tokenizer_path, tokenizer_spec)
        if self.tokenizer is not None:
            # the checkpoint then rebuilds the tokenizer from this spec (weights are in the state dict)
            self.hparams["tokenizer_spec"] = self.tokenizer.spec()
        self.ema: AveragedModel | None = None
        self._schedule: list[torch.Tensor] | None = None
        self._mask: torch.Tensor | None = None
        self.register_buffer("train_token_counts", torch.zeros(0), persistent=False)
        # each rank counts its own batches (summed for the baseline in `_gather_token_counts`); DDP
        # would otherwise overwrite them with rank 0's counts on every forward (buffer broadcast)
        self._ddp_params_and_buffers_to_ignore = ["train_token_counts"]

    def network_config(self, config_cls: type[T], **resolved: Any) -> T:
        """A network's config dataclass from this generator's constructor arguments of the same names
        (the network's arguments are written once, in `config_cls`), `resolved` values overriding."""
        names = {f.name for f in fields(config_cls)}  # type: ignore[arg-type]
        return config_cls(**{**{k: v for k, v in self.hparams.items() if k in names}, **resolved})

    def build_network(self, **resolved: Any) -> nn.Module:
        """`self.net`: a `network_cls` built from its config (`network_cls.config_cls`), the fields read
        from this generator's arguments and `resolved` (sizes resolved against the tokenizer)."""
        return self.network_cls(self.network_config(self.network_cls.config_cls, **resolved))

    # ---- tokenizer -------------------------------------------------------------------------------

    def _load_tokenizer(self, path: str | None, spec: Mapping | None) -> Tokenizer | None:
        if spec is not None:
            cls = resolve_tokenizer_class(spec.get("class_path") if isinstance(spec, Mapping) else spec)
            if not issubclass(cls, self.tokenizer_kind):
                raise TypeError(f"{type(self).__name__} needs a {self.tokenizer_kind.__name__}, got {cls.__name__}")
            tokenizer = build_tokenizer(spec).freeze()
        elif path is not None:
            tokenizer = load_tokenizer(path, expected=self.tokenizer_kind)
        else:
            return None
        return tokenizer

    def resolve_sizes(self, vocab_size: int | None, scales: tuple[tuple[int, int], ...] | None) -> tuple[int, tuple]:
        """The (vocab_size, scales) the network is built for: given values must fit the tokenizer."""
        tok = self.tokenizer
        if tok is None:
            if vocab_size is None or scales is None:
                raise ValueError(
                    f"{type(self).__name__} needs a tokenizer_path, or explicit vocab_size and grid sizes "
                    f"(got vocab_size={vocab_size}, scales={scales})"
                )
            return vocab_size, tuple(tuple(s) for s in scales)
        where = self.hparams.get("tokenizer_path") or "the tokenizer spec"
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise ValueError(
                f"{type(self).__name__} was configured with vocab_size {vocab_size}, but the tokenizer "
                f"({where}) has vocab_size {tok.vocab_size}"
            )
        if scales is not None and tuple(tuple(s) for s in scales) != tuple(tok.scales):
            raise ValueError(
                f"{type(self).__name__} was configured for token grid(s) {list(scales)}, but the tokenizer "
                f"({where}) produces {list(tok.scales)}"
            )
        return tok.vocab_size, tuple(tok.scales)

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a clear error if this generator was built without one."""
        if self.tokenizer is None:
            raise RuntimeError(
                f"{type(self).__name__} has no tokenizer: build it with tokenizer_path=... to train on images "
                f"or decode samples"
            )
        return self.tokenizer

    def train(self, mode: bool = True) -> "BaseGenerator":
        """Like nn.Module.train, but the frozen tokenizer always stays in eval mode."""
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()
        return self

    @torch.no_grad()
    def tokenize(self, images_B3HW: torch.Tensor) -> torch.Tensor:
        """Images -> flat token positions (B, N): every scale's map, row-major, coarse to fine."""
        tok = self.require_tokenizer()
        # nearest-code search in float32 also under bf16/fp16 autocast, as the official tokenizers run
        with torch.autocast(device_type=images_B3HW.device.type, enabled=False):
            return torch.cat([m.flatten(1) for m in tok.encode(images_B3HW.float())], dim=1)

    def split_scales(self, tokens_BN: torch.Tensor) -> list[torch.Tensor]:
        """Flat tokens (B, N) -> one (B, h_k, w_k) map per scale."""
        maps, start = [], 0
        for h, w in self.scales:
            maps.append(tokens_BN[:, start : start + h * w].reshape(-1, h, w))
            start += h * w
        return maps

    @torch.no_grad()
    def decode_tokens(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """Flat tokens (B, N) -> images (B, 3, H, W) in [-1, 1]."""
        return self.require_tokenizer().decode(self.split_scales(tokens_BN.long()))

    # ---- the paradigm contract -------------------------------------------------------------------

    scales: tuple[tuple[int, int], ...]  # set by subclasses (from resolve_sizes)
    vocab_size: int

    @property
    def num_tokens(self) -> int:
        """N, the number of token positions."""
        return sum(h * w for h, w in self.scales)

    @abstractmethod
    def build_schedule(self) -> list[torch.Tensor]:
        """Positions predicted at each step (paradigm hook 1)."""

    @property
    def schedule(self) -> list[torch.Tensor]:
        """The schedule, built once and checked to be a partition of all positions."""
        if self._schedule is None:
            with torch.device("cpu"):  # index tensors, also when the model is built under torch.device("meta")
                steps = [torch.as_tensor(s, dtype=torch.long).flatten().cpu() for s in self.build_schedule()]
            order = torch.cat(steps)
            if sorted(order.tolist()) != list(range(self.num_tokens)):
                raise ValueError(
                    f"{type(self).__name__}.build_schedule() must cover every one of the {self.num_tokens} "
                    f"positions exactly once; it covers {len(order)} positions ({len(set(order.tolist()))} distinct)"
                )
            self._schedule = steps
        return self._schedule

    @property
    def num_steps(self) -> int:
        """Forward passes of the network per generated batch."""
        return len(self.schedule)

    @property
    def prediction_order(self) -> torch.Tensor:
        """All positions in the order they are predicted: `cat(schedule)`."""
        return torch.cat(self.schedule)

    def step_of_slot(self) -> torch.Tensor:
        """(N,) step index of every slot in prediction order."""
        return torch.cat([torch.full((len(s),), k) for k, s in enumerate(self.schedule)])

    @abstractmethod
    def teacher_inputs(self, tokens_BN: torch.Tensor) -> Any:
        """Network inputs for every slot, from the ground-truth tokens (B, N) (paradigm hook 2)."""

    @abstractmethod
    def step_inputs(self, state: SamplingState) -> Any:
        """Network inputs of `state.step`'s slots while sampling (paradigm hook 2)."""

    def visibility_mask(self) -> torch.Tensor:
        """(N, N) bool over slots in prediction order; default block-causal over steps (paradigm hook 3)."""
        with torch.device("cpu"):
            steps = self.step_of_slot()
            return steps[:, None] >= steps[None, :]

    @property
    def mask(self) -> torch.Tensor:
        """`visibility_mask()` built once, on the module's device."""
        if self._mask is None or self._mask.device != self.device:
            self._mask = self.visibility_mask().to(self.device)
        return self._mask

    @abstractmethod
    def forward(self, inputs: Any, labels_B: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: `teacher_inputs(...)` -> logits (B, N, V) in prediction order (paradigm hook 3)."""

    @abstractmethod
    def forward_step(self, inputs: Any, state: SamplingState) -> torch.Tensor:
        """Logits (R, l, V) of `state.step`'s slots, through the network's cache (paradigm hook 3)."""

    def logits_to_tokens(self, logits_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """One token per slot of the step (B, l); default: independent draws, row-major."""
        B, l, V = logits_BlV.shape
        return state.sampler(logits_BlV.reshape(B * l, V), state.generator).reshape(B, l)

    def update_state(self, state: SamplingState, ids_Bl: torch.Tensor, logits_BlV: torch.Tensor) -> SamplingState:
        """Record the step's tokens (B, l) in every row (both CFG halves); `logits_BlV` are the guided ones."""
        positions = self.schedule[state.step].to(state.tokens.device)
        state.tokens[:, positions] = ids_Bl.repeat(2, 1) if state.guided else ids_Bl
        return state

    def cfg_scale(self, step: int, cfg: float) -> float:
        """Guidance scale at `step` (constant by default)."""
        return cfg

    def guide_logits(self, cond_BlV: torch.Tensor, uncond_BlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """Guided logits of one step from its conditional and null-class rows; default
        `guide(cond, uncond, cfg_scale(step, cfg))`, the conditional rows alone where that scale is 1.
        Override to combine them another way (e.g. VAR's `(1 + t) * cond - t * uncond`)."""
        scale = self.cfg_scale(state.step, state.cfg)
        return guide(cond_BlV, uncond_BlV, scale) if scale != 1.0 else cond_BlV

    def apply_guidance(self, logits_RlV: torch.Tensor, state: SamplingState) -> torch.Tensor:
        """(R, l, V) -> (B, l, V): the one place where classifier-free guidance is applied."""
        if not state.guided:
            return logits_RlV
        B = state.batch_size
        return self.guide_logits(logits_RlV[:B], logits_RlV[B:], state)

    def start_sampling(self, state: SamplingState) -> SamplingState:
        """Prepare caches (and `state.carry`) for a generation of `len(state.labels)` rows."""
        return state

    def end_sampling(self, state: SamplingState) -> SamplingState:
        """Free the caches (called also when sampling fails)."""
        return state

    # ---- training --------------------------------------------------------------------------------

    def drop_labels(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Replace labels by the null class `num_classes` with probability `class_dropout_prob` (training only)."""
        if not self.training or self.class_dropout_prob <= 0:
            return labels_B
        drop = torch.rand(labels_B.shape[0], device=labels_B.device) < self.class_dropout_prob
        return torch.where(drop, torch.full_like(labels_B, self.num_classes), labels_B)

    def check_labels(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Labels as int64, with a clear error for ids outside [0, num_classes)."""
        labels_B = torch.as_tensor(labels_B, dtype=torch.long, device=self.device).reshape(-1)
        bad = labels_B[(labels_B < 0) | (labels_B >= self.num_classes)]
        if len(bad):
            raise ValueError(
                f"class id {bad[0].item()} is out of range: this generator has num_classes={self.num_classes} "
                f"(valid ids 0..{self.num_classes - 1})"
            )
        return labels_B

    def teacher_forcing(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Logits (B, N, V) for every position, in prediction order."""
        return self(self.teacher_inputs(tokens_BN), labels_B, self.mask)

    def sequence_loss(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch: `token_loss` of the teacher-forced logits against the tokens
        in prediction order (a paradigm that trains on a drawn subset overrides this)."""
        logits = self.teacher_forcing(tokens_BN, labels_B)
        return self.token_loss(logits, tokens_BN[:, self.prediction_order.to(tokens_BN.device)])

    def position_losses(
        self,
        tokens_BN: torch.Tensor,
        labels_B: torch.Tensor,
        context_BN: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Cross-entropy (B, N) float32 of every slot in prediction order, the network reading the tokens
        of `context_BN` (default: the image's own) and predicting those of `tokens_BN`. NaN marks a
        slot a paradigm does not score; `generator` drives any draw (an order, a mask)."""
        seen_BN = tokens_BN if context_BN is None else context_BN
        logits_BNV = self.teacher_forcing(seen_BN, labels_B)
        targets_BN = tokens_BN[:, self.prediction_order.to(tokens_BN.device)]
        return F.cross_entropy(logits_BNV.float().transpose(1, 2), targets_BN, reduction="none")

    @torch.no_grad()
    def context_diagnostic(self, tokens_BN: torch.Tensor, labels_B: torch.Tensor) -> dict[str, torch.Tensor]:
        """Does the model use its context? The held-out loss by step (`loss_q1`..: the steps cut in
        up to four equal parts; a part without a scored slot is left out) and `context_gain`: how much the loss of the slots after step 0 rises
        when each image's context is another image's (the batch rolled by one row, labels kept).
        A gain near 0 nats means the network predicts from the class and the position alone."""
        own_BN = self.position_losses(tokens_BN, labels_B, generator=torch.Generator().manual_seed(0))
        other_BN = self.position_losses(
            tokens_BN, labels_B, tokens_BN.roll(1, dims=0), generator=torch.Generator().manual_seed(0)
        )
        steps_N = self.step_of_slot().to(own_BN.device)
        parts = min(4, self.num_steps)
        bounds = [round(p * self.num_steps / parts) for p in range(parts + 1)]
        out = {}
        for p in range(parts):
            part_BN = own_BN[:, (steps_N >= bounds[p]) & (steps_N < bounds[p + 1])]
            if not part_BN.isnan().all():  # a part no slot of which is scored has no loss
                out[f"loss_q{p + 1}"] = part_BN.nanmean()
        out["context_gain"] = (other_BN - own_BN)[:, steps_N > 0].nanmean()
        return out

    def token_loss(self, logits_BNV: torch.Tensor, targets_BN: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over all predicted positions."""
        return F.cross_entropy(logits_BNV.reshape(-1, logits_BNV.shape[-1]).float(), targets_BN.reshape(-1))

    def batch_tokens(self, batch: dict[str, Any]) -> torch.Tensor:
        """Flat tokens (B, N) of a batch: read from a token cache (`tokens`), else encoded from `image`."""
        if "tokens" in batch:  # `arzoo tokenize` already ran the frozen tokenizer
            tokens = batch["tokens"].to(self.device, torch.long)
            if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
                raise ValueError(
                    f"the token cache holds {tuple(tokens.shape[1:])} tokens per image, but {type(self).__name__} "
                    f"predicts {self.num_tokens} (grids {list(self.scales)}); re-run `arzoo tokenize` with this recipe"
                )
            return tokens
        return self.tokenize(batch["image"])

    def _shared_step(self, batch: dict[str, Any], split: str) -> torch.Tensor | None:
        labels = batch["label"]
        if len(labels) == 0:
            return None
        if (labels < 0).any():
            raise ValueError(
                "the data has no class labels (label -1) but this generator is class-conditional; "
                "use a labelled source (digits, or a folder with one sub-folder per class)"
            )
        tokens = self.batch_tokens(batch)
        loss = self.sequence_loss(tokens, self.drop_labels(self.check_labels(labels)))
        # evaluation metrics are averaged over the ranks (once per epoch); training logs stay per rank
        sync = split != "train"
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=len(labels), sync_dist=sync)
        if split == "train":
            self._count_tokens(tokens)
        else:
            if self.train_token_counts.numel():
                self.log(f"{split}/unigram_loss", self._unigram_loss(tokens), batch_size=len(labels), sync_dist=sync)
            if len(labels) > 1:  # another image's context needs a second image
                for name, value in self.context_diagnostic(tokens, self.check_labels(labels)).items():
                    self.log(f"{split}/{name}", value, batch_size=len(labels), sync_dist=sync)
        return loss

    def _count_tokens(self, tokens_BN: torch.Tensor) -> None:
        counts = torch.bincount(tokens_BN.reshape(-1), minlength=self.vocab_size).float()
        if self.train_token_counts.numel() != counts.numel():
            self.train_token_counts = torch.zeros_like(counts)
        self.train_token_counts += counts

    def _gather_token_counts(self) -> None:
        """Sum the ranks' training-token counts for the baseline (each rank counted only its own batches)."""
        self._all_token_counts = self.train_token_counts
        if self._trainer is not None and self.trainer.world_size > 1 and self.train_token_counts.numel():
            self._all_token_counts = self.trainer.strategy.reduce(self.train_token_counts.clone(), reduce_op="sum")

    def on_validation_epoch_start(self) -> None:
        self._gather_token_counts()

    def on_test_epoch_start(self) -> None:
        self._gather_token_counts()

    def _unigram_loss(self, tokens_BN: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of a model that predicts the (add-one smoothed) training-token frequencies."""
        counts = getattr(self, "_all_token_counts", None)
        if counts is None or counts.numel() != self.train_token_counts.numel():
            counts = self.train_token_counts  # called outside a validation/test epoch
        probs = (counts + 1) / (counts.sum() + self.vocab_size)
        return -probs.log()[tokens_BN.reshape(-1)].mean()

    def setup(self, stage: str) -> None:
        """Before fitting or evaluating: the data must carry the class labels this generator is conditioned on."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        if getattr(datamodule, "has_labels", True) is False:
            raise ValueError(
                getattr(datamodule, "label_note", None)
                or f"the data ({getattr(datamodule, 'source', type(datamodule).__name__)}) has no class labels, but "
                f"{type(self).__name__} is class-conditional; use a labelled source (digits, or a folder with one "
                f"sub-folder per class)"
            )
        data_classes = int(getattr(datamodule, "num_classes", 0) or 0)
        if data_classes > self.num_classes:
            raise ValueError(
                f"the data has {data_classes} classes but {type(self).__name__} has num_classes={self.num_classes}; "
                f"set model.init_args.num_classes: {data_classes}"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    # ---- EMA -------------------------------------------------------------------------------------

    def configure_ema(self) -> None:
        """Create the EMA copy of `self.net` (call at the end of a subclass __init__)."""
        if self.hparams.ema_decay > 0:
            self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(self.hparams.ema_decay))
            self.ema.requires_grad_(False)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the EMA update: both happen before callbacks (ModelCheckpoint) see
        the batch end, so a checkpoint holds the EMA of exactly the steps taken (exact resume)."""
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    @contextmanager
    def sampling_weights(self, use_ema: bool = True) -> Iterator[nn.Module]:
        """Within the block `self.net` is the EMA network (when enabled and `use_ema`)."""
        live = self._modules["net"]
        if use_ema and self.ema is not None:
            self._modules["net"] = self.ema.module
        try:
            yield self._modules["net"]
        finally:
            self._modules["net"] = live

    # ---- generation ------------------------------------------------------------------------------

    def check_sampling_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The declared `sampling_options` with the given values filled in; unknown names refused."""
        unknown = sorted(set(options) - set(self.sampling_options))
        if unknown:
            raise ValueError(
                f"{unknown} are not sampling options of {type(self).__name__}; it takes "
                f"{sorted(self.sampling_options) or 'none'}"
            )
        return {**self.sampling_options, **options}

    @torch.no_grad()
    def run_sampling(
        self,
        labels_B: torch.Tensor | list[int],
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        use_ema: bool = True,
        sampler: TokenSampler | None = None,
        **options: Any,
    ) -> SamplingState:
        """The generation loop, the same for every paradigm; returns the final `SamplingState`.

        `cfg != 1` runs one doubled batch with the null class; `options` are the paradigm's
        `sampling_options`; `sampler` replaces the default `sampler_cls(temperature, top_k, top_p, greedy)`. Each step: inputs from the state, one network pass, guidance, the draw,
        then the state records the step."""
        labels_B = self.check_labels(labels_B)
        if len(labels_B) == 0:
            raise ValueError("generate() needs at least one label")
        if cfg < 0:
            raise ValueError(f"cfg must be >= 0 (1 = no guidance), got {cfg}")
        if sampler is None:
            sampler = self.sampler_cls(temperature, top_k, top_p, greedy)
        elif (temperature, top_k, top_p, greedy) != (1.0, None, 1.0, False):
            raise ValueError(
                f"pass either sampler={type(sampler).__name__}(...) or temperature/top_k/top_p/greedy, not both "
                f"(got temperature={temperature}, top_k={top_k}, top_p={top_p}, greedy={greedy})"
            )
        sampler = sampler.check(self.vocab_size)
        guided = cfg != 1.0
        labels_R = torch.cat([labels_B, torch.full_like(labels_B, self.num_classes)]) if guided else labels_B
        state = SamplingState(
            tokens=torch.zeros(len(labels_R), self.num_tokens, dtype=torch.long, device=self.device),
            labels=labels_R, batch_size=len(labels_B), cfg=cfg, sampler=sampler, generator=generator,
            options=self.check_sampling_options(options),
        )  # fmt: skip
        was_training = self.training
        self.eval()
        with self.sampling_weights(use_ema):
            state = self.start_sampling(state)
            try:
                for step in range(self.num_steps):
                    state.step, state.substep = step, 0
                    logits_RlV = self.forward_step(self.step_inputs(state), state).float()
                    logits_BlV = self.apply_guidance(logits_RlV, state)
                    state = self.update_state(state, self.logits_to_tokens(logits_BlV, state), logits_BlV)
            finally:
                state = self.end_sampling(state)
        self.train(was_training)
        return state

    @torch.no_grad()
    def generate(
        self,
        labels_B: torch.Tensor | list[int],
        cfg: float = 1.0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        greedy: bool = False,
        use_ema: bool = True,
        sampler: TokenSampler | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """Flat tokens (B, N) for the given class labels (`run_sampling`'s conditional rows)."""
        return self.run_sampling(labels_B, cfg=cfg, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
                                 greedy=greedy, use_ema=use_ema, sampler=sampler, **options).conditional_tokens()

    @torch.no_grad()
    def decode_state(self, state: SamplingState) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] of a finished generation (default: decode its tokens)."""
        return self.decode_tokens(state.conditional_tokens())

    @torch.no_grad()
    def sample_images(self, labels_B: torch.Tensor | list[int], **kwargs: Any) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1]: `run_sampling(...)` then `decode_state`."""
        return self.decode_state(self.run_sampling(labels_B, **kwargs))

    # ---- optimisation ----------------------------------------------------------------------------

    def no_weight_decay(self, name: str, param: torch.Tensor) -> bool:
        """Whether AdamW leaves this network parameter undecayed: norms, biases, embeddings."""
        lowered = name.lower()
        return param.ndim < 2 or "norm" in lowered or "embed" in lowered or "pos_" in lowered

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, param in self.net.named_parameters():
            if param.requires_grad:
                (no_decay if self.no_weight_decay(name, param) else decay).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=tuple(self.hparams.betas),
        )
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else float("inf")
        total = int(total) if total != float("inf") else 0
        scheduler = warmup_cosine_scheduler(optimizer, self.hparams.warmup_steps, total, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def num_params(self) -> int:
        """Parameters of the network (tokenizer and EMA copy excluded), as papers count them."""
        return sum(p.numel() for p in self.net.parameters())

    # ---- checkpoints -----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASS_KEY] = class_path_of(type(self))

    def run_dir(self) -> Path:
        """The folder this run writes into (the logger's version folder, else the trainer's root)."""
        # not `trainer.log_dir`: it broadcasts from rank 0, so rank-0-only callers would hang under DDP
        logger = self.trainer.logger
        path = (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)) if logger else None
        return Path(path or self.trainer.default_root_dir)

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: Any = "cpu") -> "BaseGenerator":
        """Load a folder written by `arzoo export` (safetensors + JSON, no pickle); returns the concrete class."""
        from arzoo.pretrained import from_pretrained

        model = from_pretrained(folder, map_location=map_location)
        if not isinstance(model, cls):
            raise TypeError(f"{str(folder)!r} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    @classmethod
    def migrate_arguments(cls, init_args: dict[str, Any]) -> tuple[type["BaseGenerator"], dict[str, Any]]:
        """(class, constructor arguments) for arguments saved by an older arzoo; default unchanged."""
        return cls, init_args

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None, **kwargs: Any) -> "BaseGenerator":
        """Load any generator checkpoint; on the base class this returns the concrete subclass.

        The class the checkpoint names is used only if it is arzoo's or already imported (a file
        never makes arzoo import a module, see `arzoo.class_paths`); keyword arguments override the
        saved constructor arguments. Weights must fit exactly.
        """
        source = str(checkpoint_path)
        ckpt = read_checkpoint(checkpoint_path, "generator checkpoint")
        if not isinstance(ckpt, dict):
            raise ValueError(f"generator checkpoint {source!r} holds a {type(ckpt).__name__}, expected a checkpoint dict")
        hparams = dict(ckpt.get("hyper_parameters") or {})
        class_path = ckpt.get(CLASS_KEY) or hparams.get("_class_path")
        if isinstance(hparams.get("tokenizer"), dict) and ckpt.get(CLASS_KEY) is None:
            raise ValueError(
                f"{source!r} is a tokenizer checkpoint, but a generator checkpoint is needed here "
                f"(e.g. runs/digits/raster/last.ckpt); a tokenizer checkpoint goes in a generator's tokenizer_path"
            )
        if class_path is None:
            raise ValueError(f"{source!r} is not an arzoo generator checkpoint (no {CLASS_KEY!r} entry)")
        target = resolve_class(class_path, what="generator class", source=source, base=BaseGenerator)
        if not issubclass(target, cls):
            raise TypeError(f"{source!r} holds a {target.__name__}, not a {cls.__name__}")
        init_args = {k: v for k, v in hparams.items() if not str(k).startswith("_")}
        check_class_paths(init_args, source=source)
        target, init_args = target.migrate_arguments(init_args)
        init_args.update(kwargs)
        state = ckpt.get("state_dict")
        if not isinstance(state, Mapping):
            raise ValueError(f"generator checkpoint {source!r} has no state_dict")
        model = target(**init_args)
        model.on_load_checkpoint(ckpt)
        load_state_dict_checked(model, state, f"generator checkpoint {source!r}")
        return model.to(map_location or "cpu").eval()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, weights that do not fit this network (e.g. `--ckpt_path` of another size)."""
        if isinstance(checkpoint.get("state_dict"), Mapping):
            check_state_dict_fits(self, checkpoint["state_dict"], "the checkpoint's state_dict")
