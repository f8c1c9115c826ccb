"""The edge loop: capture -> mode.prepare (edge stages) -> send, with up to K requests in flight.

While frame i is on the wire or on the server, the mode already prepares frame i+1; results are
reported in frame order. Every frame ends as one typed :class:`~hnd.edge.records.FrameRecord`:
answered (with detections and per-stage durations) or failed (with its gRPC status name).

What a frame becomes is the mode's business (:mod:`hnd.edge.modes`: the ``EdgeMode`` interface;
``split`` with a torch head and ``local`` in :mod:`hnd.edge.torch_modes`, ``offload`` JPEG/PNG);
this module sends, retries, times and records, and never imports torch itself.
"""
from __future__ import annotations

import concurrent.futures
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc
from tqdm import tqdm

from hnd.common.timing import now_ns
from hnd.edge.capture import Frame, FrameSource
from hnd.edge.client import EdgeError, Reply, SplitClient, next_request_id
from hnd.edge.modes import Detections, EdgeMode, EdgeOptions, Prepared, detections_json, make_mode
from hnd.edge.records import SERVER_STAGES, STAGES, ByteCounts, FrameRecord, ServerTimings, Timings
from hnd.edge.summary import Summary

log = logging.getLogger("hnd.edge")

__all__ = ["STAGES", "SERVER_STAGES", "EdgeOptions", "EdgeRunner", "FrameRecord", "Prepared", "Summary", "to_tensor"]


def __getattr__(name: str) -> Any:
    # ``to_tensor`` moved to hnd.edge.torch_modes; imported lazily so this module stays torch-free.
    if name == "to_tensor":
        from hnd.edge.torch_modes import to_tensor

        return to_tensor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EdgeRunner:
    """Runs frames through one mode and hands records, in frame order, to ``on_record(record, frame)``.

    Either give ``mode`` (any :class:`EdgeMode`), or the parts :func:`make_mode` builds one from:
    head / fingerprint for split mode, model for local mode. client: for every mode that uses a server.
    """

    def __init__(
        self,
        options: EdgeOptions,
        head: Any = None,
        fingerprint: str = "",
        model: Any = None,
        client: SplitClient | None = None,
        mode: EdgeMode | None = None,
    ) -> None:
        if options.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.mode = mode if mode is not None else make_mode(options, head, fingerprint, model)
        if self.mode.uses_server and client is None:
            raise ValueError(f"{self.mode.name} mode needs a client")
        self.options = options
        self.client = client
        self.last_detections: list[Detections] | None = None

    def prepare(self, frame: Frame) -> Prepared:
        """Everything the edge computes for a frame before it goes on the wire (the mode's ``prepare``)."""
        return self.mode.prepare(frame)

    def _record(self, p: Prepared, status: str = "OK", error: str | None = None,
                reply: Reply | None = None) -> FrameRecord:
        f = p.frame
        ms = Timings(**vars(p.ms))  # a copy: a resent frame keeps its prepared timings
        record = FrameRecord(
            frame=f.index, source=f.source, wall_time=f.wall_time, mode=self.mode.name, status=status,
            bytes=ByteCounts(p.payload_bytes, p.message_bytes), ms=ms, filtered=p.filtered,
            filter_probability=None if p.filter_probability is None else round(p.filter_probability, 6),
            error=error, extra=dict(p.extra),
        )
        if error is not None:
            record.ms = ms.rounded()
            return record
        if reply is not None:
            server = ServerTimings.from_proto(reply.response.timings)
            record.server_ms = server
            record.bytes.response = reply.response.ByteSize()  # the link model needs both directions
            record.batch_size = reply.response.timings.batch_size
            ms.network_server = (reply.done_ns - p.done_ns) / 1e6
            done = reply.done_ns
            compute = server.compute
        else:
            done = p.done_ns
            compute = 0.0
        dets = self.mode.detections(p, reply.response if reply is not None else None)
        ms.total = (done - f.captured_ns) / 1e6
        ms.overhead = ms.total - ms.edge_ms() - compute
        record.ms = ms.rounded()
        record.detections = detections_json(dets, self.options.keep_detections)
        self.last_detections = dets
        return record

    def _send(self, p: Prepared) -> concurrent.futures.Future:
        p.done_ns = now_ns()
        return self.client.submit(p.request, stream=self.options.stream)

    def _finish(self, p: Prepared, future: concurrent.futures.Future) -> FrameRecord:
        try:
            return self._record(p, reply=future.result())
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE and self.options.retry_unavailable:
                log.warning("frame %d: server unavailable, reconnecting", p.frame.index)
                if self.client.reconnect():
                    p.request.request_id = next_request_id(p.frame.index)
                    try:
                        record = self._record(p, reply=self._send(p).result())
                    except grpc.RpcError as again:
                        record = self._record(p, status=again.code().name, error=again.details())
                    record.attempts = 2
                    return record
            return self._record(p, status=code.name, error=exc.details())
        except EdgeError as exc:
            return self._record(p, status="UNAVAILABLE", error=str(exc))


    # --- the loop -------------------------------------------------------------------------------

    def run(
        self,
        source: FrameSource,
        on_record: Callable[[FrameRecord, Frame], None] | None = None,
        progress: bool = False,
    ) -> Summary:
        """Process every frame the source yields; returns the summary (records go to ``on_record``)."""
        summary = Summary(filter_threshold=self.options.filter_threshold)
        inflight: deque[tuple[Prepared, concurrent.futures.Future | None]] = deque()
        start = time.perf_counter()
        bar = tqdm(desc=f"hnd-edge {self.options.mode}", unit="frame", disable=not progress, leave=False)

        def emit(p: Prepared, fut: concurrent.futures.Future | None) -> None:
            if p.frame.error is not None:
                record = self._record(p, status="INVALID_ARGUMENT", error=p.frame.error)
            elif fut is None:
                record = self._record(p)
            else:
                record = self._finish(p, fut)
            self.mode.after(p, record)
            summary.add(record)
            bar.update(1)
            if on_record is not None:
                on_record(record, p.frame)

        try:
            for frame in source:
                if frame.error is not None:
                    p, fut = Prepared(frame, Timings(capture=frame.capture_ms)), None
                else:
                    p = self.prepare(frame)
                    fut = self._send(p) if p.request is not None else None
                inflight.append((p, fut))
                while len(inflight) >= self.options.max_inflight or (inflight and inflight[0][1] is None):
                    emit(*inflight.popleft())
            while inflight:
                emit(*inflight.popleft())
        finally:
            bar.close()
            source.close()
        summary.wall_s = time.perf_counter() - start
        summary.dropped = source.dropped
        return summary
