"""Several hnd-server replicas on loopback and edges balancing over them (gRPC round_robin).

``python -m hnd.bench.scaleout`` measures throughput with 1, 2, 3 replicas (each one ``hnd-server``
process) and several edges in this process, and prints a table (``--json`` keeps it). On a CPU
host it measures the mechanism (balancing, per-replica spread, what failover costs), not GPU
capacity: replicas share the host's cores.

The same pieces drive the loopback tests (tests/test_scaleout.py): ``Replica`` starts, kills,
drains and restarts one server process and reads its Prometheus counters; ``run_edge`` runs one
edge over a frame source against a target.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from hnd.common.files import atomic_write_json
from hnd.edge.api import make_mode
from hnd.edge.capture import Frame, FrameSource
from hnd.edge.client import ClientSettings, SplitClient
from hnd.edge.pipeline import EdgeOptions, EdgeRunner, Summary
from hnd.edge.records import FrameRecord
from hnd.server.local import LOOPBACK, free_ports, launch_server_process, scrape_requests, wait_serving


@dataclass
class Replica:
    """One ``hnd-server`` process on loopback, seeded random weights, started, waited for and scraped
    through ``hnd.server.local``; it keeps its ports, so a restart comes back at the same address."""

    name: str
    config: str = "test/faster_rcnn-b3ch"
    seed: int = 0
    threads: int = 1
    drain_s: float = 10.0
    extra: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        if not self.port:
            self.port, self.metrics_port = free_ports(2)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def weights(self) -> list[str]:
        return ["--random-weights", str(self.seed)]

    def flags(self) -> list[str]:
        """hnd-server's flags besides config, port and weights."""
        flags = ["--device", "cpu", "--metrics-port", str(self.metrics_port), "--threads", str(self.threads)]
        return flags + ["--drain-seconds", str(self.drain_s), "--log-level", "WARNING", *self.extra]

    def start(self) -> Replica:
        """Start the process (returns at once; ``wait_serving`` waits for the warm-up)."""
        self.starts += 1
        log: int | IO[str] = subprocess.DEVNULL
        if self.log_dir is not None:
            log = (Path(self.log_dir) / f"{self.name}-{self.starts}.log").open("w")
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "OMP_WAIT_POLICY": "PASSIVE"}
        self.proc = launch_server_process(self.config, self.port, self.weights, self.flags(), log, env)
        return self

    def wait_serving(self, timeout_s: float = 180.0) -> None:
        """Until SERVING; ServerStartError (naming the replica and the end of its log) when it exits or times out."""
        assert self.proc is not None
        wait_serving(self.proc, self.port, timeout_s, f"{self.name}: hnd-server", self._log_tail)

    def _log_tail(self, lines: int = 5) -> str:
        """The end of this start's log, so a failed start says why."""
        if self.log_dir is None:
            return ""
        path = Path(self.log_dir) / f"{self.name}-{self.starts}.log"
        try:
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return (": " + " | ".join(tail)) if tail else ""

    def kill(self) -> None:
        """SIGKILL: the replica dies with work in flight."""
        self._signal(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: the replica stops answering while its connections stay up (calls pile up on it)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def terminate(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the drain to end; returns the exit code."""
        return self._signal(signal.SIGTERM, timeout_s)

    def _signal(self, sig: int, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout_s)

    def restart(self, timeout_s: float = 180.0) -> None:
        """Rolling-restart step: drain (SIGTERM), start again on the same ports, wait until SERVING."""
        self.terminate()
        self.start()
        self.wait_serving(timeout_s)

    def counters(self) -> dict[tuple[str, str], float]:
        """``hnd_requests_total`` by (method, code), read from the replica's /metrics."""
        return scrape_requests(f"http://{LOOPBACK}:{self.metrics_port}/metrics")

    def answered(self) -> int:
        """Inference requests this replica answered OK (unary and stream messages)."""
        c = self.counters()
        return int(c.get(("Infer", "OK"), 0) + c.get(("InferStream", "OK"), 0))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def target_of(replicas: list[Replica]) -> str:
    """gRPC target syntax for a fixed list of replicas: ``ipv4:127.0.0.1:p1,127.0.0.1:p2``."""
    return "ipv4:" + ",".join(r.address for r in replicas)


class RepeatedFrames(FrameSource):
    """``count`` frames cycling over ``images`` (or until ``stop`` is set), ``fps`` apart when given.

    Frames are in order and never dropped, as from a file: every one must end as a record.
    """

    def __init__(
        self,
        images: list[np.ndarray],
        count: int | None = None,
        fps: float | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.images, self.count, self.fps, self.stop = images, count, fps, stop
        self.name = "repeat"

    def __iter__(self) -> Iterator[Frame]:
        i = 0
        next_t = time.monotonic()
        while (self.count is None or i < self.count) and not (self.stop is not None and self.stop.is_set()):
            if self.fps:
                time.sleep(max(0.0, next_t - time.monotonic()))
                next_t += 1.0 / self.fps
            wall = time.time()
            start = time.perf_counter_ns()
            yield Frame(
                i,
                f"frame{i}",
                self.images[i % len(self.images)],
                time.perf_counter_ns(),
                (time.perf_counter_ns() - start) / 1e6,
                wall,
            )
            i += 1


def sample_frames(n: int = 3, size: tuple[int, int] = (120, 160), seed: int = 0) -> list[np.ndarray]:
    """Seeded smooth RGB frames (blocks of 8 px), small so a CPU tail stays fast."""
    rng = np.random.default_rng(seed)
    h, w = size
    out = []
    for _ in range(n):
        base = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
        out.append(np.ascontiguousarray(np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:h, :w]))
    return out


def edge_model(config: str = "test/faster_rcnn-b3ch", seed: int = 0):
    """(head, fingerprint) of the student the replicas serve with ``--random-weights seed``."""
    from hnd.common.checkpoint import fingerprint
    from hnd.common.config import load_config, with_weights
    from hnd.common.build import build_model_from_config
    from hnd.common.split import split_model

    cfg = load_config(config)
    model = build_model_from_config(with_weights(cfg.model, None, seed), cfg.path)
    head, _ = split_model(model)
    return head, fingerprint(model)


def run_edge(
    target: str,
    head,
    fp: str,
    source: FrameSource,
    records: list[FrameRecord] | None = None,
    lb: str = "round_robin",
    stream: bool = False,
    max_inflight: int = 2,
    max_attempts: int = 3,
    timeout_s: float = 60.0,
    reconnect_timeout_s: float = 60.0,
) -> Summary:
    """One edge over ``source`` against ``target``; records are appended to ``records`` in frame order."""
    client = SplitClient(
        ClientSettings(
            target,
            lb=lb,
            timeout_s=timeout_s,
            connect_timeout_s=60.0,
            reconnect_timeout_s=reconnect_timeout_s,
            max_attempts=max_attempts,
        )
    )
    try:
        client.expected_fingerprint = fp
        options = EdgeOptions(
            max_inflight=max_inflight, stream=stream, max_attempts=max_attempts, keep_detections=False
        )
        runner = EdgeRunner(options, make_mode(options, head, fp), client)
        on_record = (lambda record, frame: records.append(record)) if records is not None else None
        return runner.run(source, on_record)
    finally:
        client.close()


def measure(
    replicas: list[Replica], head, fp: str, edges: int, frames: int, max_inflight: int, stream: bool = False
) -> dict[str, Any]:
    """Run ``edges`` edges of ``frames`` frames each at once over the replicas; throughput and spread."""
    images = sample_frames()
    before = [r.answered() for r in replicas]
    summaries: list[Summary] = []
    errors: list[BaseException] = []

    def edge() -> None:
        try:
            summaries.append(
                run_edge(
                    target_of(replicas),
                    head,
                    fp,
                    RepeatedFrames(images, frames),
                    stream=stream,
                    max_inflight=max_inflight,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=edge) for _ in range(edges)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise errors[0]
    answered = sum(s.answered for s in summaries)
    totals = [s.as_dict()["ms"].get("total", {}).get("p50", float("nan")) for s in summaries]
    return {
        "replicas": len(replicas),
        "edges": edges,
        "frames": edges * frames,
        "answered": answered,
        "failed": sum(s.failed for s in summaries),
        "wall_s": wall,
        "images_per_s": answered / wall,
        "p50_total_ms": float(np.nanmedian(totals)),
        "per_replica": [r.answered() - b for r, b in zip(replicas, before)],
    }


def faults(replicas: list[Replica], head, fp: str, edges: int, frames: int, rolling: bool = False) -> dict[str, Any]:
    """Edges (half unary, half stream) run ``frames`` frames each while replicas fail under them.

    Default: SIGKILL the first replica after a quarter of the frames, SIGTERM (drain) the second after
    half. ``rolling``: restart every replica in turn (drain, start, wait until SERVING), paced edges.
    Returns frames, answered, failed, retried and answers per replica (from the edges' records).
    """
    images = sample_frames()
    records: list[list[FrameRecord]] = [[] for _ in range(edges)]
    summaries: list[Summary] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def edge(i: int) -> None:
        try:
            source = RepeatedFrames(images, None if rolling else frames, fps=2.0 if rolling else None, stop=stop)
            summaries.append(run_edge(target_of(replicas), head, fp, source, records[i], stream=i % 2 == 1))
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=edge, args=(i,)) for i in range(edges)]
    start = time.perf_counter()
    for t in threads:
        t.start()

    def wait_frames(n: int) -> None:
        while min(len(r) for r in records) < n and any(t.is_alive() for t in threads):
            time.sleep(0.05)

    if rolling:
        wait_frames(2)
        for r in replicas:
            r.restart()
        wait_frames(max(len(r) for r in records) + 2)
        stop.set()
    else:
        wait_frames(frames // 4)
        replicas[0].kill()
        wait_frames(frames // 2)
        replicas[1].terminate()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    flat = [rec for recs in records for rec in recs]
    per_replica: dict[str, int] = {}
    for rec in flat:
        if rec.ok and rec.replica:
            per_replica[rec.replica] = per_replica.get(rec.replica, 0) + 1
    return {
        "scenario": "rolling restart" if rolling else "SIGKILL r0, SIGTERM r1",
        "edges": edges,
        "frames": len(flat),
        "answered": sum(r.ok for r in flat),
        "failed": sum(not r.ok for r in flat),
        "retried": sum(r.attempts > 1 for r in flat),
        "max_attempts_used": max((r.attempts for r in flat), default=0),
        "in_order": all([r.frame for r in recs] == list(range(len(recs))) for recs in records),
        "wall_s": time.perf_counter() - start,
        "per_replica": per_replica,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.scaleout", description=__doc__.splitlines()[0])
    p.add_argument("--replicas", default="1,2,3", help="replica counts to measure (comma-separated)")
    p.add_argument("--edges", type=int, default=3)
    p.add_argument("--frames", type=int, default=20, help="frames per edge")
    p.add_argument("--max-inflight", type=int, default=2)
    p.add_argument("--stream", action="store_true", help="edges use InferStream instead of unary calls")
    p.add_argument("--config", default="test/faster_rcnn-b3ch")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    p.add_argument(
        "--faults",
        action="store_true",
        help="instead: 3 replicas, SIGKILL one and drain one mid-run, then a rolling restart; "
        "reports frames answered / failed / retried",
    )
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.faults:
        return main_faults(args)
    counts = [int(c) for c in args.replicas.split(",")]
    import torch

    torch.set_num_threads(1)
    head, fp = edge_model(args.config)
    pool = [Replica(f"r{i}", args.config, threads=args.threads) for i in range(max(counts))]
    rows = []
    try:
        for r in pool:
            r.start()
        for r in pool:
            r.wait_serving()
        measure(pool[:1], head, fp, 1, 2, 1)  # warm the edge (first calls pay lazy init)
        for n in counts:
            row = measure(pool[:n], head, fp, args.edges, args.frames, args.max_inflight, args.stream)
            rows.append(row)
            print(
                f"replicas {n}: {row['images_per_s']:.2f} images/s, p50 total {row['p50_total_ms']:.0f} ms, "
                f"per replica {row['per_replica']}, failed {row['failed']}",
                flush=True,
            )
    finally:
        for r in pool:
            r.stop()
    base = rows[0]["images_per_s"] if rows else float("nan")
    print("\n| replicas | edges x frames | images/s | x 1 replica | p50 total ms | answers per replica |")
    print("|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(
            f"| {row['replicas']} | {row['edges']} x {args.frames} | {row['images_per_s']:.2f} | "
            f"{row['images_per_s'] / base:.2f} | {row['p50_total_ms']:.0f} | {row['per_replica']} |"
        )
    if args.json:
        atomic_write_json(args.json, {"args": vars(args), "rows": rows})
    return 0


def main_faults(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)
    head, fp = edge_model(args.config)
    rows = []
    for rolling in (False, True):
        pool = [Replica(f"r{i}", args.config, threads=args.threads) for i in range(3)]
        try:
            for r in pool:
                r.start()
            for r in pool:
                r.wait_serving()
            row = faults(pool, head, fp, args.edges, args.frames, rolling=rolling)
        finally:
            for r in pool:
                r.stop()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| scenario | edges | frames | answered | failed | resent | in order | answers per replica |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for row in rows:
        spread = ", ".join(str(v) for _, v in sorted(row["per_replica"].items()))
        print(
            f"| {row['scenario']} | {row['edges']} | {row['frames']} | {row['answered']} | {row['failed']} | "
            f"{row['retried']} | {'yes' if row['in_order'] else 'NO'} | {spread} |"
        )
    if args.json:
        atomic_write_json(args.json, {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
