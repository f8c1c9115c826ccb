"""perf_analyzer (Triton's load generator, over KServe v2) beside hnd's own clients, on one hnd-server.

    python -m hnd.bench.interop [--config test/faster_rcnn-b3ch] [--concurrency 1 2] [--requests 40]

One ``hnd-server`` subprocess; one real JPEG (scikit-image's astronaut, resized to ``--size``); then, side by
side on that server, at each concurrency:

* ``perf_analyzer -m hnd_offload`` (from ``.ci/make-tritonclient-venv``'s venv, or ``--perf-analyzer``),
  its own table (throughput, client-side p50 / p99 latency);
* hnd.v1 ``Infer`` with the same JPEG bytes (a plain gRPC stub, ``--concurrency`` calls in flight);
* ``hnd.connect(mode="offload")``'s ``detect_many`` on the decoded frame (the edge re-encodes it as JPEG q90;
  ``max_inflight`` = concurrency), the application's view.

Every row's server time comes from the server's own ``hnd_stage_seconds`` (compute) over that row's calls.
Prints a Markdown table (machine and load average included) for docs/benchmarks/interop.md.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import csv
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import cv2
import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

import hnd
from hnd.edge.capture import sample_images
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import split_inference_pb2_grpc as pb_grpc
from hnd.server.local import server_process

ROOT = Path(__file__).resolve().parents[1]


def compute_seconds(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the server's compute stage so far."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:  # noqa: S310 - loopback
        text = r.read().decode()
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "hnd_stage_seconds_sum" and s.labels.get("stage") == "compute":
                total = s.value
            if s.name == "hnd_stage_seconds_count" and s.labels.get("stage") == "compute":
                count = s.value
    return total, count


def row(name: str, latencies_ms: list[float], wall_s: float, server: tuple[float, float]) -> dict:
    lat = np.asarray(latencies_ms)
    return {
        "client": name,
        "infer_per_s": len(lat) / wall_s,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "server_compute_ms": 1000 * server[0] / max(server[1], 1),
    }


def run_v1(target: str, jpeg: bytes, concurrency: int, n: int) -> tuple[list[float], float]:
    """n hnd.v1 Infer calls with ``jpeg``, ``concurrency`` at a time; (latencies ms, wall s)."""
    channel = grpc.insecure_channel(target)
    stub = pb_grpc.SplitInferenceStub(channel)
    request = pb.InferRequest(image=pb.EncodedImage(format=pb.EncodedImage.FORMAT_JPEG, data=jpeg))
    stub.Infer(request)  # connection set up outside the timing

    def one(_: int) -> float:
        t = time.perf_counter()
        stub.Infer(request, timeout=60)
        return (time.perf_counter() - t) * 1000

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        lat = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    channel.close()
    return lat, wall


def run_api(target: str, frame: np.ndarray, concurrency: int, n: int) -> tuple[list[float], float]:
    """n frames through hnd.connect(mode="offload").detect_many; (record total ms per frame, wall s)."""
    with hnd.connect(target, mode="offload", max_inflight=concurrency) as detector:
        detector.detect(frame)
        start = time.perf_counter()
        lat = [d.record.ms.total for d in detector.detect_many([frame] * n)]
        return lat, time.perf_counter() - start


def run_perf_analyzer(binary: str, target: str, jpeg: bytes, concurrency: int, folder: Path) -> dict:
    """perf_analyzer's own row for ``concurrency`` (its CSV: throughput, p50 / p99 client latency in us)."""
    data = folder / "inputs.json"
    raw = struct.pack("<I", len(jpeg)) + jpeg  # a BYTES element: 4-byte length, then the bytes
    data.write_text(json.dumps({"data": [{"IMAGE": {"b64": base64.b64encode(raw).decode()}}]}))
    out = folder / f"perf-{concurrency}.csv"
    cmd = [binary, "-m", "hnd_offload", "-i", "grpc", "-u", target, "--input-data", str(data)]
    cmd += ["--concurrency-range", str(concurrency), "--measurement-interval", "4000", "-f", str(out)]
    # A shared, loaded machine never gives perf_analyzer's default 10 % stability: take its windows as they come.
    cmd += ["--stability-percentage", "100", "--max-trials", "3"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode != 0:
        raise RuntimeError(f"perf_analyzer failed ({run.returncode}): {run.stdout[-2000:]}{run.stderr[-2000:]}")
    r = next(csv.DictReader(out.open()))
    return {
        "infer_per_s": float(r["Inferences/Second"]),
        "p50_ms": float(r["p50 latency"]) / 1000,
        "p99_ms": float(r["p99 latency"]) / 1000,
        "table": run.stdout,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.interop", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="test/faster_rcnn-b3ch")
    p.add_argument("--random-weights", type=int, default=0)
    p.add_argument("--size", type=int, default=240, help="the JPEG's side in pixels (default 240)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    p.add_argument("--requests", type=int, default=40, help="calls per hnd row (default 40)")
    p.add_argument(
        "--perf-analyzer",
        default=os.environ.get("HND_PERF_ANALYZER", str(ROOT / ".ci" / "tritonclient-venv" / "bin" / "perf_analyzer")),
    )
    args = p.parse_args(argv)
    photo = cv2.resize(sample_images()[0][0], (args.size, args.size), interpolation=cv2.INTER_AREA)
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    rows = []
    tables = []
    extra = ["--device", "cpu", "--max-batch", "4"]
    with server_process(args.config, ["--random-weights", str(args.random_weights)], extra, metrics=True) as s:
        with tempfile.TemporaryDirectory() as tmp:
            for c in args.concurrency:
                before = compute_seconds(s.metrics_url)
                pa = run_perf_analyzer(args.perf_analyzer, s.target, jpeg, c, Path(tmp))
                after = compute_seconds(s.metrics_url)
                server = (after[0] - before[0], after[1] - before[1])
                rows.append(
                    {"client": f"perf_analyzer (KServe v2), concurrency {c}", **pa}
                    | {"server_compute_ms": 1000 * server[0] / max(server[1], 1)}
                )
                tables.append(rows[-1].pop("table"))
                clients: list[tuple[str, Callable[..., tuple[list[float], float]]]] = [
                    (f"hnd.v1 Infer, {c} in flight", lambda c=c: run_v1(s.target, jpeg, c, args.requests)),
                    (f"hnd.connect offload, max_inflight {c}", lambda c=c: run_api(s.target, photo, c, args.requests)),
                ]
                for name, client in clients:
                    before = compute_seconds(s.metrics_url)
                    lat, wall = client()
                    after = compute_seconds(s.metrics_url)
                    rows.append(row(name, lat, wall, (after[0] - before[0], after[1] - before[1])))
    load = os.getloadavg()
    print(f"machine: {platform.machine()} {os.cpu_count()} CPUs ({platform.platform()}); load average {load[0]:.2f}")
    print(f"config {args.config} (seeded weights), one {args.size}x{args.size} JPEG of {len(jpeg):,} bytes\n")
    print("| client | inferences/s | p50 ms | p99 ms | server compute ms |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['client']} | {r['infer_per_s']:.1f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['server_compute_ms']:.1f} |"
        )
    print("\nperf_analyzer's own output:\n")
    for t in tables:
        print(t.strip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
