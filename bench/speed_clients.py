"""The request and the timing clients of ``python -m hnd.bench.overhead`` (``make_request`` also feeds
``python -m hnd.bench.batching``).

* ``make_request``: one real InferRequest, a sample photo through a config's head and codec;
* ``FloorClient``: a plain gRPC stub against the floor server (``speed_servers``), unary or a ping-pong stream;
* ``time_floor`` / ``time_hnd``: ``n`` calls one after the other, each a ``Sample`` (total and server stages).
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import grpc

from hnd.bench.speed_servers import FLOOR_SERVICE


def make_request(config: str, seed: int, bits: int, size: tuple[int, int]):
    """One real InferRequest: a sample photo resized to ``size`` (H, W) through the config's head and codec.

    Returns (request, codec encode ms).
    """
    import cv2
    import torch

    from hnd.common import codec, wire
    from hnd.common.checkpoint import fingerprint
    from hnd.common.config import load_config, with_weights
    from hnd.common.build import build_model_from_config
    from hnd.common.split import split_model
    from hnd.edge.capture import sample_images
    from hnd.edge.torch_modes import to_tensor
    from hnd.proto.v1 import split_inference_pb2 as pb

    cfg = load_config(config)
    model = build_model_from_config(with_weights(cfg.model, None, seed), cfg.path)
    head, _ = split_model(model)
    image = cv2.resize(sample_images()[0][0], (size[1], size[0]))
    with torch.inference_mode():
        batch, meta = head.preprocess([to_tensor(image)])
        z = head.encode(batch)
    # An Entropic Student codes its latent against its prior (learned entropy coding); HND students take bits.
    prior = head.prior_tables() if getattr(head, "bottleneck_type", None) == "entropic" else None
    t = time.perf_counter_ns()
    if prior is not None:
        encoded = codec.encode(z, codec.LEARNED_BITS, "channel", codec.LEARNED, prior=prior)
    else:
        encoded = codec.encode(z, bits, "tensor", "zstd", 3)
    encode_ms = (time.perf_counter_ns() - t) / 1e6
    request = pb.InferRequest(request_id="0", weights_fingerprint=fingerprint(model))
    request.bottleneck.CopyFrom(wire.bottleneck_to_proto(encoded, meta))
    return request, encode_ms


def make_small_requests(config: str, seed: int, size: tuple[int, int]):
    """The recommended camera setting's messages: 4 bits at the frame's own size (no resize to 800 px).

    Returns (intra request, key-frame request, delta-frame request): the sample photo resized to ``size``
    (H, W) coded per frame (unary), and as a stream session's key frame and the delta of a second frame of
    the same still scene with sensor noise (Gaussian, 3 levels), coded as ``hnd-edge --key-interval``
    codes it (``StreamEncoder``'s defaults). The delta's ``stream_frame.sequence`` is the caller's to set.
    """
    import cv2
    import numpy as np
    import torch

    from hnd.bench.rate import model_at
    from hnd.common import codec, wire
    from hnd.common.build import build_model_from_config
    from hnd.common.checkpoint import fingerprint
    from hnd.common.config import load_config, with_weights
    from hnd.common.split import split_model
    from hnd.common.stream_codec import StreamEncoder
    from hnd.edge.capture import sample_images
    from hnd.edge.torch_modes import to_tensor
    from hnd.proto.v1 import split_inference_pb2 as pb

    cfg = load_config(config)
    model = build_model_from_config(with_weights(cfg.model, None, seed), cfg.path)
    head, _ = split_model(model_at(model, "native", size))
    image = cv2.resize(sample_images()[0][0], (size[1], size[0]))
    noisy = np.clip(image + np.random.default_rng(0).normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    with torch.inference_mode():
        (z0, meta), (z1, _) = head([to_tensor(image)]), head([to_tensor(noisy)])
    stream = StreamEncoder(4, key_interval=1000, max_clamped=1.0)
    out = []
    for encoded, frame in ((codec.encode(z0, 4), None), *((f.tensor, f) for f in map(stream.encode, (z0, z1)))):
        request = pb.InferRequest(request_id="0", weights_fingerprint=fingerprint(model))
        request.bottleneck.CopyFrom(wire.bottleneck_to_proto(encoded, meta))
        if frame is not None:
            request.stream_frame.CopyFrom(wire.stream_frame_to_proto(frame.kind, frame.key_sequence, frame.sequence))
        out.append(request)
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# Timing clients


class FloorClient:
    """Plain gRPC stub: the same bytes in, a same-sized reply out; unary call or a ping-pong bidi stream."""

    def __init__(self, port: int) -> None:
        from hnd.common.channel import channel_options

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(64 * 1024 * 1024))
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.unary = self.channel.unary_unary(f"/{FLOOR_SERVICE}/Unary")
        stream = self.channel.stream_stream(f"/{FLOOR_SERVICE}/Stream")
        self.requests: queue.Queue = queue.Queue()
        self.responses = stream(iter(self.requests.get, None))

    def call(self, data: bytes) -> None:
        self.unary(data, timeout=30)

    def stream_call(self, data: bytes) -> None:
        self.requests.put(data)
        next(self.responses)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()


@dataclass
class Sample:
    total_ms: float
    compute_ms: float = 0.0
    decode_ms: float = 0.0
    queue_ms: float = 0.0
    encode_ms: float = 0.0

    @property
    def overhead_ms(self) -> float:
        return self.total_ms - self.compute_ms


def time_floor(fn, data: bytes, n: int) -> list[Sample]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn(data)
        out.append(Sample((time.perf_counter_ns() - t) / 1e6))
    return out


def time_hnd(client, request, n: int, stream: bool) -> list[Sample]:
    from hnd.edge.client import next_request_id

    out = []
    for i in range(n):
        request.request_id = next_request_id(i)
        t = time.perf_counter_ns()
        reply = client.submit(request, stream=stream).result()
        total = (reply.done_ns - t) / 1e6
        s = reply.response.timings
        out.append(Sample(total, s.compute_us / 1e3, s.decode_us / 1e3, s.queue_us / 1e3, s.encode_us / 1e3))
    return out


def time_hnd_deltas(client, key, delta, n: int, start: int) -> tuple[list[Sample], int]:
    """``n`` delta frames on the client's stream after ``key`` (sent first, untimed, when ``start`` is 1):
    the same delta each time, renumbered to follow the previous one. Returns (samples, next sequence).
    Raises RuntimeError if the server asks for a key frame (the session was lost: the timings would not be
    of deltas)."""
    from hnd.edge.client import next_request_id

    if start == 1:
        key.request_id = next_request_id(0)
        if client.submit(key, stream=True).result().response.key_frame_required:
            raise RuntimeError("the server keeps no stream session: no delta frames to time")
    out = []
    for i in range(n):
        delta.request_id = next_request_id(start + i)
        delta.stream_frame.sequence = start + i
        t = time.perf_counter_ns()
        reply = client.submit(delta, stream=True).result()
        total = (reply.done_ns - t) / 1e6
        if reply.response.key_frame_required or reply.response.refusal:
            raise RuntimeError(f"delta frame {start + i} was not decoded on its session")
        s = reply.response.timings
        out.append(Sample(total, s.compute_us / 1e3, s.decode_us / 1e3, s.queue_us / 1e3, s.encode_us / 1e3))
    return out, start + n
