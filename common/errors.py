"""The one base class for errors a user can fix, and how every CLI reports them.

``HndError`` (and its subclasses ``ConfigError``, ``CheckpointError``, ``CodecError``, ``EdgeError``,
``SourceError``, ...) means bad input: a file, an option or a config value. Its message is one line
that names the thing and the problem. Each CLI catches ``USER_ERRORS`` once in ``main`` and prints
``<prog>: error: <message>`` (no traceback), exit status 2; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
import sys


class HndError(Exception):
    """Bad input: ``HndError(message)`` or ``HndError(where, problem)`` -> ``"<where>: <problem>"``."""

    def __init__(self, where: str | os.PathLike, problem: str | None = None) -> None:
        self.where = str(where) if problem is not None else None
        self.problem = problem if problem is not None else str(where)
        super().__init__(f"{self.where}: {problem}" if problem is not None else self.problem)


class UsageError(HndError, ValueError):
    """A command-line option or argument value that cannot be used (also a ValueError for API callers)."""


# What a CLI reports as one line: our errors, and files the OS refuses (missing, unreadable, full disk).
USER_ERRORS: tuple[type[BaseException], ...] = (HndError, OSError)


def report(prog: str, exc: BaseException) -> int:
    """Print ``<prog>: error: <exc>`` on stderr; return the CLI exit status for bad input (2)."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2
