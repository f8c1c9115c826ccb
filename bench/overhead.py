"""python -m hnd.bench.overhead: hnd's runtime overhead next to the plain gRPC floor, in one run.

    python -m hnd.bench.overhead                         # HND Faster R-CNN 3ch, a 640x480 frame, 8-bit + zstd
    python -m hnd.bench.overhead --requests 300 --json overhead.json

Two servers run as their own processes on loopback, side by side, and are measured in alternating rounds
so machine load hits both alike:

* **floor**: a grpc.aio server (the transport hnd-server uses) whose handlers take the request bytes and
  answer with a reply of the same size as hnd's response: what any Python gRPC service pays.
* **hnd**: ``hnd-server``'s own service (validation, codec.decode, batching queue, compute thread,
  response encoding) on the real model's fingerprint, shapes and limits, with the tail replaced by a
  trivial one that returns a fixed set of detections (``--tail trivial``, the default), so the model's
  compute does not drown the runtime's cost; ``--tail real`` runs the real tail.

The client side is the edge's own ``SplitClient`` (unary ``Infer`` and ``InferStream``, one request in
flight) against a plain gRPC stub sending the same bytes (unary call and a bidi stream, ping-pong).

``overhead = end-to-end - server compute`` per request: the request's serialization, transport, server
parse / validation / decode, batch queue, compute-thread hand-offs, response encoding and the client's
reply handling. The target is overhead p50 <= 2x the floor's p50 at the same message size.
``--profile`` adds an in-process breakdown of the CPU steps on both sides (no transport).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, cast

import grpc
import numpy as np

from hnd.common.files import atomic_write_json
from hnd.common.timing import percentiles
from hnd.proto.v1 import tensor_pb2

FLOOR_SERVICE = "hnd.bench.Floor"
LEARNED = tensor_pb2.COMPRESSION_LEARNED  # an Entropic Student's request
TARGET_RATIO = 2.0
DEFAULT_CONFIG = "hnd/faster_rcnn-b3ch"


# ---------------------------------------------------------------------------------------------------
# Servers (child processes)


def _floor_handler(reply: bytes) -> grpc.GenericRpcHandler:
    async def unary(raw: bytes, context) -> bytes:
        return reply

    async def stream(request_iterator, context):
        async for _ in request_iterator:
            yield reply

    return grpc.method_handlers_generic_handler(
        FLOOR_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.stream_stream_rpc_method_handler(stream),
        },
    )


async def _serve_floor(port: int, reply_bytes: int) -> None:
    from hnd.common.channel import channel_options

    server = grpc.aio.server(options=channel_options(64 * 1024 * 1024))
    server.add_generic_rpc_handlers((_floor_handler(b"\x00" * reply_bytes),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


class TrivialTail:
    """Stands in for the tail: ``n`` fixed detections per image, no compute (so only the runtime is timed).

    Called as the real one: (z [B, C, h, w], SplitMeta) -> B dicts of boxes [n, 4], labels [n], scores [n].
    """

    def __init__(self, detections: int = 100) -> None:
        import torch

        g = torch.Generator().manual_seed(0)
        self.dets = {
            "boxes": torch.rand(detections, 4, generator=g) * 400,
            "labels": torch.randint(1, 91, (detections,), generator=g),
            "scores": torch.rand(detections, generator=g),
        }

    def __call__(self, z, meta) -> list[dict]:
        return [dict(self.dets) for _ in range(z.shape[0])]


class SleepTail(TrivialTail):
    """A stand-in with a GPU's cost shape: ``base_ms + per_image_ms * B`` of waiting (the GIL released, as
    while a GPU computes), then the trivial tail's detections. Default: the H100 float32 tail of the README
    (batch 1 in 23.3 ms, batch 8 in 71.4 ms)."""

    def __init__(self, base_ms: float = 16.4, per_image_ms: float = 6.9, detections: int = 100) -> None:
        super().__init__(detections)
        self.base_s, self.per_image_s = base_ms / 1e3, per_image_ms / 1e3

    def __call__(self, z, meta) -> list[dict]:
        time.sleep(self.base_s + self.per_image_s * z.shape[0])
        return super().__call__(z, meta)


def parse_tail(tail: str, detections: int = 100):
    """``trivial`` | ``real`` | ``sleep`` | ``sleep:BASE,PER_IMAGE`` (ms) -> the stand-in, or None for the real tail."""
    if tail == "real":
        return None
    if tail == "trivial":
        return TrivialTail(detections)
    if tail == "sleep" or tail.startswith("sleep:"):
        args = [float(v) for v in tail.split(":", 1)[1].split(",")] if ":" in tail else []
        if len(args) > 2:
            raise ValueError(f"sleep tail takes BASE_MS,PER_IMAGE_MS, got {tail!r}")
        base, per_image = (args + [16.4, 6.9][len(args) :])[:2]
        return SleepTail(base, per_image, detections)
    raise ValueError(f"unknown tail {tail!r}: trivial, real, sleep or sleep:BASE_MS,PER_IMAGE_MS")


def build_runner(config: str, seed: int, tail: str, detections: int):
    """The hnd-server ModelRunner for ``config`` (seeded weights), its tail real or a stand-in (``parse_tail``)."""
    import torch

    from hnd.common.config import load_config, with_weights
    from hnd.common.build import build_model_from_config
    from hnd.server.service import ModelRunner

    torch.set_num_threads(1)
    cfg = load_config(config)
    runner = ModelRunner(build_model_from_config(with_weights(cfg.model, None, seed), cfg.path), torch.device("cpu"))
    stand_in = parse_tail(tail, detections)
    if stand_in is not None:
        runner.tail = stand_in
    return runner


async def _serve_hnd(
    port: int,
    config: str,
    seed: int,
    tail: str,
    detections: int,
    max_batch: int = 8,
    max_delay_ms: float = 0.0,
    offload_decode_bytes: int | None = -1,
) -> None:
    """hnd-server's own service on ``port``; ``offload_decode_bytes`` -1: the server's default, None: never."""
    from hnd.server.app import ServerSettings, start_server
    from hnd.server.service import OFFLOAD_DECODE_BYTES, BatchingOptions

    runner = build_runner(config, seed, tail, detections)
    offload = OFFLOAD_DECODE_BYTES if offload_decode_bytes == -1 else offload_decode_bytes
    batching = BatchingOptions(max_batch=max_batch, max_delay_ms=max_delay_ms, offload_decode_bytes=offload)
    settings = ServerSettings(port=port, batching=batching)
    running = await start_server(runner, settings)
    print("ready", flush=True)
    await running.server.wait_for_termination()


LADDER = ("proto", "decode", "queue")  # rungs between the floor and the whole hnd server (``--ladder``)


def _ladder_handler(step: str, service, template) -> grpc.GenericRpcHandler:
    """hnd.v1.SplitInference answered part of the way: ``proto`` parses the request and answers a prebuilt
    response (hnd's call metadata, request id and detections); ``decode`` also validates and decodes the
    bottleneck exactly as hnd-server does (to a torch tensor); ``queue`` also passes it through hnd's batch
    queue to the compute thread and back (``service.batcher``, whose compute does nothing). Then each answers
    the prebuilt response: no response built from tensors, no metrics, stream messages one at a time."""
    from hnd.proto.v1 import split_inference_pb2 as pb
    from hnd.server.service import SERVICE_NAME, DeferredDecode

    async def answer(raw: bytes) -> pb.InferResponse:
        request = pb.InferRequest.FromString(raw)
        if step in ("decode", "queue"):
            key, payload = service._decode(request)
            if isinstance(payload, DeferredDecode):  # a large or learned-coded bottleneck, as hnd-server does
                payload = await service._decode_off_loop(payload)
            if step == "queue":
                await service.batcher.submit(key, payload, None)
        reply = pb.InferResponse()
        reply.CopyFrom(template)
        reply.request_id = request.request_id
        return reply

    async def unary(raw: bytes, context) -> pb.InferResponse:
        context.set_trailing_metadata(service.call_metadata)
        return await answer(raw)

    async def stream(request_iterator, context):
        await context.send_initial_metadata(service.call_metadata)
        context.set_trailing_metadata(service.call_metadata)
        async for raw in request_iterator:
            yield await answer(raw)

    async def info(raw: bytes, context) -> pb.ModelInfo:
        return service.model_info()

    serialize = pb.InferResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Infer": grpc.unary_unary_rpc_method_handler(unary, response_serializer=serialize),
            "InferStream": grpc.stream_stream_rpc_method_handler(stream, response_serializer=serialize),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                info, response_serializer=pb.ModelInfo.SerializeToString
            ),
        },
    )


async def _serve_ladder(port: int, step: str, config: str, seed: int, detections: int) -> None:
    from hnd.common import wire
    from hnd.common.channel import channel_options
    from hnd.proto.v1 import split_inference_pb2 as pb
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from hnd.server.service import SERVICE_NAME, BatchingOptions, ServerLimits, SplitInferenceService

    runner = build_runner(config, seed, "trivial", detections)
    service = SplitInferenceService(runner, ServerLimits(), BatchingOptions())  # its checks (and batcher)
    service.name_replica(f"ladder-{step}:{port}")
    service.batcher.compute = lambda payloads: [None] * len(payloads)
    service.batcher.start()
    template = pb.InferResponse(detections=[wire.detections_to_proto(d) for d in runner.tail(torch_zeros(), None)])
    server = grpc.aio.server(options=channel_options(ServerLimits().max_message_bytes))
    server.add_generic_rpc_handlers((_ladder_handler(step, service, template),))
    health_servicer = health.aio.HealthServicer()  # the edge's channel watches it (client-side health checking)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def torch_zeros():
    """A [1, 1] tensor: the trivial tail only reads the batch size."""
    import torch

    return torch.zeros(1, 1)


def start_child(args: list[str], timeout_s: float = 300.0, python: str | None = None) -> subprocess.Popen:
    """``python -m hnd.bench.overhead ARGS`` (``python``: another interpreter, e.g. another build's venv), ready."""
    return wait_ready(spawn_child(args, python), timeout_s)


def spawn_child(args: list[str], python: str | None = None) -> subprocess.Popen:
    """``python -m hnd.bench.overhead ARGS``, started; ``wait_ready`` waits for its server."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [python or sys.executable, "-m", "hnd.bench.overhead", *args], stdout=subprocess.PIPE, env=env, text=True
    )
    return proc


def wait_ready(proc: subprocess.Popen, timeout_s: float = 300.0) -> subprocess.Popen:
    """``proc`` once its server printed "ready"; RuntimeError when it exits or takes over ``timeout_s``."""
    args = [str(a) for a in cast(list, proc.args)[3:]]  # after python -m hnd.bench.overhead
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == "ready":
            return proc
        if proc.poll() is not None:
            raise RuntimeError(f"benchmark server {args[:2]} exited with code {proc.returncode}")
    proc.kill()
    raise RuntimeError(f"benchmark server {args[:2]} not ready within {timeout_s:.0f} s")


def stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# ---------------------------------------------------------------------------------------------------
# The request


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


# ---------------------------------------------------------------------------------------------------
# Clients


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


def _time_floor(fn, data: bytes, n: int) -> list[Sample]:
    out = []
    for _ in range(n):
        t = time.perf_counter_ns()
        fn(data)
        out.append(Sample((time.perf_counter_ns() - t) / 1e6))
    return out


def _time_hnd(client, request, n: int, stream: bool) -> list[Sample]:
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


# ---------------------------------------------------------------------------------------------------
# In-process profile of the CPU steps


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
    from hnd.server.service import _filter_detections

    runner, parsed, encoded = service.runner, p.parsed, p.encoded

    def response() -> bytes:
        msg = pb.InferResponse(
            request_id=parsed.request_id,
            detections=[wire.detections_to_proto(_filter_detections(d, parsed)) for d in p.result],
        )
        return msg.SerializeToString()

    def budget() -> None:
        check_split_meta(p.meta, service.budget)
        check_bottleneck_shape(encoded.shape, p.meta, runner.channels, runner.bottleneck_type or "hnd")

    return {
        "edge: serialize request": lambda: request.SerializeToString(),
        "server: parse request": lambda: pb.InferRequest.FromString(p.raw),
        "server: validate + decode": lambda: service._decode(parsed),
        "  proto -> EncodedTensor, validate": lambda: wire.bottleneck_from_proto(parsed.bottleneck),
        "  request budget (sizes, shape)": budget,
        "  codec.validate (again in decode)": lambda: codec.validate(encoded),
        "  zstd decompress": lambda: codec._decompress(encoded),
        "  unpack symbols": lambda: codec._unpack(p.packed, encoded.bits, encoded.numel),
        "  dequantize": lambda: codec.dequantize(p.quantized),
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


# ---------------------------------------------------------------------------------------------------
# Run


def run(
    config: str = DEFAULT_CONFIG,
    seed: int = 0,
    bits: int = 8,
    size: tuple[int, int] = (480, 640),
    requests: int = 200,
    rounds: int = 5,
    warmup: int = 20,
    tail: str = "trivial",
    detections: int = 100,
    profile: bool = False,
    compare_python: str | None = None,
    ladder: bool = False,
) -> dict[str, Any]:
    """Measure the floor and hnd side by side; returns the result dict (see ``format_table``).

    ``compare_python``: also run the hnd server of another build (that interpreter's installed ``hnd``, which
    must have this module) in the same alternating rounds, e.g. the code before a change.
    ``ladder``: also run the rungs of ``LADDER`` (``_ladder_handler``) in the same rounds, so the cost of
    each part of hnd's request path is measured end to end: floor -> proto -> decode -> hnd.
    """
    from hnd.server.local import free_port

    request, encode_ms = make_request(config, seed, bits, size)
    message = request.SerializeToString()  # its size before the timed calls renumber the request
    servers = _spawn_servers(config, seed, tail, detections, compare_python, ladder)
    try:
        clients = _connect(servers)
        reply_bytes = clients["hnd"].submit(request).result().response.ByteSize()
        floor_port = free_port()
        servers.floor = start_child(["--serve", "floor", "--port", str(floor_port), "--reply-bytes", str(reply_bytes)])
        fc = FloorClient(floor_port)
        per_round = max(1, requests // rounds)
        samples = _alternate_rounds(fc, clients, request, message, warmup, rounds, per_round)
        fc.close()
        for c in clients.values():
            c.close()
    finally:
        servers.stop()

    result = _describe_run(config, tail, bits, size, request, message, reply_bytes, encode_ms, per_round * rounds)
    _add_figures(result, samples, compare_python, ladder)
    if profile:
        result["profile_ms"] = profile_steps(request, build_runner(config, seed, tail, detections))
    return result


@dataclass
class _Servers:
    """The benchmark's hnd server processes by name ("hnd", "compare", the ``LADDER`` rungs), their ports,
    and the floor server once it is started."""

    ports: dict[str, int]
    children: dict[str, subprocess.Popen]
    floor: subprocess.Popen | None = None

    def stop(self) -> None:
        for child in (self.floor, *self.children.values()):
            if child is not None:
                stop_child(child)


def _spawn_servers(
    config: str, seed: int, tail: str, detections: int, compare_python: str | None, ladder: bool
) -> _Servers:
    """Starts hnd's server (and the compare build's, and the ladder rungs) without waiting for them."""
    from hnd.server.local import free_port

    common = ["--config", config, "--seed", str(seed), "--detections", str(detections)]
    # The servers start side by side (each imports torch and builds the model), then answer one by one.
    ports = {"hnd": free_port()}
    children = {"hnd": spawn_child(["--serve", "hnd", "--port", str(ports["hnd"]), "--tail", tail, *common])}
    if compare_python:
        ports["compare"] = free_port()
        children["compare"] = spawn_child(
            ["--serve", "hnd", "--port", str(ports["compare"]), "--tail", tail, *common], python=compare_python
        )
    for step in LADDER if ladder else ():
        ports[step] = free_port()
        children[step] = spawn_child([f"--serve=ladder-{step}", "--port", str(ports[step]), *common])
    return _Servers(ports, children)


def _connect(servers: _Servers) -> dict[str, Any]:
    """An edge ``SplitClient`` per server, by the same name, once that server is ready (model info fetched)."""
    from hnd.edge.client import ClientSettings, SplitClient

    clients = {}
    for name, proc in servers.children.items():
        wait_ready(proc)
        clients[name] = SplitClient(ClientSettings(f"127.0.0.1:{servers.ports[name]}"))
        clients[name].model_info()
    return clients


def _alternate_rounds(
    fc: FloorClient, clients: dict[str, Any], request, message: bytes, warmup: int, rounds: int, per_round: int
) -> dict[str, list[Sample]]:
    """Samples keyed "NAME unary" / "NAME stream" (NAME: floor, then each client's name), measured in
    ``rounds`` alternating rounds of ``per_round`` requests each after ``warmup`` untimed ones."""
    # Warm both (connections, stream set-up, allocator), then alternate short rounds of each.
    _time_floor(fc.call, message, warmup)
    _time_floor(fc.stream_call, message, warmup)
    for c in clients.values():
        _time_hnd(c, request, warmup, False)
        _time_hnd(c, request, warmup, True)
    samples: dict[str, list[Sample]] = {f"{k} {call}": [] for k in ("floor", *clients) for call in ("unary", "stream")}
    for _ in range(rounds):
        samples["floor unary"] += _time_floor(fc.call, message, per_round)
        for name, c in clients.items():
            samples[f"{name} unary"] += _time_hnd(c, request, per_round, False)
        samples["floor stream"] += _time_floor(fc.stream_call, message, per_round)
        for name, c in clients.items():
            samples[f"{name} stream"] += _time_hnd(c, request, per_round, True)
    return samples


def _describe_run(
    config: str,
    tail: str,
    bits: int,
    size: tuple[int, int],
    request,
    message: bytes,
    reply_bytes: int,
    encode_ms: float,
    requests_per_mode: int,
) -> dict[str, Any]:
    """The result's header: what was sent and on what machine; ``modes`` is filled by ``_add_figures``."""
    return {
        "config": config,
        "tail": tail,
        "message_bytes": len(message),
        "reply_bytes": reply_bytes,
        "payload_bytes": len(request.bottleneck.tensor.data),
        "bits": bits,
        "codec": "learned entropy coding" if request.bottleneck.tensor.compression == LEARNED else f"{bits}-bit + zstd",
        "frame": list(size),
        "edge_codec_encode_ms": encode_ms,
        "requests_per_mode": requests_per_mode,
        "modes": {},
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }


def _add_figures(
    result: dict[str, Any], samples: dict[str, list[Sample]], compare_python: str | None, ladder: bool
) -> None:
    """Fills ``result`` with the ``_figures`` of hnd (and the compare build, and each ladder rung) vs the floor."""
    if compare_python:
        result["compare"] = {"python": compare_python, "modes": {}}
    for call in ("unary", "stream"):
        result["modes"][call] = _figures(samples[f"floor {call}"], samples[f"hnd {call}"])
        if compare_python:
            result["compare"]["modes"][call] = _figures(samples[f"floor {call}"], samples[f"compare {call}"])
    if ladder:
        result["ladder"] = {
            step: {call: _figures(samples[f"floor {call}"], samples[f"{step} {call}"]) for call in ("unary", "stream")}
            for step in LADDER
        }


def loop_probe(
    config: str = DEFAULT_CONFIG,
    seed: int = 0,
    bits: int = 8,
    size: tuple[int, int] = (480, 640),
    seconds: float = 5.0,
    probe_interval_ms: float = 5.0,
    policies: tuple[str, ...] = ("server default", "always on the loop", "always off the loop"),
) -> dict[str, Any]:
    """Does decoding off the event loop pay? For the server's default policy, and for decoding always on and
    always off the loop (each its own server process, one after the other): one edge sends the request back to back
    (unary) for ``seconds`` while a second client calls GetModelInfo every ``probe_interval_ms``; a decode on
    the loop makes that call wait. Returns Infer p50 and the probe's p50 / p99 / max (ms) per policy."""
    from hnd.edge.client import ClientSettings, SplitClient
    from hnd.server.local import free_port
    from hnd.server.service import OFFLOAD_DECODE_BYTES

    request, _ = make_request(config, seed, bits, size)
    tensor = request.bottleneck.tensor
    out: dict[str, Any] = {
        "config": config,
        "payload_bytes": len(tensor.data),
        "raw_bytes": tensor.raw_size,
        "learned": tensor.compression == LEARNED,
        "offload_decode_bytes": OFFLOAD_DECODE_BYTES,
        "policies": {},
    }
    settings = {"server default": "-1", "always on the loop": "none", "always off the loop": "0"}
    for name in policies:
        offload = settings[name]
        port = free_port()
        proc = start_child(
            ["--serve", "hnd", "--port", str(port), "--config", config, "--seed", str(seed)]
            + ["--offload-decode-bytes", offload]
        )
        try:
            edge, probe = (SplitClient(ClientSettings(f"127.0.0.1:{port}")) for _ in range(2))
            edge.model_info()
            probe.model_info()
            edge.submit(request).result()  # warm
            stop_at = time.monotonic() + seconds
            infer_ms: list[float] = []
            sender = threading.Thread(target=_send_until, args=(edge, request, stop_at, infer_ms), daemon=True)
            sender.start()
            waits = []
            while time.monotonic() < stop_at:
                t = time.perf_counter_ns()
                probe.model_info()
                waits.append((time.perf_counter_ns() - t) / 1e6)
                time.sleep(probe_interval_ms / 1e3)
            sender.join()
            edge.close()
            probe.close()
        finally:
            stop_child(proc)
        out["policies"][name] = {
            "infer_ms_p50": float(np.median(infer_ms)),
            "infers": len(infer_ms),
            "probe_ms": {**percentiles(waits, (50, 99)), "max": max(waits)},
            "probes": len(waits),
        }
    return out


def _send_until(client, request, stop_at: float, out: list[float]) -> None:
    """Unary requests back to back until ``stop_at`` (monotonic); appends each one's ms to ``out``."""
    while time.monotonic() < stop_at:
        t = time.perf_counter_ns()
        reply = client.submit(request).result()
        out.append((reply.done_ns - t) / 1e6)


def format_probe(r: dict[str, Any]) -> str:
    kind = "learned entropy coding" if r["learned"] else f"affine, {r['raw_bytes']:,} B packed"
    lines = [
        f"{r['config']}: payload {r['payload_bytes']:,} B ({kind}); server default: off the loop from "
        f"{r['offload_decode_bytes']:,} B packed and for learned coding"
    ]
    for name, p in r["policies"].items():
        q = p["probe_ms"]
        lines.append(
            f"  decode {name:<20} Infer p50 {p['infer_ms_p50']:8.2f} ms ({p['infers']} calls)   GetModelInfo meanwhile "
            f"p50 {q['p50']:.2f} / p99 {q['p99']:.2f} / max {q['max']:.2f} ms ({p['probes']} calls)"
        )
    return "\n".join(lines)


def _figures(f: list[Sample], h: list[Sample]) -> dict[str, Any]:
    """Floor and hnd figures of one call type: percentiles, server stages, ratio of the p50s, target."""
    floor_p = percentiles([s.total_ms for s in f])
    over_p = percentiles([s.overhead_ms for s in h])
    return {
        "floor_ms": floor_p,
        "hnd_total_ms": percentiles([s.total_ms for s in h]),
        "hnd_overhead_ms": over_p,
        "server_ms": {
            k: percentiles([getattr(s, f"{k}_ms") for s in h], (50,))["p50"]
            for k in ("decode", "queue", "compute", "encode")
        },
        "ratio_p50": over_p["p50"] / floor_p["p50"],
        "target_met": over_p["p50"] <= TARGET_RATIO * floor_p["p50"],
    }


def format_table(r: dict[str, Any]) -> str:
    lines = [
        f"{r['config']} ({r['tail']} tail), frame {r['frame'][1]}x{r['frame'][0]}, {r.get('codec', 'zstd')}: "
        f"request {r['message_bytes']:,} B (payload {r['payload_bytes']:,} B), reply {r['reply_bytes']:,} B, "
        f"{r['requests_per_mode']} requests per mode, one in flight; load average {r['load_average']:.1f} on "
        f"{r['cpus']} CPUs",
        f"{'call':<8}{'floor p50/p95 ms':>20}{'hnd total p50/p95':>20}{'hnd overhead p50/p95':>23}"
        f"{'server dec/queue/comp/enc p50':>32}{'overhead/floor':>16}  target <= {TARGET_RATIO:g}x",
    ]
    rows = [(call, m) for call, m in r["modes"].items()]
    rows += [(f"{call}*", m) for call, m in r.get("compare", {}).get("modes", {}).items()]
    for call, m in rows:
        f, t, o, s = m["floor_ms"], m["hnd_total_ms"], m["hnd_overhead_ms"], m["server_ms"]
        server = f"{s['decode']:.2f}/{s['queue']:.2f}/{s['compute']:.2f}/{s['encode']:.2f}"
        lines.append(
            f"{call:<8}{f['p50']:>11.2f} / {f['p95']:<6.2f}{t['p50']:>11.2f} / {t['p95']:<6.2f}"
            f"{o['p50']:>14.2f} / {o['p95']:<6.2f}{server:>32}{m['ratio_p50']:>15.2f}x  "
            f"{'met' if m['target_met'] else 'NOT met'}"
        )
    if "compare" in r:
        lines.append(f"* the same against the hnd server of {r['compare']['python']}")
    if "ladder" in r:
        lines.append("end to end p50 ms, measured in the same rounds (each rung adds a part of hnd's request path):")
        lines.append(
            f"  {'call':<8}{'floor':>8}{'+ proto in/out':>16}{'+ validate/decode':>19}{'+ batch queue':>15}{'hnd':>8}"
        )
        for call in ("unary", "stream"):
            m = r["modes"][call]
            p = [r["ladder"][step][call]["hnd_total_ms"]["p50"] for step in LADDER]
            lines.append(
                f"  {call:<8}{m['floor_ms']['p50']:>8.2f}{p[0]:>16.2f}{p[1]:>19.2f}{p[2]:>15.2f}"
                f"{m['hnd_total_ms']['p50']:>8.2f}"
            )
    if "profile_ms" in r:
        lines.append("in-process CPU steps (median ms):")
        lines += [f"  {k:<46}{v:>8.3f}" for k, v in r["profile_ms"].items()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.overhead", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--seed", type=int, default=0, help="seeded random weights (both sides)")
    p.add_argument("--bits", type=int, default=8)
    p.add_argument("--frame", default="480x640", help="HxW the sample photo is resized to (default 480x640)")
    p.add_argument("--requests", type=int, default=200, help="timed requests per mode")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds the requests are split into")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--tail", default="trivial", help="trivial (default) | real | sleep[:BASE_MS,PER_IMAGE_MS]")
    p.add_argument("--detections", type=int, default=100, help="detections the trivial tail returns per image")
    p.add_argument("--profile", action="store_true", help="add an in-process breakdown of the CPU steps")
    p.add_argument(
        "--compare-python",
        metavar="PYTHON",
        help="also measure the hnd server of another build (its venv's python) in the same rounds",
    )
    p.add_argument(
        "--ladder",
        action="store_true",
        help="also time servers that do only part of hnd's path (proto in/out; + validate/decode) in the same rounds",
    )
    p.add_argument(
        "--loop-probe",
        action="store_true",
        help="instead: does decoding off the event loop pay? GetModelInfo latency while the request decodes, "
        "server default vs always on / always off the loop",
    )
    p.add_argument("--seconds", type=float, default=5.0, help="--loop-probe: seconds per policy")
    p.add_argument("--json", help="write the result as JSON")
    # Child-process entry points (used by run()).
    p.add_argument("--serve", choices=("floor", "hnd", *(f"ladder-{s}" for s in LADDER)), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--reply-bytes", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--max-delay-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--offload-decode-bytes", default="-1", help=argparse.SUPPRESS)  # -1 default, none: never
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.serve:  # a child process: serve until terminated
        asyncio.run(_child_server(args))
        return 0
    try:
        h, w = (int(v) for v in args.frame.lower().split("x"))
    except ValueError:
        p.error(f"--frame must be HxW, got {args.frame!r}")
    if args.loop_probe:
        probe = loop_probe(args.config, args.seed, args.bits, (h, w), args.seconds)
        print(format_probe(probe))
        if args.json:
            atomic_write_json(args.json, probe)
        return 0
    result = run(
        args.config,
        args.seed,
        args.bits,
        (h, w),
        args.requests,
        args.rounds,
        args.warmup,
        args.tail,
        args.detections,
        args.profile,
        args.compare_python,
        args.ladder,
    )
    print(format_table(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _child_server(args: argparse.Namespace) -> Coroutine[Any, Any, None]:
    """The server ``--serve`` names (floor, hnd or a ladder rung), to run on an event loop."""
    if args.serve == "floor":
        return _serve_floor(args.port, args.reply_bytes)
    if args.serve.startswith("ladder-"):
        return _serve_ladder(args.port, args.serve.split("-", 1)[1], args.config, args.seed, args.detections)
    offload = None if args.offload_decode_bytes == "none" else int(args.offload_decode_bytes)
    return _serve_hnd(
        args.port,
        args.config,
        args.seed,
        args.tail,
        args.detections,
        args.max_batch,
        args.max_delay_ms,
        offload,
    )


if __name__ == "__main__":
    sys.exit(main())
