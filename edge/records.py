"""Typed per-frame records and their one serialisation (JSONL), read back by hnd-bench and tools.

Every frame the edge handles ends as one :class:`FrameRecord`: answered (detections, per-stage
durations, the server's own stage times) or failed (its gRPC status name and the error). The JSON
layout of a record (one line of ``--output``) is::

    {"frame": 3, "source": "cam.mp4", "wall_time": 1764620000.123456, "mode": "split", "status": "OK",
     "bytes": {"payload": 2100, "message": 2190, "response": 310},
     "ms": {"capture": 1.2, "preprocess": 3.0, "head": 40.1, "encode": 1.1, "network_server": 52.0,
            "total": 98.0, "overhead": 3.1},
     "server_ms": {"decode": 0.4, "queue": 0.0, "compute": 45.0, "encode": 0.3}, "batch_size": 1,
     "detections": [{"count": 2, "boxes": [[x1, y1, x2, y2], ...], "labels": [...], "scores": [...]}]}

Optional keys appear only when they apply: ``error`` (failed frames), ``attempts`` (sent more than
once: its replica died or drained, or its stream broke), ``replica`` (the server replica that answered), ``filtered`` / ``filter_probability`` (the neural filter ran), ``server_ms`` /
``batch_size`` / ``bytes.response`` (a server answered), plus whatever a mode adds in ``extra``
(merged at the top level, e.g. a stream session's key/delta flag). Durations are milliseconds of one
host's monotonic clock; ``wall_time`` is the capture's wall-clock time (seconds since the epoch).

No torch here: the records are plain data, shared by every edge mode (torch, ONNX, offload, local).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

STAGES = ("capture", "preprocess", "head", "filter", "encode", "network_server", "total")
SERVER_STAGES = ("decode", "queue", "compute", "encode")


@dataclass
class Timings:
    """Edge-side stage durations of one frame, in ms; None: the stage did not run.

    capture: reading/decoding the frame; preprocess: resize/normalize/pad; head: the network part that runs
    on the edge (split: stem + encoder, local: the whole model); filter: the neural filter; encode: codec or
    image encoding; network_server: request sent -> response arrived; total: capture done -> result;
    overhead: total minus the edge stages and the server's compute (queues, wire, scheduling).
    """

    capture: float | None = None
    preprocess: float | None = None
    head: float | None = None
    filter: float | None = None
    encode: float | None = None
    network_server: float | None = None
    total: float | None = None
    overhead: float | None = None

    def get(self, name: str, default: float = 0.0) -> float:
        value = getattr(self, name, None)
        return default if value is None else value

    def edge_ms(self) -> float:
        """What the edge computed for the frame: preprocess + head + filter + encode."""
        return self.get("preprocess") + self.get("head") + self.get("filter") + self.get("encode")

    def rounded(self) -> Timings:
        """To the microsecond, as written: what a record holds is what its JSON line says."""
        return Timings(**{f.name: None if (v := getattr(self, f.name)) is None else round(v, 3) for f in fields(self)})

    def to_dict(self) -> dict[str, float]:
        return {f.name: round(v, 3) for f in fields(self) if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, d: dict[str, float]) -> Timings:
        names = {f.name for f in fields(cls)}
        return cls(**{k: float(v) for k, v in d.items() if k in names})


@dataclass
class ServerTimings:
    """The server's own stage durations for one request, in ms (its clock; never subtracted from ours)."""

    decode: float = 0.0
    queue: float = 0.0
    compute: float = 0.0
    encode: float = 0.0

    def total(self) -> float:
        return self.decode + self.queue + self.compute + self.encode

    def to_dict(self) -> dict[str, float]:
        return {"decode": self.decode, "queue": self.queue, "compute": self.compute, "encode": self.encode}

    @classmethod
    def from_proto(cls, timings: Any) -> ServerTimings:
        """From a ``pb.ServerTimings`` (microseconds)."""
        return cls(timings.decode_us / 1e3, timings.queue_us / 1e3, timings.compute_us / 1e3, timings.encode_us / 1e3)


