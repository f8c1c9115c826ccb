"""Live figures of a running edge: a sliding window of the last seconds, a status line, JSON stats lines,
Prometheus metrics (``--metrics-port``) and the running summary on SIGUSR1.

:class:`LiveStats` sees every record (``add``, from the runner's ``on_record``) and keeps, in bounded
memory, the records of the last ``window_s`` seconds (at most ``MAX_WINDOW`` of them) — enough for
fps, kbit/s on the wire and p50/p95 end-to-end latency over that window. A ticker thread refreshes the
status line every second and writes one JSON line per ``--stats-interval``, also while no frame
arrives (a server or camera that went away is exactly when an operator looks). Totals — dropped,
failed, reconnects, records lost — come from the run's counters.

The JSON line (``--stats-interval S``, to ``--stats-file`` or stdout)::

    {"time": "2026-12-01T21:00:00Z", "window_s": 10.0, "frames": 98, "fps": 9.8, "kbit_s": 171.2,
     "latency_ms": {"p50": 120.1, "p95": 180.3}, "stages_ms": {"head": 40.0, ...}, "bytes_per_frame": 2190,
     "failed": 0, "dropped": 3, "reconnects": 0, "records_lost": 0, "waiting_s": null,
     "totals": {"frames": 5120, "answered": 5120, "failed": 0}}

``waiting_s`` is how long the edge has been waiting for the server (null when it is not).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hnd.edge.records import FrameRecord

log = logging.getLogger("hnd.edge")

MAX_WINDOW = 20_000  # records kept for the window at most (bounds memory whatever the frame rate)
CHART_STAGES = ("capture", "preprocess", "head", "encode", "network_server", "total")


@dataclass
class _Entry:
    t: float  # monotonic time the record was made
    ok: bool
    total_ms: float | None
    wire_bytes: int  # request + response
    payload_bytes: int
    stages: dict[str, float]


class EdgeMetrics:
    """Prometheus metrics of one edge (own registry): ``hnd_edge_frames_total{status}``,
    ``hnd_edge_dropped_frames_total``, ``hnd_edge_wire_bytes_total{direction}``,
    ``hnd_edge_stage_seconds{stage}`` (histogram), ``hnd_edge_reconnects_total``,
    ``hnd_edge_records_lost_total``, ``hnd_edge_waiting_for_server`` (0/1) and ``hnd_edge_fps`` (window)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.frames = Counter(
            "hnd_edge_frames", "Frames handled, by status (OK or a gRPC code)", ["status"], registry=r
        )
        self.dropped = Counter("hnd_edge_dropped_frames", "Live frames dropped as stale before processing", registry=r)
        self.wire_bytes = Counter("hnd_edge_wire_bytes", "Serialized bytes on the wire", ["direction"], registry=r)
        self.stage_seconds = Histogram(
            "hnd_edge_stage_seconds",
            "Edge-side stage durations (total: capture done -> result)",
            ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.reconnects = Counter("hnd_edge_reconnects", "Times the server came back after the edge waited", registry=r)
        self.records_lost = Counter("hnd_edge_records_lost", "Records --output could not write", registry=r)
        self.waiting = Gauge("hnd_edge_waiting_for_server", "1 while the edge waits for the server", registry=r)
        self.fps = Gauge("hnd_edge_fps", "Frames per second over the last window", registry=r)
        self._seen = {"dropped": 0, "reconnects": 0, "records_lost": 0}
        self._adapt: tuple[Gauge, Gauge, Gauge] | None = None  # hnd-edge --adapt only (made on its first record)
        self._point: str | None = None

    def observe_adapt(self, point: str, link: dict[str, Any]) -> None:
        """hnd-edge --adapt: ``hnd_edge_operating_point{point}`` (1: in use), ``hnd_edge_link_bandwidth_bps``
        and ``hnd_edge_link_rtt_seconds`` (the estimate the point was chosen under)."""
        if self._adapt is None:
            r = self.registry
            self._adapt = (
                Gauge(
                    "hnd_edge_operating_point",
                    "1 for the operating point in use (hnd-edge --adapt)",
                    ["point"],
                    registry=r,
                ),
                Gauge("hnd_edge_link_bandwidth_bps", "Estimated link bandwidth, bit/s (hnd-edge --adapt)", registry=r),
                Gauge("hnd_edge_link_rtt_seconds", "Estimated round trip (hnd-edge --adapt)", registry=r),
            )
        points, bandwidth, rtt = self._adapt
        if point != self._point:
            if self._point is not None:
                points.labels(self._point).set(0)
            points.labels(point).set(1)
            self._point = point
        if link.get("kbps") is not None:
            bandwidth.set(link["kbps"] * 1e3)
        if link.get("rtt_ms") is not None:
            rtt.set(link["rtt_ms"] / 1e3)

    def observe(self, record: FrameRecord) -> None:
        self.frames.labels(record.status).inc()
        if "operating_point" in record.extra:
            self.observe_adapt(record.extra["operating_point"], record.extra.get("link") or {})
        if not record.ok:
            return
        self.wire_bytes.labels("sent").inc(record.bytes.message)
        self.wire_bytes.labels("received").inc(record.bytes.response or 0)
        for stage in CHART_STAGES:
            value = getattr(record.ms, stage)
            if value is not None:
                self.stage_seconds.labels(stage).observe(value / 1e3)

    def update(self, dropped: int, reconnects: int, records_lost: int, waiting: bool, fps: float) -> None:
        """Counters the run keeps itself: add what changed since the last update."""
        for name, value in (("dropped", dropped), ("reconnects", reconnects), ("records_lost", records_lost)):
            delta = value - self._seen[name]
            if delta > 0:
                getattr(self, name).inc(delta)
                self._seen[name] = value
        self.waiting.set(1 if waiting else 0)
        self.fps.set(fps)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)


