"""arzoo: a PyTorch Lightning zoo of visual autoregressive image generators.

`import arzoo` is light: the names below are imported on first use (generators need lightning).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute), imported on first access
_LAZY = {
    "BaseGenerator": ("arzoo.generators.base", "BaseGenerator"),
    "Generator": ("arzoo.generators.base", "BaseGenerator"),  # `arzoo.Generator.load_from_checkpoint(path)`
    "create_generator": ("arzoo.generators.registry", "create_generator"),
    "list_generators": ("arzoo.generators.registry", "list_generators"),
    "from_pretrained": ("arzoo.pretrained", "from_pretrained"),
}

__all__ = ["BaseGenerator", "Generator", "__version__", "create_generator", "from_pretrained", "list_generators"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        if module_name == "arzoo.generators.registry":
            importlib.import_module("arzoo.generators")  # every paradigm module registers its sizes
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'arzoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
