"""Triton's own tools against a real hnd-server, as separate processes from a venv of their own
(``.ci/make-tritonclient-venv``: tritonclient pins protobuf < 7, hnd uses 7): examples/triton_client.py gets
exactly hnd.v1's detections from both models, and perf_analyzer load-tests the offload model."""

from __future__ import annotations

import base64
import csv
import json
import os
import struct
import subprocess
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest
from runtime_support import frames, v1_detections

from hnd.common.checkpoint import fingerprint
from hnd.common.codec import CodecSettings
from hnd.common.split import split_model
from hnd.edge.api import make_mode
from hnd.edge.capture import ArrayFrames
from hnd.edge.modes import EdgeOptions
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import split_inference_pb2_grpc as pb_grpc
from hnd.server.local import scrape_requests, server_process

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "test/faster_rcnn-b3ch"
EXAMPLE = ROOT / "examples" / "triton_client.py"


@pytest.fixture(scope="module")
def venv() -> Path:
    path = Path(os.environ.get("HND_TRITONCLIENT_VENV", ROOT / ".ci" / "tritonclient-venv"))
    if not (path / "bin" / "python").exists():
        pytest.fail(f"{path}: no tritonclient venv; run .ci/make-tritonclient-venv (.ci/run does)")
    return path


@pytest.fixture(scope="module")
def server():
    extra = ["--max-original-side", "240", "--device", "cpu"]
    with server_process(CONFIG, ["--random-weights", "0"], extra, metrics=True) as s:
        channel = grpc.insecure_channel(s.target)
        yield s, pb_grpc.SplitInferenceStub(channel)
        channel.close()


def run_example(venv: Path, server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "python"), str(EXAMPLE), "--server", server.target, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want) and len(want["scores"]) > 0
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape and got[k].tobytes() == want[k].tobytes()


def test_tritonclient_offload_gets_hnd_v1s_detections(venv, server, tmp_path):
    s, stub = server
    data = cv2.imencode(".jpg", cv2.cvtColor(frames(1)[0], cv2.COLOR_RGB2BGR))[1].tobytes()
    (tmp_path / "frame.jpg").write_bytes(data)
    run = run_example(venv, s, "--image", str(tmp_path / "frame.jpg"), "--out", str(tmp_path / "out.npz"))
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["live"] and report["ready"] and report["server"]["name"] == "hnd"
    assert sorted(report["models"]) == ["hnd_offload", "hnd_tail"]
    assert report["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": ["1"]}]
    want = v1_detections(
        stub.Infer(pb.InferRequest(image=pb.EncodedImage(format=pb.EncodedImage.FORMAT_JPEG, data=data)))
    )
    assert_same(dict(np.load(tmp_path / "out.npz")), want)

    (tmp_path / "not.jpg").write_bytes(b"GIF89a" + bytes(100))
    refused = run_example(venv, s, "--image", str(tmp_path / "not.jpg"), "--out", str(tmp_path / "x.npz"))
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr and "JPEG, PNG or WebP" in refused.stderr


def test_tritonclient_tail_gets_hnd_v1s_detections(venv, server, tiny_model, tmp_path):
    s, stub = server
    model = tiny_model("faster_rcnn")
    head, _ = split_model(model)
    options = EdgeOptions(codec=CodecSettings(bits=8, granularity="tensor", compression="none"))
    request = make_mode(options, head, fingerprint(model)).prepare(next(iter(ArrayFrames(frames(1))))).request
    t, meta = request.bottleneck.tensor, request.bottleneck.meta
    np.savez(
        tmp_path / "head.npz",
        symbols=np.frombuffer(t.data, np.uint8).reshape(list(t.shape)),
        image_size=np.array([meta.image_sizes[0].height, meta.image_sizes[0].width], np.int64),
        original_size=np.array([meta.original_sizes[0].height, meta.original_sizes[0].width], np.int64),
        scale=np.float64(t.scale[0]),
        zero_point=np.int64(t.zero_point[0]),
        fingerprint=np.str_(request.weights_fingerprint),
    )
    run = run_example(venv, s, "--bottleneck", str(tmp_path / "head.npz"), "--out", str(tmp_path / "out.npz"))
    assert run.returncode == 0, run.stderr
    assert_same(dict(np.load(tmp_path / "out.npz")), v1_detections(stub.Infer(request)))


def test_perf_analyzer_load_tests_the_offload_model(venv, server, tmp_path):
    """perf_analyzer, unchanged, with a real JPEG (a scikit-image photo, downscaled to the server's limit)."""
    from skimage import data as photos

    s, _ = server
    photo = cv2.resize(photos.astronaut(), (240, 240), interpolation=cv2.INTER_AREA)
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))[1].tobytes()
    inputs = tmp_path / "inputs.json"
    # "b64" is the tensor's raw content: a BYTES element is its 4-byte little-endian length, then the bytes.
    raw = struct.pack("<I", len(jpeg)) + jpeg
    inputs.write_text(json.dumps({"data": [{"IMAGE": {"b64": base64.b64encode(raw).decode()}}]}))
    before = scrape_requests(s.metrics_url).get(("ModelInfer", "OK"), 0.0)
    table = tmp_path / "perf.csv"
    run = subprocess.run(
        [
            str(venv / "bin" / "perf_analyzer"),
            "-m",
            "hnd_offload",
            "-i",
            "grpc",
            "-u",
            s.target,
            "--input-data",
            str(inputs),
            "--concurrency-range",
            "1",
            "--measurement-interval",
            "2000",
            "--stability-percentage",
            "100",
            "-f",
            str(table),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    row = next(csv.DictReader(table.open()))
    assert float(row["Inferences/Second"]) > 0
    assert scrape_requests(s.metrics_url).get(("ModelInfer", "OK"), 0.0) - before >= 2  # answered, not refused
