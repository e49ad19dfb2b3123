"""The errors a user can cause, and how the `arzoo` command reports them: one line, no traceback.

A bottom-layer module (standard library only). Library code raises ordinary exceptions with a
clear message (`ValueError` for a value out of range, `FileNotFoundError` for a missing file, ...);
the few kinds a caller may want to tell apart have their own class here. `arzoo` (the command)
turns any exception into one line, `arzoo <command>: error: <message>`, with exit code 2 when what
the user typed or configured is wrong (`usage_error`) and 1 otherwise (a damaged file, a full disk,
a training fault). `--debug` or `ARZOO_DEBUG=1` shows the full traceback instead.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "CorruptFileError",
    "DataError",
    "UntrustedClassError",
    "debug_enabled",
    "exit_code",
    "one_line",
]


class CorruptFileError(ValueError):
    """A file exists but its content cannot be used: truncated, not the expected format, checksum mismatch."""


class UntrustedClassError(ValueError):
    """A file names a class outside arzoo whose module is not imported: arzoo refuses to import it."""


class DataError(RuntimeError):
    """The data cannot be trained on (e.g. no image of the source could be read)."""


# Raised for what a user typed or configured: exit code 2. Anything else (damaged files, the
# environment, training faults, bugs) exits with 1.
_USAGE = (TypeError, KeyError, IndexError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


def debug_enabled() -> bool:
    """Whether the user asked for full tracebacks (`ARZOO_DEBUG=1`; the `--debug` flag sets it)."""
    return os.environ.get("ARZOO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def exit_code(err: BaseException) -> int:
    """2 for a usage error (a bad value, a missing file the user named), 1 for every other failure."""
    if isinstance(err, (CorruptFileError, UntrustedClassError, DataError)):
        return 1
    if isinstance(err, ValueError) or isinstance(err, _USAGE):
        return 2
    return 1


def one_line(err: BaseException) -> str:
    """The message of `err` as one line: its first line, with OS errors naming the file and the cause."""
    if isinstance(err, OSError) and err.errno is not None and (err.filename is not None or not isinstance(err, _USAGE)):
        where = err.filename if err.filename is not None else ""
        cause = os.strerror(err.errno) if err.errno in errno.errorcode else str(err)
        if where and err.errno == errno.ENOTDIR:
            blocker = _file_in_the_way(str(where))
            if blocker:
                return f"cannot create {str(where)!r}: {blocker!r} is a file, not a folder"
        if where:
            hint = {errno.ENOSPC: "free space there or write elsewhere",
                    errno.EACCES: "choose a folder you can write to",
                    errno.EROFS: "choose a folder you can write to"}.get(err.errno, "")
            return f"cannot access {str(where)!r}: {cause}" + (f" ({hint})" if hint else "")
        return cause
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]  # str(KeyError) adds quotes around the message
    else:
        text = str(err)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    return lines[0]


def _file_in_the_way(path: str) -> str | None:
    """The nearest ancestor of `path` that is a file (why a folder below it cannot be made), if any."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and parent != os.path.dirname(parent):
        if os.path.isfile(parent):
            return parent
        parent = os.path.dirname(parent)
    return None
