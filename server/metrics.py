"""Prometheus metrics of hnd-server (one registry per server, so tests can run several)."""

from __future__ import annotations

import tornado.httpserver
import tornado.web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

STAGES = ("decode", "queue", "compute", "encode")


class ServerMetrics:
    """``hnd_requests_total{method,code}``, ``hnd_refusals_total{method,code,reason}``,
    ``hnd_deadline_drops_total{method}``, ``hnd_request_seconds{method,code}``,
    ``hnd_stream_messages_total{outcome}``, ``hnd_log_suppressed_total``, ``hnd_batch_size``,
    ``hnd_queue_depth``, ``hnd_queue_bytes``, ``hnd_decode_queue_depth``, ``hnd_inflight_message_bytes``, ``hnd_dropped_total{reason}``, ``hnd_late_images_total``,
    ``hnd_stage_seconds{stage}`` and ``hnd_request_bytes_total``.

    InferStream counts per message: one request = one stream message. Every call ends in
    ``hnd_requests_total`` with its final code, including CANCELLED and DEADLINE_EXCEEDED when the caller went
    away first and UNAUTHENTICATED from the token check.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hnd_requests",
            "Requests answered, by method and gRPC status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "hnd_batch_size",
            "Images per tail batch",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        self.queue_depth = Gauge("hnd_queue_depth", "Requests waiting for a batch slot", registry=self.registry)
        self.decode_queue_depth = Gauge(
            "hnd_decode_queue_depth",
            "Requests waiting for the decode thread or on it (max_decode_queue)",
            registry=self.registry,
        )
        self.inflight_message_bytes = Gauge(
            "hnd_inflight_message_bytes",
            "Serialized request bytes held from receipt to answer (max_inflight_message_bytes)",
            registry=self.registry,
        )
        self.queue_bytes = Gauge(
            "hnd_queue_bytes",
            "Decoded payload bytes the waiting requests hold (max_queue_bytes)",
            registry=self.registry,
        )
        self.dropped = Counter(
            "hnd_dropped",
            "Requests taken out of the queue without compute: cancelled (the caller went away), deadline (passed, "
            "or would pass before the batch ends), pushed_out (queue full, a client holding fewer came)",
            ["reason"],
            registry=self.registry,
        )
        self.late_images = Counter(
            "hnd_late_images",
            "Images computed whose caller had gone (cancelled or past its deadline) when their batch ended",
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "hnd_stage_seconds",
            "Server stage durations",
            ["stage"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.refusals = Counter(
            "hnd_refusals",
            "Requests refused, by method, status code and reason (a fixed label)",
            ["method", "code", "reason"],
            registry=self.registry,
        )
        self.deadline_drops = Counter(
            "hnd_deadline_drops",
            "Requests whose deadline passed while queued (never computed)",
            ["method"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "hnd_request_seconds",
            "Server time of a request from receipt to answer or refusal",
            ["method", "code"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.stream_messages = Counter(
            "hnd_stream_messages",
            "InferStream messages: answered, refused, or dropped because their stream had ended (not computed)",
            ["outcome"],
            registry=self.registry,
        )
        self.stream_sessions = Gauge(
            "hnd_stream_sessions",
            "InferStream sessions holding a slot (server/streams.py), by what they hold",
            ["kind"],
            registry=self.registry,
        )
        self.stream_sessions_reclaimed = Counter(
            "hnd_stream_sessions_reclaimed",
            "Stream sessions whose slot was taken back before their stream ended: idle (no frame for the idle "
            "timeout) or fair_share (given to a client holding fewer)",
            ["reason"],
            registry=self.registry,
        )
        self.key_frames_required = Counter(
            "hnd_key_frames_required",
            "Stream frames answered with key_frame_required: refused (no valid "
            "reference) or not_kept (answered, no session free)",
            ["outcome"],
            registry=self.registry,
        )
        self.log_suppressed = Counter(
            "hnd_log_suppressed", "Refusal log lines left out by the rate limit", registry=self.registry
        )
        self.request_bytes = Counter("hnd_request_bytes", "Serialized request bytes received", registry=self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Expose /metrics over HTTP on ``host:port``, on the running event loop (call from it)."""
        app = tornado.web.Application([(r"/(?:metrics)?", _MetricsHandler, {"registry": self.registry})])
        server = MetricsServer(
            app,
            idle_connection_timeout=METRICS_IDLE_TIMEOUT_S,
            body_timeout=METRICS_IDLE_TIMEOUT_S,
            max_header_size=16 * 1024,
            max_body_size=16 * 1024,
        )
        server.listen(port, address=host)
        return server


# The metrics endpoint: at most this many connections at once (scrapers, a person with curl); more are closed
# at once. A connection idle (or sending its request slowly) this long is closed. prometheus_client's own
# server ran one thread per connection, unbounded: 200 half-open connections held 208 threads.
METRICS_MAX_CONNECTIONS = 16
METRICS_IDLE_TIMEOUT_S = 10.0


class MetricsServer(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server on the event loop (no thread per connection), with a connection bound."""

    max_connections = METRICS_MAX_CONNECTIONS
    open_connections = 0

    def handle_stream(self, stream, address) -> None:
        if self.open_connections >= self.max_connections:
            stream.close()
            return
        self.open_connections += 1
        super().handle_stream(stream, address)

    def on_close(self, server_conn) -> None:
        self.open_connections -= 1
        super().on_close(server_conn)


class _MetricsHandler(tornado.web.RequestHandler):
    def initialize(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.write(generate_latest(self.registry))
