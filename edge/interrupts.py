"""SIGTERM and Ctrl-C during an edge run, raised where the run can stop cleanly.

A Python signal handler runs in the main thread between two bytecodes, wherever it is. An exception raised
there can land inside a library's bookkeeping: in grpc's call creation, between the call being made and
being counted, it leaves a call that no thread completes, and the channel's close then waits for it forever
(hnd-edge hung on SIGTERM). So while a run is in progress (``deferred``) the handler only records the
signal, and the run raises it at its own points: before each frame (``checkpoint``) and while it waits for
an answer or for the server (``wait``, ``sleep``: short slices, so the run ends within ~0.1 s of the
signal). Outside a run (set-up, clean-up) the handler raises at once, as Python's own Ctrl-C does.
"""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

SLICE_S = 0.1  # how long a wait goes without looking for a signal


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd, docker stop, Kubernetes): the run ends as on Ctrl-C."""


_deferring = 0  # > 0 while a run is in progress
_pending: KeyboardInterrupt | None = None  # the signal that came meanwhile (the first one)


def on_signal(signum: int, frame: object) -> None:
    """Handler for SIGTERM and SIGINT: ``Terminated`` / ``KeyboardInterrupt``, at once or at the run's next point."""
    global _pending
    exc = Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if not _deferring:
        raise exc
    if _pending is None:
        _pending = exc


def install() -> None:
    """Route SIGTERM and SIGINT through ``on_signal`` (main thread only, as Python requires)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)


def checkpoint() -> None:
    """Raise the signal that came since the last point, if any."""
    global _pending
    if _pending is not None:
        exc, _pending = _pending, None
        raise exc


@contextmanager
def deferred() -> Iterator[None]:
    """A run in progress: signals wait for its next ``checkpoint`` / ``wait`` / ``sleep``; one that came
    during the last step is raised when the run ends."""
    global _deferring, _pending
    _deferring += 1
    try:
        yield
    except BaseException:
        if _deferring == 1:
            _pending = None  # the run ends anyway (interrupted, server gone, ...)
        raise
    finally:
        _deferring -= 1
    if not _deferring:
        checkpoint()


@contextmanager
def immediate() -> Iterator[None]:
    """A wait in the run outside any library's bookkeeping (reading the next frame from a camera that may
    stall): a signal is raised at once, as outside a run."""
    global _deferring
    checkpoint()
    saved, _deferring = _deferring, 0
    try:
        yield
    finally:
        _deferring = saved


def wait(future: concurrent.futures.Future) -> None:
    """Until ``future`` is done, looking for a signal every ``SLICE_S``."""
    checkpoint()
    while not concurrent.futures.wait([future], timeout=SLICE_S).done:
        checkpoint()


def sleep(seconds: float) -> None:
    """``time.sleep`` looking for a signal every ``SLICE_S``."""
    end = time.monotonic() + seconds
    checkpoint()
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(left, SLICE_S))
        checkpoint()
