"""Prometheus metrics of hnd-server (one registry per server, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGES = ("decode", "queue", "compute", "encode")


class ServerMetrics:
    """``hnd_requests_total{method,code}``, ``hnd_refusals_total{method,code,reason}``,
    ``hnd_deadline_drops_total{method}``, ``hnd_request_seconds{method,code}``,
    ``hnd_stream_messages_total{outcome}``, ``hnd_log_suppressed_total``, ``hnd_batch_size``,
    ``hnd_queue_depth``, ``hnd_queue_bytes``, ``hnd_dropped_total{reason}``, ``hnd_late_images_total``,
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

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose /metrics over HTTP on ``host:port`` (a daemon thread)."""
        start_http_server(port, addr=host, registry=self.registry)
