"""`arzoo` (and `python -m arzoo`): dispatch to a command; every failure ends in one line.

    arzoo [--plugin MODULE]... [--debug] fit|validate|test|predict|sample|tokenize|export|bench ...

`fit | validate | test | predict` are LightningCLI's (`arzoo.cli.lightning_cli`); the others are
plain commands with a `main(argv)` each, imported only when used. `--plugin` imports a module of
the user's (a paradigm, a data module) before anything is read, so that checkpoints naming its
classes load (arzoo never imports a module a file names; see `arzoo.class_paths`). An error ends
the command with `arzoo <command>: error: <one line>` and exit code 2 (a usage mistake) or 1 (any
other failure); `--debug` or `ARZOO_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

from arzoo.errors import DataError, debug_enabled, exit_code, one_line

# Commands that need no Trainer of their own: subcommand -> module with `main(argv: list[str])`.
PLAIN_COMMANDS: dict[str, str] = {
    "sample": "arzoo.cli.sample",
    "tokenize": "arzoo.cli.tokenize",
    "export": "arzoo.cli.export",
    "bench": "arzoo.bench.command",
}
LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def split_global_options(argv: list[str]) -> tuple[list[str], list[str], bool]:
    """(argv without them, plugin modules, debug) from `--plugin M` / `--plugin=M` / `--debug` anywhere in argv."""
    rest: list[str] = []
    plugins: list[str] = []
    debug = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--debug":
            debug = True
        elif arg == "--plugin":
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                raise ValueError("--plugin needs a module name, e.g. `arzoo --plugin my_paradigm fit ...`")
            plugins.append(argv[i + 1])
            i += 1
        elif arg.startswith("--plugin="):
            plugins.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return rest, plugins, debug


def run(argv: list[str]) -> None:
    """Run one `arzoo` command line (without the program name); errors propagate as exceptions."""
    from arzoo.class_paths import import_plugins

    argv, plugins, debug = split_global_options(argv)
    if debug:
        os.environ["ARZOO_DEBUG"] = "1"
    if plugins:
        # the current folder is importable, as `python -m` makes it
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        import_plugins(plugins)
    if argv and argv[0] in PLAIN_COMMANDS:
        importlib.import_module(PLAIN_COMMANDS[argv[0]]).main(argv[1:])
        return
    from arzoo.cli.lightning_cli import run_lightning_cli

    run_lightning_cli(argv or ["--help"])


def _command_name(argv: list[str]) -> str:
    words = [a for a in argv if not a.startswith("-")]
    known = (*PLAIN_COMMANDS, *LIGHTNING_COMMANDS)
    return f"arzoo {words[0]}" if words and words[0] in known else "arzoo"


def main(args: list[str] | None = None) -> None:
    """Entry point of the `arzoo` console script and of `python -m arzoo`."""
    argv = sys.argv[1:] if args is None else list(args)
    try:
        run(argv)
    except SystemExit:
        raise  # argument parsers report their own usage errors (exit code 2) and --help (0)
    except KeyboardInterrupt:
        print(f"{_command_name(argv)}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as err:  # noqa: BLE001 - every failure ends in one line (the traceback with --debug)
        if debug_enabled() or "--debug" in argv:
            raise
        sys.stderr.flush()
        sys.stdout.flush()
        code = exit_code(err)
        known = isinstance(err, (ValueError, TypeError, LookupError, OSError, DataError)) or type(err).__name__ in (
            "NonFiniteLossError", "MisconfigurationException")
        hint = "" if known else " (rerun with --debug for the traceback)"
        print(f"{_command_name(argv)}: error: {one_line(err)}{hint}", file=sys.stderr)
        raise SystemExit(code) from None
