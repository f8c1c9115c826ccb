"""hnd.bench.overhead and hnd.bench.batching: they run, measure what they say, and the stand-in tails behave."""

from __future__ import annotations

import sys
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
    r = overhead.run(
        CONFIG, size=(120, 160), requests=6, rounds=2, warmup=2, ladder=True, small=True, compare_python=sys.executable
    )
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
    # The small messages: 4-bit intra on unary, the session's delta frames on the stream (each decoded on its
    # session, else time_hnd_deltas raises), each against the floor at its own size.
    small = r["small"]
    assert 0 < small["message_bytes"]["stream"] < small["message_bytes"]["unary"] < r["message_bytes"]
    for call in ("unary", "stream"):
        m = small["modes"][call]
        assert m["ratio_p50"] == pytest.approx(m["hnd_overhead_ms"]["p50"] / m["floor_ms"]["p50"])
    assert "small messages, same rounds" in overhead.format_table(r)
    # --ladder with --small: the intra message through the floor, each rung and hnd, both ways.
    assert set(small["ladder_p50_ms"]) == {"floor", *speed_servers.LADDER, "hnd"}
    assert all(v[call] > 0 for v in small["ladder_p50_ms"].values() for call in ("unary", "stream"))
    # --compare-python: the other build's server gets the same calls, small messages included.
    for modes in (r["compare"]["modes"], small["compare_modes"]):
        assert all(modes[call]["hnd_overhead_ms"]["p50"] > 0 for call in ("unary", "stream"))
    assert "unary*" in overhead.format_table(r).split("small messages")[1]


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
        runner = speed_servers.build_runner(CONFIG, 0, "trivial", 5)
        steps = decode_profile.profile_steps(request, runner, repeats=3)
        four_bit, _ = speed_clients.make_request(CONFIG, 0, 4, (120, 160))
        table_steps = decode_profile.profile_steps(four_bit, runner, repeats=3)
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
    # 4 bits of one scale: the decode's table step in place of unpack + dequantize, as codec.decode runs it.
    table_parts = {k.strip() for k in table_steps if k.startswith("  ")}
    assert "packed bytes -> floats (per-byte table)" in table_parts and "unpack symbols" not in table_parts


def test_profiles_of_two_bit_widths_are_shown_in_path_order():
    big = ["server: validate + decode", "  zstd decompress", "  unpack symbols", "  dequantize", "  numpy -> torch"]
    small = [
        "server: validate + decode",
        "  zstd decompress",
        "  packed bytes -> floats (per-byte table)",
        "  numpy -> torch",
    ]
    assert overhead._merged_steps(big, small) == big[:2] + [small[2]] + big[2:]


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


