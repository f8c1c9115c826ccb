"""The closing summary of an edge run: counts, fps, bytes per frame and per-stage latency percentiles."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hnd.common.timing import percentiles
from hnd.edge.records import SERVER_STAGES, STAGES, FrameRecord


@dataclass
class Summary:
    frames: int = 0
    answered: int = 0
    failed: int = 0
    dropped: int = 0
    wall_s: float = 0.0
    payload_bytes: list[int] = field(default_factory=list)
    message_bytes: list[int] = field(default_factory=list)
    ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    server_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in SERVER_STAGES})
    overhead_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    replicas: dict[str, int] = field(default_factory=dict)  # answered frames per server replica
    retried: int = 0  # frames sent more than once (replica died or drained, stream broke)
    filter_threshold: float | None = None  # set when the neural filter ran
    filtered: int = 0  # answered frames the filter dropped (nothing sent; counted in answered)
    filter_probability: list[float] = field(default_factory=list)

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
        mean_payload = float(np.mean(self.payload_bytes)) if self.payload_bytes else 0.0
        mean_message = float(np.mean(self.message_bytes)) if self.message_bytes else 0.0
        return {
            "threshold": self.filter_threshold, "sent": self.sent, "filtered": self.filtered,
            "filtered_share": self.filtered / self.answered if self.answered else 0.0,
            "payload_bytes_saved_est": mean_payload * self.filtered,
            "message_bytes_saved_est": mean_message * self.filtered,
            "probability": percentiles(self.filter_probability, (50,)),
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
            self.filter_probability.append(record.filter_probability)
        if record.filtered:
            self.filtered += 1  # nothing went on the wire: keep it out of the bytes/frame figures
        else:
            self.payload_bytes.append(record.bytes.payload)
            self.message_bytes.append(record.bytes.message)
        for s in STAGES:
            value = getattr(record.ms, s)
            if value is not None:
                self.ms[s].append(value)
        if record.server_ms is not None:
            for s in SERVER_STAGES:
                self.server_ms[s].append(getattr(record.server_ms, s))
        if record.ms.overhead is not None:
            self.overhead_ms.append(record.ms.overhead)

    def as_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames, "answered": self.answered, "failed": self.failed, "dropped": self.dropped,
            "statuses": self.statuses, "wall_s": self.wall_s, "fps": self.fps,
            "replicas": self.replicas, "retried": self.retried,
            "payload_bytes": percentiles(self.payload_bytes, (50,)),
            "message_bytes": percentiles(self.message_bytes, (50,)),
            "ms": {s: percentiles(v) for s, v in self.ms.items() if v},
            "server_ms": {s: percentiles(v) for s, v in self.server_ms.items() if v},
            "overhead_ms": percentiles(self.overhead_ms),
            **({"filter": self.filter_stats()} if self.filter_threshold is not None else {}),
        }

    def format(self) -> str:
        d = self.as_dict()
        lines = [
            f"frames {d['frames']}  answered {d['answered']}  failed {d['failed']}  dropped {d['dropped']}  "
            f"fps {d['fps']:.2f}  wall {d['wall_s']:.1f} s",
        ]
        if self.filter_threshold is not None:
            f = d["filter"]
            lines.append(f"filter threshold {f['threshold']:g}  sent {f['sent']}  filtered {f['filtered']} "
                         f"({100 * f['filtered_share']:.0f}%)  bytes saved ~{f['payload_bytes_saved_est']:,.0f} payload"
                         f" / ~{f['message_bytes_saved_est']:,.0f} message (mean of sent frames x filtered)")
        if self.answered:
            if self.payload_bytes:  # none when the filter dropped every frame
                lines.append(f"bytes/frame  payload mean {d['payload_bytes']['mean']:,.0f} "
                             f"p50 {d['payload_bytes']['p50']:,.0f}  message mean {d['message_bytes']['mean']:,.0f} "
                             f"p50 {d['message_bytes']['p50']:,.0f}")
            lines.append(f"{'stage (ms)':<22}{'p50':>10}{'p95':>10}{'p99':>10}")
            for name, stats in [(s, d["ms"][s]) for s in STAGES if s in d["ms"]] + \
                    [(f"server.{s}", d["server_ms"][s]) for s in SERVER_STAGES if s in d["server_ms"]] + \
                    ([("overhead", d["overhead_ms"])] if self.overhead_ms else []):
                lines.append(f"{name:<22}{stats['p50']:>10.2f}{stats['p95']:>10.2f}{stats['p99']:>10.2f}")
        if self.failed:
            lines.append("statuses " + ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())))
        if len(self.replicas) > 1 or self.retried:
            lines.append(f"replicas {len(self.replicas)}: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(self.replicas.items()))
                         + f"  retried frames {self.retried}")
        return "\n".join(lines)
