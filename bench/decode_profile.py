"""``python -m hnd.bench.overhead --profile``: the request path's CPU steps timed in process (no transport).

``profile_steps`` times each step from the edge's serialization to its parse of the reply, in path order,
with the server's validate + decode split into its parts and the batch queue's hand-off timed on an event
loop with a do-nothing compute.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np


def profile_steps(request, runner, repeats: int = 50) -> dict[str, float]:
    """Median ms of each CPU step of the request path, in process (no transport), in path order.

    The server's validate + decode is also split into its parts (indented names), and the batch queue's
    hand-off to the compute thread and back is timed on an event loop with a do-nothing compute.
    """
    from hnd.server.batching import Batcher
    from hnd.server.service import BatchingOptions, ServerLimits, SplitInferenceService

    # Every decode on the calling thread, so each step is timed where it runs.
    service = SplitInferenceService(runner, ServerLimits(), BatchingOptions(offload_decode_bytes=None))
    out = {}
    for name, fn in _request_steps(request, service, _RequestParts.of(request, service)).items():
        if fn is None:
            out[name] = _handoff_ms(Batcher(lambda items: [None] * len(items)), repeats)
            continue
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter_ns()
            fn()
            times.append((time.perf_counter_ns() - t) / 1e6)
        out[name] = float(np.median(times))
    return out


@dataclass
class _RequestParts:
    """One request taken apart once, up front: what each profiled step starts from."""

    raw: bytes  # the serialized InferRequest
    parsed: Any  # InferRequest
    payload: Any  # the server's decoded bottleneck
    result: list  # the runner's detections for it
    encoded: Any  # codec.EncodedTensor
    meta: Any  # its SplitMeta
    packed: bytes  # the decompressed, still packed symbols
    quantized: Any  # codec.Quantized
    value: np.ndarray  # the dequantized bottleneck

    @classmethod
    def of(cls, request, service) -> _RequestParts:
        from hnd.common import codec, wire
        from hnd.proto.v1 import split_inference_pb2 as pb

        raw = request.SerializeToString()
        parsed = pb.InferRequest.FromString(raw)
        _, payload = service._decode(parsed)
        result = service.runner.compute([payload])[0]
        encoded, meta = wire.bottleneck_from_proto(parsed.bottleneck, service.limits.codec)
        packed = codec._decompress(encoded)
        symbols = codec._unpack(packed, encoded.bits, encoded.numel)
        quantized = codec.Quantized(
            encoded.shape, encoded.bits, encoded.granularity, encoded.scale, encoded.zero_point, symbols
        )
        return cls(raw, parsed, payload, result, encoded, meta, packed, quantized, codec.dequantize(quantized))


def _request_steps(request, service, p: _RequestParts) -> dict[str, Any]:
    """The profiled steps by name, in path order; None for the batch queue's hand-off (timed apart)."""
    import torch

    from hnd.common import codec, wire
    from hnd.proto.v1 import split_inference_pb2 as pb
    from hnd.server.budget import check_bottleneck_shape, check_split_meta
    from hnd.server.service import filter_detections

    runner, parsed, encoded = service.runner, p.parsed, p.encoded

    def response() -> bytes:
        msg = pb.InferResponse(
            request_id=parsed.request_id,
            detections=[wire.detections_to_proto(filter_detections(d, parsed)) for d in p.result],
        )
        return msg.SerializeToString()

    def budget() -> None:
        check_split_meta(p.meta, service.budget)
        check_bottleneck_shape(encoded.shape, p.meta, runner.channels, runner.bottleneck_type or "hnd")

    # 2- and 4-bit codes of one scale go to floats by a per-byte table (codec.decode), others unpacked first.
    if codec.dequantize_packed(p.packed, encoded) is not None:
        to_floats = {"  packed bytes -> floats (per-byte table)": lambda: codec.dequantize_packed(p.packed, encoded)}
    else:
        to_floats = {
            "  unpack symbols": lambda: codec._unpack(p.packed, encoded.bits, encoded.numel),
            "  dequantize": lambda: codec.dequantize(p.quantized),
        }
    return {
        "edge: serialize request": lambda: request.SerializeToString(),
        "server: parse request": lambda: pb.InferRequest.FromString(p.raw),
        "server: validate + decode": lambda: service._decode(parsed),
        "  proto -> EncodedTensor, validate": lambda: wire.bottleneck_from_proto(parsed.bottleneck),
        "  request budget (sizes, shape)": budget,
        "  codec.validate (again in decode)": lambda: codec.validate(encoded),
        "  zstd decompress": lambda: codec._decompress(encoded),
        **to_floats,
        "  numpy -> torch": lambda: torch.from_numpy(p.value).reshape(encoded.shape),
        "server: batch queue -> compute thread -> loop": None,
        "server: run_split (tail stand-in)": lambda: runner.compute([p.payload]),
        "server: build + serialize response": response,
        "edge: parse response + detections": lambda: [
            wire.detections_from_proto(d) for d in pb.InferResponse.FromString(response()).detections
        ],
    }


def _handoff_ms(batcher, repeats: int) -> float:
    """Median ms of one ``Batcher.submit`` round trip (event loop -> compute thread -> event loop)."""

    async def go() -> float:
        batcher.start()
        times = []
        for i in range(repeats + 5):
            t = time.perf_counter_ns()
            await batcher.submit("k", None, None)
            if i >= 5:
                times.append((time.perf_counter_ns() - t) / 1e6)
        await batcher.stop()
        return float(np.median(times))

    return asyncio.run(go())
