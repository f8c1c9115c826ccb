"""Three hnd-server processes on loopback and several edges balancing over them (gRPC round_robin):
answers spread over the replicas; a replica SIGKILLed and one drained with SIGTERM mid-run, and a
rolling restart of all of them, lose no frame of any edge. Tiny test model, CPU, few frames."""

from __future__ import annotations

import threading
import time

import pytest
from hnd.bench.scaleout import (
    RepeatedFrames,
    Replica,
    edge_model,
    run_edge,
    sample_frames,
    target_of,
)

CONFIG = "test/faster_rcnn-b3ch"


@pytest.fixture(scope="module")
def head_fp():
    return edge_model(CONFIG)


@pytest.fixture
def replicas(tmp_path, request):
    """``count`` (indirect parameter, default 3) hnd-server processes, started together."""
    pool = [Replica(f"r{i}", CONFIG, log_dir=tmp_path) for i in range(getattr(request, "param", 3))]
    for r in pool:
        r.start()
    try:
        for r in pool:
            r.wait_serving()
        yield pool
    finally:
        for r in pool:
            r.stop()


def start_edges(target, head_fp, modes, stop=None, count=None, fps=None):
    """One thread per edge; returns (threads, {edge: records}, {edge: summary})."""
    head, fp = head_fp
    records: dict[str, list] = {name: [] for name in modes}
    summaries: dict[str, object] = {}
    images = sample_frames()

    def edge(name: str, stream: bool) -> None:
        summaries[name] = run_edge(
            target,
            head,
            fp,
            RepeatedFrames(images, count, fps, stop),
            records[name],
            stream=stream,
            max_inflight=2,
            max_attempts=3,
        )

    threads = [threading.Thread(target=edge, args=(name, stream), name=name) for name, stream in modes.items()]
    for t in threads:
        t.start()
    return threads, records, summaries


def wait_for(predicate, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def assert_every_frame_answered(records, summaries, count=None):
    for name, recs in records.items():
        frames = [r.frame for r in recs]
        assert frames == list(range(len(frames))), f"{name}: frames missing or out of order"
        if count is not None:
            assert len(frames) == count, name
        bad = [(r.frame, r.status, r.error) for r in recs if not r.ok]
        assert not bad, f"{name}: frames not answered: {bad}"
        assert summaries[name].failed == 0


MODES = {"unary-a": False, "unary-b": False, "stream": True}


@pytest.mark.timeout(600)
def test_spread_then_sigkill_and_sigterm_mid_run_lose_no_frame(replicas, head_fp):
    target = target_of(replicas)
    # 1. Spread: every replica answers a share (its own Prometheus counters say so).
    threads, records, summaries = start_edges(target, head_fp, {"unary-a": False, "unary-b": False}, count=9)
    for t in threads:
        t.join()
    assert_every_frame_answered(records, summaries, 9)
    counts = [r.answered() for r in replicas]
    assert sum(counts) == 18 and all(c > 0 for c in counts), counts
    per_replica = {}
    for recs in records.values():
        for rec in recs:
            per_replica[rec.replica] = per_replica.get(rec.replica, 0) + 1
    assert sorted(per_replica.values()) == sorted(counts)  # the edges' view matches the servers'

    # 2. Faults mid-run: SIGKILL one replica, drain another with SIGTERM, while unary and stream edges run.
    stop = threading.Event()
    threads, records, summaries = start_edges(target, head_fp, MODES, stop=stop)
    done = lambda n: lambda: all(len(r) >= n for r in records.values())
    wait_for(done(3))
    # Freeze replica 0 first, so calls are surely in flight on it when it dies: round_robin keeps
    # sending to it (its connection is up), and an edge whose oldest frame waits there stalls.
    replicas[0].freeze()
    # With two frames in flight an edge may still record the frame ahead of the stuck one, so look for an
    # edge that stops recording for a while (round_robin sends each edge to the frozen replica soon).
    stalled: list[str] = []
    deadline = time.monotonic() + 60
    while not stalled and time.monotonic() < deadline:
        before = {k: len(v) for k, v in records.items()}
        time.sleep(3)
        stalled = [k for k, v in records.items() if len(v) == before[k]]
    assert stalled, "no edge had a frame waiting on the frozen replica"
    replicas[0].kill()
    wait_for(done(6))
    assert replicas[1].terminate() == 0  # the drain ended cleanly
    # From here on only the survivor answers; the records of up to max_inflight (2) frames sent before the
    # drain ended may still come in after it, so look past them at frames sent afterwards.
    drained = {name: len(recs) for name, recs in records.items()}
    wait_for(lambda: all(len(recs) >= max(10, drained[name] + 5) for name, recs in records.items()))
    stop.set()
    for t in threads:
        t.join(timeout=300)
    # The frames stuck on the killed replica were answered by another: sent again by gRPC's retry
    # policy (unary; invisible to the edge) or by the edge (a broken stream: record.attempts > 1).
    assert_every_frame_answered(records, summaries)
    late = [rec.replica for name, recs in records.items() for rec in recs[drained[name] + 2 :]]
    assert len(late) >= 9 and all(r.endswith(f":{replicas[2].port}") for r in late), late  # only the survivor


@pytest.mark.timeout(900)
@pytest.mark.parametrize("replicas", [2], indirect=True)  # two keep it short: each restart is a model load
def test_rolling_restart_of_all_replicas_loses_no_frame(replicas, head_fp):
    stop = threading.Event()
    threads, records, summaries = start_edges(target_of(replicas), head_fp, MODES, stop=stop, fps=4)
    wait_for(lambda: all(len(r) >= 2 for r in records.values()))
    for r in replicas:
        r.restart()
    n = {name: len(recs) for name, recs in records.items()}
    wait_for(lambda: all(len(records[k]) >= n[k] + 2 for k in records))  # still flowing after the last restart
    stop.set()
    for t in threads:
        t.join(timeout=300)
    assert_every_frame_answered(records, summaries)
    assert all(r.starts == 2 for r in replicas)
