"""gRPC channel options shared by hnd-server and the edge's channel (so the edge never imports the server)."""
from __future__ import annotations


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
