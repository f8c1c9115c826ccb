"""Server behaviour that replicas behind a balancer rely on: health flips NOT_SERVING as soon as a
drain starts (before in-flight work ends), open streams end UNAVAILABLE after answering what they
read, and every call names the replica and its weights in its metadata."""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hnd.common import codec, wire
from hnd.common.checkpoint import fingerprint
from hnd.common.split import split_model
from hnd.edge.pipeline import to_tensor
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.server.app import REPLICA_KEY, TAIL_KEY, WEIGHTS_KEY
from hnd.server.healthcheck import check
from hnd.server.service import SERVICE_NAME
from runtime_support import frames, serving

INFER = f"/{SERVICE_NAME}/Infer"
STREAM = f"/{SERVICE_NAME}/InferStream"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


def request_for(model, request_id: str = "r", fp: str | None = None) -> pb.InferRequest:
    head, _ = split_model(model)
    with torch.inference_mode():
        z, meta = head([to_tensor(frames(1)[0])])
    request = pb.InferRequest(request_id=request_id, weights_fingerprint=fingerprint(model) if fp is None else fp)
    request.bottleneck.CopyFrom(wire.bottleneck_to_proto(codec.encode(z), meta))
    return request


def gate_compute(server) -> threading.Event:
    """Hold the server's tail until the returned event is set (so work stays in flight)."""
    gate = threading.Event()
    batcher = server.service.batcher
    compute = batcher.compute

    def gated(payloads):
        assert gate.wait(30), "test never opened the gate"
        return compute(payloads)

    batcher.compute = gated
    return gate


def start_drain(server, grace_s: float = 20.0) -> threading.Thread:
    """Drain the BackgroundServer from another thread, as SIGTERM would."""
    running = server.running
    t = threading.Thread(target=lambda: asyncio.run_coroutine_threadsafe(running.drain(grace_s), server.loop).result())
    t.start()
    return t


def metadata(call_or_error) -> dict[str, str]:
    return dict(call_or_error.trailing_metadata() or ())


def test_health_turns_not_serving_when_drain_starts_before_in_flight_work_ends(model):
    request = request_for(model).SerializeToString()
    with serving(model, health_port=0) as server:
        gate = gate_compute(server)
        target = f"127.0.0.1:{server.port}"
        probe = f"127.0.0.1:{server.running.health_port}"  # what kubelet's gRPC probes dial
        assert check(probe) == "SERVING"
        with grpc.insecure_channel(target) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=30
            )
            statuses: queue.Queue = queue.Queue()

            def follow() -> None:
                try:
                    for reply in watch:
                        statuses.put(reply.status)
                except grpc.RpcError:
                    pass  # cancelled below

            threading.Thread(target=follow, daemon=True).start()
            assert statuses.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING
            in_flight = channel.unary_unary(INFER).future(request, timeout=30)
            deadline = time.monotonic() + 10
            while server.service.batcher.depth == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            drainer = start_drain(server)
            # NOT_SERVING arrives while the request is still held in the tail.
            assert statuses.get(timeout=10) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert check(probe) == "NOT_SERVING"
            assert not in_flight.done()
            watch.cancel()  # an open Watch would hold the drain for its whole grace
            gate.set()
            answer = pb.InferResponse.FromString(in_flight.result(timeout=30))
            assert answer.request_id == "r"  # in-flight work still finished
            drainer.join(timeout=30)
        server.running = None  # already drained


def test_drain_ends_open_streams_unavailable_after_answering_what_was_read(model):
    requests = [request_for(model, f"s{i}") for i in range(2)]
    with serving(model) as server:
        gate = gate_compute(server)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            outbox: queue.Queue = queue.Queue()
            call = channel.stream_stream(STREAM)(iter(outbox.get, None), timeout=60)
            for r in requests:
                outbox.put(r.SerializeToString())
            deadline = time.monotonic() + 10
            while server.service.batcher.depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # let the server read the second message too
            drainer = start_drain(server)
            time.sleep(0.2)
            gate.set()
            answered = []
            with pytest.raises(grpc.RpcError) as exc:
                for raw in call:
                    answered.append(pb.InferResponse.FromString(raw).request_id)
            outbox.put(None)
            drainer.join(timeout=30)
        server.running = None
    assert answered == ["s0", "s1"]
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in exc.value.details()


def test_every_call_names_the_replica_and_its_weights(model):
    with serving(model, replica="replica-a") as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        infer = channel.unary_unary(INFER)
        _, call = infer.with_call(request_for(model).SerializeToString(), timeout=30)
        assert metadata(call) == {REPLICA_KEY: "replica-a", WEIGHTS_KEY: fingerprint(model), TAIL_KEY: "fp32"}
        # A refusal carries them too: the edge names the replica with other weights.
        with pytest.raises(grpc.RpcError) as exc:
            infer(request_for(model, fp="0" * 64).SerializeToString(), timeout=30)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert metadata(exc.value)[REPLICA_KEY] == "replica-a"
        # A stream names them in its initial metadata, before any answer.
        outbox: queue.Queue = queue.Queue()
        stream = channel.stream_stream(STREAM)(iter(outbox.get, None), timeout=30)
        assert dict(stream.initial_metadata())[WEIGHTS_KEY] == fingerprint(model)
        outbox.put(request_for(model, "x").SerializeToString())
        assert pb.InferResponse.FromString(next(stream)).request_id == "x"
        outbox.put(None)
        assert list(stream) == []
    # Default name: host and port, the pod name on Kubernetes.
    with serving(model) as server, grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        _, call = channel.unary_unary(INFER).with_call(request_for(model).SerializeToString(), timeout=30)
        assert metadata(call)[REPLICA_KEY].endswith(f":{server.port}")


def test_health_port_serves_health_only(model):
    with (
        serving(model, health_port=0) as server,
        grpc.insecure_channel(f"127.0.0.1:{server.running.health_port}") as channel,
    ):
        with pytest.raises(grpc.RpcError) as exc:
            channel.unary_unary(INFER)(request_for(model).SerializeToString(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED  # inference never bypasses --port's TLS
