"""hnd-edge --view-port in a real headless Chromium: the page loads, frames arrive and change, charts update.

Skips only when no Chromium is installed (``apt-get install chromium``; .ci/run installs it). Set
HND_VIEW_SCREENSHOT=path.png to keep the screenshot (docs/live-view.png, on the live view's page, comes from this test).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import urllib.request

import cv2
import pytest
from chromium_support import Chromium, chromium_binary
from runtime_support import serving

from hnd.edge import cli as edge_cli
from hnd.edge.capture import sample_images, write_video
from hnd.server.local import free_port

CONFIG = "test/mask_rcnn-b3ch"

needs_chromium = pytest.mark.skipif(
    chromium_binary() is None, reason="chromium not installed (apt-get install chromium)"
)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("mask_rcnn")


@needs_chromium
def test_live_view_in_a_headless_browser(model, tmp_path):
    images, _ = sample_images()
    video = str(tmp_path / "live.mp4")
    write_video(video, [cv2.resize(images[i % 3], (320, 240)) for i in range(1200)], fps=10)
    view_port = free_port()
    shot = os.environ.get("HND_VIEW_SCREENSHOT") or str(tmp_path / "view.png")
    result: dict = {}

    with serving(model) as server:
        args = edge_cli.build_parser().parse_args(
            [
                "--server",
                f"127.0.0.1:{server.port}",
                "--video",
                video,
                "--live",
                "--config",
                CONFIG,
                "--random-weights",
                "0",
                "--view-port",
                str(view_port),
                "--score-threshold",
                "0.3",
                "--no-progress",
                "--window",
                "3",
                "--max-frames",
                "400",
            ]
        )

        def edge() -> None:
            try:
                result["summary"] = edge_cli.run_edge(args)
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                result["error"] = exc

        async def browse() -> dict:
            async with Chromium() as page:
                thread = threading.Thread(target=edge, name="hnd-test-edge", daemon=True)
                thread.start()
                url = f"http://127.0.0.1:{view_port}/"
                deadline = time.monotonic() + 120
                while True:  # the view server is up once the edge has loaded its model
                    try:
                        html = urllib.request.urlopen(url, timeout=2).read().decode()
                        break
                    except OSError:
                        if time.monotonic() > deadline or not thread.is_alive():
                            raise AssertionError(f"view never came up: {result.get('error')}") from None
                        await asyncio.sleep(0.2)
                assert "<script>" in html and "http" not in html.split("<script>")[0].replace(
                    'name="viewport"', ""
                )  # no external assets
                await page.goto(url)
                state = {}
                while time.monotonic() < deadline:
                    # null until the navigation has produced the page (the old document may still be there)
                    state = await page.eval(
                        "document.getElementById('frame') ? Object.assign({}, "
                        "document.body.dataset, "
                        "{img: document.getElementById('frame').naturalWidth, "
                        "status: document.getElementById('status').textContent}) : null"
                    )
                    if state is None:
                        await asyncio.sleep(0.2)
                        continue
                    if (
                        int(state["distinct"]) >= 3
                        and int(state["chartUpdates"]) >= 3
                        and int(state["windows"]) >= 2
                        and state["img"] > 0
                    ):
                        break
                    await asyncio.sleep(0.3)
                first = state
                later = first
                while time.monotonic() < deadline + 60 and int(later["frames"]) <= int(first["frames"]):
                    await asyncio.sleep(0.5)  # the stream goes on: more frames, more chart updates
                    later = await page.eval("Object.assign({}, document.body.dataset)")
                if os.environ.get("HND_VIEW_SCREENSHOT"):  # for the docs: let the charts fill a little
                    until = time.monotonic() + 240
                    while time.monotonic() < until and int(later.get("points", 0)) < 12:
                        await asyncio.sleep(1.0)
                        later = await page.eval("Object.assign({}, document.body.dataset)")
                await page.screenshot(shot)
                return {"first": first, "later": later}

        try:
            seen = asyncio.run(browse())
            frame_jpg = urllib.request.urlopen(f"http://127.0.0.1:{view_port}/frame.jpg", timeout=5).read()
        finally:
            runner = edge_cli._current_runner
            if runner is not None and runner.source is not None:
                runner.source.close()  # ends the live source: the run finishes its frames in flight and returns
            for t in threading.enumerate():
                if t.name == "hnd-test-edge":
                    t.join(timeout=60)
    assert "error" not in result, result.get("error")

    first, later = seen["first"], seen["later"]
    assert int(first["distinct"]) >= 3, first  # frames arrive, and they are different frames
    assert first["img"] == 320  # the JPEG decoded in the page at the frame's size
    assert int(first["chartUpdates"]) >= 3 and int(first["points"]) >= 3  # the charts took the frames' figures
    assert int(first["windows"]) >= 2 and "fps" in first["status"] and "kbit/s" in first["status"]
    assert int(later["frames"]) > int(first["frames"]) and int(later["chartUpdates"]) > int(first["chartUpdates"])
    assert frame_jpg[:2] == b"\xff\xd8"
    assert os.path.getsize(shot) > 10_000


def test_view_serves_page_frames_and_mjpeg_without_a_model():
    """The view alone: page without external assets, /frame.jpg, /stream.mjpg parts as frames are published."""
    import numpy as np

    from hnd.edge.records import FrameRecord, Timings
    from hnd.edge.view import LiveView

    view = LiveView(0)
    try:
        page = urllib.request.urlopen(view.url, timeout=10).read().decode()
        assert "new WebSocket" in page and 'src="http' not in page and 'href="http' not in page
        stream = urllib.request.urlopen(view.url + "stream.mjpg", timeout=10)
        assert stream.headers["Content-Type"].startswith("multipart/x-mixed-replace")
        import torch

        dets = {
            "boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]),
            "labels": torch.tensor([1]),
            "scores": torch.tensor([0.9]),
        }

        def publish():
            for i in range(40):
                view._last_publish = 0.0  # not rate-limited in this test
                view.publish(
                    np.full((48, 64, 3), (10 * i) % 256, dtype=np.uint8),
                    dets,
                    FrameRecord(i, "t", 0.0, "split", ms=Timings(total=5.0)),
                )
                time.sleep(0.05)

        threading.Thread(target=publish, daemon=True).start()
        parts = []
        while len(parts) < 2:
            assert stream.readline() == b"--frame\r\n"
            assert stream.readline() == b"Content-Type: image/jpeg\r\n"
            length = int(stream.readline().split(b":")[1])
            stream.readline()
            parts.append(stream.read(length))
            stream.readline()
        assert all(p[:2] == b"\xff\xd8" for p in parts) and parts[0] != parts[1]  # JPEGs, and they change
        decoded = cv2.imdecode(np.frombuffer(parts[1], np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (48, 64, 3)
        assert urllib.request.urlopen(view.url + "frame.jpg", timeout=10).read()[:2] == b"\xff\xd8"
        stream.close()
    finally:
        view.close()
