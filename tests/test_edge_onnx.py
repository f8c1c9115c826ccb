"""hnd-edge with an ONNX head: runs where torch cannot be imported, equals the in-process path, native
resolution, and one-line refusals (other model, corrupt file, no metadata, missing provider)."""

from __future__ import annotations


import onnx
import pytest
import torch
from runtime_support import export_onnx_files, frames, one_line_error, serving, torch_free_edge, torch_free_records

from hnd.common import codec, wire
from hnd.common.split import split_model
from hnd.edge import export_head as export_cli
from hnd.edge.onnx_head import OnnxHead

CONFIG = "test/faster_rcnn-b3ch"


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


@pytest.fixture(scope="module")
def server(model):
    with serving(model) as s:
        yield s


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    return export_onnx_files(tmp_path_factory.mktemp("edge_onnx"), model, CONFIG, "head.onnx")


def test_edge_runs_without_torch_and_equals_the_in_process_path(server, files, model, tmp_path):
    records = torch_free_records(server, CONFIG, files["head"], files["images"], tmp_path / "r.jsonl")
    assert [r["status"] for r in records] == ["OK", "OK"]
    # In process: the same ONNX head and codec, then the server's tail, through the wire's format.
    onnx_head = OnnxHead(files["head"], threads=1)
    _, tail = split_model(model)
    for r, img in zip(records, frames(2)):
        result, meta = onnx_head([img])
        z = torch.from_numpy(codec.roundtrip(result.bottleneck, 8))
        with torch.inference_mode():
            want = wire.detections_from_proto(wire.detections_to_proto(tail(z, meta)[0]))
        assert r["detections"][0]["count"] == len(want["scores"]) > 0
        assert r["detections"][0]["labels"] == want["labels"].tolist()
        assert r["detections"][0]["boxes"] == [[round(float(v), 2) for v in b] for b in want["boxes"].tolist()]
        assert r["bytes"]["payload"] == len(codec.encode(result.bottleneck, 8).payload)


def test_native_resolution_split(server, files, tmp_path):
    """--min-size / --max-size: frames split at their own size, accepted within the server's limits."""
    out = tmp_path / "r.jsonl"
    records = torch_free_records(
        server, CONFIG, files["head"], files["images"], out, "--min-size", "96", "--max-size", "128"
    )
    assert all(r["status"] == "OK" for r in records)
    small = OnnxHead(files["head"], min_size=96, max_size=128)
    assert records[0]["bytes"]["payload"] == len(codec.encode(small([frames(1)[0]])[0].bottleneck, 8).payload)


def test_head_of_another_model_is_refused(server, files, tmp_path):
    other = tmp_path / "other.onnx"
    assert export_cli.main([str(other), "--config", CONFIG, "--random-weights", "7"]) == 0
    err = one_line_error(torch_free_edge(server, CONFIG, other, files["images"]))
    assert "weights fingerprint mismatch" in err and OnnxHead(other).fingerprint in err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_metadata"])
def test_bad_onnx_files_are_one_line(server, files, tmp_path, damage):
    path = tmp_path / f"{damage}.onnx"
    good = files["head"].read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x08\x07garbage" * 50)
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 3])
    else:
        m = onnx.load(str(files["head"]))
        del m.metadata_props[:]
        onnx.save(m, str(path))
    err = one_line_error(torch_free_edge(server, CONFIG, path, files["images"]))
    assert str(path) in err
    assert ("without hnd metadata" if damage == "no_metadata" else "not a loadable ONNX model") in err


def test_missing_provider_is_one_line(server, files):
    err = one_line_error(
        torch_free_edge(server, CONFIG, files["head"], files["images"], "--ort-provider", "TensorrtExecutionProvider")
    )
    assert "TensorrtExecutionProvider is not available" in err and "CPUExecutionProvider" in err


def test_onnx_split_codes_key_and_delta_frames_like_the_torch_split(files):
    """The ONNX split mode codes through the torch split's BottleneckCoder, so --key-interval works with an
    ONNX head too: a key frame, then delta frames quantized with the key's parameters."""
    import time

    from hnd.common.codec import CodecSettings
    from hnd.common.stream_codec import StreamEncoder
    from hnd.edge.capture import Frame
    from hnd.edge.modes import EdgeOptions
    from hnd.edge.onnx_mode import OnnxSplitMode

    head = OnnxHead(files["head"], threads=1)
    mode = OnnxSplitMode(EdgeOptions(codec=CodecSettings(bits=8), key_interval=3, stream=True), head)
    same = frames(1)[0]
    kinds, payloads = [], []
    for i in range(3):
        p = mode.prepare(Frame(i, "test", same, time.monotonic_ns(), 0.0, time.time()))
        kinds.append(p.extra["frame_type"])
        payloads.append(p.request.bottleneck.tensor.data)
    assert kinds == ["key", "delta", "delta"]
    # The same bytes as the stream encoder gives for the ONNX bottleneck in process.
    z = head([same])[0].bottleneck
    enc = StreamEncoder(8, "tensor", "zstd", 3, key_interval=3, max_clamped=0.001)
    assert [enc.encode(z).tensor.payload for _ in range(3)] == payloads


