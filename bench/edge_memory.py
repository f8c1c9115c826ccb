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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.edge_memory", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--warmup", type=float, default=60.0, help="seconds left out of the slope")
    p.add_argument("--config", default="test/faster_rcnn-b3ch")
    p.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"))
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        video = str(Path(tmp) / "long.mp4")
        n = write_long_video(video, a.minutes, a.fps, tuple(a.size))
        port = free_port()
        server = start_server_process(a.config, port, ["--random-weights", "0"])
        sampler = RssSampler.start()
        try:
            code = edge_cli.main(_edge_argv(port, video, a.config, Path(tmp)))
        finally:
            sampler.stop.set()
            stop_server_process(server)
        with open(Path(tmp) / "r.jsonl") as f:
            records = sum(1 for _ in f)
    result = {
        "minutes": a.minutes,
        "fps": a.fps,
        "frames_in_video": n,
        "records": records,
        "exit_code": code,
        **rss_summary(sampler.samples, a.warmup),
        "samples": [[round(x, 1), int(y)] for x, y in sampler.samples],
    }
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if a.json:
        atomic_write_json(a.json, result)
    return 0


def write_long_video(path: str, minutes: float, fps: int, size: tuple[int, int]) -> int:
    """The sample photos at ``size`` (W, H), repeated for ``minutes`` and 5 s more, as a video at ``fps``; the
    number of frames."""
    images, _ = sample_images()
    n = int(minutes * 60 * fps) + fps * 5
    write_video(path, [cv2.resize(images[i % len(images)], size) for i in range(n)], fps=fps)
    return n


@dataclass
class RssSampler:
    """(seconds since start, RSS kB) every second on a daemon thread, until ``stop`` is set."""

    samples: list[tuple[float, int]]
    stop: threading.Event

    @classmethod
    def start(cls) -> RssSampler:
        sampler = cls([], threading.Event())
        start = time.monotonic()

        def sample() -> None:
            while not sampler.stop.wait(1.0):
                sampler.samples.append((time.monotonic() - start, rss_kb()))

        threading.Thread(target=sample, daemon=True).start()
        return sampler


def _edge_argv(port: int, video: str, config: str, tmp: Path) -> list[str]:
    """hnd-edge playing ``video`` live against the local server; records and stats in ``tmp``."""
    return [
        "--server",
        f"127.0.0.1:{port}",
        "--video",
        video,
        "--live",
        "--config",
        config,
        "--random-weights",
        "0",
        "--output",
        str(tmp / "r.jsonl"),
        "--stats-interval",
        "30",
        "--stats-file",
        str(tmp / "stats.jsonl"),
        "--no-progress",
    ]


def rss_summary(samples: list[tuple[float, int]], warmup: float) -> dict[str, Any]:
    """RSS at the start, after ``warmup`` s, at the end and its max, and the least-squares slope after warm-up
    (NaN with fewer than 3 samples there)."""
    t = np.array([s[0] for s in samples])
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    keep = t >= warmup
    slope_kb_per_min = float(np.polyfit(t[keep] / 60, rss[keep], 1)[0]) if keep.sum() > 2 else float("nan")
    return {
        "rss_kb": {
            "start": int(rss[0]),
            "after_warmup": int(rss[keep][0]) if keep.any() else None,
            "end": int(rss[-1]),
            "max": int(rss.max()),
        },
        "slope_kb_per_min_after_warmup": slope_kb_per_min,
        "warmup_s": warmup,
    }


if __name__ == "__main__":
    sys.exit(main())
