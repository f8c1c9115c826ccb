"""Client-supplied text on its way into statuses and logs: truncated and escaped; refusal logs rate-limited.

A client controls request ids, fingerprints and whatever bytes it sends: unbounded, they would grow a
status past gRPC's metadata limit (the client then sees RESOURCE_EXHAUSTED instead of the real status),
and a newline in them would forge a log line. A retry storm of bad requests would flood the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

MAX_CLIENT_TEXT = 80


def client_text(value: str | bytes, limit: int = MAX_CLIENT_TEXT) -> str:
    """``value`` as one printable line of at most ``limit`` characters (plus a length note).

    Control and non-printable characters come out as Python escapes (``\\n``, ``\\x1b``), so the result
    never spans log lines or carries terminal escapes.
    """
    if isinstance(value, bytes):
        value = value.decode("utf-8", "backslashreplace")
    cut = value[:limit]
    text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
    if len(value) > limit:
        text += f"...({len(value)} chars)"
    return text


class RateLimitedLog:
    """At most ``burst`` lines per ``period_s``; the rest are counted and reported once per period.

    ``on_suppressed(n)`` (e.g. a Prometheus counter's ``inc``) sees every suppressed line as it happens.
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = 20,
        period_s: float = 10.0,
        on_suppressed: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.period_s = period_s
        self.on_suppressed = on_suppressed
        self.clock = clock
        self._lock = threading.Lock()
        self._window_start = clock()
        self._logged = 0
        self.suppressed = 0  # in the current window
        self.suppressed_total = 0

    def flush(self) -> None:
        """Report what the current window suppressed now (e.g. when the server drains)."""
        with self._lock:
            if self.suppressed:
                self.logger.warning(
                    "%d similar refusal lines suppressed in the last %.0f s",
                    self.suppressed,
                    self.clock() - self._window_start,
                )
            self._window_start, self._logged, self.suppressed = self.clock(), 0, 0

    def warning(self, msg: str, *args: object) -> bool:
        """Log like ``logger.warning`` unless over the rate; returns whether the line was written."""
        with self._lock:
            now = self.clock()
            if now - self._window_start >= self.period_s:
                if self.suppressed:
                    self.logger.warning(
                        "%d similar refusal lines suppressed in the last %.0f s",
                        self.suppressed,
                        now - self._window_start,
                    )
                self._window_start, self._logged, self.suppressed = now, 0, 0
            if self._logged >= self.burst:
                self.suppressed += 1
                self.suppressed_total += 1
                if self.on_suppressed is not None:
                    self.on_suppressed(1)
                return False
            self._logged += 1
        self.logger.warning(msg, *args)
        return True
