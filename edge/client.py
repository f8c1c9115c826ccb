"""The edge's gRPC client: channel set-up (TLS, token), model-info check, unary and streaming
requests as futures, and reconnection with backoff."""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from hnd.common.channel import channel_options
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import split_inference_pb2_grpc as pb_grpc

log = logging.getLogger("hnd.edge")


class EdgeError(Exception):
    """A condition that stops the edge (one clear line for the user)."""


@dataclass
class ClientSettings:
    target: str  # host:port
    tls_ca: str | None = None  # CA that signed the server's certificate; set: use TLS
    tls_cert: str | None = None  # client certificate for mutual TLS
    tls_key: str | None = None
    token: str | None = None
    max_message_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 30.0  # per-request deadline
    connect_timeout_s: float = 10.0
    reconnect_timeout_s: float = 30.0  # how long to keep retrying after the server went away


@dataclass
class Reply:
    response: pb.InferResponse
    done_ns: int  # monotonic time the response arrived


class SplitClient:
    """Blocking set-up, non-blocking requests: ``submit(request)`` returns a Future[Reply]."""

    def __init__(self, settings: ClientSettings) -> None:
        self.settings = settings
        self.metadata = (("authorization", f"Bearer {settings.token}"),) if settings.token else ()
        self.channel = self._make_channel()
        self.stub = pb_grpc.SplitInferenceStub(self.channel)
        self._stream: _Stream | None = None

    def _make_channel(self) -> grpc.Channel:
        s = self.settings
        options = channel_options(s.max_message_bytes)
        if s.tls_ca or s.tls_cert:
            creds = grpc.ssl_channel_credentials(
                root_certificates=Path(s.tls_ca).read_bytes() if s.tls_ca else None,
                private_key=Path(s.tls_key).read_bytes() if s.tls_key else None,
                certificate_chain=Path(s.tls_cert).read_bytes() if s.tls_cert else None,
            )
            return grpc.secure_channel(s.target, creds, options=options)
        return grpc.insecure_channel(s.target, options=options)

    def model_info(self) -> pb.ModelInfo:
        """GetModelInfo, waiting up to connect_timeout_s for the server to come up."""
        try:
            return self.stub.GetModelInfo(
                pb.ModelInfoRequest(), timeout=self.settings.connect_timeout_s, metadata=self.metadata,
                wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            raise EdgeError(f"{self.settings.target}: {exc.code().name}: {exc.details()}") from None

    def submit(self, request: pb.InferRequest, stream: bool = False) -> concurrent.futures.Future:
        """Send one request; the future resolves to a Reply or raises grpc.RpcError."""
        if stream:
            if self._stream is None or self._stream.broken:
                self._stream = _Stream(self)
            return self._stream.submit(request)
        out: concurrent.futures.Future = concurrent.futures.Future()
        call = self.stub.Infer.future(request, timeout=self.settings.timeout_s, metadata=self.metadata)

        def done(f: grpc.Future) -> None:
            now = time.perf_counter_ns()
            try:
                out.set_result(Reply(f.result(), now))
            except grpc.RpcError as exc:
                out.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - cancelled and the like
                out.set_exception(exc)

        call.add_done_callback(done)
        return out

    def reconnect(self) -> bool:
        """Wait, with exponential backoff, until the server answers again; False after reconnect_timeout_s."""
        deadline = time.monotonic() + self.settings.reconnect_timeout_s
        delay = 0.1
        while time.monotonic() < deadline:
            try:
                grpc.channel_ready_future(self.channel).result(timeout=delay)
                self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=max(delay, 1.0), metadata=self.metadata)
                return True
            except (grpc.FutureTimeoutError, grpc.RpcError):
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
        return False

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self.channel.close()


class _Stream:
    """One InferStream call: requests go in through a queue, responses resolve futures in order."""

    _SENTINEL = object()

    def __init__(self, client: SplitClient) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.pending: queue.Queue[tuple[str, concurrent.futures.Future]] = queue.Queue()
        self.broken = False
        self._lock = threading.Lock()
        self.call = client.stub.InferStream(iter(self.requests.get, self._SENTINEL), metadata=client.metadata)
        self.reader = threading.Thread(target=self._read, name="hnd-stream-reader", daemon=True)
        self.reader.start()

    def submit(self, request: pb.InferRequest) -> concurrent.futures.Future:
        out: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self.broken:
                out.set_exception(EdgeError("stream closed"))
                return out
            self.pending.put((request.request_id, out))
            self.requests.put(request)
        return out

    def _read(self) -> None:
        error: BaseException | None = None
        try:
            for response in self.call:
                now = time.perf_counter_ns()
                request_id, fut = self.pending.get_nowait()
                if response.request_id != request_id:
                    fut.set_exception(EdgeError(f"stream out of order: got {response.request_id}, want {request_id}"))
                else:
                    fut.set_result(Reply(response, now))
        except grpc.RpcError as exc:
            error = exc
        except queue.Empty:
            error = EdgeError("server answered a request that was not sent")
        with self._lock:
            self.broken = True
            while True:
                try:
                    _, fut = self.pending.get_nowait()
                except queue.Empty:
                    break
                fut.set_exception(error or EdgeError("stream ended before answering"))

    def close(self) -> None:
        self.requests.put(self._SENTINEL)
        self.reader.join(timeout=5)


_ids = itertools.count()


def next_request_id(frame_index: int) -> str:
    """Unique per process: frame index plus a counter (retries get a new id)."""
    return f"{frame_index}-{next(_ids)}"
