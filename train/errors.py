"""One error type for bad input to hnd-train / hnd-eval: the CLIs print it as one line, no traceback."""
from __future__ import annotations

import os


class HndError(Exception):
    """Bad input (file, config, checkpoint): printed as ``<prog>: error: <file>: <problem>``."""

    def __init__(self, where: str | os.PathLike, problem: str) -> None:
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")
