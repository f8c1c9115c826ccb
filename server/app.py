"""hnd-server's transport: grpc.aio server, health, reflection, TLS, token auth, drain.

``start_server`` returns a running server on the current event loop; ``serve`` runs one
until SIGTERM / SIGINT and drains it; ``BackgroundServer`` runs one in a thread (tests,
the demo, the benchmark).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from hnd.common.channel import REPLICA_KEY, TAIL_KEY, WEIGHTS_KEY, channel_options  # noqa: F401 - re-exported
from hnd.common import tracing
from hnd.common.errors import UsageError
from hnd.server.kserve import V2_SERVICE, InferenceV2
from hnd.server.otel import TracingInterceptor
from hnd.server.metrics import MetricsServer
from hnd.server.service import SERVICE_NAME, BatchingOptions, ModelRunner, ServerLimits, SplitInferenceService
from hnd.server.text import client_text

log = logging.getLogger("hnd.server")

# Methods reachable without a token: orchestrators probe health, tools list services.
_PUBLIC_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


@dataclass
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None  # set: mutual TLS, clients must present a certificate signed by it


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 50051  # 0: any free port
    limits: ServerLimits = field(default_factory=ServerLimits)
    batching: BatchingOptions = field(default_factory=BatchingOptions)
    tls: TlsFiles | None = None
    token: str | None = None
    metrics_port: int | None = None
    # The metrics port's own address (the edge's --metrics-host too): loopback unless asked, since /metrics has
    # no authentication; on Kubernetes pass 0.0.0.0 for Prometheus to scrape the pod (with a NetworkPolicy).
    metrics_host: str = "127.0.0.1"
    offload: bool = True
    drain_s: float = 10.0
    # Plain-text port that serves only grpc.health.v1 (kubelet's gRPC probes cannot use TLS). None: off.
    health_port: int | None = None
    replica: str | None = None  # the name in REPLICA_KEY; None: "<hostname>:<port>" (the pod name on Kubernetes)
    # Close each client connection after this long (GOAWAY; calls in flight finish within the
    # grace), so clients re-resolve DNS and spread over replicas added since. None: never.
    max_connection_age_s: float | None = None
    max_connection_age_grace_s: float = 30.0


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without ``authorization: Bearer <token>`` metadata with UNAUTHENTICATED."""

    def __init__(self, token: str, service: SplitInferenceService | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._service = service  # its rate-limited refusal log and refusal counter, when given

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_PUBLIC_PREFIXES):
            return await continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self._expected):
            return await continuation(handler_call_details)
        method = handler_call_details.method  # client text: clipped, and a fixed label for metrics
        if self._service is not None:
            known = method.rsplit("/", 1)[-1] if method.startswith(f"/{SERVICE_NAME}/") else ""
            label = known if known in ("Infer", "InferStream", "GetModelInfo") else "other"
            self._service.metrics.refusals.labels(label, "UNAUTHENTICATED", "token").inc()
            self._service.metrics.requests.labels(label, "UNAUTHENTICATED").inc()  # every final code is counted
            self._service.refusal_log.warning("%s UNAUTHENTICATED: missing or wrong bearer token", client_text(method))
        else:
            log.warning("%s UNAUTHENTICATED: missing or wrong bearer token", client_text(method))

        async def deny(request_or_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

        if handler_call_details.method.endswith("Stream"):
            return grpc.stream_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def add_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Server reflection as grpc.reflection.v1 (what grpcurl and current tools ask first) and v1alpha.

    grpcio-reflection implements only v1alpha; v1 is the same protocol (same messages and field
    numbers) under another package name, so the same servicer answers both.
    """
    names = (*service_names, REFLECTION_V1, reflection.SERVICE_NAME)
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                REFLECTION_V1,
                {
                    "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
                        servicer.ServerReflectionInfo,
                        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
                        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
                    ),
                },
            ),
        )
    )


def read_token(path: str) -> str:
    """The bearer token from a file (surrounding whitespace ignored); it must not be empty."""
    token = Path(path).read_text().strip()
    if not token:
        raise UsageError(path, "token file is empty")
    return token


@dataclass
class RunningServer:
    server: grpc.aio.Server
    service: SplitInferenceService
    health: health.aio.HealthServicer
    port: int
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    metrics_server: MetricsServer | None = None

    async def drain(self, grace_s: float) -> None:
        """Health NOT_SERVING first (probes and client-side balancers move away while in-flight work
        still runs), open streams end UNAVAILABLE after answering what they read, in-flight calls
        get ``grace_s`` to finish, then stop."""
        await self.health.enter_graceful_shutdown()
        self.service.begin_drain()
        await self.server.stop(grace_s)
        if self.health_server is not None:  # probes read NOT_SERVING until the end of the drain
            await self.health_server.stop(None)
        await self.service.batcher.stop()
        self.service.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()


async def start_server(runner: ModelRunner, settings: ServerSettings) -> RunningServer:
    """Build, bind and start the server on the running loop; health turns SERVING after warm-up."""
    # Tracing first: the service's batcher asks for its tracer when it is made.
    tracer = tracing.get_tracer("hnd.server") if tracing.configure_from_env("hnd-server") else None
    service = SplitInferenceService(runner, settings.limits, settings.batching, offload=settings.offload)
    # Replica, weights and tail metadata are set by the service's handlers (SplitInferenceService.call_metadata),
    # not by an interceptor: an interceptor costs every call a coroutine and a new handler.
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if tracer is not None:  # OpenTelemetry (hnd.server.otel): installed only when on, so free when off
        replica = lambda: dict(service.call_metadata).get(REPLICA_KEY, "")  # noqa: E731
        interceptors.append(TracingInterceptor(tracer, replica))
    if settings.token:
        interceptors.append(TokenAuthInterceptor(settings.token, service))
    options = channel_options(settings.limits.max_message_bytes)
    if settings.max_connection_age_s:
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    server = grpc.aio.server(interceptors=interceptors, options=options)
    # The Open Inference Protocol (KServe v2) on the same port, over the same service core.
    v2 = InferenceV2(service)
    server.add_generic_rpc_handlers((service.generic_handler(), v2.generic_handler()))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    add_reflection(server, (SERVICE_NAME, V2_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
    address = f"{settings.host}:{settings.port}"
    if settings.tls is not None:
        creds = grpc.ssl_server_credentials(
            [(Path(settings.tls.key).read_bytes(), Path(settings.tls.cert).read_bytes())],
            root_certificates=Path(settings.tls.client_ca).read_bytes() if settings.tls.client_ca else None,
            require_client_auth=settings.tls.client_ca is not None,
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    service.name_replica(settings.replica or f"{socket.gethostname()}:{port}")
    health_server, health_port = None, None
    if settings.health_port is not None:
        # Health only, no SplitInference: a plain-text port must not bypass TLS for inference.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
        if health_port == 0:
            raise OSError(f"cannot listen on {settings.host}:{settings.health_port} (--health-port)")
        await health_server.start()
    metrics_server = None
    if settings.metrics_port is not None:
        metrics_server = service.metrics.serve(settings.metrics_port, settings.metrics_host)
    await server.start()
    service.batcher.start()
    # Warm up off the event loop so health checks are answered (NOT_SERVING) meanwhile.
    await asyncio.get_running_loop().run_in_executor(None, runner.warm_up)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    v2.ready = True
    log.info(
        "serving %s (%s, %d-channel bottleneck, weights %s, tail %s on %s) on %s:%d",
        SERVICE_NAME,
        runner.kind,
        runner.channels,
        runner.fingerprint[:12],
        runner.tail_info["summary"],
        runner.tail_info["device"],
        settings.host,
        port,
    )
    return RunningServer(server, service, health_servicer, port, health_server, health_port, metrics_server)


async def serve(runner: ModelRunner, settings: ServerSettings) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    running = await start_server(runner, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining (up to %.0f s for in-flight requests)", settings.drain_s)
    await running.drain(settings.drain_s)
    log.info("stopped")


class BackgroundServer:
    """A server on its own event loop thread: ``with BackgroundServer(runner, settings) as s: s.port``."""

    def __init__(self, runner: ModelRunner, settings: ServerSettings) -> None:
        self.runner = runner
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.running: RunningServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="hnd-server", daemon=True)

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        self.running = asyncio.run_coroutine_threadsafe(start_server(self.runner, self.settings), self.loop).result()
        return self

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def service(self) -> SplitInferenceService:
        return self.running.service

    def stop(self, grace_s: float = 1.0) -> None:
        if self.running is not None:
            asyncio.run_coroutine_threadsafe(self.running.drain(grace_s), self.loop).result()
            self.running = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    def __exit__(self, *exc) -> None:
        self.stop()