def _pipelined(server, head, images, workers: int, **options):
    """The ONNX split over ``images`` with ``workers`` head workers on a stream with temporal coding: (records
    as JSON dicts, each frame's coded bottleneck message, the names of the threads that ran the heads)."""
    import threading

    from hnd.common.codec import CodecSettings
    from hnd.edge.capture import ArrayFrames
    from hnd.edge.modes import EdgeOptions
    from hnd.edge.onnx_mode import OnnxSplitMode
    from hnd.edge.pipeline import EdgeRunner
    from runtime_support import client_for

    # With several workers, frames 0 and 1 must compute at once: each waits here for the other.
    meet = threading.Barrier(2) if workers > 1 else None

    class Recording(OnnxSplitMode):
        def compute(self, frame):
            threads.add(threading.current_thread().name)
            if meet is not None and frame.index < 2:
                meet.wait(timeout=30)
            return super().compute(frame)

        def finish(self, frame, computed):
            p = super().finish(frame, computed)
            sent.append(p.request.bottleneck.SerializeToString())
            return p

    threads: set[str] = set()
    sent: list[bytes] = []
    opts = EdgeOptions(codec=CodecSettings(bits=4), key_interval=3, stream=True, head_workers=workers, **options)
    client = client_for(server)
    try:
        runner = EdgeRunner(opts, Recording(opts, head), client)
        records: list[dict] = []
        runner.run(ArrayFrames(images), lambda r, f: records.append(r.to_dict()))
    finally:
        client.close()
    return records, sent, threads


def test_head_workers_keep_frame_order_and_the_one_worker_bytes(server, files):
    """Three head workers: the heads run on the pool's threads, two frames at once (they wait for each other), and
    the records, coded bytes (key / delta frames of a temporal stream) and detections are the one-worker run's,
    in frame order."""
    head = OnnxHead(files["head"], threads=1)
    images = frames(5, seed=3, sizes=((120, 150),))
    one, sent_one, threads_one = _pipelined(server, head, images, 1)
    three, sent_three, threads_three = _pipelined(server, head, images, 3)
    assert not any(t.startswith("hnd-head") for t in threads_one)
    assert len(threads_three) > 1 and all(t.startswith("hnd-head") for t in threads_three)  # 0 and 1 met
    assert sent_three == sent_one and len(set(sent_one)) == 5
    assert [r["frame"] for r in three] == [r["frame"] for r in one] == list(range(5))
    assert [r["frame_type"] for r in one] == ["key", "delta", "delta", "key", "delta"]
    for a, b in zip(one, three):
        assert a["status"] == b["status"] == "OK"
        # (the response's size varies with the server's timings it carries)
        assert (a["bytes"]["message"], a["frame_type"], a["detections"]) == (
            b["bytes"]["message"],
            b["frame_type"],
            b["detections"],
        )


def test_frames_on_the_head_pool_are_recorded_when_abandoned(server, files):
    """Frames whose heads were computing when the run was abandoned get their records, in order, unsent."""
    from hnd.common.codec import CodecSettings
    from hnd.edge.capture import Frame
    from hnd.edge.modes import EdgeOptions
    from hnd.edge.onnx_mode import OnnxSplitMode
    from hnd.edge.pipeline import EdgeRunner
    from runtime_support import client_for

    import time

    opts = EdgeOptions(codec=CodecSettings(bits=8), head_workers=4)
    client = client_for(server)
    try:
        runner = EdgeRunner(opts, OnnxSplitMode(opts, OnnxHead(files["head"], threads=1)), client)
        records = []
        runner.begin(on_record=lambda r, f: records.append(r))
        for i, img in enumerate(frames(3)):
            runner.put(Frame(i, "test", img, time.monotonic_ns(), 0.0, time.time()))
        assert runner.pending == 3  # all three on the pool, none sent
        runner.flush(abandon=("CANCELLED", "interrupted"))
        runner.end()
    finally:
        client.close()
    assert [(r.frame, r.status) for r in records] == [(0, "CANCELLED"), (1, "CANCELLED"), (2, "CANCELLED")]
    assert runner.pending == 0


def test_head_workers_default_to_the_cores_and_split_them(monkeypatch, files):
    """hnd-edge's default: 2 head workers on 2 or more cores (1 on one), each ONNX head run on cores / workers
    intra-op threads unless --threads says; --head-workers 0 is one line."""
    from hnd.common.config import ConfigError, load_config
    from hnd.edge import api

    monkeypatch.setattr(api.os, "cpu_count", lambda: 4)
    assert api.head_workers(api.EdgeSettings()) == 2 and api.head_workers(api.EdgeSettings(head_workers=3)) == 3
    cfg = load_config(CONFIG)
    em = api.load_edge_model(cfg, "split", head_path=str(files["head"]), head_workers=2)
    assert em.head.session.get_session_options().intra_op_num_threads == 2
    em = api.load_edge_model(cfg, "split", head_path=str(files["head"]), threads=3, head_workers=2)
    assert em.head.session.get_session_options().intra_op_num_threads == 3
    monkeypatch.setattr(api.os, "cpu_count", lambda: 1)
    assert api.head_workers(api.EdgeSettings()) == 1
    with pytest.raises(ConfigError, match="^--head-workers must be >= 1, got 0$"):
        api.head_workers(api.EdgeSettings(head_workers=0))