def test_gemm_models_compute_the_product_they_time():
    """hnd.bench.gemm's sessions compute A x B (so the rate they give is a matrix multiply's)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from hnd.bench import gemm

    for precision in gemm.GEMM_OPS:
        data, a = gemm.gemm_model(precision, 8, 16, 4)
        b = numpy_helper.to_array(next(i for i in onnx.load_from_string(data).graph.initializer if i.name == "B"))
        y = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
        if precision == "fp32":
            np.testing.assert_allclose(y, a @ b, rtol=1e-5, atol=1e-4)
        elif precision == "int8":
            assert np.array_equal(y, (a.astype(np.int32) - 128) @ b.astype(np.int32))
        else:  # y = round(0.02 * 0.01 * (a - 128) @ b / 0.5) + 128, saturated to uint8
            want = np.clip(np.rint((a.astype(np.int32) - 128) @ b.astype(np.int32) * 0.0004) + 128, 0, 255)
            assert np.abs(y.astype(np.int32) - want).max() <= 1
    rate = gemm.gemm_rate("int8", 1, (64, 64, 64), repeats=2)
    assert rate.op == "MatMulInteger" and rate.gmac_per_s == pytest.approx(64**3 / rate.ms / 1e6)


def test_head_gmac_counts_every_convolution():
    """Stem 7x7/2 on 3 channels, maxpool /2, then the encoder's four 2x2 convs with padding 1 (64-256-64-C)."""
    from hnd.bench.head import head_gmac
    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config
    from hnd.common.split import split_model

    cfg = load_config(CONFIG)
    head, _ = split_model(build_model_from_config(cfg.model, cfg.path))
    h, w = 64, 96
    stem = 64 * (h // 2) * (w // 2) * 3 * 49
    h, w = h // 4, w // 4  # after the maxpool
    chans = [(64, 64), (64, 256), (256, 64), (64, 3)]
    enc = sum(co * (h + 1 + i) * (w + 1 + i) * ci * 4 for i, (ci, co) in enumerate(chans))
    assert head_gmac(head.eval(), (64, 96)) == pytest.approx((stem + enc) / 1e9)


def test_head_benchmark_levers_side_by_side(monkeypatch):
    """python -m hnd.bench.head: every cell against the GEMM rate of its precision and threads, the levers
    in turns (each with its agreement), and the int8 head's frames/s over two cores."""
    import numpy as np

    from hnd.bench import head as bench_head

    small = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    monkeypatch.setattr(bench_head, "frames", lambda: {"640x480": small})
    res = bench_head.run(CONFIG, None, 0, [1, 2], 1, lever_rounds=1)
    assert set(res.gemm_gmac_per_s) == {"1", "2"} and len(res.load_average) == 6
    for c in res.cells:
        assert c.gmac > 0 and c.gmac_per_s == pytest.approx(c.gmac / c.best_ms * 1e3)
        assert (c.vs_gemm > 0) == c.runtime.startswith("ORT")
    names = {r.name for r in res.levers}
    assert {"int8, direct stem", "int8, s2d stem, uint8 pixels (the int8 file)", "fp32, s2d stem"} <= names
    assert all(r.max_abs_diff < 1e-4 for r in res.levers if r.name.startswith("fp32") and "uint8" not in r.name)
    # Each lever's own preprocessing is timed beside it: uint8 pixels skip the float conversion.
    assert all(r.preprocess_ms > 0 for r in res.levers)
    assert set(res.frames_per_s) == {
        "1 session x 1 thread",
        "1 session x 2 threads",
        "2 sessions x 1 thread",
        "1 session x 1 thread, 2 callers",
        "edge stages, 1 head worker",
        "edge stages, 2 head workers",
    }
    assert set(res.cores_used) == set(res.frames_per_s) and all(v > 0 for v in res.cores_used.values())
    text = bench_head.markdown(res)
    assert "share of the same precision's GEMM rate" in text and "Speed-up of 2 threads" in text
    assert "frames/s over the two cores" in text


def test_temporal_benchmark_compares_heads_and_hysteresis_side_by_side():
    """python -m hnd.bench.speed_temporal: every head x coding on the same synthetic video, ratios to the fp32
    head and to intra; hysteresis sends fewer bytes than none on sensor noise, fp32 or int8."""
    from hnd.bench import speed_temporal

    res = speed_temporal.run(CONFIG, None, 0, 3, (128, 96), 4, [0.0, 0.25])
    by = {(r.head, r.coding): r for r in res.rows}
    assert set(by) == {(h, c) for h in speed_temporal.HEADS for c in ("intra", "temporal h=0", "temporal h=0.25")}
    for r in res.rows:
        assert r.later_bytes > 0 and 0.0 <= r.f1 <= 1.0 and r.rms_steps > 0
        assert r.vs_fp32_bytes == pytest.approx(r.later_bytes / by[("fp32", r.coding)].later_bytes)
        assert r.f1_vs_intra == pytest.approx(r.f1 - by[(r.head, "intra")].f1)
    for head in ("fp32", "int8"):
        assert by[(head, "temporal h=0.25")].later_bytes < by[(head, "temporal h=0")].later_bytes
    assert "| int8 | temporal h=0.25 |" in speed_temporal.markdown(res)
