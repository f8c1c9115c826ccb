"""The in-flight window and the per-request deadline, sized to the server the edge meets.

A fixed window and deadline (the config's 4 frames and 30 s) suit a GPU server; against a CPU server
whose tail takes seconds, four frames sent at once queue behind each other past the deadline and come
back DEADLINE_EXCEEDED after the server spent its time on them. Unless ``--max-inflight`` /
``--timeout`` fix them, the edge therefore starts with one frame in flight and the config's deadline
and, after every answer, sizes both from what it measured (moving averages over the last answers):

- ``edge_ms``: what the edge spends on a frame before it goes out (capture .. encode);
- ``service_ms``: the server's compute per image (its batch's compute over the batch size);
- ``remote_ms``: request sent -> answer, less the time the request waited in the server's queue.

The window is ``ceil((edge_ms + remote_ms) / max(edge_ms, service_ms))``: a frame's whole cycle over the
time the slower side (edge or server) needs per frame, so that side is always busy and no more frames
are out than that (more only wait in the server's queue, towards the deadline), capped by the config's window and by what the server advertises (``limits.max_queue``, and
``limits.max_stream_inflight`` on InferStream). The deadline is ``max(base, DEADLINE_FACTOR x`` the
slowest recent answer ``)``: a server slower than the base deadline is waited for, a hung one is still
noticed, within at most ``MAX_DEADLINE_FACTOR x base``. A frame that misses its deadline halves the window
and doubles the deadline (same bound), so a server slower than the base deadline is learnt too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hnd.edge.records import FrameRecord

ALPHA = 0.3  # weight of the newest answer in the moving averages
DEADLINE_FACTOR = 4.0  # the deadline covers this many times the slowest recent answer
MAX_DEADLINE_FACTOR = 10.0  # ... but not more than this many times the base deadline


@dataclass
class Window:
    """Frames in flight (``size``) and the per-request deadline (``deadline_s``) of a run.

    fixed_size / fixed_deadline: the user's ``--max-inflight`` / ``--timeout`` (kept as given);
    cap: the largest window the edge may grow to (the config's, within the server's limits).
    """

    size: int
    deadline_s: float
    cap: int
    base_deadline_s: float
    fixed_size: bool = False
    fixed_deadline: bool = False
    edge_ms: float | None = None
    service_ms: float | None = None
    remote_ms: float | None = None
    slowest_ms: float | None = None  # decaying maximum of network_server

    @classmethod
    def start(cls, cap: int, deadline_s: float, fixed_size: bool = False, fixed_deadline: bool = False) -> Window:
        """The window of a run's first frame: ``cap`` when fixed, else 1 until an answer is measured."""
        if cap < 1:
            raise ValueError(f"max_inflight must be >= 1, got {cap}")
        return cls(
            size=cap if fixed_size else 1,
            deadline_s=deadline_s,
            cap=cap,
            base_deadline_s=deadline_s,
            fixed_size=fixed_size,
            fixed_deadline=fixed_deadline,
        )

    def limit_by_server(self, max_queue: int, max_stream_inflight: int, stream: bool) -> None:
        """Cap a window the edge sizes itself by the server's advertised limits (0: none advertised)."""
        if self.fixed_size:
            return
        for limit in (max_queue, max_stream_inflight if stream else 0):
            if limit > 0:
                self.cap = min(self.cap, limit)
        self.size = min(self.size, self.cap)

    def observe(self, record: FrameRecord) -> None:
        """Update the averages from an answered frame, then the window and the deadline. A frame that missed
        its deadline halves a self-sized window and doubles a self-sized deadline (within its bound): the
        server is slower than anything measured so far, possibly slower than the base deadline itself."""
        if record.status == "DEADLINE_EXCEEDED":
            if not self.fixed_size:
                self.size = max(1, self.size // 2)
            if not self.fixed_deadline:
                self.deadline_s = min(2 * self.deadline_s, MAX_DEADLINE_FACTOR * self.base_deadline_s)
            return
        ms, server = record.ms, record.server_ms
        if not record.ok or ms.network_server is None or server is None:
            return
        batch = max(record.batch_size or 1, 1)
        self.edge_ms = _average(self.edge_ms, ms.edge_ms() + ms.get("capture"))
        self.service_ms = _average(self.service_ms, server.compute / batch)
        self.remote_ms = _average(self.remote_ms, max(ms.network_server - server.queue, 0.0))
        slowest = self.slowest_ms * (1 - ALPHA) if self.slowest_ms is not None else 0.0
        self.slowest_ms = max(slowest, ms.network_server)
        if not self.fixed_size:
            busy = max(self.edge_ms, self.service_ms, 1e-3)
            self.size = max(1, min(self.cap, math.ceil((self.edge_ms + self.remote_ms) / busy - 1e-6)))
        if not self.fixed_deadline:
            wanted = DEADLINE_FACTOR * self.slowest_ms / 1e3
            self.deadline_s = min(max(self.base_deadline_s, wanted), MAX_DEADLINE_FACTOR * self.base_deadline_s)

    def describe(self) -> str:
        """``window 2 (auto, up to 4), deadline 30 s (auto)``: the summary's line."""
        size = f"window {self.size}" + ("" if self.fixed_size else f" (auto, up to {self.cap})")
        return size + f", deadline {seconds(self.deadline_s)} s" + ("" if self.fixed_deadline else " (auto)")


def seconds(value: float) -> str:
    """A deadline for people: ``30``, ``2.5``, ``66.1`` (a self-sized one is not ``66.1308``)."""
    return f"{round(value, 1):g}"


def _average(old: float | None, new: float) -> float:
    return new if old is None else (1 - ALPHA) * old + ALPHA * new
