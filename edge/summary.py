"""The summary of an edge run in bounded memory: counters, fps, bytes per frame, per-stage latency quantiles.

A camera run lasts weeks (10 fps is ~864k frames a day), so a figure cannot keep every frame's value for
ever: each is a :class:`StreamingStat` — count, sum (exact mean), the values themselves while there are at
most ``EXACT_LIMIT`` of them (quantiles then exact, as :func:`hnd.common.timing.percentiles` computes them),
and a DDSketch beyond. DDSketch (Datadog's, the ``ddsketch`` package) guarantees a relative error of at
most 1 % on every quantile, for any distribution, and its collapsing variant is capped at ``BIN_LIMIT``
bins, so a stat's memory is bounded (a few tens of kB plus the exact values' 80 kB) whatever the run's
length. A short run's quantiles are exact; a longer one's within 1 % of the exact percentile; means,
counts and totals are always exact.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ddsketch import LogCollapsingLowestDenseDDSketch

from hnd.edge.records import SERVER_STAGES, STAGES, FrameRecord

RELATIVE_ACCURACY = 0.01
BIN_LIMIT = 2048  # 1 % accuracy over 2048 bins spans ~18 orders of magnitude: never collapses in practice
EXACT_LIMIT = 10_000  # values kept for exact quantiles (80 kB a stat); the sketch answers beyond


class StreamingStat:
    """Count, exact mean and sum, and quantiles of a stream of floats in bounded memory: exact up to
    ``exact_limit`` values, within 1 % (DDSketch) beyond."""

    def __init__(self, exact_limit: int = EXACT_LIMIT) -> None:
        self.sketch = LogCollapsingLowestDenseDDSketch(relative_accuracy=RELATIVE_ACCURACY, bin_limit=BIN_LIMIT)
        self.count = 0
        self.sum = 0.0
        self.exact_limit = exact_limit
        self.values: array | None = array("d")  # None once more than exact_limit values came

    def add(self, value: float) -> None:
        value = float(value)
        self.sketch.add(value)
        self.count += 1
        self.sum += value
        if self.values is not None:
            if self.count <= self.exact_limit:
                self.values.append(value)
            else:
                self.values = None  # from here on the sketch answers

    @property
    def exact(self) -> bool:
        """Whether quantiles are exact (every value kept)."""
        return self.values is not None

    def __len__(self) -> int:
        return self.count

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else float("nan")

    def quantile(self, q: float) -> float:
        """The q-quantile (q in 0..1), NaN when empty."""
        if not self.count:
            return float("nan")
        if self.values is not None:
            return float(np.percentile(np.frombuffer(self.values, dtype=np.float64), 100 * q))
        value = self.sketch.get_quantile_value(q)
        return float("nan") if value is None else float(value)

    def stats(self, qs: Iterable[float] = (50, 95, 99)) -> dict[str, float]:
        """``{"p50": ..., "p95": ..., "p99": ..., "mean": ...}`` like :func:`hnd.common.timing.percentiles`."""
        out = {f"p{int(q)}": self.quantile(q / 100) for q in qs}
        out["mean"] = self.mean
        return out


@dataclass
class Summary:
    frames: int = 0
    answered: int = 0
    failed: int = 0
    dropped: int = 0
    wall_s: float = 0.0
    payload_bytes: StreamingStat = field(default_factory=StreamingStat)
    message_bytes: StreamingStat = field(default_factory=StreamingStat)
    response_bytes: int = 0  # total, over answered frames
    ms: dict[str, StreamingStat] = field(default_factory=lambda: {s: StreamingStat() for s in STAGES})
    server_ms: dict[str, StreamingStat] = field(default_factory=lambda: {s: StreamingStat() for s in SERVER_STAGES})
    overhead_ms: StreamingStat = field(default_factory=StreamingStat)
    statuses: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)  # answered frames per server replica
    retried: int = 0  # frames sent more than once (replica died or drained, stream broke)
    filter_threshold: float | None = None  # set when the neural filter ran
    filtered: int = 0  # answered frames the filter dropped (nothing sent; counted in answered)
    filter_probability: StreamingStat = field(default_factory=StreamingStat)
    reconnects: int = 0  # times the server came back after the edge waited for it
    records_lost: int = 0  # records --output could not write (disk full, ...)
    server_tail: str | None = None  # how the server ran the tail (GetModelInfo TailInfo), e.g. "bf16 on NVIDIA H100"
    interrupted: str | None = None  # the signal that ended the run early (SIGINT, SIGTERM)
    # A mode's own figures (EdgeMode.summary_sections(), e.g. "adapt": per operating point): each has
    # as_dict() and format_lines(), and is kept up to date by its mode.
    sections: dict[str, Any] = field(default_factory=dict)
    window: str | None = None  # the in-flight window and deadline at the end (hnd.edge.window.Window.describe)

    @property
    def fps(self) -> float:
        return self.answered / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def sent(self) -> int:
        """Answered frames that went through the model past the filter (sent to the server in split mode)."""
        return self.answered - self.filtered

    def filter_stats(self) -> dict[str, Any] | None:
        """Frames sent / filtered and the bytes the filter saved, None when no filter ran.

        Saved bytes are an estimate: the mean payload (and message) size of the frames that were
        sent, times the number of filtered frames (a filtered frame's bottleneck is never encoded).
        """
        if self.filter_threshold is None:
            return None
        mean_payload = self.payload_bytes.mean if self.payload_bytes.count else 0.0
        mean_message = self.message_bytes.mean if self.message_bytes.count else 0.0
        return {
            "threshold": self.filter_threshold,
            "sent": self.sent,
            "filtered": self.filtered,
            "filtered_share": self.filtered / self.answered if self.answered else 0.0,
            "payload_bytes_saved_est": mean_payload * self.filtered,
            "message_bytes_saved_est": mean_message * self.filtered,
            "probability": self.filter_probability.stats((50,)),
        }

    def add(self, record: FrameRecord) -> None:
        self.frames += 1
        self.statuses[record.status] = self.statuses.get(record.status, 0) + 1
        self.retried += record.attempts > 1
        if record.replica and record.ok:
            self.replicas[record.replica] = self.replicas.get(record.replica, 0) + 1
        if not record.ok:
            self.failed += 1
            return
        self.answered += 1
        if record.filter_probability is not None:
            self.filter_probability.add(record.filter_probability)
        if record.filtered:
            self.filtered += 1  # nothing went on the wire: keep it out of the bytes/frame figures
        else:
            self.payload_bytes.add(record.bytes.payload)
            self.message_bytes.add(record.bytes.message)
        self.response_bytes += record.bytes.response or 0
        for s in STAGES:
            value = getattr(record.ms, s)
            if value is not None:
                self.ms[s].add(value)
        if record.server_ms is not None:
            for s in SERVER_STAGES:
                self.server_ms[s].add(getattr(record.server_ms, s))
        if record.ms.overhead is not None:
            self.overhead_ms.add(record.ms.overhead)

    def failed_by_status(self) -> dict[str, int]:
        """Failed frames per status (a gRPC code or an edge status such as EDGE_DECODE_ERROR), most first."""
        failed = [(k, v) for k, v in self.statuses.items() if k != "OK"]
        return dict(sorted(failed, key=lambda kv: (-kv[1], kv[0])))

    def quantile_method(self) -> str:
        """How the quantiles were computed: exact while every stat kept its values, else DDSketch's bound."""
        stats = [self.payload_bytes, self.message_bytes, self.overhead_ms, *self.ms.values(), *self.server_ms.values()]
        if all(v.exact for v in stats):
            return f"exact (every value kept, up to {EXACT_LIMIT:,} frames); means and counts exact"
        return (
            f"DDSketch, relative error <= {RELATIVE_ACCURACY:.0%} (over {EXACT_LIMIT:,} frames); means and counts exact"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "answered": self.answered,
            "failed": self.failed,
            "dropped": self.dropped,
            "statuses": self.statuses,
            "wall_s": self.wall_s,
            "fps": self.fps,
            "replicas": self.replicas,
            "retried": self.retried,
            "reconnects": self.reconnects,
            "records_lost": self.records_lost,
            "payload_bytes": self.payload_bytes.stats((50,)),
            "message_bytes": self.message_bytes.stats((50,)),
            "ms": {s: v.stats() for s, v in self.ms.items() if v.count},
            "server_ms": {s: v.stats() for s, v in self.server_ms.items() if v.count},
            "overhead_ms": self.overhead_ms.stats(),
            "quantiles": self.quantile_method(),
            **({"filter": self.filter_stats()} if self.filter_threshold is not None else {}),
            **({"server_tail": self.server_tail} if self.server_tail is not None else {}),
            **({"interrupted": self.interrupted} if self.interrupted is not None else {}),
            **{name: section.as_dict() for name, section in self.sections.items()},
            **({"window": self.window} if self.window is not None else {}),
            "failed_by_status": self.failed_by_status(),
        }

    def format(self) -> str:
        d = self.as_dict()
        lines = [
            f"frames {d['frames']}  answered {d['answered']}  failed {d['failed']}  dropped {d['dropped']}  "
            f"fps {d['fps']:.2f}  wall {d['wall_s']:.1f} s"
            + (f"  server tail {self.server_tail}" if self.server_tail else "")
            + (f"  interrupted by {self.interrupted}" if self.interrupted else ""),
        ]
        if self.reconnects or self.records_lost:
            lines.append(f"reconnects {self.reconnects}  records lost {self.records_lost}")
        if self.filter_threshold is not None:
            f = d["filter"]
            lines.append(
                f"filter threshold {f['threshold']:g}  sent {f['sent']}  filtered {f['filtered']} "
                f"({100 * f['filtered_share']:.0f}%)  bytes saved ~{f['payload_bytes_saved_est']:,.0f} payload"
                f" / ~{f['message_bytes_saved_est']:,.0f} message (mean of sent frames x filtered)"
            )
        if self.answered:
            if self.payload_bytes.count:  # none when the filter dropped every frame
                lines.append(
                    f"bytes/frame  payload mean {d['payload_bytes']['mean']:,.0f} "
                    f"p50 {d['payload_bytes']['p50']:,.0f}  message mean {d['message_bytes']['mean']:,.0f} "
                    f"p50 {d['message_bytes']['p50']:,.0f}"
                )
            lines.append(f"{'stage (ms)':<22}{'mean':>10}{'p50':>10}{'p95':>10}{'p99':>10}")
            for name, stats in (
                [(s, d["ms"][s]) for s in STAGES if s in d["ms"]]
                + [(f"server.{s}", d["server_ms"][s]) for s in SERVER_STAGES if s in d["server_ms"]]
                + ([("overhead", d["overhead_ms"])] if self.overhead_ms.count else [])
            ):
                lines.append(
                    f"{name:<22}{stats['mean']:>10.2f}{stats['p50']:>10.2f}{stats['p95']:>10.2f}{stats['p99']:>10.2f}"
                )
            if not self.ms["total"].exact:
                lines.append(f"(quantiles within {RELATIVE_ACCURACY:.0%}: {d['quantiles']})")
        if self.window is not None:
            lines.append(self.window)
        if self.failed:
            by_status = self.failed_by_status()
            lines.append("failed by status: " + ", ".join(f"{k} {v}" for k, v in by_status.items()))
            if "DEADLINE_EXCEEDED" in by_status:
                lines.append(
                    "  DEADLINE_EXCEEDED: the server answered later than the deadline; --timeout S waits longer, "
                    "--max-inflight N queues fewer frames on it"
                )
        if len(self.replicas) > 1 or self.retried:
            lines.append(
                f"replicas {len(self.replicas)}: "
                + ", ".join(f"{k} {v}" for k, v in sorted(self.replicas.items()))
                + f"  retried frames {self.retried}"
            )
        for section in self.sections.values():
            lines += section.format_lines()
        return "\n".join(lines)
