"""A benchmark suite: tokenizers and generator entries (recipe + overrides), one budget, one evaluation.

A suite file (`benchmarks/suites/<name>.yaml`) reads:

```yaml
name: quick
budget: {wall_clock_s: 40}        # or {train_images: 16000}: the same for every generator entry
tokenizer_budget: {train_images: 9600}
evaluation: {num_samples: 300, cfg: 2.0, top_k: 16, seed: 0, feature: digits}
tokenizers:
  vq: {recipe: recipes/digits/tokenizer_vq.yaml}
entries:
  - {name: raster, recipe: recipes/digits/raster.yaml, tokenizer: vq, overrides: {...}, evaluation: {...}}
  # a two-stage method: the first stage is trained but not ranked; the two share one budget
  - {name: hmar-stage1, recipe: ..., tokenizer: msvq, budget_share: 0.7, evaluate: false}
  - {name: hmar, recipe: ..., tokenizer: msvq, init_from: hmar-stage1, budget_share: 0.3}
```

Recipes are the ones `arzoo fit` reads; the harness resolves each one (OmegaConf interpolation,
dotted overrides, the budget, the tokenizer checkpoint), hashes the result and runs it in its own
folder, so a tokenizer shared by several entries is trained once, keyed by its resolved config.
"""

from __future__ import annotations

import copy
import hashlib
import json
import difflib
from dataclasses import MISSING as MISSING_FACTORY, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

SUITES_DIR = Path("benchmarks/suites")


# The suite file's schema (OmegaConf structured configs): an unknown key or a value of the wrong type
# is refused before anything trains, naming the suite, the entry and the key.
@dataclass
class BudgetSpec:
    """`budget:` / `tokenizer_budget:` as written in a suite file."""

    train_images: Optional[int] = None
    wall_clock_s: Optional[float] = None


@dataclass
class EvaluationSpec:
    """`evaluation:` (the suite's, or an entry's overrides of it)."""

    num_samples: int = 300
    batch_size: int = 100
    cfg: float = 2.0
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: float = 1.0
    seed: int = 0
    feature: str = "digits"
    latency_batch: int = 16
    # the paradigm's declared `sampling_options` (e.g. HMAR's mask_schedule): no retraining needed
    options: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerSpec:
    """One entry of `tokenizers:`: a recipe to train, or an existing checkpoint (`checkpoint:`)."""

    recipe: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None  # a trained tokenizer checkpoint: used as is, never retrained


@dataclass
class EntrySpec:
    """One entry of `entries:`."""

    name: str = MISSING
    recipe: str = MISSING
    tokenizer: Optional[str] = None
    overrides: Dict[str, Any] = field(default_factory=dict)
    evaluation: Dict[str, Any] = field(default_factory=dict)  # checked against EvaluationSpec once merged
    init_from: Optional[str] = None
    model_of: Optional[str] = None  # evaluate that earlier entry's trained model (e.g. other sampling options)
    budget_share: float = 1.0
    evaluate: bool = True


@dataclass
class SuiteSpec:
    """The top level of a suite file."""

    name: Optional[str] = None
    budget: Dict[str, Any] = field(default_factory=dict)  # checked against BudgetSpec
    tokenizer_budget: Optional[Dict[str, Any]] = None
    evaluation: Dict[str, Any] = field(default_factory=dict)  # checked against EvaluationSpec
    tokenizers: Dict[str, Any] = field(default_factory=dict)  # each checked against TokenizerSpec
    entries: List[Any] = field(default_factory=list)  # each checked against EntrySpec


EVALUATION_DEFAULTS: dict[str, Any] = {
    f.name: f.default_factory() if f.default_factory is not MISSING_FACTORY else f.default for f in fields(EvaluationSpec)
}


def _validated(schema: type, raw: Any, where: str) -> dict[str, Any]:
    """`raw` merged onto `schema`'s defaults as a plain dict; a wrong key or type is one line naming `where`."""
    known = [f.name for f in fields(schema)]
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping of {', '.join(known)}; got {raw!r}")
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where} has unknown key {key!r}{hint}; known keys: {', '.join(known)}")
    try:
        conf = OmegaConf.merge(OmegaConf.structured(schema), dict(raw))
        missing = sorted(OmegaConf.missing_keys(conf))
        if missing:
            raise ValueError(f"{where} has no {missing[0]!r}, which is required")
        return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        message = str(getattr(err, "msg", None) or err).splitlines()[0]
        raise ValueError(f"{where}: key {key!r}: {message}") from None


