"""Tail execution options (hnd.server.accel): exactness per option, CUDA-only refusals, compile buckets, reporting."""

from __future__ import annotations

import copy

import cv2
import grpc
import pytest
import numpy as np
import torch

from hnd.bench.agreement import detection_agreement
from hnd.common.checkpoint import fingerprint
from hnd.common.split import Tail, split_model
from hnd.edge.capture import sample_images
from hnd.edge.client import ClientSettings, SplitClient
from hnd.edge.torch_modes import to_tensor
from hnd.server import accel
from hnd.server import cli as server_cli
from hnd.server.accel import AccelError, AcceleratedTail, TailOptions, batch_bucket, build_tail, check_options
from hnd.server.app import TAIL_KEY, BackgroundServer, ServerSettings
from hnd.server.service import BatchingOptions, ModelRunner

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def photos() -> list[torch.Tensor]:
    """Two scikit-image photos at half size (natural images: detections of a real scene's statistics)."""
    out = []
    for img in sample_images()[0][:2]:
        out.append(to_tensor(cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2))))
    return out


@torch.inference_mode()
def _bottlenecks(model, photos):
    head, tail = split_model(model)
    return tail, [head([p]) for p in photos]


@torch.inference_mode()
def _run(tail, zs):
    return [tail(z, meta)[0] for z, meta in zs]


def test_default_options_serve_the_plain_tail(tiny_model):
    model = tiny_model("faster_rcnn")
    _, tail = split_model(model)
    assert build_tail(tail, TailOptions(), CPU) is tail
    runner = ModelRunner(model, CPU)
    assert isinstance(runner.tail, Tail)
    assert runner.tail_info["summary"] == "fp32" and runner.tail_info["fp32_part"] == "everything"


@pytest.mark.parametrize("kind", ("faster_rcnn", "keypoint_rcnn"))
def test_dense_split_of_the_tail_is_bit_exact(tiny_model, photos, kind):
    """AcceleratedTail runs the RPN in two parts (head inside the dense part); with fp32 eager it equals Tail."""
    tail, zs = _bottlenecks(tiny_model(kind), photos)
    want = _run(tail, zs)
    got = _run(AcceleratedTail(tail, TailOptions(), CPU), zs)
    assert sum(len(w["scores"]) for w in want) > 0
    for w, g in zip(want, got):
        assert w.keys() == g.keys()
        for k in w:
            assert torch.equal(w[k], g[k]), k


def test_channels_last_fp32_is_within_float_rounding(tiny_model, photos):
    model = copy.deepcopy(tiny_model("faster_rcnn"))  # channels_last changes the modules' memory format
    tail, zs = _bottlenecks(model, photos)
    want = _run(tail, zs)
    got = _run(AcceleratedTail(tail, TailOptions(channels_last=True), CPU), zs)
    for w, g in zip(want, got):
        a = detection_agreement(w, g, iou=0.5, score=0.0)
        assert a["reference"] > 0
        assert a["f1"] == 1.0
        assert a["max_box_diff"] <= 1e-3 and a["max_score_diff"] <= 1e-6


def test_bf16_on_cpu_is_within_its_stated_bound(tiny_model, photos):
    """bf16 autocast of the dense part against fp32 (seeded random weights: scores are near-ties, so
    detections reorder more than a trained model's would). Bound: IoU-matched F1 >= 0.75 per image,
    matched scores within 1e-3, and the result is not fp32's (the option really ran)."""
    tail, zs = _bottlenecks(tiny_model("faster_rcnn"), photos)
    want = _run(tail, zs)
    got = _run(AcceleratedTail(tail, TailOptions("bf16"), CPU), zs)
    assert any(not torch.equal(w["boxes"], g["boxes"]) for w, g in zip(want, got))
    for w, g in zip(want, got):
        a = detection_agreement(w, g, iou=0.5, score=0.0)
        assert a["reference"] > 0 and a["f1"] >= 0.75, a
        assert a["max_score_diff"] <= 1e-3, a


