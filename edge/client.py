"""The edge's gRPC client: channel set-up (TLS, token), model-info check, unary and streaming
requests as futures, and reconnection with backoff.

Several replicas: ``target`` takes gRPC's target syntax (``dns:///hnd-server.hnd.svc:50051`` for a
Kubernetes headless Service, ``ipv4:10.0.0.5:50051,10.0.0.6:50051``), and the channel balances with
gRPC's own policies (``round_robin`` or ``pick_first``) from a service config that also turns on
client-side health checking (a draining replica, NOT_SERVING, gets no new calls) and gRPC's retry
policy (a unary call that failed UNAVAILABLE before any answer is sent again, to another replica).
Every answer names its replica and weights (server metadata); an answer from a replica with other
weights stops the edge (WeightsMismatch)."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from hnd.common.errors import HndError
from hnd.common.meta import FingerprintMismatch, check_fingerprint
from hnd.edge import interrupts
from hnd.edge.diagnose import describe_failure
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import split_inference_pb2_grpc as pb_grpc
from hnd.common.channel import REPLICA_KEY, WEIGHTS_KEY, channel_options, client_channel

log = logging.getLogger("hnd.edge")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SplitInference"].full_name  # hnd.v1.SplitInference
LB_POLICIES = ("round_robin", "pick_first")
PROBE_TIMEOUT_S = 3.0  # a GetModelInfo that asks whether a silent server is busy or gone
# Schemes of gRPC's target syntax (https://github.com/grpc/grpc/blob/master/doc/naming.md).
TARGET_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract")


class EdgeError(HndError):
    """A condition that stops the edge (one clear line for the user)."""


class StreamBroken(EdgeError):
    """The InferStream ended before answering this request (the request may be sent again)."""


class WeightsMismatch(EdgeError):
    """A replica answered with other weights than this edge's: all replicas must share the fingerprint."""


def check_target(target: str) -> str:
    """``target`` unchanged when it is HOST:PORT or gRPC target syntax; EdgeError naming the problem."""
    scheme, sep, rest = target.partition(":")
    if sep and scheme in TARGET_SCHEMES:
        if not rest.strip("/"):
            raise EdgeError(f"--server {target}: no address after '{scheme}:'")
        return target
    if "://" in target:
        raise EdgeError(
            f"--server {target}: unknown scheme (gRPC targets: {', '.join(TARGET_SCHEMES)}; "
            "e.g. dns:///hnd-server.hnd.svc:50051)"
        )
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise EdgeError(
            f"--server {target}: expected HOST:PORT or a gRPC target such as "
            "dns:///hnd-server.hnd.svc:50051 or ipv4:10.0.0.5:50051,10.0.0.6:50051"
        )
    return target


