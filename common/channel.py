"""gRPC channel options shared by hnd-server and the edge's channel (so the edge never imports the server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

# The inference service's full name (hnd/v1/split_inference.proto): here, not in hnd.server.service, so that
# hnd-healthcheck and the edge name it without importing the server (torch).
SERVICE_NAME = "hnd.v1.SplitInference"


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message-size and keepalive options shared by the server and the edge's channel."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_channel(
    target: str,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """A client channel to ``target`` (the edge, hnd-healthcheck): TLS when a CA (PEM file; else the system
    roots) or a client certificate is given, ``tls_cert`` + ``tls_key`` for mutual TLS; else plain text."""
    if tls_ca or tls_cert:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(tls_ca).read_bytes() if tls_ca else None,
            private_key=Path(tls_key).read_bytes() if tls_key else None,
            certificate_chain=Path(tls_cert).read_bytes() if tls_cert else None,
        )
        return grpc.secure_channel(target, creds, options=options)
    return grpc.insecure_channel(target, options=options)


# Metadata every SplitInference call carries back (trailing; a stream also in its initial metadata):
# which replica answered and which weights it holds. Behind a balancer the client cannot see the
# peer, so this is how an edge names the replica with other weights and counts answers per replica.
REPLICA_KEY = "hnd-replica"
WEIGHTS_KEY = "hnd-weights"
TAIL_KEY = "hnd-tail"  # how the tail ran, e.g. "fp32" or "bf16+channels_last" (hnd.server.accel)
