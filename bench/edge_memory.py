"""The edge's memory over a long paced run: RSS sampled while ``hnd-edge --video V --live`` runs at the
video's frame rate against a real ``hnd-server`` (a separate process), and the least-squares slope.

    python -m hnd.bench.edge_memory --minutes 5 --fps 10 --json bench/results/edge_memory.json

The edge runs in this process (its RSS is read from /proc/self/status every second); the first
``--warmup`` seconds (model load, first forwards, allocator growth) are left out of the slope. A
bounded-memory edge has a slope of ~0 kB/min; a per-frame list of figures would grow with the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from hnd.common.files import atomic_write_json
from hnd.edge import cli as edge_cli
from hnd.edge.capture import sample_images, write_video
from hnd.server.local import free_port, start_server_process, stop_server_process


def rss_kb() -> int:
    """Resident set size of this process in kB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.edge_memory", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slope")
    p.add_argument("--config", default="test/faster_rcnn-b3ch")
    p.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    images, _ = sample_images()
    with tempfile.TemporaryDirectory() as tmp:
        video = str(Path(tmp) / "long.mp4")
        n = int(a.minutes * 60 * a.fps) + a.fps * 5
        write_video(video, [cv2.resize(images[i % len(images)], tuple(a.size)) for i in range(n)], fps=a.fps)
        port = free_port()
        server = start_server_process(a.config, port, ["--random-weights", "0"])
        samples: list[tuple[float, int]] = []
        stop = threading.Event()
        start = time.monotonic()

        def sample() -> None:
            while not stop.wait(1.0):
                samples.append((time.monotonic() - start, rss_kb()))

        threading.Thread(target=sample, daemon=True).start()
        try:
            code = edge_cli.main(
                [
                    "--server",
                    f"127.0.0.1:{port}",
                    "--video",
                    video,
                    "--live",
                    "--config",
                    a.config,
                    "--random-weights",
                    "0",
                    "--output",
                    str(Path(tmp) / "r.jsonl"),
                    "--stats-interval",
                    "30",
                    "--stats-file",
                    str(Path(tmp) / "stats.jsonl"),
                    "--no-progress",
                ]
            )
        finally:
            stop.set()
            stop_server_process(server)
        with open(Path(tmp) / "r.jsonl") as f:
            records = sum(1 for _ in f)
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    keep = t >= a.warmup
    slope_kb_per_min = float(np.polyfit(t[keep] / 60, rss[keep], 1)[0]) if keep.sum() > 2 else float("nan")
    result = {
        "minutes": a.minutes,
        "fps": a.fps,
        "frames_in_video": n,
        "records": records,
        "exit_code": code,
        "rss_kb": {
            "start": int(rss[0]),
            "after_warmup": int(rss[keep][0]) if keep.any() else None,
            "end": int(rss[-1]),
            "max": int(rss.max()),
        },
        "slope_kb_per_min_after_warmup": slope_kb_per_min,
        "warmup_s": a.warmup,
        "samples": [[round(x, 1), int(y)] for x, y in samples],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if a.json:
        atomic_write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