def service_config(lb: str = "round_robin", max_attempts: int = 3) -> str:
    """The channel's gRPC service config (JSON): balancing policy, health checking, retry policy.

    Inference is idempotent (same request, same answer on any replica with the same weights), so
    UNAVAILABLE calls are retried; gRPC retries only calls no replica has answered yet, caps
    attempts at 5, and keeps every attempt inside the call's deadline.
    """
    if lb not in LB_POLICIES:
        raise EdgeError(f"--lb {lb}: expected one of {', '.join(LB_POLICIES)}")
    if not 1 <= max_attempts <= 5:
        raise EdgeError(f"max attempts {max_attempts}: gRPC allows 1 to 5")
    config: dict = {
        "loadBalancingConfig": [{lb: {}}],
        # round_robin watches grpc.health.v1 per replica and skips NOT_SERVING ones (pick_first ignores it).
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
        # A retry storm against a fleet that is down stops itself: retries pause when most calls fail.
        "retryThrottling": {"maxTokens": 100, "tokenRatio": 0.1},
    }
    if max_attempts > 1:
        config["methodConfig"] = [
            {
                "name": [
                    {"service": SERVICE_NAME, "method": "Infer"},
                    {"service": SERVICE_NAME, "method": "GetModelInfo"},
                ],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def metadata_of(call) -> dict[str, str]:
    """Trailing metadata of a finished call or RpcError as a dict ({} when there is none)."""
    try:
        return dict(call.trailing_metadata() or ())
    except Exception:  # noqa: BLE001 - errors raised before any call existed carry none
        return {}


@dataclass
class ClientSettings:
    target: str  # host:port, or gRPC target syntax (dns:///name:port, ipv4:a:p,b:p)
    tls_ca: str | None = None  # CA that signed the server's certificate; set: use TLS
    tls_cert: str | None = None  # client certificate for mutual TLS
    tls_key: str | None = None
    token: str | None = None
    max_message_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 30.0  # per-request deadline
    connect_timeout_s: float = 10.0
    reconnect_timeout_s: float | None = 30.0  # how long to wait for a server that went away (None: forever)
    lb: str = "round_robin"  # gRPC load-balancing policy over the addresses the target resolves to
    max_attempts: int = 3  # gRPC retry policy: attempts per unary call (1..5), on UNAVAILABLE
    tls_server_name: str | None = None  # name checked against the certificate instead of the target's


@dataclass
class Reply:
    response: pb.InferResponse
    done_ns: int  # monotonic time the response arrived
    replica: str = ""  # the replica that answered (server metadata)


class SplitClient:
    """Blocking set-up, non-blocking requests: ``submit(request)`` returns a Future[Reply]."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        check_target(settings.target)
        self.metadata = (("authorization", f"Bearer {settings.token}"),) if settings.token else ()
        # Weights every replica must hold (set by the edge after its model-info check); None: not checked.
        self.expected_fingerprint: str | None = None
        self.info_replica = ""
        self.channel = self._make_channel()
        self.stub = pb_grpc.SplitInferenceStub(self.channel)
        self._stream: _Stream | None = None
        self.reconnects = 0
        self.waiting_since: float | None = None

    def _make_channel(self) -> grpc.Channel:
        s = self.settings
        options = channel_options(s.max_message_bytes) + [
            ("grpc.service_config", service_config(s.lb, s.max_attempts)),
            ("grpc.enable_retries", 1),
            # gRPC keeps a copy of each request to retry it: room for the largest one allowed.
            ("grpc.per_rpc_retry_buffer_size", s.max_message_bytes),
            # A replica that restarts is back in the rotation within seconds (gRPC's default: up to 120 s).
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ]
        if s.tls_server_name:
            options.append(("grpc.ssl_target_name_override", s.tls_server_name))
        return client_channel(s.target, s.tls_ca, s.tls_cert, s.tls_key, options)

    def model_info(self) -> pb.ModelInfo:
        """GetModelInfo, waiting up to connect_timeout_s for the server to come up."""
        try:
            info, call = self.stub.GetModelInfo.with_call(
                pb.ModelInfoRequest(),
                timeout=self.settings.connect_timeout_s,
                metadata=self.metadata,
                wait_for_ready=True,
            )
            self.info_replica = metadata_of(call).get(REPLICA_KEY, "")  # which replica answered
            return info
        except grpc.RpcError as exc:

            def probe() -> None:  # the same call, failing fast with the transport's reason
                self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=3, metadata=self.metadata)

            tls = bool(self.settings.tls_ca or self.settings.tls_cert)
            raise EdgeError(describe_failure(exc, probe, self.settings.target, tls)) from None

    def probe_link(self) -> tuple[int, float] | None:
        """One timed GetModelInfo on the open channel: (message bytes both ways, ms), a first measurement of
        the link for ``--adapt`` (hnd.edge.linkest.LinkEstimator.observe_probe); None when it fails."""
        request = pb.ModelInfoRequest()
        start = time.perf_counter()
        try:
            info = self.stub.GetModelInfo(request, timeout=self.settings.connect_timeout_s, metadata=self.metadata)
        except grpc.RpcError:
            return None  # the frames will tell
        return request.ByteSize() + info.ByteSize(), (time.perf_counter() - start) * 1e3

    def submit(
        self, request: pb.InferRequest, stream: bool = False, metadata: tuple[tuple[str, str], ...] = ()
    ) -> concurrent.futures.Future:
        """Send one request; the future resolves to a Reply or raises grpc.RpcError. metadata: more call
        metadata for a unary call (the frame's trace context); a stream's metadata is the stream's own."""
        if stream:
            if self._stream is None or self._stream.broken:
                self._stream = _Stream(self)
            return self._stream.submit(request)
        out: concurrent.futures.Future = concurrent.futures.Future()
        call = self.stub.Infer.future(request, timeout=self.settings.timeout_s, metadata=self.metadata + metadata)

        def done(f: grpc.Future) -> None:
            now = time.perf_counter_ns()
            if not out.set_running_or_notify_cancel():
                return  # the edge abandoned the frame (interrupt, server gone): nobody waits for this answer
            try:
                response = f.result()
                md = metadata_of(f)
                self.check_weights(md)
                settle(out, Reply(response, now, md.get(REPLICA_KEY, "")))
            except Exception as exc:  # noqa: BLE001 - RpcError, WeightsMismatch, cancelled and the like
                settle(out, error=exc)

        call.add_done_callback(done)
        # Abandoning the frame cancels its call: the server sees CANCELLED and need not compute it.
        out.add_done_callback(lambda o: call.cancel() if o.cancelled() else None)
        return out

    def check_weights(self, md: dict[str, str]) -> None:
        """WeightsMismatch when the replica that sent ``md`` holds other weights than expected."""
        if self.expected_fingerprint is None:
            return
        try:  # a reply without the weights tag (a server not behind our interceptor) passes
            check_fingerprint(self.expected_fingerprint, md.get(WEIGHTS_KEY), required=False)
        except FingerprintMismatch as exc:
            raise WeightsMismatch(self.mismatch_message(md.get(REPLICA_KEY, "?"), exc.given)) from None

    def mismatch_message(self, replica: str, weights: str) -> str:
        return (
            f"replica {replica} behind {self.settings.target} serves other weights "
            f"(fingerprint {weights[:16]}..., this edge {(self.expected_fingerprint or '?')[:16]}...): "
            "all replicas must load the same checkpoint"
        )

    def responds(self, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
        """Whether the server answers GetModelInfo within ``timeout_s``. The call queues behind no tail's
        compute: a server busy computing answers it, one whose event loop hangs (SIGSTOP) or is gone does not."""
        try:
            self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout_s, metadata=self.metadata)
            return True
        except grpc.RpcError:
            return False

    def reconnect(self, timeout_s: float | None = None) -> bool:
        """Wait, with exponential backoff (0.1 s doubling up to 5 s), until the server answers again.

        False after ``timeout_s`` (default ``reconnect_timeout_s``; None: wait until it comes back). While waiting,
        ``waiting_since`` holds the monotonic time the wait began (status lines say "waiting for the
        server"); every wait that ends with the server back counts in ``reconnects``.
        """
        timeout = self.settings.reconnect_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        self.waiting_since = start
        log.warning(
            "%s: server unavailable; waiting for it (%s)",
            self.settings.target,
            "no time limit" if timeout is None else f"up to {timeout:g} s",
        )
        delay = 0.1
        try:
            while timeout is None or time.monotonic() - start < timeout:
                try:
                    grpc.channel_ready_future(self.channel).result(timeout=delay)
                    self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=max(delay, 1.0), metadata=self.metadata)
                    self.reconnects += 1
                    log.warning("%s: server back after %.1f s", self.settings.target, time.monotonic() - start)
                    return True
                except (grpc.FutureTimeoutError, grpc.RpcError):
                    interrupts.sleep(delay)  # a signal ends the wait here, between two grpc calls
                    delay = min(delay * 2, 5.0)
            return False
        finally:
            self.waiting_since = None

    def end_stream(self) -> None:
        """Half-close the current InferStream: what it carries is still answered, and the next stream request
        opens a new stream (a new session on the server: hnd-edge --adapt switching operating points)."""
        if self._stream is not None:
            self._stream.requests.put(_Stream._SENTINEL)
            self._stream = None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self.channel.close()


class FrameDeadlineExceeded(grpc.RpcError):
    """A stream frame the server did not answer within the client's per-request deadline (``timeout_s``).

    Behaves as the RpcError a unary call past its deadline raises (``code()`` DEADLINE_EXCEEDED), so a frame
    ends with the same status whichever way it travelled."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"Deadline Exceeded: no answer on InferStream within {timeout_s:g} s")

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return str(self)

    def trailing_metadata(self) -> tuple:
        return ()


def settle(fut: concurrent.futures.Future, result: object = None, error: BaseException | None = None) -> None:
    """Resolve ``fut`` unless it is done already (the edge cancels the futures of frames it stops waiting for:
    an interrupt, a give-up, an expired deadline); the answer that comes later is dropped quietly."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


@dataclass
class _Pending:
    request_id: str
    future: concurrent.futures.Future
    deadline: float | None  # monotonic time after which the frame counts as DEADLINE_EXCEEDED
    timeout_s: float = 0.0  # the deadline it was sent with (the edge may resize it between frames)


class _Stream:
    """One InferStream call: requests go in through a queue, responses resolve futures in order.

    Every frame has the client's per-request deadline (``timeout_s``), counted from its ``submit``, as a unary
    call has: gRPC's deadline covers a whole call, so a watchdog thread times the oldest unanswered frame. When
    it expires, that frame fails DEADLINE_EXCEEDED and the call is cancelled (answers come in order, so none
    behind it can come first; the server frees the stream's session); the frames behind it fail StreamBroken,
    to be sent again on a new stream. The watchdog sleeps until the oldest frame's deadline (with none in flight,
    until the earliest deadline a frame sent now could have) and is woken only when a frame could expire
    before that: a frame in flight costs it no wake-up (two per frame before, each a thread switch).
    """

    _SENTINEL = object()

    def __init__(self, client: SplitClient) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.pending: collections.deque[_Pending] = collections.deque()
        self.broken = False
        self.error: BaseException | None = None  # what ended the stream (set with broken)
        self._cond = threading.Condition()
        # When the watchdog looks next (monotonic; None: only when woken). Guarded by _cond.
        self._watch_until: float | None = None
        self.client = client
        self.replica = ""
        self.call = client.stub.InferStream(iter(self.requests.get, self._SENTINEL), metadata=client.metadata)
        self.reader = threading.Thread(target=self._read, name="hnd-stream-reader", daemon=True)
        self.reader.start()
        self.watchdog = threading.Thread(target=self._watch, name="hnd-stream-deadlines", daemon=True)
        self.watchdog.start()

    def submit(self, request: pb.InferRequest) -> concurrent.futures.Future:
        out: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self.broken:  # a refusal that came before this request (other weights) stays the answer
                out.set_exception(
                    self.error if isinstance(self.error, WeightsMismatch) else StreamBroken("stream closed")
                )
                return out
            timeout = self.client.settings.timeout_s  # read per frame: the edge sizes it from the answers
            deadline = time.monotonic() + timeout if timeout else None
            self.pending.append(_Pending(request.request_id, out, deadline, timeout or 0.0))
            self.requests.put(request)
            if self._expires_first(self.pending[0].deadline):
                self._cond.notify_all()
        return out

    def _expires_first(self, deadline: float | None) -> bool:
        """Whether the watchdog must look sooner than it plans to, for a head frame with ``deadline``."""
        return deadline is not None and (self._watch_until is None or deadline < self._watch_until)

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            md = dict(self.call.initial_metadata() or ())  # the server names replica and weights first
            self.replica = md.get(REPLICA_KEY, "")
            self.client.check_weights(md)
            for response in self.call:
                now = time.perf_counter_ns()
                with self._cond:
                    if not self.pending:
                        raise queue.Empty
                    frame = self.pending.popleft()
                    if self.pending and self._expires_first(self.pending[0].deadline):
                        self._cond.notify_all()  # the next frame's deadline comes first (a shorter timeout)
                if response.request_id != frame.request_id:
                    settle(
                        frame.future,
                        error=EdgeError(f"stream out of order: got {response.request_id}, want {frame.request_id}"),
                    )
                else:
                    settle(frame.future, Reply(response, now, self.replica))
        except WeightsMismatch as exc:
            error = exc
            self.call.cancel()
        except grpc.RpcError as exc:
            error = exc
        except queue.Empty:
            error = EdgeError("server answered a request that was not sent")
        with self._cond:
            self.broken = True
            self.error = self.error or error  # the watchdog's StreamBroken, when it cancelled the call
            left = list(self.pending)
            self.pending.clear()
            self._cond.notify_all()
        for frame in left:
            settle(frame.future, error=self.error or StreamBroken("stream ended before answering"))

    def _watch(self) -> None:
        """Fails the oldest frame DEADLINE_EXCEEDED once its deadline passes, and cancels the call."""
        with self._cond:
            while True:
                if self.broken:
                    return
                now = time.monotonic()
                if not self.pending:  # a frame sent from now on expires no sooner than now + timeout
                    timeout = self.client.settings.timeout_s
                    self._watch_until = now + timeout if timeout else None
                else:
                    late = self.pending[0]
                    if late.deadline is not None and late.deadline <= now:
                        break
                    self._watch_until = late.deadline  # None: nothing to time until it is answered
                # Woken sooner only by a frame that expires before _watch_until (submit, _read) or the end.
                self._cond.wait(None if self._watch_until is None else self._watch_until - now)
            self.pending.popleft()
            self.broken = True
            self.error = StreamBroken(
                f"stream cancelled: request {late.request_id} had no answer within {late.timeout_s:g} s"
            )
        settle(late.future, error=FrameDeadlineExceeded(late.timeout_s))
        self.call.cancel()  # the reader fails the frames behind it with self.error

    def close(self) -> None:
        self.requests.put(self._SENTINEL)
        self.reader.join(timeout=5)
        with self._cond:
            self.broken = True
            self._cond.notify_all()


_ids = itertools.count()


def next_request_id(frame_index: int) -> str:
    """Unique per process: frame index plus a counter (retries get a new id)."""
    return f"{frame_index}-{next(_ids)}"
