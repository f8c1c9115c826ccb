"""The Python API: hnd.connect / hnd.aio.connect against hnd.serve, results equal to the in-process split,
errors as HndError, torch-free with an ONNX head, and hnd-edge's defaults shared with it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from dataclasses import fields

import grpc
import numpy as np
import pytest
from runtime_support import assert_same_detections, expected_split, export_onnx_files, frames

import hnd
import hnd.aio
from hnd.common.errors import HndError, UsageError
from hnd.edge.api import EdgeSettings, FrameFailed
from hnd.edge.cli import build_parser as edge_parser

CONFIG = "test/faster_rcnn-b3ch"


@pytest.fixture(scope="module")
def server():
    # The config's seeded weights; small images only (a larger frame is refused: the FrameFailed test).
    with hnd.serve(CONFIG, device="cpu", max_batch=2, max_original_side=240) as s:
        yield s


def as_dict(det) -> dict:
    return {"boxes": det.boxes, "labels": det.labels, "scores": det.scores}


def test_detect_equals_the_in_process_split_and_detect_many_keeps_frame_order(server, tiny_model):
    model = tiny_model("faster_rcnn")
    images = frames(4)
    with hnd.connect(server.target, config=CONFIG, random_weights=0, max_inflight=3) as detector:
        one = detector.detect(images[0])
        many = list(detector.detect_many(images))
        assert detector.summary.answered == 5
    for det in (one, many[0]):
        assert det.ok and len(det) > 0  # random weights with score threshold 0 still detect
        assert det.boxes.dtype == np.float32 and det.boxes.shape == (len(det), 4)
        assert det.labels.dtype == np.int64 and det.scores.dtype == np.float32
        assert det.masks is None and det.keypoints is None
    assert [d.record.frame for d in many] == [1, 2, 3, 4]  # detect was frame 0
    for image, det in zip(images, many):
        assert_same_detections(expected_split(model, image, bits=8, granularity="tensor"), [as_dict(det)])
        assert det.record.bytes.payload > 0 and det.record.replica and det.record.ms.total > 0
        # boxes in the frame's own pixels
        assert det.boxes[:, 2].max() <= image.shape[1] + 1e-3 and det.boxes[:, 3].max() <= image.shape[0] + 1e-3


def test_push_and_drain_serve_a_callback_style_loop(server):
    images = frames(5)
    got = []
    with hnd.connect(server.target, config=CONFIG, random_weights=0, max_inflight=2) as detector:
        for image in images:  # what a camera callback would do: hand the frame over, take what is done
            got += detector.push(image)
        got += detector.drain()
        with pytest.raises(UsageError, match="uint8"):
            detector.push(images[0].astype(np.float32))
    assert [d.record.frame for d in got] == [0, 1, 2, 3, 4] and all(d.ok for d in got)


def test_errors_are_hnd_errors_never_grpc(server):
    with pytest.raises(UsageError, match="unknown option colour"):
        hnd.connect(server.target, colour="red")
    with pytest.raises(UsageError, match="image_format 'gif'"):
        hnd.connect(server.target, mode="offload", image_format="gif")
    with pytest.raises(HndError) as unreachable:
        hnd.connect("127.0.0.1:1", config=CONFIG, random_weights=0, timeout=1, connect_timeout=1)
    assert not isinstance(unreachable.value, grpc.RpcError) and "nothing listens there" in str(unreachable.value)
    with pytest.raises(UsageError, match=r"connect_timeout \(--connect-timeout\) must be > 0 seconds, got 0"):
        hnd.connect(server.target, connect_timeout=0)
    with hnd.connect(server.target, config=CONFIG, random_weights=0) as detector:
        with pytest.raises(UsageError, match=r"\[H, W, 3\] uint8"):
            detector.detect(np.zeros((8, 8), np.uint8))
        big = np.zeros((300, 300, 3), np.uint8)  # beyond the server's max_original_side
        with pytest.raises(FrameFailed) as failed:
            detector.detect(big)
        assert failed.value.record.status == "INVALID_ARGUMENT" and isinstance(failed.value, HndError)
        statuses = [d.record.status for d in detector.detect_many([frames(1)[0], big], raise_errors=False)]
        assert statuses == ["OK", "INVALID_ARGUMENT"]
        assert detector.detect(frames(1)[0]).ok  # the detector goes on after a failed frame
    with pytest.raises(UsageError, match="closed"):
        detector.detect(frames(1)[0])


def test_aio_connect_detects_from_an_async_source(server):
    images = frames(3)

    async def camera():
        for image in images:
            await asyncio.sleep(0)
            yield image

    async def main():
        async with hnd.aio.connect(server.target, config=CONFIG, random_weights=0, max_inflight=2) as detector:
            first = await detector.detect(images[0])
            rest = [det async for det in detector.detect_many(camera())]
        awaited = await hnd.aio.connect(server.target, config=CONFIG, random_weights=0)  # no async with
        try:
            again = await awaited.detect(images[0])
        finally:
            await awaited.aclose()
        assert again.scores.tobytes() == first.scores.tobytes()
        return first, rest

    first, rest = asyncio.run(main())
    assert first.ok and [d.record.frame for d in rest] == [1, 2, 3]
    assert first.scores.tobytes() == rest[0].scores.tobytes()  # the same frame, the same answer


def test_onnx_head_api_never_imports_torch(server, tiny_model, tmp_path):
    files = export_onnx_files(tmp_path, tiny_model("faster_rcnn"), CONFIG, "head.onnx")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None  # any import of torch fails
        sys.modules["torchvision"] = None
        import numpy as np
        import hnd
        frame = np.full((120, 150, 3), 90, np.uint8)
        with hnd.connect({server.target!r}, head={str(files["head"])!r}, config={CONFIG!r}, key_interval=3) as d:
            dets = list(d.detect_many([frame, frame, frame]))
        assert [x.record.extra["frame_type"] for x in dets] == ["key", "delta", "delta"]
        assert all(x.ok for x in dets) and sys.modules["torch"] is None
        print("ok", len(dets[0]))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr


def test_the_connect_timeout_is_the_clients_wait_for_a_server_not_up_yet():
    from hnd.common.config import RuntimeConfig
    from hnd.edge.api import make_client

    assert EdgeSettings().connect_timeout == 10.0  # a server may be starting: gRPC's wait_for_ready, bounded
    client = make_client(EdgeSettings(connect_timeout=0.5), RuntimeConfig(), live=False)
    try:
        assert client.settings.connect_timeout_s == 0.5
    finally:
        client.close()
    args = edge_parser().parse_args(["--images", "x", "--connect-timeout", "2.5"])
    assert EdgeSettings.from_args(args).connect_timeout == 2.5


def test_settings_defaults_are_hnd_edges():
    defaults = {a.dest: a.default for a in edge_parser()._actions}
    for f in fields(EdgeSettings):
        if f.name != "token":  # the API's own (the CLI reads --token-file)
            assert defaults[f.name] == f.default, f.name


def test_serve_refuses_unknown_options():
    with pytest.raises(UsageError, match="unknown option colour"):
        hnd.serve(CONFIG, colour="red")
    with pytest.raises(UsageError, match="--device.*tpu"):
        hnd.serve(CONFIG, device="tpu")
    with pytest.raises(UsageError, match="--precision.*fp7"):
        hnd.serve(CONFIG, precision="fp7")