@dataclass
class Budget:
    """Training budget shared by a group of runs: images seen, or wall-clock seconds."""

    train_images: int | None = None
    wall_clock_s: float | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, what: str) -> "Budget":
        """Read `{train_images: N}` or `{wall_clock_s: S}` (exactly one)."""
        given = {k: v for k, v in _validated(BudgetSpec, raw or {}, what).items() if v is not None}
        if len(given) != 1:
            raise ValueError(f"{what} must set exactly one of train_images / wall_clock_s, got {dict(raw or {}) or 'nothing'}")
        budget = cls(**given)
        value = budget.train_images if budget.train_images is not None else budget.wall_clock_s
        if not value or value <= 0:
            raise ValueError(f"{what} must be positive, got {raw}")
        return budget

    def describe(self) -> str:
        """Human-readable budget, printed in the leaderboard."""
        if self.train_images is not None:
            return f"{self.train_images:,} training images seen per run"
        return f"{self.wall_clock_s:g} s of training wall clock per run"

    def apply(self, config: dict[str, Any], share: float = 1.0) -> None:
        """Set the trainer's stopping rule for `share` of this budget (the recipe's epochs no longer count)."""
        trainer = config.setdefault("trainer", {})
        trainer["max_epochs"] = -1
        if self.train_images is not None:
            batch = int(config["data"]["init_args"].get("batch_size", 64))
            trainer["max_steps"] = max(1, -(-round(self.train_images * share) // batch))
            trainer.pop("max_time", None)
        else:
            trainer["max_steps"] = -1
            trainer["max_time"] = {"seconds": max(1, int(round(self.wall_clock_s * share)))}


@dataclass
class Run:
    """One training run of the suite (a tokenizer or a generator entry), resolved and hashed."""

    name: str
    kind: str  # "tokenizer" | "generator"
    recipe: str
    config: dict[str, Any]
    tokenizer: str | None = None
    init_from: str | None = None  # the entry whose checkpoint this one starts from (a later training stage)
    model_of: str | None = None  # the entry whose trained model this one evaluates (it trains nothing itself)
    checkpoint: str | None = None  # a tokenizer given as a trained checkpoint (nothing to train)
    evaluate: bool = True
    evaluation: dict[str, Any] = field(default_factory=dict)
    evaluation_overrides: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        """Hash of the resolved config: the key under which a finished run is reused."""
        return config_hash(self.config)

    @property
    def trained_checkpoint(self) -> str:
        """Where the run's checkpoint is, relative to the suite's output folder (or absolute)."""
        if self.checkpoint:
            return self.checkpoint
        return f"{'tokenizers' if self.kind == 'tokenizer' else 'entries'}/{self.folder_name}/last.ckpt"

    @property
    def folder_name(self) -> str:
        """Folder of the run inside the suite's output folder."""
        return f"{self.name}-{self.config_hash}"


@dataclass
class Suite:
    """A parsed suite: tokenizer runs first, then generator entries."""

    name: str
    path: Path
    budget: Budget
    tokenizer_budget: Budget
    tokenizers: dict[str, Run]
    entries: list[Run]
    raw: dict[str, Any]


def config_hash(config: Mapping[str, Any]) -> str:
    """Short stable hash of a JSON-able config."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def resolve_suite_path(suite: str) -> Path:
    """`quick` -> benchmarks/suites/quick.yaml; a path is used as it is."""
    path = Path(suite)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"suite file {str(path)!r} does not exist")
        return path
    named = SUITES_DIR / f"{suite}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) if SUITES_DIR.is_dir() else []
        raise FileNotFoundError(
            f"no suite named {suite!r}: expected {named} (run from the repository root); "
            f"known suites: {', '.join(known) or 'none found'}"
        )
    return named


def load_recipe(recipe: str | Path, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A recipe as a plain dict with dotted `overrides` applied and interpolations resolved."""
    path = Path(recipe)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    conf = OmegaConf.load(path)
    for key, value in (overrides or {}).items():
        OmegaConf.update(conf, key, value, merge=False, force_add=True)
    resolved = OmegaConf.to_container(conf, resolve=True)
    for section in ("model", "trainer"):
        if section not in resolved:
            raise ValueError(f"recipe {str(path)!r} has no {section!r} section; is it an `arzoo fit` recipe?")
    return resolved


def _strip_run_location(config: dict[str, Any]) -> None:
    """Remove what says where a recipe writes (logger, checkpoint folders, progress bars, sample grids)."""
    trainer = config.setdefault("trainer", {})
    for key in ("logger", "callbacks", "default_root_dir", "enable_progress_bar"):
        trainer.pop(key, None)
    trainer.pop("max_time", None)


def load_suite(suite: str) -> Suite:
    """Parse and resolve a suite by name or path; every error names the suite and the entry."""
    path = resolve_suite_path(suite)
    try:
        loaded = OmegaConf.load(path)
        raw = OmegaConf.to_container(loaded, resolve=True)
    except Exception as err:  # noqa: BLE001 - YAML and interpolation errors: one line naming the file
        raise ValueError(f"suite {str(path)!r} could not be read: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"suite {str(path)!r} is not a mapping of settings (name, budget, tokenizers, entries)")
    top = _validated(SuiteSpec, raw, f"suite {str(path)!r}")
    if not top["entries"]:
        raise ValueError(f"suite {str(path)!r} has no `entries:` list")
    name = str(top["name"] or path.stem)
    where = f"suite {name!r} ({path})"
    budget = Budget.parse(raw.get("budget"), f"{where}: budget")
    tokenizer_budget = Budget.parse(raw.get("tokenizer_budget", raw.get("budget")), f"{where}: tokenizer_budget")
    evaluation = _validated(EvaluationSpec, raw.get("evaluation") or {}, f"{where}: evaluation")

    tokenizers: dict[str, Run] = {}
    for tok_name, tok_raw in (raw.get("tokenizers") or {}).items():
        spec = _validated(TokenizerSpec, tok_raw, f"{where}: tokenizer {tok_name!r}")
        if (spec["recipe"] is None) == (spec["checkpoint"] is None):
            raise ValueError(
                f"{where}: tokenizer {tok_name!r} needs either `recipe:` (train it) or `checkpoint:` (use a "
                f"trained one), not {'both' if spec['recipe'] else 'neither'}"
            )
        if spec["checkpoint"] is not None:
            ckpt = Path(spec["checkpoint"]).expanduser().resolve()
            if not ckpt.is_file():
                raise FileNotFoundError(f"{where}: tokenizer {tok_name!r}: checkpoint {str(ckpt)!r} does not exist")
            stat = ckpt.stat()  # a changed file is a new run (its reference rows are recomputed)
            config = {"checkpoint": str(ckpt), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            tokenizers[tok_name] = Run(tok_name, "tokenizer", "–", config, checkpoint=str(ckpt))
            continue
        config = load_recipe(spec["recipe"], spec["overrides"])
        _strip_run_location(config)
        tokenizer_budget.apply(config)
        tokenizers[tok_name] = Run(tok_name, "tokenizer", spec["recipe"], config, overrides=dict(spec["overrides"]))

    entries: list[Run] = []
    for index, entry_raw in enumerate(raw["entries"]):
        label = entry_raw.get("name") if isinstance(entry_raw, dict) else None
        spec = _validated(EntrySpec, entry_raw, f"{where}: entry {label or index!r}")
        entry_name = spec["name"]
        if entry_name in {r.name for r in entries}:
            raise ValueError(f"{where}: every entry needs a unique `name`, got {entry_name!r} twice")
        entry_where = f"{where}: entry {entry_name!r}"
        tok = spec["tokenizer"]
        if tok is not None and tok not in tokenizers:
            raise ValueError(f"{entry_where} uses tokenizer {tok!r}, but the suite defines {sorted(tokenizers)}")
        share = spec["budget_share"]
        if not 0 < share <= 1:
            raise ValueError(f"{entry_where} has budget_share {share}; expected a fraction in (0, 1]")
        config = load_recipe(spec["recipe"], spec["overrides"])
        _strip_run_location(config)
        budget.apply(config, share)
        init_from = spec["init_from"]
        if init_from is not None:
            earlier = {r.name: r for r in entries}
            if init_from not in earlier:
                raise ValueError(
                    f"{entry_where} starts from {init_from!r}, which is not an earlier entry (earlier: {sorted(earlier)})"
                )
            config["model"].setdefault("init_args", {})["init_from"] = f"entries/{earlier[init_from].folder_name}/last.ckpt"
        if tok is not None:  # the tokenizer run's checkpoint is decided by its hash, so this stays stable
            trained = tokenizers[tok].checkpoint or f"tokenizers/{tokenizers[tok].folder_name}/last.ckpt"
            config["model"].setdefault("init_args", {})["tokenizer_path"] = trained
        model_of = spec["model_of"]
        if model_of is not None:
            earlier = {r.name: r for r in entries}
            if model_of not in earlier or earlier[model_of].model_of is not None:
                raise ValueError(
                    f"{entry_where} evaluates the model of {model_of!r}, which is not an earlier entry that trains "
                    f"(earlier: {sorted(k for k, r in earlier.items() if r.model_of is None)})"
                )
            if earlier[model_of].config_hash != config_hash(config):
                raise ValueError(
                    f"{entry_where} evaluates the model of {model_of!r} but its recipe or overrides differ; "
                    f"an entry with model_of may change only its evaluation settings"
                )
        entry_eval = dict(entry_raw.get("evaluation") or {})
        merged = _validated(EvaluationSpec, {**evaluation, **entry_eval}, f"{entry_where}: evaluation")
        entries.append(
            Run(
                entry_name, "generator", spec["recipe"], config, tokenizer=tok, init_from=init_from, model_of=model_of,
                evaluate=spec["evaluate"], evaluation=merged,
                evaluation_overrides={k: merged[k] for k in entry_eval}, overrides=dict(spec["overrides"]),
            )
        )
    return Suite(name, path, budget, tokenizer_budget, tokenizers, entries, copy.deepcopy(raw))
