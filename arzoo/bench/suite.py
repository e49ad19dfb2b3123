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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

SUITES_DIR = Path("benchmarks/suites")
EVALUATION_DEFAULTS: dict[str, Any] = {
    "num_samples": 300,
    "batch_size": 100,
    "cfg": 2.0,
    "temperature": 1.0,
    "top_k": None,
    "top_p": 1.0,
    "seed": 0,
    "feature": "digits",
    "latency_batch": 16,
}


@dataclass
class Budget:
    """Training budget shared by a group of runs: images seen, or wall-clock seconds."""

    train_images: int | None = None
    wall_clock_s: float | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None, what: str) -> "Budget":
        """Read `{train_images: N}` or `{wall_clock_s: S}` (exactly one)."""
        raw = dict(raw or {})
        unknown = set(raw) - {"train_images", "wall_clock_s"}
        if unknown or len(raw) != 1:
            raise ValueError(
                f"{what} must set exactly one of train_images / wall_clock_s, got {raw or 'nothing'}"
            )
        budget = cls(**raw)
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
    evaluate: bool = True
    evaluation: dict[str, Any] = field(default_factory=dict)
    evaluation_overrides: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def config_hash(self) -> str:
        """Hash of the resolved config: the key under which a finished run is reused."""
        return config_hash(self.config)

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
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if not isinstance(raw, dict) or not raw.get("entries"):
        raise ValueError(f"suite {str(path)!r} has no `entries:` list")
    name = str(raw.get("name", path.stem))
    budget = Budget.parse(raw.get("budget"), f"{path}: budget")
    tokenizer_budget = Budget.parse(raw.get("tokenizer_budget", raw.get("budget")), f"{path}: tokenizer_budget")
    evaluation = {**EVALUATION_DEFAULTS, **(raw.get("evaluation") or {})}
    unknown = set(evaluation) - set(EVALUATION_DEFAULTS)
    if unknown:
        raise ValueError(f"{path}: unknown evaluation setting(s) {sorted(unknown)}; known: {sorted(EVALUATION_DEFAULTS)}")

    tokenizers: dict[str, Run] = {}
    for tok_name, spec in (raw.get("tokenizers") or {}).items():
        config = load_recipe(spec["recipe"], spec.get("overrides"))
        _strip_run_location(config)
        tokenizer_budget.apply(config)
        tokenizers[tok_name] = Run(tok_name, "tokenizer", spec["recipe"], config, overrides=dict(spec.get("overrides") or {}))

    entries: list[Run] = []
    seen: set[str] = set()
    for spec in raw["entries"]:
        entry_name = spec.get("name")
        if not entry_name or entry_name in seen:
            raise ValueError(f"{path}: every entry needs a unique `name`, got {entry_name!r}")
        seen.add(entry_name)
        if "recipe" not in spec:
            raise ValueError(f"{path}: entry {entry_name!r} has no `recipe`")
        tok = spec.get("tokenizer")
        if tok is not None and tok not in tokenizers:
            raise ValueError(
                f"{path}: entry {entry_name!r} uses tokenizer {tok!r}, but the suite defines {sorted(tokenizers)}"
            )
        unknown = set(spec) - {"name", "recipe", "tokenizer", "overrides", "evaluation", "init_from", "budget_share", "evaluate"}
        if unknown:
            raise ValueError(f"{path}: entry {entry_name!r} has unknown key(s) {sorted(unknown)}")
        share = float(spec.get("budget_share", 1.0))
        if not 0 < share <= 1:
            raise ValueError(f"{path}: entry {entry_name!r} has budget_share {share}; expected a fraction in (0, 1]")
        config = load_recipe(spec["recipe"], spec.get("overrides"))
        _strip_run_location(config)
        budget.apply(config, share)
        init_from = spec.get("init_from")
        if init_from is not None:
            earlier = {r.name: r for r in entries}
            if init_from not in earlier:
                raise ValueError(
                    f"{path}: entry {entry_name!r} starts from {init_from!r}, which is not an earlier entry "
                    f"(earlier: {sorted(earlier)})"
                )
            config["model"].setdefault("init_args", {})["init_from"] = f"entries/{earlier[init_from].folder_name}/last.ckpt"
        if tok is not None:  # the tokenizer run's checkpoint is decided by its hash, so this stays stable
            config["model"].setdefault("init_args", {})["tokenizer_path"] = f"tokenizers/{tokenizers[tok].folder_name}/last.ckpt"
        entry_eval = dict(spec.get("evaluation") or {})
        unknown = set(entry_eval) - set(EVALUATION_DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: entry {entry_name!r} has unknown evaluation setting(s) {sorted(unknown)}")
        entries.append(
            Run(
                entry_name, "generator", spec["recipe"], config, tokenizer=tok, init_from=init_from,
                evaluate=bool(spec.get("evaluate", True)), evaluation={**evaluation, **entry_eval}, evaluation_overrides=entry_eval,
                overrides=dict(spec.get("overrides") or {}),
            )
        )
    return Suite(name, path, budget, tokenizer_budget, tokenizers, entries, copy.deepcopy(raw))