@dataclass
class ByteCounts:
    """payload: the bottleneck / image bytes; message: the whole serialized request; response: the reply."""

    payload: int = 0
    message: int = 0
    response: int | None = None

    def to_dict(self) -> dict[str, int]:
        d = {"payload": self.payload, "message": self.message}
        if self.response is not None:
            d["response"] = self.response
        return d


@dataclass
class FrameRecord:
    """One frame's outcome. ``status`` is "OK" or a gRPC status name; ``error`` says why it failed.

    ``detections``: per image, ``{"count": N}`` plus ``boxes`` [[x1, y1, x2, y2]] / ``labels`` / ``scores``
    (/ ``keypoints`` [[[x, y, v]]]) in original frame coordinates when detections are kept.
    """

    frame: int
    source: str
    wall_time: float
    mode: str
    status: str = "OK"
    bytes: ByteCounts = field(default_factory=ByteCounts)
    ms: Timings = field(default_factory=Timings)
    server_ms: ServerTimings | None = None
    batch_size: int | None = None
    filtered: bool | None = None  # None: no filter ran
    filter_probability: float | None = None
    error: str | None = None
    attempts: int = 1
    replica: str | None = None  # the server replica that answered (its hnd-replica metadata)
    detections: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # mode-specific keys, merged at the top level

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of this record (the one layout every writer and reader uses)."""
        d: dict[str, Any] = {
            "frame": self.frame, "source": self.source, "wall_time": round(self.wall_time, 6), "mode": self.mode,
            "status": self.status, "bytes": self.bytes.to_dict(), "ms": self.ms.to_dict(),
        }
        if self.filtered is not None:
            d["filtered"] = self.filtered
            d["filter_probability"] = round(self.filter_probability, 6) if self.filter_probability is not None \
                else None
        if self.error is not None:
            d["error"] = self.error
        if self.server_ms is not None:
            d["server_ms"] = self.server_ms.to_dict()
        if self.batch_size is not None:
            d["batch_size"] = self.batch_size
        if self.attempts != 1:
            d["attempts"] = self.attempts
        if self.replica is not None:
            d["replica"] = self.replica
        if self.detections is not None:
            d["detections"] = self.detections
        d.update(self.extra)
        return d

    def to_json(self) -> str:
        """One JSONL line (no newline)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrameRecord:
        known = {f.name for f in fields(cls)}
        b = d.get("bytes", {})
        server = d.get("server_ms")
        return cls(
            frame=int(d["frame"]), source=d.get("source", ""), wall_time=float(d.get("wall_time", 0.0)),
            mode=d.get("mode", ""), status=d.get("status", "OK"),
            bytes=ByteCounts(int(b.get("payload", 0)), int(b.get("message", 0)),
                             int(b["response"]) if "response" in b else None),
            ms=Timings.from_dict(d.get("ms", {})),
            server_ms=ServerTimings(**server) if server is not None else None,
            batch_size=d.get("batch_size"), filtered=d.get("filtered"),
            filter_probability=d.get("filter_probability"), error=d.get("error"),
            attempts=int(d.get("attempts", 1)), replica=d.get("replica"), detections=d.get("detections"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_json(cls, line: str) -> FrameRecord:
        return cls.from_dict(json.loads(line))


def read_records(path: str | Path) -> Iterator[FrameRecord]:
    """The records of a JSONL file, in order; a last line cut short by a crash is skipped."""
    with Path(path).open() as f:
        for line in f:
            if not line.endswith("\n"):
                return  # a writer died mid-line: that record is lost, the ones before are whole
            if line.strip():
                yield FrameRecord.from_json(line)


class RecordWriter:
    """JSONL records to a temp file, renamed into place at close (readers never see half a file)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        self.file = self.tmp.open("w")

    def write(self, record: FrameRecord) -> None:
        self.file.write(record.to_json() + "\n")

    def close(self) -> None:
        self.file.close()
        os.replace(self.tmp, self.path)
