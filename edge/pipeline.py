"""The edge loop: capture -> mode.prepare (edge stages) -> send, with up to K requests in flight.

While frame i is on the wire or on the server, the mode already prepares frame i+1; results are
reported in frame order. A mode whose head is order-free (``EdgeMode.parallel_head``: the ONNX split) runs
the heads of up to ``EdgeOptions.head_workers`` frames at once on a thread pool (the frames over the cores:
ONNX Runtime releases the GIL), while coding and sending stay in frame order on the caller's thread, so a
temporal coder's references are those of a one-worker run, byte for byte. Every frame ends as one typed :class:`~hnd.edge.records.FrameRecord`:
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
from dataclasses import dataclass, field
from typing import Any

import grpc
from tqdm import tqdm

from hnd.common import tracing
from hnd.common.timing import now_ns
from hnd.edge import interrupts
from hnd.edge.capture import READ_ERROR, Frame, FrameSource, SourceLost
from hnd.common.channel import REPLICA_KEY, WEIGHTS_KEY
from hnd.edge.client import EdgeError, Reply, SplitClient, StreamBroken, WeightsMismatch, metadata_of, next_request_id
from hnd.edge.modes import Detections, EdgeMode, EdgeOptions, Prepared, detections_json
from hnd.edge.records import SERVER_STAGES, STAGES, ByteCounts, FrameRecord, ServerTimings, Timings
from hnd.edge.summary import Summary
from hnd.edge.window import Window, seconds
from hnd.proto.v1 import split_inference_pb2 as pb

log = logging.getLogger("hnd.edge")

# The progress line: frames so far and the elapsed time, then the live status line (fps, kbit/s, latency
# over the last window); tqdm's own rate ("2.40s/frame" beside "0.1 fps") would say the same thing twice.
PROGRESS_FORMAT = "{desc}: {n_fmt}{unit} [{elapsed}{postfix}]"
INTERRUPTED = "CANCELLED"  # a frame in flight when the run was interrupted (its call is cancelled)


class ServerGone(EdgeError):
    """The server stayed unreachable for ``give_up_after_s``; every frame so far is recorded.

    summary: the run's summary up to that point (the CLI prints it, then this line).
    """

    def __init__(self, message: str, summary: Summary | None = None) -> None:
        super().__init__(message)
        self.summary = summary


# to_tensor too, lazily (module __getattr__ below)
__all__ = ["STAGES", "SERVER_STAGES", "EdgeOptions", "EdgeRunner", "FrameRecord", "Prepared", "Summary"]


def __getattr__(name: str) -> Any:
    # ``to_tensor`` moved to hnd.edge.torch_modes; imported lazily so this module stays torch-free.
    if name == "to_tensor":
        from hnd.edge.torch_modes import to_tensor

        return to_tensor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class EdgeRunner:
    """Runs frames through one mode and hands records, in frame order, to ``on_record(record, frame)``.

    mode: any :class:`EdgeMode` (:func:`hnd.edge.api.make_mode` builds one from options and parts);
    client: for every mode that uses a server.

    Two ways to drive it: ``run(source)`` for a whole source, or frame by frame (what
    :class:`hnd.edge.api.Detector` does): ``begin()``, then ``put(frame)`` per frame (records come out
    through ``on_record`` as the window of ``max_inflight`` fills), ``flush()`` for the ones still in flight,
    ``end()``.
    """

    def __init__(self, options: EdgeOptions, mode: EdgeMode, client: SplitClient | None = None) -> None:
        if options.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.mode = mode
        self.tracer = tracing.get_tracer("hnd.edge")  # None: tracing off, nothing per frame
        if self.mode.uses_server and client is None:
            raise ValueError(f"{self.mode.name} mode needs a client")
        self.options = options
        self.client = client
        self.sizing = Window.start(
            options.max_inflight,
            client.settings.timeout_s if client is not None else 0.0,
            fixed_size=not options.auto_window,
            fixed_deadline=not options.auto_deadline or client is None,
        )
        self.mode.use_window(self.sizing)
        self.last_detections: list[Detections] | None = None
        self.mismatch: FrameRecord | None = None  # the record of the frame a WeightsMismatch stopped
        self.summary: Summary | None = None  # of the run in progress (or the last one)
        self.source: FrameSource | None = None
        self.bar: tqdm | None = None
        self.window: _InFlight | None = None  # the frames in flight of the run begun last
        self._started = time.perf_counter()
        self._unavailable_since: float | None = None  # monotonic time of the first UNAVAILABLE since an answer
        self._answered_at = time.monotonic()  # of the last answer (or the run's start)
        self._silence_warned = False  # the "no answer within the deadline" warning, once per silence
        self._slow_warned = False  # the "serving but slower than the deadline" warning, once per run
        self._gave_up: str | None = None  # set once the server counts as gone: no more sends or retries
        if options.head_workers < 1:
            raise ValueError("head_workers must be >= 1")
        self.head_workers = options.head_workers if mode.parallel_head else 1
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # made by put, shut by end
        # Frames read, their heads computing on the pool, not yet coded nor sent; oldest first.
        self._ahead: deque[tuple[Frame, concurrent.futures.Future | None]] = deque()

    def fit_server(self, info: pb.ModelInfo) -> None:
        """Keep a self-sized window within what the server advertises (queue, requests per stream)."""
        lim = info.limits
        self.sizing.limit_by_server(lim.max_queue, lim.max_stream_inflight, self.options.stream)

    def _measured(self, record: FrameRecord) -> None:
        """An answer's timings size the window and the deadline of the frames that follow."""
        self.sizing.observe(record)
        if self.client is not None and not self.sizing.fixed_deadline:
            self.client.settings.timeout_s = self.sizing.deadline_s

    def prepare(self, frame: Frame) -> Prepared:
        """Everything the edge computes for a frame before it goes on the wire (the mode's ``prepare``)."""
        return self.mode.prepare(frame)

    def _record(
        self, p: Prepared, status: str = "OK", error: str | None = None, reply: Reply | None = None
    ) -> FrameRecord:
        f = p.frame
        ms = Timings(**vars(p.ms))  # a copy: a resent frame keeps its prepared timings
        record = FrameRecord(
            frame=f.index,
            source=f.source,
            wall_time=f.wall_time,
            mode=self.mode.name,
            status=status,
            bytes=ByteCounts(p.payload_bytes, p.message_bytes),
            ms=ms,
            filtered=p.filtered,
            filter_probability=None if p.filter_probability is None else round(p.filter_probability, 6),
            error=error,
            extra=dict(p.extra),
        )
        if error is not None:
            record.ms = ms.rounded()
            return record
        if reply is not None:
            server = ServerTimings.from_proto(reply.response.timings)
            record.server_ms = server
            record.bytes.response = reply.response.ByteSize()  # the link model needs both directions
            record.batch_size = reply.response.timings.batch_size
            record.replica = reply.replica or None
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
        p.deadline_s = self.client.settings.timeout_s
        if p.span is None:
            return self.client.submit(p.request, stream=self.options.stream)
        p.span.add_event("send", {"hnd.request_id": p.request.request_id})  # each attempt, same trace
        return self.client.submit(p.request, stream=self.options.stream, metadata=tracing.inject(p.span))

    def _trace(self, p: Prepared) -> None:
        """The frame's span (from its capture on), its edge stages as children; ended with its record."""
        start = int(p.frame.wall_time * 1e9)
        p.span = self.tracer.start_span(
            "hnd.frame", start_time=start, attributes={"hnd.frame": p.frame.index, "hnd.mode": self.mode.name}
        )
        ms = p.ms
        stages = [("capture", ms.capture), ("preprocess", ms.preprocess), ("head", ms.head), ("encode", ms.encode)]
        tracing.stage_spans(self.tracer, p.span, start, stages)

    @staticmethod
    def _end_trace(p: Prepared, record: FrameRecord) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = p.span
        span.set_attributes(
            {
                "hnd.status": record.status,
                "hnd.attempts": record.attempts,
                "hnd.bytes": record.bytes.message,
                "hnd.replica": record.replica or "",
            }
        )
        if not record.ok:
            span.set_status(Status(StatusCode.ERROR, f"{record.status}: {record.error}"))
        span.end()
        p.span = None

    def _answered(self, p: Prepared, reply: Reply) -> FrameRecord:
        """A reply's record: a stream frame the server refused for want of a reference (and that was not
        re-coded and resent) is FAILED_PRECONDITION, never a frame with no detections."""
        if reply.response.refusal:
            return self._record(
                p, status="FAILED_PRECONDITION", error=f"server asked for a key frame: {reply.response.refusal}"
            )
        return self._record(p, reply=reply)

    def _reconnect(self) -> bool:
        """Wait for a ready server within what is left of ``give_up_after_s`` (counted from the first
        UNAVAILABLE since the last answer); marks the server gone when that runs out."""
        give_up = self.options.give_up_after_s
        if give_up is None:
            return self.client.reconnect()
        now = time.monotonic()
        if self._unavailable_since is None:
            self._unavailable_since = now
        left = give_up - (now - self._unavailable_since)
        if left > 0 and self.client.reconnect(timeout_s=left):
            return True
        self._gave_up = (
            f"server {self.client.settings.target} unreachable for {give_up:g} s (--give-up-after): giving up"
        )
        return False

    def _unanswered(self, p: Prepared) -> None:
        """A frame past its deadline (unary or stream): a warning once per silence, and the server counts as
        gone once it has answered nothing for ``give_up_after_s`` (a server that hangs, not only one that
        went away)."""
        silent = time.monotonic() - self._answered_at
        give_up = self.options.give_up_after_s
        if self._unavailable_since is None:  # a reconnect wait that follows counts from the last answer too
            self._unavailable_since = self._answered_at
        if not self._silence_warned:
            self._silence_warned = True
            log.warning(
                "frame %d: no answer within the %s s deadline (--timeout); server %s silent for %.1f s%s",
                p.frame.index,
                seconds(p.deadline_s or self.client.settings.timeout_s),
                self.client.settings.target,
                silent,
                "" if give_up is None else f" (giving up after {give_up:g} s, --give-up-after)",
            )
        if give_up is not None and silent >= give_up and not self._gave_up:
            if self.client.responds():  # busy computing, not gone: the deadline grows (if self-sized) instead
                self._still_serving(p)
                return
            self._gave_up = (
                f"server {self.client.settings.target} answered nothing for {give_up:g} s (--give-up-after): giving up"
            )

    def _still_serving(self, p: Prepared) -> None:
        """The server answered nothing for ``give_up_after_s`` yet answers a probe: it is slower than the
        deadline (a CPU tail under load), so the give-up clock starts again; said once a run."""
        self._answered_at = time.monotonic()
        self._unavailable_since = None
        if self._slow_warned:
            return
        self._slow_warned = True
        log.warning(
            "server %s is serving but slower than the %s s deadline: %s",
            self.client.settings.target,
            seconds(p.deadline_s or self.client.settings.timeout_s),
            "going on with the deadline doubled after each miss"
            if not self.sizing.fixed_deadline
            else "going on (--timeout S waits longer)",
        )

    def _finish(self, p: Prepared, future: concurrent.futures.Future) -> FrameRecord:
        """The frame's record; a frame that failed UNAVAILABLE (replica died or drained, stream
        broken) is sent again, up to ``max_attempts`` sends, each after the channel has a ready
        replica again (``reconnect``, bounded by the client's reconnect timeout). A stream frame the
        server refused for want of a reference is re-coded by the mode (``reencode``: a key frame) and
        sent once more; so is a frame resent on a new stream after a reconnect.

        Raises WeightsMismatch (after keeping the frame's record in ``self.mismatch``) when a
        replica holds other weights than this edge.
        """
        attempts = 1
        refused = False
        while True:
            retry = False
            try:
                interrupts.wait(future)  # a signal ends the run here, not inside grpc's bookkeeping
                reply = future.result()
                if reply.response.refusal and not refused and self.mode.reencode(p, "refused"):
                    log.info("frame %d: %s; sending it again re-coded", p.frame.index, reply.response.refusal)
                    refused = True
                    attempts += 1
                    p.request.request_id = next_request_id(p.frame.index)
                    future = self._send(p)
                    continue
                record = self._answered(p, reply)
                self._unavailable_since = None
                self._answered_at, self._silence_warned = time.monotonic(), False
                break
            except WeightsMismatch as exc:
                self.mismatch = self._record(p, status="FAILED_PRECONDITION", error=str(exc))
                raise
            except grpc.RpcError as exc:
                code, status, error = exc.code(), exc.code().name, exc.details()
                md = metadata_of(exc)
                if code == grpc.StatusCode.FAILED_PRECONDITION and WEIGHTS_KEY in md and "fingerprint" in (error or ""):
                    message = self.client.mismatch_message(md.get(REPLICA_KEY, "?"), md[WEIGHTS_KEY])
                    self.mismatch = self._record(p, status=status, error=message)
                    raise WeightsMismatch(message) from None
                # CANCELLED here is the server's doing, never this edge's (a frame the edge abandons ends its
                # future, not in an RpcError): a server shutting down cancels the calls it had received but
                # not yet handed to a handler (grpc/grpc#41785), so it counts as UNAVAILABLE: send again.
                retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    self._unanswered(p)
            except StreamBroken as exc:
                status, error, retry = "UNAVAILABLE", str(exc), True
            except EdgeError as exc:
                status, error = "UNAVAILABLE", str(exc)
            if not (retry and self.options.retry_unavailable and attempts < self.options.max_attempts) or self._gave_up:
                record = self._record(p, status=status, error=error)
                break
            log.warning(
                "frame %d: %s (%s), sending again (attempt %d of %d)",
                p.frame.index,
                status,
                error,
                attempts + 1,
                self.options.max_attempts,
            )
            if not self._reconnect():
                record = self._record(p, status=status, error=f"{error}; no replica came back")
                break
            attempts += 1
            self.mode.reencode(p, "reconnect")  # a new stream: stream modes start it with a key frame
            p.request.request_id = next_request_id(p.frame.index)
            future = self._send(p)
        record.attempts = attempts
        return record

    def _abandon(self, p: Prepared, fut: concurrent.futures.Future, status: str, why: str) -> FrameRecord:
        """The record of a frame whose answer will not be waited for (interrupt, server gone)."""
        if fut.done():
            return self._finish(p, fut)  # answered (or failed) already: record what came back
        fut.cancel()
        return self._record(p, status=status, error=why)

    # --- the loop -------------------------------------------------------------------------------

    def run(
        self,
        source: FrameSource,
        on_record: Callable[[FrameRecord, Frame], None] | None = None,
        progress: bool = False,
    ) -> Summary:
        """Process every frame the source yields; returns the summary (records go to ``on_record``)."""
        summary = self.begin(source, on_record, progress)
        try:
            with interrupts.deferred():  # SIGTERM / Ctrl-C: raised before a frame or while waiting
                try:
                    frames = iter(source)
                    while True:
                        with interrupts.immediate():  # a stalled camera does not hold a signal back
                            frame = next(frames, None)
                        if frame is None:
                            break
                        self.put(frame)
                        if self._gave_up:  # stop reading once the server counts as gone
                            break
                except SourceLost:
                    self.flush(wait=True)  # the frames already sent still get their records
                    raise
                self.flush()
        except KeyboardInterrupt:
            # SIGTERM / Ctrl-C: answers already here are recorded, the rest marked; nothing waits.
            self._gave_up = self._gave_up or "interrupted"
            self.flush(abandon=(INTERRUPTED, "interrupted before the server answered"))
            raise
        finally:
            self.end()
        if self._gave_up:
            raise ServerGone(self._gave_up, summary)
        return summary

    def begin(
        self,
        source: FrameSource | None = None,
        on_record: Callable[[FrameRecord, Frame], None] | None = None,
        progress: bool = False,
    ) -> Summary:
        """Start a run: a new summary and an empty window; records will go to ``on_record``."""
        summary = self.summary = Summary(filter_threshold=self.options.filter_threshold)
        summary.sections.update(self.mode.summary_sections())
        self.source = source
        self._started = time.perf_counter()
        self._answered_at = time.monotonic()
        self._slow_warned = False
        self.bar = tqdm(
            desc=f"hnd-edge {self.options.mode}",
            unit=" frames",
            bar_format=PROGRESS_FORMAT,
            disable=not progress,
            leave=False,
        )
        self.window = _InFlight(self, summary, self.bar, on_record)
        return summary

    def put(self, frame: Frame) -> None:
        """Prepare and send one frame (a frame that could not be read goes straight to the window); the
        oldest frames are recorded while ``max_inflight`` are out or the oldest needs no answer.

        With ``head_workers`` > 1 the frame's head starts on the pool and the oldest frame read is coded and
        sent once ``head_workers`` frames are computing (``flush`` sends the rest)."""
        interrupts.checkpoint()
        if self.head_workers == 1:
            self._admit(frame)
            return
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(self.head_workers, thread_name_prefix="hnd-head")
        computing = None if frame.error is not None else self._pool.submit(self.mode.compute, frame)
        self._ahead.append((frame, computing))
        while len(self._ahead) >= self.head_workers and not self._gave_up:
            self._admit(*self._ahead[0], ahead=True)

    @property
    def pending(self) -> int:
        """Frames read and not yet recorded: computing on the head pool, or in flight."""
        return len(self._ahead) + (len(self.window.frames) if self.window is not None else 0)

    def _admit(self, frame: Frame, computing: concurrent.futures.Future | None = None, ahead: bool = False) -> None:
        """Code and send one frame, in frame order (``computing``: its head on the pool, None: computed here);
        the oldest frames are recorded while the window is backlogged. ``ahead``: the frame is the oldest of
        ``_ahead``, moved from there into the window as it is sent (an interrupt leaves it in one of the two)."""
        window = self.window
        if frame.error is not None:
            p, fut = Prepared(frame, Timings(capture=frame.capture_ms)), None
        else:
            if computing is None:
                p = self.prepare(frame)
            else:
                interrupts.wait(computing)
                p = self.mode.finish(frame, computing.result())
            if self.tracer is not None:
                self._trace(p)
            fut = self._send(p) if p.request is not None else None
        if ahead:
            self._ahead.popleft()
        window.frames.append((p, fut))
        while window.backlogged(self.sizing.size):
            window.emit_first()
            if self._gave_up:
                break

    def flush(self, abandon: tuple[str, str] | None = None, wait: bool = False) -> None:
        """Record every frame still in flight, oldest first. ``abandon`` (status, why): do not wait for the
        answers; once the server counts as gone, frames are abandoned as UNAVAILABLE unless ``wait``. Frames
        whose heads are computing are sent first (or, abandoning, recorded with the rest)."""
        window = self.window
        while self._ahead and abandon is None and not self._gave_up:
            self._admit(*self._ahead[0], ahead=True)
        while window is not None and window.frames:
            if abandon is None and self._gave_up and not wait:
                window.emit_first(abandon=("UNAVAILABLE", self._gave_up))
            else:
                window.emit_first(abandon=abandon)
        while window is not None and self._ahead:  # never sent (interrupted, or the server gone): after the rest
            frame, computing = self._ahead.popleft()
            if computing is not None:
                computing.cancel()
            never: concurrent.futures.Future = concurrent.futures.Future()  # no answer will come
            window.frames.append((Prepared(frame, Timings(capture=frame.capture_ms)), never))
            window.emit_first(abandon=abandon or ("UNAVAILABLE", self._gave_up or "not sent"))

    def end(self) -> Summary | None:
        """End the run: the progress bar and the source closed, the head pool shut, the summary's counters brought
        up to date."""
        self._ahead.clear()  # only an exception leaves frames here; their records are not coming
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self.bar is not None:
            self.bar.close()
        if self.source is not None:
            self.source.close()
        return self.running_summary()

    @property
    def gave_up(self) -> str | None:
        """Why the run stopped sending (the server unreachable for ``give_up_after_s``), None while it goes on."""
        return self._gave_up

    def running_summary(self) -> Summary:
        """The summary so far (SIGUSR1, live figures): counters brought up to date, in bounded memory."""
        summary = self.summary
        if summary is not None:
            summary.wall_s = time.perf_counter() - self._started
            summary.dropped = getattr(self.source, "dropped", 0)
            summary.reconnects = getattr(self.client, "reconnects", 0)
            if self.mode.uses_server:
                summary.window = self.sizing.describe()
        return summary


