"""The one place where a dotted name (`"arzoo.generators.RasterGenerator"`) becomes a class.

A class named by a *file* (a checkpoint's generator class or hyper-parameters, an export's
`config.json`, a tokenizer spec) is resolved only when it is arzoo's own or its module is already
imported: opening a file never imports, and so never runs, a module the file names. A user's own
module (a plugin paradigm, say) is imported by the user: by their recipe's `class_path`, by
`arzoo --plugin <module>`, or by `import` in their script. A class named by the user's own recipe
or code may import its module (`trusted=True`).

A bottom-layer module: standard library only.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Iterable

from arzoo.errors import UntrustedClassError

__all__ = ["class_path_of", "import_plugins", "resolve_class", "check_class_paths"]

OWN_PACKAGE = "arzoo"


def class_path_of(cls: type) -> str:
    """The dotted name `resolve_class` turns back into `cls`."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_own(module_name: str) -> bool:
    return module_name == OWN_PACKAGE or module_name.startswith(OWN_PACKAGE + ".")


def _split(class_path: str) -> list[tuple[str, list[str]]]:
    """(module name, attribute chain) candidates, the longest module name first (nested classes)."""
    parts = class_path.split(".")
    return [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]


def resolve_class(
    class_path: Any,
    *,
    what: str = "class",
    source: str | None = None,
    base: type | tuple[type, ...] | None = None,
    trusted: bool = False,
) -> type:
    """The class named `class_path`, checked to subclass `base`.

    `source` names the file the name was read from; such a name is resolved only when the class is
    arzoo's or its module is already imported (see the module docstring). `trusted=True` (a name
    the user wrote in a recipe or in code) may import any module. Every failure is a ValueError
    naming the class, the file and what was expected.
    """
    where = f" (named in {source!r})" if source else ""
    if not isinstance(class_path, str) or "." not in class_path or not all(class_path.split(".")):
        raise ValueError(f"{what} {class_path!r}{where} is not a dotted class path such as 'package.module.Class'")
    found: Any = None
    errors: list[str] = []
    for module_name, attrs in _split(class_path):
        module = sys.modules.get(module_name)
        if module is None:
            if not (trusted or _is_own(module_name)):
                continue
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                if err.name and module_name.startswith(err.name):
                    continue  # this prefix is not a module; try a shorter one (a nested class)
                errors.append(f"importing {module_name!r} failed: {type(err).__name__}: {err}")
                break
            except Exception as err:  # noqa: BLE001 - an import can raise anything; report it in one line
                errors.append(f"importing {module_name!r} failed: {type(err).__name__}: {err}")
                break
        obj: Any = module
        for attr in attrs:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            found = obj
            break
        errors.append(f"module {module_name!r} has no {'.'.join(attrs)!r}")
        break
    if found is None:
        top = class_path.split(".")[0]
        if not errors and source and not trusted and not _is_own(top):
            raise UntrustedClassError(
                f"{what} {class_path!r}{where} is not an arzoo class and its module is not imported; arzoo never "
                f"imports a module a file names. If you trust it, load it first: `arzoo --plugin "
                f"{class_path.rpartition('.')[0]} ...`, or `import {class_path.rpartition('.')[0]}` in your script"
            )
        detail = "; ".join(errors) or "no such module"
        hint = " (is it installed, or run with `arzoo --plugin <module>`?)" if not _is_own(top) else ""
        raise ValueError(f"{what} {class_path!r}{where} cannot be found: {detail}{hint}")
    if not isinstance(found, type):
        raise ValueError(f"{what} {class_path!r}{where} is a {type(found).__name__}, not a class")
    if base is not None and not issubclass(found, base):
        bases = base if isinstance(base, tuple) else (base,)
        names = " or ".join(class_path_of(b) for b in bases)
        raise ValueError(f"{what} {class_path!r}{where} is not a subclass of {names}")
    return found


def check_class_paths(value: Any, *, source: str, what: str = "class") -> None:
    """Resolve every `class_path` entry nested in `value` (dicts and lists) under the file rule, so
    that a later consumer (jsonargparse) finds only arzoo's or already imported modules."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("class_path", "_class_path") and isinstance(item, str):
                resolve_class(item, what=what, source=source)
            else:
                check_class_paths(item, source=source, what=what)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_class_paths(item, source=source, what=what)


def import_plugins(modules: Iterable[str]) -> None:
    """Import the user's plugin modules (`arzoo --plugin my_paradigm`), with a clear error for a bad name."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001
            raise ValueError(
                f"--plugin {name!r} could not be imported ({type(err).__name__}: {err}); give an importable module "
                f"name (a module in the current folder, or an installed package), e.g. --plugin my_paradigm"
            ) from err
