"""hnd-edge: CLI, records, reconnect after a server restart, live capture, head-only weights."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
import warnings

import cv2
import grpc
import numpy as np
import pytest
import torch
from runtime_support import edge_argv, frames, run_edge, serving, write_frames

from hnd.common.channel import SERVICE_NAME
from hnd.common.checkpoint import export_head, fingerprint, save_checkpoint
from hnd.edge import cli as edge_cli
from hnd.edge.api import make_mode
from hnd.edge.capture import ArrayFrames, LiveCapture, write_video
from hnd.edge.client import ClientSettings, SplitClient
from hnd.edge.pipeline import EdgeOptions, EdgeRunner
from hnd.common.split import split_model
from hnd.server import cli as server_cli
from hnd.server.app import BackgroundServer, ServerSettings
from hnd.server.service import ModelRunner

CONFIG = "test/faster_rcnn-b3ch"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as s:
        yield s


@pytest.fixture()
def image_dir(tmp_path):
    folder = write_frames(tmp_path / "frames", 3)
    (folder / "999.jpg").write_bytes(b"not an image")  # a bad file is recorded, not fatal
    return folder


def test_cli_writes_records_summary_and_video(server, image_dir, tmp_path, capsys):
    out, video, summary = tmp_path / "r.jsonl", tmp_path / "v.mp4", tmp_path / "s.json"
    code = edge_cli.main(
        edge_argv(
            image_dir,
            *("--output", str(out), "--save-video", str(video), "--summary-json", str(summary), "--no-progress"),
            server=server,
            config=CONFIG,
        )
    )
    assert code == 1  # one frame failed (the bad file), the rest were answered
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["frame"] for r in records] == [0, 1, 2, 3]
    assert [r["status"] for r in records] == ["OK", "OK", "OK", "EDGE_DECODE_ERROR"]
    assert "999.jpg" in records[3]["error"]
    assert records[0]["detections"][0]["count"] == len(records[0]["detections"][0]["boxes"]) > 0
    stats = json.loads(summary.read_text())
    assert stats["answered"] == 3 and stats["failed"] == 1
    assert stats["server_tail"] == "fp32 on cpu"  # what the server ran (GetModelInfo tail)
    assert stats["payload_bytes"]["mean"] == pytest.approx(np.mean([r["bytes"]["payload"] for r in records[:3]]))
    cap = cv2.VideoCapture(str(video))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3  # the undecodable file has no pixels to draw
    printed = capsys.readouterr().out
    assert "bytes/frame" in printed and "network_server" in printed


def test_cli_stops_on_fingerprint_mismatch(server, image_dir, capsys):
    code = edge_cli.main(edge_argv(image_dir, "--no-progress", server=server, seed=1, config=CONFIG))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "fingerprint mismatch" in err[0] and "Traceback" not in err[0]


def test_missing_camera_is_one_clear_line(capsys):
    code = edge_cli.main(["--camera", "97", "--config", CONFIG, "--random-weights", "0", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [err[0]] and "camera 97: cannot open" in err[0]


def test_server_cli_refuses_missing_checkpoint(tmp_path, capsys):
    code = server_cli.main(["--config", CONFIG, "--checkpoint", str(tmp_path / "nope.pt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope.pt" in err[0]


def test_head_only_export_serves_the_same_detections(model, server, image_dir, tmp_path, monkeypatch):
    import itertools

    import hnd.edge.client

    full = tmp_path / "student.pt"
    save_checkpoint(full, model)
    head_file = tmp_path / "head.pt"
    assert export_head(full, head_file) == fingerprint(model)
    args = edge_argv(image_dir / "000.png", "--no-progress", server=server, seed=None, config=CONFIG)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    # Request ids carry a process-wide counter: start both runs from the same count, so the request
    # sizes compare whatever ran before in this process.
    monkeypatch.setattr(hnd.edge.client, "_ids", itertools.count())
    assert edge_cli.main([*args, "--head", str(head_file), "--output", str(a)]) == 0
    monkeypatch.setattr(hnd.edge.client, "_ids", itertools.count())
    assert edge_cli.main([*args, "--checkpoint", str(full), "--output", str(b)]) == 0
    ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ra["detections"] == rb["detections"]
    # The response's size varies with the server's timings (varints of microseconds): compare the request.
    assert (ra["bytes"]["payload"], ra["bytes"]["message"]) == (rb["bytes"]["payload"], rb["bytes"]["message"])


def test_edge_reconnects_after_server_restart(model):
    """The server goes away after frame 1 and comes back on the same port: every frame is accounted for."""
    first = BackgroundServer(ModelRunner(model, torch.device("cpu")), ServerSettings(port=0)).__enter__()
    port = first.port
    state = {"second": None}

    def restart():
        time.sleep(1.0)
        state["second"] = BackgroundServer(
            ModelRunner(model, torch.device("cpu")), ServerSettings(port=port)
        ).__enter__()

    class RestartingSource(ArrayFrames):
        def __iter__(self):
            for frame in super().__iter__():
                if frame.index == 2:
                    first.stop(grace_s=5)
                    threading.Thread(target=restart, daemon=True).start()
                yield frame

    client = SplitClient(ClientSettings(f"127.0.0.1:{port}", reconnect_timeout_s=30))
    head, _ = split_model(model)
    options = EdgeOptions(max_inflight=1)
    runner = EdgeRunner(options, make_mode(options, head, fingerprint(model)), client)
    records = []
    try:
        summary = runner.run(RestartingSource(frames(5)), lambda r, f: records.append(r.to_dict()))
    finally:
        client.close()
        if state["second"] is not None:
            state["second"].stop()
    assert [r["frame"] for r in records] == [0, 1, 2, 3, 4]
    assert summary.answered + summary.failed == 5
    assert summary.answered == 5, [r.get("error") for r in records]
    assert [r.get("attempts", 1) for r in records] == [1, 1, 2, 1, 1]  # frame 2 met the restart and was resent


def test_a_call_the_server_cancels_is_sent_again(model, server):
    """A server shutting down cancels the calls it received but had not handed to a handler yet: the client
    gets CANCELLED, not UNAVAILABLE (grpc/grpc#41785; seen in a rolling restart). The edge sends such a
    frame again like an UNAVAILABLE one. Here a front server cancels the second Infer and passes the rest
    on to the real one."""
    upstream = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    infers = []

    def forward(method: str):
        call = upstream.unary_unary(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
            if method.endswith("/Infer"):
                infers.append(len(request))
                if len(infers) == 2:
                    context.abort(grpc.StatusCode.CANCELLED, "Cancelled on the server side")
            return call(request, timeout=30)

        return grpc.unary_unary_rpc_method_handler(handle)

    handlers = {name: forward(f"/{SERVICE_NAME}/{name}") for name in ("GetModelInfo", "Infer")}
    front = grpc.server(concurrent.futures.ThreadPoolExecutor(4))
    front.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)])
    port = front.add_insecure_port("127.0.0.1:0")
    front.start()
    client = SplitClient(ClientSettings(f"127.0.0.1:{port}"))
    try:
        summary, records, _ = run_edge(model, client, frames(3), max_inflight=1)
    finally:
        client.close()
        front.stop(None)
        upstream.close()
    assert [(r["status"], r.get("attempts", 1)) for r in records] == [("OK", 1), ("OK", 2), ("OK", 1)]
    assert summary.answered == 3 and len(infers) == 4


def test_live_capture_keeps_the_latest_frame_and_counts_drops(tmp_path):
    """A generated 20 fps video through the live-camera code path, consumed slower than it plays."""
    path = str(tmp_path / "live.mp4")
    video = [np.full((48, 64, 3), i * 8, dtype=np.uint8) for i in range(30)]
    write_video(path, video, fps=20)
    source = LiveCapture(path)  # paced at the file's own 20 fps, like a camera
    taken = []
    for frame in source:
        taken.append(int(frame.image.mean() // 8 + 0.5))
        time.sleep(0.15)  # a slow pipeline: ~3 camera frames go by per frame processed
    assert source.dropped > 0
    assert len(taken) + source.dropped == source.captured == 30
    assert taken == sorted(taken) and len(set(taken)) == len(taken)  # always newer frames, none twice


def test_a_read_only_frame_is_read_the_same_and_without_a_warning():
    """Frames shared or cached read-only (the adaptive bench's cycled clip) made torch warn on every run."""
    from hnd.edge.torch_modes import to_tensor

    image = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    read_only = image.copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = to_tensor(read_only)
    assert tensor.shape == (3, 6, 8) and torch.equal(tensor, to_tensor(image))
