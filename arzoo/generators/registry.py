"""Named generator sizes (like timm's model names): `create_generator("raster-b")`.

Each model-family module registers its sizes next to its class with `register_sizes`; the table
is a convenience on top of the classes, which remain usable directly with keyword arguments.
"""

from __future__ import annotations

from typing import Any, Mapping

from arzoo.generators.base import BaseGenerator

_SIZES: dict[str, tuple[type[BaseGenerator], dict[str, Any]]] = {}


def register_sizes(cls: type[BaseGenerator], sizes: Mapping[str, Mapping[str, Any]]) -> None:
    """Make `create_generator(name)` build `cls(**sizes[name])`."""
    for name, kwargs in sizes.items():
        if name in _SIZES and _SIZES[name][0] is not cls:
            raise ValueError(f"generator name {name!r} is already registered by {_SIZES[name][0].__name__}")
        _SIZES[name] = (cls, dict(kwargs))


def list_generators() -> list[str]:
    """Registered generator names, sorted."""
    return sorted(_SIZES)


def generator_config(name: str) -> tuple[type[BaseGenerator], dict[str, Any]]:
    """(class, keyword arguments) registered under `name`."""
    if name not in _SIZES:
        raise KeyError(f"unknown generator {name!r}; registered names: {', '.join(list_generators())}")
    cls, kwargs = _SIZES[name]
    return cls, dict(kwargs)


def create_generator(name: str, **overrides: Any) -> BaseGenerator:
    """Build a registered generator; keyword arguments override the registered ones.

    Works under `with torch.device("meta"):` to count parameters without allocating them.
    """
    cls, kwargs = generator_config(name)
    kwargs.update(overrides)
    return cls(**kwargs)
