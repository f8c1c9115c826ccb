"""Long unattended runs: streamed and rotated records, write errors, segmented video, bounded-memory summary,
live figures (status line, --stats-interval, SIGUSR1, Prometheus), a server gone for seconds, a camera that stops."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import threading
import time
import tracemalloc
import urllib.request

import cv2
import numpy as np
import pytest
import torch
from runtime_support import edge_argv, frames

from hnd.edge import capture as capture_mod
from hnd.edge import cli as edge_cli
from hnd.edge.capture import LiveCapture, SourceLost, write_video
from hnd.edge.draw import VideoSink
from hnd.edge.live import LiveStats
from hnd.edge.records import ByteCounts, FrameRecord, RecordWriteError, RecordWriter, Timings, read_records
from hnd.edge.summary import Summary
from hnd.server.app import BackgroundServer, ServerSettings
from hnd.server.local import free_port
from hnd.server.service import ModelRunner

CONFIG = "test/faster_rcnn-b3ch"


def _rec(i: int, total: float = 50.0, status: str = "OK") -> FrameRecord:
    return FrameRecord(
        i,
        "cam",
        time.time(),
        "split",
        status=status,
        bytes=ByteCounts(1000 + i % 7, 1100, 200),
        ms=Timings(capture=1.0, head=10.0, total=total, overhead=1.0),
        detections=[{"count": 0}],
    )


# --- records ----------------------------------------------------------------------------------------


def test_records_are_appended_and_readable_while_the_run_goes_on(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_rec(100).to_json() + "\n")  # an earlier run's record
    w = RecordWriter(path)
    assert w.appended_to > 0
    for i in range(3):
        w.write(_rec(i))
        # flushed record by record: a reader (tail -f) sees every whole line at once
        assert [r.frame for r in read_records(path)] == [100, *range(i + 1)]
    w.close()
    assert path.read_text().count("\n") == 4


def test_rotation_by_size_keeps_a_bounded_number_of_files(tmp_path):
    path = tmp_path / "r.jsonl"
    w = RecordWriter(path, rotate="1KB", keep=2)
    for i in range(40):
        w.write(_rec(i))
    w.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    frames_seen = [r.frame for f in ("r.jsonl.2", "r.jsonl.1", "r.jsonl") for r in read_records(tmp_path / f)]
    assert frames_seen == list(range(40 - len(frames_seen), 40))  # the newest, in order, every line whole
    assert all((tmp_path / f).stat().st_size <= 1000 for f in files)


def test_rotation_by_time(tmp_path):
    path = tmp_path / "r.jsonl"
    w = RecordWriter(path, rotate="1s", keep=3)
    w.write(_rec(0))
    time.sleep(1.2)
    w.write(_rec(1))
    w.close()
    rotated = [p for p in tmp_path.iterdir() if p.name.startswith("r.jsonl.")]
    assert len(rotated) == 1 and [r.frame for r in read_records(rotated[0])] == [0]
    assert [r.frame for r in read_records(path)] == [1]


def test_disk_full_is_one_line_and_the_run_goes_on(capsys):
    lines: list[str] = []
    w = RecordWriter("/dev/full", warn=lines.append)
    assert [w.write(_rec(i)) for i in range(5)] == [False] * 5
    assert w.lost == 5 and len(lines) == 1 and "No space left on device" in lines[0] and "/dev/full" in lines[0]
    w.close()
    with pytest.raises(RecordWriteError, match="/dev/full: cannot write records"):
        RecordWriter("/dev/full", on_error="stop", warn=lines.append).write(_rec(0))


def test_a_failed_write_that_left_half_a_line_is_repaired_when_writing_works_again(tmp_path):
    path = tmp_path / "r.jsonl"
    lines: list[str] = []
    w = RecordWriter(path, warn=lines.append)
    w.write(_rec(0))
    stream = w.handler.stream
    real_write = stream.write
    state = {"fail": True}

    def half_then_enospc(text):
        if state["fail"]:
            state["fail"] = False
            real_write(text[: len(text) // 2])
            stream.flush()
            raise OSError(28, "No space left on device")
        return real_write(text)

    stream.write = half_then_enospc
    assert w.write(_rec(1)) is False
    assert w.write(_rec(2)) is True and w.write(_rec(3)) is True
    w.close()
    assert [r.frame for r in read_records(path)] == [0, 2, 3] and w.lost == 1
    assert "cannot write" in lines[0] and "again (1 lost meanwhile)" in lines[1]


@pytest.mark.parametrize("rotate", [None, "1MB", "1h"])
def test_a_torn_last_line_of_a_previous_run_costs_no_record_of_the_next(tmp_path, rotate):
    """The last run died mid-record (disk full, kill -9): its half line ends where it was cut; the new run's
    first record is not merged onto it."""
    path = tmp_path / "r.jsonl"
    path.write_text(_rec(0).to_json() + "\n" + _rec(1).to_json()[:40])
    lines: list[str] = []
    w = RecordWriter(path, rotate=rotate, warn=lines.append)
    w.write(_rec(7))
    w.write(_rec(8))
    w.close()
    assert [r.frame for r in read_records(path)] == [0, 7, 8]  # the torn record 1 alone is lost
    assert len(lines) == 1 and "ended in a partial record" in lines[0]
    w = RecordWriter(path, rotate=rotate, warn=lines.append)  # a whole file: nothing to say
    w.close()
    assert len(lines) == 1 and path.read_text().endswith("}\n")


def test_cli_stops_cleanly_on_write_error_when_told(tmp_path, capsys):
    images = tmp_path / "f"
    images.mkdir()
    cv2.imwrite(str(images / "0.png"), frames(1)[0])
    local = edge_argv(images, "--mode", "local", "--no-progress", config=CONFIG)
    code = edge_cli.main([*local, "--output", "/dev/full", "--on-write-error", "stop"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == edge_cli.EXIT_WRITE_ERROR == 4
    assert len(err) == 1 and "/dev/full: cannot write records" in err[0] and "Traceback" not in err[0]
    code = edge_cli.main([*local, "--output", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is a folder" in err[0]


def test_video_segments_are_finished_files_and_bounded(tmp_path):
    sink = VideoSink(str(tmp_path / "v.mp4"), fps=10, segment_s=0.25, keep=2)
    for i in range(12):
        sink.write(np.full((32, 48, 3), i * 20, dtype=np.uint8))
        time.sleep(0.06)
    finished_before_close = list(sink.finished)
    sink.close()
    assert finished_before_close  # segments end while the run goes on, not only at its end
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(n.startswith("v-") and n.endswith(".mp4") for n in names)  # keep=2
    for n in names:
        cap = cv2.VideoCapture(str(tmp_path / n))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) >= 1
        cap.release()


# --- bounded memory ---------------------------------------------------------------------------------


def test_summary_memory_stays_flat_and_quantiles_are_within_one_percent():
    rng = np.random.default_rng(0)
    totals = rng.lognormal(4.0, 0.5, 120_000)
    summary = Summary()
    tracemalloc.start()
    try:
        for i in range(20_000):
            summary.add(_rec(i, float(totals[i])))
        after_warmup = tracemalloc.get_traced_memory()[0]
        for i in range(20_000, 120_000):
            summary.add(_rec(i, float(totals[i])))
        after_all = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    # 100k more frames: a list-based summary grows by several MB here; the sketches do not
    assert after_all - after_warmup < 100_000, (after_warmup, after_all)
    stats = summary.as_dict()["ms"]["total"]
    for q in (50, 95, 99):
        assert stats[f"p{q}"] == pytest.approx(np.percentile(totals, q), rel=0.0201)  # DDSketch's bound (2 x 1 %)
    assert stats["mean"] == pytest.approx(totals.mean(), rel=1e-9) and summary.answered == 120_000


def test_live_window_is_bounded_and_says_when_waiting():
    state = {"waiting_s": None}
    live = LiveStats(
        lambda: {"frames": 10, "answered": 9, "failed": 1, "dropped": 4, "reconnects": 2, "records_lost": 0, **state},
        window_s=5.0,
    )
    for i in range(9):
        live.add(_rec(i, total=100.0 + i))
    live.add(_rec(9, status="UNAVAILABLE"))
    w = live.window()
    assert w["frames"] == 10 and w["failed_window"] == 1 and w["latency_ms"]["p50"] == pytest.approx(104.0)
    assert w["fps"] > 0 and w["kbit_s"] > 0 and w["stages_ms"]["head"] == pytest.approx(10.0)
    line = LiveStats.status_line(w)
    assert "fps" in line and "kbit/s" in line and "p95" in line and "dropped 4" in line and "reconnects 2" in line
    state["waiting_s"] = 12.0
    assert LiveStats.status_line(live.window()).startswith("WAITING for the server 12 s")


# --- end to end: stats lines, SIGUSR1, Prometheus, a server that goes away -------------------------------


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("faster_rcnn")


def _live_video(tmp_path, seconds: float, fps: int = 10) -> str:
    path = str(tmp_path / "live.mp4")
    base = frames(3)
    write_video(path, [cv2.resize(base[i % 3], (96, 80)) for i in range(int(seconds * fps))], fps=fps)
    return path


def test_server_gone_for_seconds_edge_waits_captures_and_resumes(model, tmp_path, capsys, caplog):
    """The server stops once two frames were answered and comes back once the edge says it waits (steered by
    what the edge writes, not by timings: the machine may be slow)."""
    port = free_port()
    first = BackgroundServer(ModelRunner(model, torch.device("cpu")), ServerSettings(port=port)).__enter__()
    out, stats, metrics_port = tmp_path / "r.jsonl", tmp_path / "stats.jsonl", free_port()
    state: dict = {}

    def wait_for(check, timeout=120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if check():
                    return True
            time.sleep(0.05)
        return False

    def outage():
        wait_for(lambda: sum(r.ok for r in read_records(out)) >= 2)
        first.stop(grace_s=0)
        state["stopped"] = True
        wait_for(lambda: any(json.loads(line)["waiting_s"] for line in stats.read_text().splitlines()))
        os.kill(os.getpid(), signal.SIGUSR1)  # the running summary, while waiting
        time.sleep(1.0)
        state["second"] = BackgroundServer(
            ModelRunner(model, torch.device("cpu")), ServerSettings(port=port)
        ).__enter__()

    threading.Thread(target=outage, daemon=True).start()
    old_usr1 = signal.getsignal(signal.SIGUSR1)
    try:
        code = edge_cli.main(
            [
                "--server",
                f"127.0.0.1:{port}",
                "--video",
                _live_video(tmp_path, 120.0),
                "--live",
                "--config",
                CONFIG,
                "--random-weights",
                "0",
                "--max-inflight",
                "1",
                "--output",
                str(out),
                "--stats-interval",
                "0.2",
                "--stats-file",
                str(stats),
                "--window",
                "2",
                "--metrics-port",
                str(metrics_port),
                "--max-frames",
                "6",
                "--no-progress",
            ]
        )
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    finally:
        signal.signal(signal.SIGUSR1, old_usr1)
        if "second" in state:
            state["second"].stop()
        elif not state.get("stopped"):
            first.stop(grace_s=0)
    captured = capsys.readouterr()
    records = list(read_records(out))
    lines = [json.loads(line) for line in stats.read_text().splitlines()]
    assert code in (0, 1) and "second" in state
    assert [r.frame for r in records] == list(range(6))
    assert all(r.ok for r in records[2:]), [(r.status, r.error) for r in records]  # resumed after the outage
    assert any(r.attempts > 1 for r in records)  # the frame that met the outage was resent, not lost
    assert any(line["waiting_s"] for line in lines)
    assert lines[-1]["reconnects"] >= 1 and lines[-1]["totals"]["frames"] == 6
    assert lines[-1]["dropped"] > 0  # capture went on during the wait: stale frames were dropped and counted
    assert "waiting for it (no time limit)" in caplog.text and "server back after" in caplog.text
    assert "answered" in captured.err  # SIGUSR1's running summary
    assert 'hnd_edge_frames_total{status="OK"}' in scraped and "hnd_edge_reconnects_total 1.0" in scraped
    assert "hnd_edge_stage_seconds_bucket" in scraped and "hnd_edge_dropped_frames_total" in scraped


class _FakeCap:
    """A camera that gives ``frames`` frames and then nothing (read() -> False), like an unplugged one."""

    def __init__(self, frames: int) -> None:
        self.left = frames

    def read(self):
        if self.left <= 0:
            time.sleep(0.01)
            return False, None
        self.left -= 1
        time.sleep(0.02)
        return True, np.full((24, 32, 3), 100, dtype=np.uint8)

    def get(self, prop):
        return 0.0

    def release(self):
        pass


def test_camera_that_stops_is_reopened_and_resumes():
    caps = iter([_FakeCap(3), _FakeCap(0), _FakeCap(4)])  # unplugged, still gone at the first retry, back
    lines: list[str] = []
    source = LiveCapture(0, opener=lambda target: next(caps), lost_after_s=10.0, warn=lines.append, max_frames=5)
    taken = [f.index for f in source]
    assert taken == [0, 1, 2, 3, 4] and source.reopened == 1
    assert "camera 0: no frame" in lines[0] and "delivering frames again" in lines[-1]


def test_camera_that_never_comes_back_ends_the_run_with_exit_code_3(monkeypatch, tmp_path, capsys):
    opened = {"n": 0}

    def opener(target):
        opened["n"] += 1
        return _FakeCap(4 if opened["n"] == 1 else 0)

    monkeypatch.setattr(capture_mod, "_open_capture", opener)
    out = tmp_path / "r.jsonl"
    code = edge_cli.main(
        [
            "--camera",
            "0",
            "--config",
            CONFIG,
            "--random-weights",
            "0",
            "--mode",
            "local",
            "--source-timeout",
            "1.5",
            "--output",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == edge_cli.EXIT_SOURCE_LOST == 3
    assert err[-1].startswith("hnd-edge: error: camera 0: no frames for 1.5 s") and "Traceback" not in captured.err
    assert any("camera 0: no frame (unplugged or stalled?)" in line for line in err)
    records = list(read_records(out))
    assert 1 <= len(records) <= 4 and all(r.ok for r in records)  # what was captured was processed and kept
    assert "frames" in captured.out  # the summary of what ran


def test_source_lost_raises_from_iteration():
    source = LiveCapture(0, opener=lambda target: _FakeCap(0), lost_after_s=0.5, warn=lambda line: None)
    with pytest.raises(SourceLost, match="no frames for 0.5 s"):
        list(source)


# --- network sources ----------------------------------------------------------------------------------


def _serve_folder(folder) -> http.server.ThreadingHTTPServer:
    """A quiet HTTP server for ``folder`` on loopback (a port of the OS's choice), in a daemon thread."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_network_stream_is_read_live_and_reconnected_when_it_drops(tmp_path, capsys):
    """--video http://... (a camera's stream, here an MPEG-TS clip PyAV wrote, served on loopback): read
    through OpenCV/FFmpeg as a live source; when the stream ends the edge reopens it and frames flow again."""
    import av

    with av.open(str(tmp_path / "cam.ts"), "w", format="mpegts") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            image = np.full((48, 64, 3), 10 * i, np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    server = _serve_folder(tmp_path)
    url = f"http://127.0.0.1:{server.server_address[1]}/cam.ts"
    try:
        source = capture_mod.open_source(video=url, lost_after_s=20.0)
        assert isinstance(source, LiveCapture)
        taken, deadline = [], time.monotonic() + 60
        for frame in source:
            taken.append(frame)
            if source.reopened and source.captured > 20:  # the whole clip, then frames of the reopened stream
                break
            assert time.monotonic() < deadline, (source.captured, source.reopened)
        source.close()
        with pytest.raises(capture_mod.SourceError, match=r"rtsp://cam:\*\*\*@127.0.0.1:1/s: cannot open"):
            capture_mod.open_source(video="rtsp://cam:secret@127.0.0.1:1/s")  # nothing listens; no password shown
    finally:
        server.shutdown()
    assert taken[0].source == f"live:{url}" and taken[0].image.shape == (48, 64, 3)
    err = capsys.readouterr().err
    assert f"{url}: no frame" in err and f"{url}: delivering frames again" in err