class LiveStats:
    """The window and the ticker. ``counters()`` returns the run's totals:
    ``{"dropped", "reconnects", "records_lost", "waiting_s", "frames", "answered", "failed"}``."""

    def __init__(
        self,
        counters: Callable[[], dict[str, Any]],
        window_s: float = 10.0,
        stats_interval_s: float | None = None,
        stats_out: TextIO | None = None,
        status: Callable[[str], None] | None = None,
        metrics: EdgeMetrics | None = None,
    ) -> None:
        if window_s <= 0:
            raise ValueError(f"window must be > 0 s, got {window_s}")
        if stats_interval_s is not None and stats_interval_s <= 0:
            raise ValueError(f"--stats-interval must be > 0 s, got {stats_interval_s}")
        self.counters = counters
        self.window_s = window_s
        self.stats_interval_s = stats_interval_s
        self.stats_out = stats_out
        self.status = status
        self.metrics = metrics
        self._entries: deque[_Entry] = deque(maxlen=MAX_WINDOW)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.listeners: list[Callable[[dict[str, Any]], None]] = []  # get every window() (the live view)
        self.adapt: dict[str, Any] | None = None  # hnd-edge --adapt: the last record's point and link estimate

    def add(self, record: FrameRecord) -> None:
        stages = {s: v for s in CHART_STAGES if (v := getattr(record.ms, s)) is not None}
        entry = _Entry(
            time.monotonic(),
            record.ok,
            record.ms.total if record.ok else None,
            record.bytes.message + (record.bytes.response or 0),
            record.bytes.payload,
            stages,
        )
        with self._lock:
            self._entries.append(entry)
            if "operating_point" in record.extra:
                self.adapt = {"operating_point": record.extra["operating_point"], "link": record.extra.get("link")}
        if self.metrics is not None:
            self.metrics.observe(record)

    def window(self) -> dict[str, Any]:
        """The figures of the last ``window_s`` seconds plus the run's totals (the JSON line's dict)."""
        now = time.monotonic()
        with self._lock:
            while self._entries and now - self._entries[0].t > self.window_s:
                self._entries.popleft()
            entries = list(self._entries)
        c = self.counters()
        span = min(self.window_s, max(now - self.started, 1e-3))  # a young run: the time it has run
        ok = [e for e in entries if e.ok]
        latency = np.array([e.total_ms for e in ok if e.total_ms is not None])
        stages = {s: float(np.mean(v)) for s in CHART_STAGES if (v := [e.stages[s] for e in ok if s in e.stages])}
        sent = [e.payload_bytes for e in ok if e.wire_bytes]
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "window_s": self.window_s,
            "frames": len(entries),
            "fps": len(ok) / span if ok else 0.0,
            "kbit_s": sum(e.wire_bytes for e in entries) * 8 / 1e3 / span if entries else 0.0,
            "latency_ms": {
                "p50": float(np.percentile(latency, 50)) if latency.size else None,
                "p95": float(np.percentile(latency, 95)) if latency.size else None,
            },
            "stages_ms": stages,
            "bytes_per_frame": float(np.mean(sent)) if sent else None,
            "failed_window": len(entries) - len(ok),
            "failed": c.get("failed", 0),
            "dropped": c.get("dropped", 0),
            "reconnects": c.get("reconnects", 0),
            "records_lost": c.get("records_lost", 0),
            "waiting_s": c.get("waiting_s"),
            "source_stalled_s": c.get("source_stalled_s"),
            "totals": {"frames": c.get("frames", 0), "answered": c.get("answered", 0), "failed": c.get("failed", 0)},
            **(self.adapt or {}),
        }
        if self.metrics is not None:
            self.metrics.update(
                out["dropped"], out["reconnects"], out["records_lost"], out["waiting_s"] is not None, out["fps"]
            )
        return out

    @staticmethod
    def status_line(w: dict[str, Any]) -> str:
        """``9.8 fps  171 kbit/s  p50 120 ms  p95 180 ms  dropped 3  failed 0  reconnects 0`` (+ waiting)."""
        lat = w["latency_ms"]
        parts = [
            f"{w['fps']:.1f} fps",
            f"{w['kbit_s']:,.0f} kbit/s",
            f"p50 {lat['p50']:.0f} ms" if lat["p50"] is not None else "p50 -",
            f"p95 {lat['p95']:.0f} ms" if lat["p95"] is not None else "p95 -",
            f"dropped {w['dropped']}",
            f"failed {w['failed']}",
            f"reconnects {w['reconnects']}",
        ]
        if w["records_lost"]:
            parts.append(f"records lost {w['records_lost']}")
        if "operating_point" in w:
            link = w.get("link") or {}
            parts.append(
                f"point {w['operating_point']} (link {_or_dash(link.get('kbps'), ',.0f')} kbit/s, "
                f"RTT {_or_dash(link.get('rtt_ms'), '.0f')} ms)"
            )
        if w["waiting_s"] is not None:
            parts.insert(0, f"WAITING for the server {w['waiting_s']:.0f} s |")
        if w.get("source_stalled_s"):
            parts.insert(0, f"NO FRAMES from the source {w['source_stalled_s']:.0f} s |")
        return "  ".join(parts)

    # --- the ticker -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._tick, name="hnd-live-stats", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        next_stats = time.monotonic() + (self.stats_interval_s or 0)
        while not self._stop.wait(1.0 if self.stats_interval_s is None else min(1.0, self.stats_interval_s)):
            try:
                self.emit(force_stats=False, now_due=next_stats)
            except Exception:  # noqa: BLE001 - live figures must never stop the edge; say it and go on
                log.exception("live stats tick failed")
            if self.stats_interval_s is not None and time.monotonic() >= next_stats:
                next_stats += self.stats_interval_s * max(
                    1, int((time.monotonic() - next_stats) // self.stats_interval_s) + 1
                )

    def emit(self, force_stats: bool = False, now_due: float | None = None) -> dict[str, Any]:
        """Refresh the status line, tell the listeners, and write the JSON line when it is due (or forced)."""
        w = self.window()
        if self.status is not None:
            self.status(self.status_line(w))
        for listener in list(self.listeners):
            listener(w)
        due = self.stats_interval_s is not None and (
            force_stats or (now_due is not None and time.monotonic() >= now_due)
        )
        if due and self.stats_out is not None:
            try:
                self.stats_out.write(json.dumps(w) + "\n")
                self.stats_out.flush()
            except (OSError, ValueError) as exc:  # a closed pipe or a full disk must not stop the edge
                print(f"hnd-edge: cannot write stats: {exc}", file=sys.stderr)
                self.stats_out = None
        return w

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def _or_dash(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