@pytest.mark.parametrize(
    "options,needle",
    [
        (TailOptions("fp16"), "--precision fp16 needs a CUDA device"),
        (TailOptions(compile="reduce-overhead"), "CUDA graphs and needs a CUDA device"),
        (TailOptions("int4"), "--precision must be one of"),
    ],
)
def test_cuda_only_options_refuse_on_cpu(options, needle):
    with pytest.raises(AccelError, match=needle):
        check_options(options, CPU)


def test_hnd_server_refuses_fp16_on_cpu_with_one_line(capsys):
    rc = server_cli.main(
        ["--config", "test/faster_rcnn-b3ch", "--random-weights", "0", "--device", "cpu", "--precision", "fp16"]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("hnd-server: error: --precision fp16 needs a CUDA device") and "\n" not in err


def test_compile_pads_the_batch_to_a_bucket_and_caps_the_graphs(tiny_model, photos, monkeypatch):
    """torch.compile stands in as a recorder here (inductor needs minutes per graph on this CPU); what is
    tested is hnd's part: static shapes per (batch bucket, padded size), padding dropped, the cap."""
    seen: list[tuple[int, ...]] = []

    def fake_compile(module, mode=None, dynamic=None):
        assert dynamic is False

        def run(z):
            seen.append(tuple(z.shape))
            return module(z)

        return run

    monkeypatch.setattr(accel.torch, "compile", fake_compile)
    monkeypatch.setattr(accel, "MAX_GRAPHS", 1)
    tail, zs = _bottlenecks(tiny_model("faster_rcnn"), photos[:1])
    z, meta = zs[0]
    z3 = torch.cat([z, z, z])
    meta3 = type(meta)(meta.original_sizes * 3, meta.image_sizes * 3, meta.padded_size)
    acc = AcceleratedTail(tail, TailOptions(compile="default"), CPU)
    with torch.inference_mode():
        got = acc(z3, meta3)
        want = tail(z3, meta3)
        other = acc(
            z[..., :-32, :],
            type(meta)(meta.original_sizes, meta.image_sizes, (meta.padded_size[0] - 128, meta.padded_size[1])),
        )
    assert batch_bucket(3) == 4 and seen == [(4, *z.shape[1:])]  # the second shape ran eagerly: cap of 1
    assert len(got) == 3 and len(other) == 1
    for w, g in zip(want, got):
        torch.testing.assert_close(g["boxes"], w["boxes"], rtol=1e-4, atol=1e-3)


def test_model_info_metadata_and_answers_say_what_ran(tiny_model, photos):
    """A bf16 server reports it in GetModelInfo and call metadata, and answers what its tail gives in process."""
    model = tiny_model("faster_rcnn")
    runner = ModelRunner(model, CPU, TailOptions("bf16"))
    settings = ServerSettings(port=0, batching=BatchingOptions(max_batch=1))
    from hnd.common import codec, wire
    from hnd.proto.v1 import split_inference_pb2 as pb

    head, _ = split_model(model)
    with torch.inference_mode():
        z, meta = head([photos[0]])
    encoded = codec.encode(z, 8)
    with torch.inference_mode():
        want = runner.tail(torch.from_numpy(codec.decode(encoded)).reshape(z.shape), meta)[0]
    with BackgroundServer(runner, settings) as server:
        client = SplitClient(ClientSettings(f"127.0.0.1:{server.port}"))
        info = client.model_info()
        request = pb.InferRequest(request_id="1", weights_fingerprint=fingerprint(model))
        request.bottleneck.CopyFrom(wire.bottleneck_to_proto(encoded, meta))
        response, call = client.stub.Infer.with_call(request, timeout=60)
        client.close()
    assert info.tail.precision == "bf16" and info.tail.summary == "bf16" and info.tail.device == "cpu"
    assert "RPN head" in info.tail.reduced_precision_part and "RoIAlign" in info.tail.fp32_part
    assert dict(call.trailing_metadata())[TAIL_KEY] == "bf16"
    got = wire.detections_from_proto(response.detections[0])
    assert np.array_equal(got["boxes"], want["boxes"].numpy()) and np.array_equal(got["scores"], want["scores"].numpy())
    assert grpc.StatusCode.OK == call.code()
