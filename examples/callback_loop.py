"""Split detection driven by a camera callback: the camera's thread hands each frame over and goes on; results
come back in frame order on the application's side.

    python examples/callback_loop.py --server 127.0.0.1:50051 --config test/faster_rcnn-b3ch \
        --random-weights 0 --frames 20

Many camera SDKs (GStreamer appsink, ROS image topics, vendor SDKs) call the application with each frame.
The callback must return quickly, so it only queues the frame; one worker thread owns the Detector (it is
not thread-safe) and uses ``push`` (send without waiting; returns what is done) and ``drain`` (wait for the
rest), so up to ``max_inflight`` frames are on the wire while the camera keeps delivering. A full queue drops
the newest frame, as a live camera should rather than fall behind. Here a synthetic camera thread stands in.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

import hnd
from hnd.edge.api import Detection

_STOP = object()


class CallbackDetector:
    """``on_frame(frame)`` for the camera's callback; ``on_result(detection)`` is called, in frame order, on
    the worker thread. ``dropped`` counts frames the queue had no room for."""

    def __init__(self, detector: hnd.Detector, on_result: Callable[[Detection], None], backlog: int = 4) -> None:
        self.detector = detector
        self.on_result = on_result
        self.frames: queue.Queue = queue.Queue(maxsize=backlog)
        self.dropped = 0
        self.error: BaseException | None = None
        self.worker = threading.Thread(target=self._run, name="hnd-callback-worker", daemon=True)
        self.worker.start()

    def on_frame(self, frame: np.ndarray) -> None:
        try:
            self.frames.put_nowait(frame)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        try:
            while (frame := self.frames.get()) is not _STOP:
                for det in self.detector.push(frame):
                    self.on_result(det)
            for det in self.detector.drain():
                self.on_result(det)
        except hnd.HndError as exc:  # the server went away for good, other weights...: stop, keep the reason
            self.error = exc

    def close(self) -> None:
        """Finish the frames already handed over, then stop the worker (raises what stopped it, if anything)."""
        self.frames.put(_STOP)
        self.worker.join()
        if self.error is not None:
            raise self.error


def fake_camera(on_frame: Callable[[np.ndarray], None], frames: int, fps: float, seed: int = 0) -> None:
    """A camera thread's loop: ``frames`` smooth random [240, 320, 3] uint8 RGB frames at ``fps``."""
    rng = np.random.default_rng(seed)
    for _ in range(frames):
        small = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
        on_frame(np.kron(small, np.ones((8, 8, 1), np.uint8)))
        time.sleep(1 / fps)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--config", default="hnd/faster_rcnn-b3ch")
    p.add_argument("--head")
    p.add_argument("--random-weights", type=int)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--fps", type=float, default=10.0)
    args = p.parse_args(argv)
    options = {"config": args.config, "head": args.head, "max_inflight": 2}
    if args.random_weights is not None:
        options["random_weights"] = args.random_weights

    def on_result(det: Detection) -> None:
        r = det.record
        print(f"frame {r.frame}: {r.status}, {len(det)} detections, {r.bytes.message} bytes, {r.ms.total} ms")

    try:
        with hnd.connect(args.server, **options) as detector:
            loop = CallbackDetector(detector, on_result)
            camera = threading.Thread(target=fake_camera, args=(loop.on_frame, args.frames, args.fps))
            camera.start()
            camera.join()
            loop.close()
    except hnd.HndError as exc:
        print(f"callback_loop: error: {exc}", file=sys.stderr)
        return 2
    print(f"dropped {loop.dropped} frames (queue full)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
