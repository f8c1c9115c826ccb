"""hnd.bench.overhead and hnd.bench.batching: they run, measure what they say, and the stand-in tails behave."""

from __future__ import annotations

import time

import pytest
import torch

from hnd.bench import batching, decode_profile, overhead, speed_clients, speed_servers
from hnd.common.split import SplitMeta

CONFIG = "test/faster_rcnn-b3ch"


def test_stand_in_tails():
    z = torch.zeros(3, 3, 12, 12)
    meta = SplitMeta(((32, 32),) * 3, ((32, 32),) * 3, (32, 32))
    out = speed_servers.parse_tail("trivial", detections=7)(z, meta)
    assert len(out) == 3 and out[0]["boxes"].shape == (7, 4) and out[0]["labels"].dtype == torch.int64
    sleep = speed_servers.parse_tail("sleep:20,10")
    t = time.monotonic()
    sleep(z, meta)
    assert time.monotonic() - t >= 0.05  # 20 + 3 x 10 ms
    assert speed_servers.parse_tail("real") is None
    with pytest.raises(ValueError, match="unknown tail"):
        speed_servers.parse_tail("fast")
    assert batching.parse_policies("1x0,8x2.5") == [(1, 0.0), (8, 2.5)]


def test_overhead_benchmark_measures_both_sides():
    r = overhead.run(CONFIG, size=(120, 160), requests=6, rounds=2, warmup=2, ladder=True)
    assert r["message_bytes"] > r["payload_bytes"] > 0 and r["reply_bytes"] > 0
    assert r["requests_per_mode"] == 6
    for call in ("unary", "stream"):
        m = r["modes"][call]
        assert m["floor_ms"]["p50"] > 0 and m["hnd_overhead_ms"]["p50"] > 0
        assert m["hnd_total_ms"]["p50"] >= m["hnd_overhead_ms"]["p50"]
        assert m["ratio_p50"] == pytest.approx(m["hnd_overhead_ms"]["p50"] / m["floor_ms"]["p50"])
        assert m["target_met"] == (m["ratio_p50"] <= overhead.TARGET_RATIO)
    assert "overhead/floor" in overhead.format_table(r)
    # The rungs between the floor and hnd answered the same requests (the edge's client checks the ids).
    for step in speed_servers.LADDER:
        assert all(r["ladder"][step][call]["hnd_total_ms"]["p50"] > 0 for call in ("unary", "stream"))
    assert "+ validate/decode" in overhead.format_table(r)


def test_batching_benchmark_batches_only_under_concurrency():
    """Adaptive policy (delay 0): one edge never waits for a batch; eight edges against a busy GPU-like tail
    make batches (and so more images/s than one edge)."""
    r = batching.run(CONFIG, "sleep:30,1", policies=[(8, 0.0)], edges=[1, 8], seconds=1.0, size=(120, 160))
    one, eight = r["rows"]
    assert one["mean_batch"] == 1.0 and one["queue_ms_p50"] < 30
    assert eight["mean_batch"] > 1.5
    assert eight["images_per_s"] > one["images_per_s"]
    assert "| max-batch |" in batching.format_markdown(r)


def test_overhead_profile_splits_the_server_decode_into_its_steps():
    import torch

    threads = torch.get_num_threads()
    try:
        request, _ = speed_clients.make_request(CONFIG, 0, 8, (120, 160))
        steps = decode_profile.profile_steps(request, speed_servers.build_runner(CONFIG, 0, "trivial", 5), repeats=3)
    finally:
        torch.set_num_threads(threads)  # build_runner pins the server to one thread
    parts = [k.strip() for k in steps if k.startswith("  ")]
    assert parts[:3] == [
        "proto -> EncodedTensor, validate",
        "request budget (sizes, shape)",
        "codec.validate (again in decode)",
    ]
    assert {"zstd decompress", "unpack symbols", "dequantize", "numpy -> torch"} <= set(parts)
    assert "server: batch queue -> compute thread -> loop" in steps
    assert all(v > 0 for v in steps.values())


def test_loop_probe_times_another_call_while_the_server_decodes():
    r = overhead.loop_probe(
        CONFIG, size=(120, 160), seconds=0.4, probe_interval_ms=20, policies=("always off the loop",)
    )
    assert list(r["policies"]) == ["always off the loop"]
    assert not r["learned"] and 0 < r["payload_bytes"] and r["raw_bytes"] < r["offload_decode_bytes"]
    for p in r["policies"].values():
        assert p["infers"] > 0 and p["probes"] > 0 and p["infer_ms_p50"] > 0
        assert 0 < p["probe_ms"]["p50"] <= p["probe_ms"]["max"]
    assert "GetModelInfo meanwhile" in overhead.format_probe(r)
