"""The Open Inference Protocol (KServe v2) on hnd-server's port: the offload and tail models answer exactly
what hnd.v1 answers for the same input, through the same validation, budgets and metrics."""

from __future__ import annotations

import struct

import cv2
import grpc
import numpy as np
import pytest
from runtime_support import frames, v1_detections

import hnd
from hnd.common.checkpoint import fingerprint
from hnd.common.codec import CodecSettings
from hnd.common.split import split_model
from hnd.edge.api import make_mode
from hnd.edge.capture import ArrayFrames
from hnd.edge.modes import EdgeOptions
from hnd.proto.inference import grpc_service_pb2 as v2
from hnd.proto.inference import grpc_service_pb2_grpc as v2_grpc
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import split_inference_pb2_grpc as pb_grpc
from hnd.server.kserve import OFFLOAD_MODEL, TAIL_MODEL

CONFIG = "test/faster_rcnn-b3ch"


@pytest.fixture(scope="module")
def server():
    with hnd.serve(CONFIG, device="cpu", max_batch=1, max_original_side=240) as s:
        channel = grpc.insecure_channel(s.target)
        yield s, v2_grpc.GRPCInferenceServiceStub(channel), pb_grpc.SplitInferenceStub(channel)
        channel.close()


def jpeg(image: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def offload_request(data: bytes, raw: bool = True) -> v2.ModelInferRequest:
    request = v2.ModelInferRequest(model_name=OFFLOAD_MODEL, id="a")
    tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1])
    if raw:
        request.raw_input_contents.append(struct.pack("<I", len(data)) + data)
    else:
        tensor.contents.bytes_contents.append(data)
    return request


def outputs(response: v2.ModelInferResponse) -> dict[str, np.ndarray]:
    types = {"FP32": np.float32, "INT64": np.int64, "UINT8": np.uint8}
    return {
        t.name: np.frombuffer(raw, types[t.datatype]).reshape(t.shape)
        for t, raw in zip(response.outputs, response.raw_output_contents)
    }


def assert_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


def test_offload_model_answers_as_hnd_v1_bit_for_bit(server):
    s, stub, v1 = server
    data = jpeg(frames(1)[0])
    v1_answer = v1.Infer(
        pb.InferRequest(request_id="a", image=pb.EncodedImage(format=pb.EncodedImage.FORMAT_JPEG, data=data))
    )
    for raw in (True, False):  # raw_input_contents (tritonclient) or bytes_contents
        answer = stub.ModelInfer(offload_request(data, raw))
        got = outputs(answer)
        assert len(got["scores"]) > 0  # random weights, score threshold 0: something to compare
        assert_equal(got, v1_detections(v1_answer))
        assert answer.model_name == OFFLOAD_MODEL and answer.id == "a"
        assert answer.parameters["compute_us"].int64_param > 0
    registry = s.service.metrics.registry
    assert registry.get_sample_value("hnd_requests_total", {"method": "ModelInfer", "code": "OK"}) == 2


def test_tail_model_answers_as_hnd_v1_bit_for_bit(server, tiny_model):
    _, stub, v1 = server
    model = tiny_model("faster_rcnn")
    head, _ = split_model(model)
    options = EdgeOptions(codec=CodecSettings(bits=8, granularity="tensor", compression="none"))
    prepared = make_mode(options, head, fingerprint(model)).prepare(next(iter(ArrayFrames(frames(1)))))
    request = prepared.request
    t, meta = request.bottleneck.tensor, request.bottleneck.meta
    v1_answer = v1.Infer(request)
    v2_request = v2.ModelInferRequest(model_name=TAIL_MODEL, model_version="1")
    v2_request.inputs.add(name="BOTTLENECK", datatype="UINT8", shape=list(t.shape))
    v2_request.inputs.add(name="IMAGE_SIZE", datatype="INT64", shape=[2])
    v2_request.inputs.add(name="ORIGINAL_SIZE", datatype="INT64", shape=[2])
    v2_request.raw_input_contents.extend(
        [
            t.data,
            np.array([meta.image_sizes[0].height, meta.image_sizes[0].width], np.int64).tobytes(),
            np.array([meta.original_sizes[0].height, meta.original_sizes[0].width], np.int64).tobytes(),
        ]
    )
    v2_request.parameters["scale"].double_param = t.scale[0]
    v2_request.parameters["zero_point"].int64_param = t.zero_point[0]
    v2_request.parameters["weights_fingerprint"].string_param = request.weights_fingerprint
    got = outputs(stub.ModelInfer(v2_request))
    assert len(got["scores"]) > 0
    assert_equal(got, v1_detections(v1_answer))

    v2_request.parameters["weights_fingerprint"].string_param = "0" * 64
    with pytest.raises(grpc.RpcError) as other_weights:
        stub.ModelInfer(v2_request)
    assert other_weights.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    del v2_request.parameters["weights_fingerprint"]
    with pytest.raises(grpc.RpcError) as no_weights:
        stub.ModelInfer(v2_request)
    assert no_weights.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_v2_messages_count_against_the_in_flight_byte_budget():
    """ModelInfer holds its message against max_inflight_message_bytes as hnd.v1's Infer does: one that would
    pass it is refused RESOURCE_EXHAUSTED before any work, and what a call held is given back."""
    with hnd.serve(CONFIG, device="cpu", max_batch=1, max_original_side=240, max_inflight_mib=1) as s:
        with grpc.insecure_channel(s.target) as channel:
            stub = v2_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(offload_request(b"\xff" * (2 << 20)), timeout=60)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_inflight_message_bytes 1048576" in refused.value.details()
            assert len(outputs(stub.ModelInfer(offload_request(jpeg(frames(1)[0])), timeout=120))["scores"]) > 0
        assert s.service.messages.held == 0


