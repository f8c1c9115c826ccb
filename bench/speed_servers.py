"""The servers ``python -m hnd.bench.overhead`` and ``python -m hnd.bench.batching`` time, each its own process.

* the **floor**: a plain grpc.aio server answering a same-sized reply (what any Python gRPC service pays);
* **hnd**: ``hnd-server``'s own service on a config's model, its tail real or a stand-in (``parse_tail``:
  ``TrivialTail``, no compute; ``SleepTail``, a GPU's cost shape);
* the **ladder** rungs (``LADDER``): hnd.v1.SplitInference answered part of the way.

A child is ``python -m hnd.bench.overhead --serve NAME ...`` (that CLI's hidden flags; ``child_server`` is
what it runs), started with ``spawn_child`` / ``wait_ready`` (or ``start_child``) and ended with ``stop_child``.
Children go through the overhead module's CLI so that ``--compare-python`` can start another build's server.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any, cast

import grpc

FLOOR_SERVICE = "hnd.bench.Floor"
LADDER = ("proto", "decode", "queue")  # rungs between the floor and the whole hnd server (``--ladder``)


# ---------------------------------------------------------------------------------------------------
# The floor


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


# ---------------------------------------------------------------------------------------------------
# Stand-in tails and the hnd server


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
    while a GPU computes), then the trivial tail's detections. Default: the H100 float32 tail of
    docs/benchmarks/runtime.md (batch 1 in 23.3 ms, batch 8 in 71.4 ms)."""

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


# ---------------------------------------------------------------------------------------------------
# Ladder rungs


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


# ---------------------------------------------------------------------------------------------------
# Child processes


def child_server(args: argparse.Namespace) -> Coroutine[Any, Any, None]:
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
    """SIGTERM, then kill after 10 s (a benchmark child has nothing to drain)."""
    from hnd.server.local import stop_server_process  # hnd and torch only where used, as above

    stop_server_process(proc, timeout_s=10.0)
