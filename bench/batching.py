"""python -m hnd.bench.batching: images/s and latency per batching policy and number of concurrent edges.

    python -m hnd.bench.batching                                   # GPU-like stand-in tail, 1..16 edges
    python -m hnd.bench.batching --tail real --config test/faster_rcnn-b3ch --edges 1,2,4

Each policy (``--max-batch`` x ``--max-delay-ms``) gets its own ``hnd-server`` process; for each number of
edges E, E clients (one gRPC channel each, as separate devices) send the same real bottleneck in a closed
loop, one request in flight each, for ``--seconds``. Reported per (policy, E): images/s, latency p50 / p99
(request sent -> answer), the mean batch the server formed and its queue p50.

The tail: ``sleep`` (default) waits ``16.4 + 6.9 * B`` ms, the cost shape of the float32 tail measured on an
H100 (batch 1 23.3 ms, batch 8 71.4 ms), so the batching mechanism is measured against a GPU-like cost on
any machine; ``real`` runs the config's tail on this CPU (where batching buys little: a CPU's convolution
throughput barely grows with the batch).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from hnd.bench.speed_clients import make_request
from hnd.bench.speed_servers import start_child, stop_child
from hnd.common.files import atomic_write_json
from hnd.common.timing import percentiles

DEFAULT_POLICIES = "1x0,8x0,8x5,8x20"
DEFAULT_EDGES = "1,2,4,8,16"


def parse_policies(text: str) -> list[tuple[int, float]]:
    """``"8x0,8x5"`` -> [(max_batch 8, max_delay_ms 0.0), (8, 5.0)]."""
    out = []
    for part in text.split(","):
        b, d = part.lower().split("x")
        out.append((int(b), float(d)))
    return out


def _edge(client, request, stop_at: float, out: list, start: threading.Event) -> None:
    from hnd.edge.client import next_request_id

    start.wait()
    while time.monotonic() < stop_at:
        request.request_id = next_request_id(0)
        t = time.perf_counter_ns()
        reply = client.submit(request).result()
        s = reply.response.timings
        out.append(((reply.done_ns - t) / 1e6, s.batch_size, s.queue_us / 1e3, len(reply.response.detections)))


def measure(port: int, request, edges: int, seconds: float, warmup_s: float = 1.0) -> dict[str, Any]:
    """E edges in a closed loop against the server on ``port``; the figures of the timed window."""
    from hnd.edge.client import ClientSettings, SplitClient

    clients = [SplitClient(ClientSettings(f"127.0.0.1:{port}")) for _ in range(edges)]
    for c in clients:
        c.model_info()
        c.submit(request).result()
    results: list[list] = [[] for _ in range(edges)]
    start = threading.Event()
    t_start = time.monotonic() + 0.1
    stop_at = t_start + warmup_s + seconds
    threads = [
        threading.Thread(target=_edge, args=(c, _copy(request), stop_at, r, start)) for c, r in zip(clients, results)
    ]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    for c in clients:
        c.close()
    # Drop each edge's first warmup_s of answers (connections, allocator, the server's first batches).
    samples = []
    for r in results:
        elapsed = np.cumsum([x[0] for x in r]) / 1e3
        samples += [x for x, e in zip(r, elapsed) if e > warmup_s]
    lat = [x[0] for x in samples]
    images = sum(x[3] for x in samples)
    return {
        "edges": edges,
        "images": images,
        "images_per_s": images / seconds,
        "latency_ms": percentiles(lat, (50, 99)),
        "mean_batch": float(np.mean([x[1] for x in samples])) if samples else 0.0,
        "queue_ms_p50": float(np.median([x[2] for x in samples])) if samples else float("nan"),
    }


def _copy(request):
    from hnd.proto.v1 import split_inference_pb2 as pb

    out = pb.InferRequest()
    out.CopyFrom(request)
    return out


def run(
    config: str = "hnd/faster_rcnn-b3ch",
    tail: str = "sleep",
    policies: list[tuple[int, float]] | None = None,
    edges: list[int] | None = None,
    seconds: float = 5.0,
    size: tuple[int, int] = (480, 640),
    seed: int = 0,
) -> dict[str, Any]:
    from hnd.server.local import free_port

    policies = policies or parse_policies(DEFAULT_POLICIES)
    edges = edges or [int(e) for e in DEFAULT_EDGES.split(",")]
    request, _ = make_request(config, seed, 8, size)
    rows = []
    for max_batch, delay in policies:
        port = free_port()
        server = start_child(
            [
                "--serve",
                "hnd",
                "--port",
                str(port),
                "--config",
                config,
                "--seed",
                str(seed),
                "--tail",
                tail,
                "--max-batch",
                str(max_batch),
                "--max-delay-ms",
                str(delay),
            ]
        )
        try:
            for e in edges:
                row = measure(port, request, e, seconds)
                row.update(max_batch=max_batch, max_delay_ms=delay)
                rows.append(row)
                print(format_row(row), flush=True)
        finally:
            stop_child(server)
    return {
        "config": config,
        "tail": tail,
        "seconds": seconds,
        "frame": list(size),
        "message_bytes": request.ByteSize(),
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def format_row(r: dict[str, Any]) -> str:
    lat = r["latency_ms"]
    return (
        f"max-batch {r['max_batch']:>2} delay {r['max_delay_ms']:>4g} ms  edges {r['edges']:>2}  "
        f"{r['images_per_s']:>7.1f} images/s  p50 {lat['p50']:>7.1f} ms  p99 {lat['p99']:>7.1f} ms  "
        f"mean batch {r['mean_batch']:>4.1f}  queue p50 {r['queue_ms_p50']:>6.1f} ms"
    )


def format_markdown(result: dict[str, Any]) -> str:
    lines = [
        "| max-batch | max-delay-ms | edges | images/s | p50 ms | p99 ms | mean batch | queue p50 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lat = r["latency_ms"]
        lines.append(
            f"| {r['max_batch']} | {r['max_delay_ms']:g} | {r['edges']} | {r['images_per_s']:.1f} | "
            f"{lat['p50']:.1f} | {lat['p99']:.1f} | {r['mean_batch']:.2f} | {r['queue_ms_p50']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.batching", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="hnd/faster_rcnn-b3ch")
    p.add_argument("--tail", default="sleep", help="sleep[:BASE_MS,PER_IMAGE_MS] (default: H100-like) | real | trivial")
    p.add_argument("--policies", default=DEFAULT_POLICIES, help="MAX_BATCHxMAX_DELAY_MS list (default %(default)s)")
    p.add_argument("--edges", default=DEFAULT_EDGES, help="numbers of concurrent edges (default %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="timed window per point")
    p.add_argument("--frame", default="480x640", help="HxW of the sample photo (default 480x640)")
    p.add_argument("--json", help="write the result as JSON")
    args = p.parse_args(argv)
    try:
        h, w = (int(v) for v in args.frame.lower().split("x"))
        policies = parse_policies(args.policies)
        edges = [int(e) for e in args.edges.split(",")]
    except ValueError:
        p.error("--frame is HxW, --policies like 8x0,8x5, --edges like 1,2,4")
    result = run(args.config, args.tail, policies, edges, args.seconds, (h, w))
    print(format_markdown(result))
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
