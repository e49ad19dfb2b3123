"""What every network config dataclass shares: positive-int checks and "config or keyword
arguments" construction (`RasterTransformer(config)` and `RasterTransformer(dim=64, ...)` alike)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, TypeVar

__all__ = ["check_positive_ints", "config_to_dict", "network_config"]

C = TypeVar("C")


def check_positive_ints(owner: str, **values: Any) -> None:
    """Raise a ValueError naming `owner` and the first argument that is not a positive int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")


def network_config(config_cls: type[C], config: C | None, kwargs: dict[str, Any], owner: str) -> C:
    """`config` if given (and of `config_cls`), else `config_cls(**kwargs)`; both given is an error."""
    if config is None:
        return config_cls(**kwargs)
    if kwargs:
        raise TypeError(f"{owner}: pass a config or keyword arguments, not both (got {sorted(kwargs)})")
    if not isinstance(config, config_cls):
        raise TypeError(f"{owner} needs a {config_cls.__name__}, got {type(config).__name__}")
    return config


def config_to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as a plain JSON-ready dict (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