@dataclass
class _InFlight:
    """One run's frames in flight, oldest first, and where each record goes (summary, bar, ``on_record``)."""

    runner: EdgeRunner
    summary: Summary
    bar: tqdm
    on_record: Callable[[FrameRecord, Frame], None] | None
    frames: deque[tuple[Prepared, concurrent.futures.Future | None]] = field(default_factory=deque)

    def backlogged(self, max_inflight: int) -> bool:
        """Whether the oldest frame is to be recorded before the next is read: ``max_inflight`` are out, or
        it waits for no answer."""
        return len(self.frames) >= max_inflight or (bool(self.frames) and self.frames[0][1] is None)

    def emit_first(self, abandon: tuple[str, str] | None = None) -> None:
        """Record the oldest frame; ``abandon`` (status, why): do not wait for its answer."""
        # Popped only once recorded: an interrupt while waiting for its answer leaves it to the handler.
        p, fut = self.frames[0]
        try:
            record = self._record_of(p, fut, abandon)
        finally:
            if p.span is not None and self.runner.mismatch is not None and self.runner.mismatch.frame == p.frame.index:
                EdgeRunner._end_trace(p, self.runner.mismatch)  # the run stops on other weights
        if p.span is not None:
            EdgeRunner._end_trace(p, record)
        self.runner.mode.after(p, record)
        self.runner._measured(record)
        self.summary.add(record)
        self.bar.update(1)
        if self.on_record is not None:
            self.on_record(record, p.frame)
        self.frames.popleft()

    def _record_of(
        self, p: Prepared, fut: concurrent.futures.Future | None, abandon: tuple[str, str] | None
    ) -> FrameRecord:
        """A frame that could not be read, needed no server, is abandoned, or gets its answer."""
        runner = self.runner
        if p.frame.error is not None:
            return runner._record(p, status=p.frame.status or READ_ERROR, error=p.frame.error)
        if fut is None:
            return runner._record(p)
        if abandon is not None:
            return runner._abandon(p, fut, *abandon)
        try:
            return runner._finish(p, fut)
        except WeightsMismatch:  # the frame is recorded, then the run stops
            self.summary.add(runner.mismatch)
            if self.on_record is not None:
                self.on_record(runner.mismatch, p.frame)
            raise
