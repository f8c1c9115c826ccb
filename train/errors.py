"""Kept so that ``from hnd.train.errors import HndError`` still works: the class is hnd.common.errors.HndError."""

from __future__ import annotations

from hnd.common.errors import HndError

__all__ = ["HndError"]
