"""Edge modes behind one interface, typed records and their one JSONL form, the edge without server modules."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from hnd.edge.capture import ArrayFrames, Frame
from hnd.edge.api import make_mode
from hnd.edge.modes import EdgeMode, EdgeOptions, OffloadMode, Prepared
from hnd.edge.pipeline import EdgeRunner
from hnd.edge.records import ByteCounts, FrameRecord, ServerTimings, Timings, read_records


def _record(**kw) -> FrameRecord:
    base = dict(
        frame=3,
        source="cam",
        wall_time=1764620000.1234567,
        mode="split",
        bytes=ByteCounts(2100, 2190, 310),
        ms=Timings(
            capture=1.0, preprocess=2.0, head=40.12345, encode=1.0, network_server=50.0, total=95.0, overhead=1.0
        ),
        server_ms=ServerTimings(0.4, 0.0, 45.0, 0.3),
        batch_size=1,
        detections=[{"count": 1, "boxes": [[1.0, 2.0, 3.0, 4.0]], "labels": [1], "scores": [0.9]}],
    )
    base.update(kw)
    return FrameRecord(**base)


def test_record_json_layout_and_round_trip():
    r = _record(extra={"key_frame": True})
    d = json.loads(r.to_json())
    assert list(d) == [
        "frame",
        "source",
        "wall_time",
        "mode",
        "status",
        "bytes",
        "ms",
        "server_ms",
        "batch_size",
        "detections",
        "key_frame",
    ]
    assert d["ms"]["head"] == 40.123 and d["wall_time"] == 1764620000.123457
    assert "filter" not in d["ms"] and "error" not in d and "attempts" not in d  # absent unless they apply
    back = FrameRecord.from_dict(d)
    assert back.to_dict() == d and back.extra == {"key_frame": True}
    assert back.server_ms.total() == pytest.approx(45.7) and back.ms.edge_ms() == pytest.approx(43.123)
    failed = FrameRecord(0, "x.jpg", 0.0, "offload", status="UNAVAILABLE", error="gone", attempts=2)
    d = failed.to_dict()
    assert d["status"] == "UNAVAILABLE" and d["error"] == "gone" and d["attempts"] == 2
    assert "server_ms" not in d and "detections" not in d and "response" not in d["bytes"]
    assert FrameRecord.from_dict(d) == failed


def test_read_records_skips_a_line_cut_short(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [_record(frame=i).to_json() + "\n" for i in range(3)]
    path.write_text("".join(lines) + lines[0][:25])  # a crash mid-write
    assert [r.frame for r in read_records(path)] == [0, 1, 2]


class CountingMode(EdgeMode):
    """A mode outside this package: computes a fake result here, sees every final record."""

    name = "counting"
    uses_server = False

    def __init__(self, options: EdgeOptions) -> None:
        super().__init__(options)
        self.seen: list[tuple[int, str]] = []
        self.closed = False

    def prepare(self, frame: Frame) -> Prepared:
        mean = float(frame.image.mean())
        dets = {"boxes": np.array([[0.0, 0.0, 2.0, 2.0]]), "labels": np.array([1]), "scores": np.array([mean / 255])}
        return Prepared(
            frame,
            Timings(capture=frame.capture_ms, head=0.5),
            local_result=[dets],
            done_ns=frame.captured_ns,
            extra={"mean": round(mean, 2)},
        )

    def after(self, prepared: Prepared, record: FrameRecord) -> None:
        self.seen.append((record.frame, record.status))


def test_a_new_mode_plugs_into_the_runner():
    options = EdgeOptions(mode="counting", max_inflight=2)
    mode = CountingMode(options)
    runner = EdgeRunner(options, mode=mode)
    images = [np.full((8, 8, 3), v, dtype=np.uint8) for v in (0, 51, 255)]
    records: list[FrameRecord] = []
    summary = runner.run(ArrayFrames(images), lambda r, f: records.append(r))
    assert mode.seen == [(0, "OK"), (1, "OK"), (2, "OK")]
    assert [r.mode for r in records] == ["counting"] * 3 and [r.extra["mean"] for r in records] == [0.0, 51.0, 255.0]
    assert [r.detections[0]["scores"] for r in records] == [[0.0], [0.2], [1.0]]
    assert all(r.ms.head == 0.5 and r.ms.total is not None for r in records)
    assert summary.answered == 3 and summary.as_dict()["ms"]["head"]["p50"] == pytest.approx(0.5, rel=0.01)  # DDSketch


def test_modes_check_what_they_need():
    with pytest.raises(ValueError, match="needs a client"):
        EdgeRunner(EdgeOptions(mode="offload"), OffloadMode(EdgeOptions(mode="offload")))
    with pytest.raises(ValueError, match="split mode needs a head"):
        make_mode(EdgeOptions(mode="split"))
    with pytest.raises(ValueError, match="unknown edge mode"):
        make_mode(EdgeOptions(mode="telepathy"))
    with pytest.raises(ValueError, match="not offload"):
        OffloadMode(EdgeOptions(mode="offload", filter_threshold=0.5))
    offload = make_mode(EdgeOptions(mode="offload", jpeg_quality=80))
    frame = next(iter(ArrayFrames([np.zeros((16, 24, 3), dtype=np.uint8)])))
    p = offload.prepare(frame)
    assert p.request.image.data[:2] == b"\xff\xd8" and p.payload_bytes == len(p.request.image.data)
    assert p.message_bytes == p.request.ByteSize() > p.payload_bytes and p.ms.encode is not None


def test_the_edge_imports_no_server_module():
    code = (
        "import sys; import hnd.edge.cli, hnd.edge.pipeline, hnd.edge.client, hnd.edge.modes; "
        "print([m for m in sys.modules if m.startswith('hnd.server')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_progress_line_counts_frames_and_leaves_the_rate_to_the_status_line(capsys):
    options = EdgeOptions(mode="counting", max_inflight=2)
    runner = EdgeRunner(options, mode=CountingMode(options))
    runner.run(ArrayFrames([np.zeros((8, 8, 3), dtype=np.uint8)] * 3), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"hnd-edge counting: \d frames \[\d\d:\d\d\]", err), err  # "5 frames", not "5frame"
    assert not any(unit in err for unit in ("s/frame", "frame/s", "frames/s", "it/s"))


def test_opencv_warnings_follow_the_log_level(capfd):
    """Opening a camera that is not there: OpenCV's own [ WARN ] lines only at INFO / DEBUG; the edge's
    one line ("camera 97: cannot open") says it either way."""
    import logging

    import cv2

    from hnd.edge.capture import SourceError, _open_capture, set_opencv_logging

    before = cv2.utils.logging.getLogLevel()
    try:
        for level in (logging.WARNING, logging.INFO):
            set_opencv_logging(level)
            capfd.readouterr()
            with pytest.raises(SourceError, match="camera 97: cannot open"):
                _open_capture(97)
            warned = "WARN" in capfd.readouterr().err
            assert warned == (level == logging.INFO), level
    finally:
        cv2.utils.logging.setLogLevel(before)