def test_bad_requests_get_hnd_v1s_statuses(server):
    s, stub, _ = server

    def code(request: v2.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelInfer(request)
        return exc.value.code(), exc.value.details()

    image = jpeg(frames(1)[0])
    unknown = offload_request(image)
    unknown.model_name = "yolo"
    assert code(unknown)[0] == grpc.StatusCode.NOT_FOUND
    assert code(offload_request(b"GIF89a not an image"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    too_big = jpeg(np.zeros((300, 300, 3), np.uint8))  # beyond max_original_side, as hnd.v1 refuses it
    status, details = code(offload_request(too_big))
    assert status == grpc.StatusCode.INVALID_ARGUMENT and "240" in details
    wrong_type = offload_request(image)
    wrong_type.inputs[0].datatype = "FP32"
    assert code(wrong_type) == (grpc.StatusCode.INVALID_ARGUMENT, "input IMAGE: datatype FP32, expected BYTES")
    refusals = s.service.metrics.registry.get_sample_value(
        "hnd_refusals_total", {"method": "ModelInfer", "code": "INVALID_ARGUMENT", "reason": "original_size"}
    )
    assert refusals == 1


def test_server_and_model_metadata(server):
    _, stub, _ = server
    assert stub.ServerLive(v2.ServerLiveRequest()).live and stub.ServerReady(v2.ServerReadyRequest()).ready
    assert stub.ModelReady(v2.ModelReadyRequest(name=TAIL_MODEL)).ready
    assert not stub.ModelReady(v2.ModelReadyRequest(name="yolo")).ready
    assert stub.ServerMetadata(v2.ServerMetadataRequest()).name == "hnd"
    meta = stub.ModelMetadata(v2.ModelMetadataRequest(name=OFFLOAD_MODEL))
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("IMAGE", "BYTES", [1])]
    assert [t.name for t in meta.outputs] == ["boxes", "labels", "scores"]
    index = stub.RepositoryIndex(v2.RepositoryIndexRequest())
    assert sorted((m.name, m.state) for m in index.models) == [(OFFLOAD_MODEL, "READY"), (TAIL_MODEL, "READY")]
    config = stub.ModelConfig(v2.ModelConfigRequest(name=TAIL_MODEL)).config
    assert [i.name for i in config.input] == ["BOTTLENECK", "IMAGE_SIZE", "ORIGINAL_SIZE"]


@pytest.mark.parametrize("kind", ["mask_rcnn", "keypoint_rcnn"])
def test_mask_and_keypoint_outputs_equal_hnd_v1s_and_the_apis(kind):
    """Mask R-CNN adds masks UINT8 [N, H, W], Keypoint R-CNN keypoints FP32 [N, K, 3] and keypoint_scores;
    the same arrays as hnd.v1's answer decoded, and as hnd.connect's Detection."""
    from hnd.common import wire

    config = f"test/{kind}-b3ch"
    image = frames(1)[0]
    data = jpeg(image)
    with hnd.serve(config, device="cpu") as s:
        channel = grpc.insecure_channel(s.target)
        v2_stub, v1_stub = v2_grpc.GRPCInferenceServiceStub(channel), pb_grpc.SplitInferenceStub(channel)
        got = outputs(v2_stub.ModelInfer(offload_request(data)))
        v1 = v1_stub.Infer(pb.InferRequest(image=pb.EncodedImage(format=pb.EncodedImage.FORMAT_JPEG, data=data)))
        channel.close()
        with hnd.connect(s.target, config=config, random_weights=0, mode="offload", image_format="png") as d:
            det = d.detect(image)
    want = wire.detections_from_proto(v1.detections[0])
    n = len(want["scores"])
    assert n > 0 and got["scores"].tobytes() == want["scores"].tobytes()
    if kind == "mask_rcnn":
        assert got["masks"].dtype == np.uint8 and got["masks"].shape == (n, *image.shape[:2])
        assert got["masks"].tobytes() == want["masks"].tobytes()
        assert det.masks.dtype == np.uint8 and det.masks.shape == (len(det), *image.shape[:2])
        assert det.keypoints is None
    else:
        assert got["keypoints"].shape == (n, want["keypoints"].shape[1], 3)
        assert got["keypoints"].tobytes() == want["keypoints"].tobytes()
        assert got["keypoint_scores"].tobytes() == want["keypoints_scores"].tobytes()
        assert det.keypoints.dtype == np.float32 and det.keypoints.shape[2] == 3 and det.masks is None


def test_a_draining_server_is_not_ready_over_v2():
    """ServerReady / ModelReady / the repository index follow the drain (health NOT_SERVING) as hnd.v1 does."""
    with hnd.serve(CONFIG, device="cpu") as s:
        channel = grpc.insecure_channel(s.target)
        stub = v2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerReady(v2.ServerReadyRequest()).ready
        s.service.begin_drain()
        assert not stub.ServerReady(v2.ServerReadyRequest()).ready
        assert not stub.ModelReady(v2.ModelReadyRequest(name=OFFLOAD_MODEL)).ready
        assert {m.state for m in stub.RepositoryIndex(v2.RepositoryIndexRequest()).models} == {"UNAVAILABLE"}
        assert stub.ServerLive(v2.ServerLiveRequest()).live  # alive while it drains
        channel.close()
