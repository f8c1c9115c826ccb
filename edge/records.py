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

import contextlib
import json
import logging
import logging.handlers
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

log = logging.getLogger("hnd.edge")

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
            "frame": self.frame,
            "source": self.source,
            "wall_time": round(self.wall_time, 6),
            "mode": self.mode,
            "status": self.status,
            "bytes": self.bytes.to_dict(),
            "ms": self.ms.to_dict(),
        }
        if self.filtered is not None:
            d["filtered"] = self.filtered
            d["filter_probability"] = round(self.filter_probability, 6) if self.filter_probability is not None else None
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
            frame=int(d["frame"]),
            source=d.get("source", ""),
            wall_time=float(d.get("wall_time", 0.0)),
            mode=d.get("mode", ""),
            status=d.get("status", "OK"),
            bytes=ByteCounts(
                int(b.get("payload", 0)), int(b.get("message", 0)), int(b["response"]) if "response" in b else None
            ),
            ms=Timings.from_dict(d.get("ms", {})),
            server_ms=ServerTimings(**server) if server is not None else None,
            batch_size=d.get("batch_size"),
            filtered=d.get("filtered"),
            filter_probability=d.get("filter_probability"),
            error=d.get("error"),
            attempts=int(d.get("attempts", 1)),
            replica=d.get("replica"),
            detections=d.get("detections"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    @classmethod
    def from_json(cls, line: str) -> FrameRecord:
        return cls.from_dict(json.loads(line))


def read_records(path: str | Path) -> Iterator[FrameRecord]:
    """The records of a JSONL file, in order. A last line cut short by a crash is skipped, and so is a line
    that a failed write (disk full) or a previous run left half written: the writer ends it before it writes
    again."""
    with Path(path).open() as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return  # a writer died mid-line: that record is lost, the ones before are whole
            if not line.strip():
                continue
            try:
                yield FrameRecord.from_json(line)
            except (ValueError, KeyError):
                log.warning("%s:%d: not a whole record, skipped", path, n)


def parse_rotate(value: str) -> tuple[str, int]:
    """``--output-rotate`` -> ("size", bytes) or ("time", seconds): "100MB", "512KB", "1GiB" / "30s", "10m", "1h", "1d"."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    unit = m.group(2).lower() if m else ""
    if m and unit in _SIZE_UNITS:
        return "size", int(float(m.group(1)) * _SIZE_UNITS[unit])
    if m and unit in _TIME_UNITS:
        return "time", int(float(m.group(1)) * _TIME_UNITS[unit])
    raise ValueError(f"--output-rotate {value!r}: give a size (100MB, 512KB, 1GB) or a duration (30s, 10m, 1h, 1d)")


# "m" is minutes: sizes spell their B (100MB, 512KB, 1GiB).
_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_TIME_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


class RecordWriteError(OSError):
    """--output cannot be written (disk full, permission, ...) and the writer was told to stop."""


class RecordWriter:
    """JSONL records appended to ``path``, one whole line per write, flushed record by record.

    - A reader (``tail -f``, ``read_records``) never sees half a record; a crash or ``kill -9`` loses at
      most the record being written. The OS gets every line at once; ``fsync`` runs at most once per
      ``fsync_s`` (default 1 s), so a power cut loses at most that last second.
    - An existing file is appended to (never truncated); ``appended_to`` says how big it was. A last line
      that a previous run left without its newline (cut short) is ended first: that record stays lost,
      the new run's first record is whole.
    - ``rotate`` ("100MB" or "1h", see :func:`parse_rotate`) rotates with the standard library's rotating
      handlers: by size to ``path.1`` .. ``path.N``, by time to ``path.YYYY-MM-DD_HH-MM-SS``; ``keep``
      bounds the rotated files kept (the oldest are deleted).
    - A write that fails (disk full, permission, a removed folder) prints one line and, with
      ``on_error="continue"`` (the default), the run goes on: the record is counted in ``lost`` and the
      writer tries again with the next record, saying so once when writing works again. With
      ``on_error="stop"`` it raises :class:`RecordWriteError` and the edge stops cleanly.
    """

    def __init__(
        self,
        path: str | Path,
        rotate: str | None = None,
        keep: int = 10,
        on_error: str = "continue",
        fsync_s: float = 1.0,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        if on_error not in ("continue", "stop"):
            raise ValueError(f"on_error must be continue or stop, got {on_error!r}")
        if keep < 1:
            raise ValueError(f"--output-keep must be >= 1, got {keep}")
        self.path = Path(path)
        self.on_error = on_error
        self.fsync_s = fsync_s
        self.warn = warn or (lambda line: print(line, file=sys.stderr))
        self.lost = 0
        self.written = 0
        self._failing = False
        self._last_sync = time.monotonic()
        if self.path.is_dir():
            raise IsADirectoryError(f"{self.path}: is a folder, not a file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.appended_to = self.path.stat().st_size if self.path.exists() else 0
        if rotate is None:
            handler: logging.FileHandler = logging.FileHandler(self.path, mode="a", encoding="utf-8", delay=False)
        else:
            kind, amount = parse_rotate(rotate)
            if kind == "size":
                handler = logging.handlers.RotatingFileHandler(
                    self.path, mode="a", maxBytes=amount, backupCount=keep, encoding="utf-8"
                )
            else:
                handler = logging.handlers.TimedRotatingFileHandler(
                    self.path, when="S", interval=max(1, amount), backupCount=keep, encoding="utf-8", utc=True
                )
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.handleError = self._handle_error  # type: ignore[method-assign,assignment]
        self.handler = handler
        self._error: BaseException | None = None
        if self._end_torn_line():  # a previous run cut short mid-record (disk full, power cut, kill -9)
            self.warn(
                f"hnd-edge: {self.path} ended in a partial record (a run cut short): it stays skipped, "
                "this run's records start on a fresh line"
            )

    def _handle_error(self, _record: logging.LogRecord) -> None:
        self._error = sys.exc_info()[1]

    def write(self, record: FrameRecord) -> bool:
        """Append one record; False when it could not be written (counted in ``lost``)."""
        self._error = None
        if self._failing:
            self._reopen()
        if self._error is None:
            self.handler.emit(logging.makeLogRecord({"msg": record.to_json(), "levelno": logging.INFO}))
        if self._error is None and self.fsync_s >= 0 and time.monotonic() - self._last_sync >= self.fsync_s:
            self._sync()
        if self._error is not None:
            return self._failed(self._error)
        if self._failing:
            self.warn(f"hnd-edge: writing records to {self.path} again ({self.lost} lost meanwhile)")
            self._failing = False
        self.written += 1
        return True

    def _failed(self, exc: BaseException) -> bool:
        self.lost += 1
        if self.on_error == "stop":
            raise RecordWriteError(f"{self.path}: cannot write records: {exc}") from None
        if not self._failing:
            self.warn(
                f"hnd-edge: cannot write records to {self.path}: {exc}; going on without them "
                "(counted as records lost; retried with every record)"
            )
        self._failing = True
        # Drop what the failed write left buffered: it would otherwise land later, out of order or halved.
        stream, self.handler.stream = self.handler.stream, None
        if stream is not None:
            with contextlib.suppress(OSError, ValueError):
                stream.close()
        return False

    def _reopen(self) -> None:
        """After a failure: a fresh stream, and end a half-written last line so the next record is whole."""
        try:
            if self.handler.stream is None:
                self.handler.stream = self.handler._open()
            self._end_torn_line()
        except OSError as exc:
            self._error = exc

    def _end_torn_line(self) -> bool:
        """End the file's last line when it has no newline (a record cut short), so that the next record
        starts a line of its own and ``read_records`` keeps it; True when there was one."""
        if not (self.path.exists() and self.path.stat().st_size):
            return False
        with self.path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) == b"\n":
                return False
        self.handler.stream.write("\n")
        self.handler.stream.flush()
        return True

    def _sync(self) -> None:
        try:
            if self.handler.stream is not None:
                self.handler.stream.flush()
                os.fsync(self.handler.stream.fileno())
            self._last_sync = time.monotonic()
        except OSError as exc:
            self._error = exc

    def close(self) -> None:
        self._error = None
        self._sync()
        with contextlib.suppress(OSError, ValueError):
            self.handler.close()
