"""hnd-bench --adapt-trace: adaptive against each fixed point over a link trace (a short one, tiny model)."""

from __future__ import annotations

import json

import pytest

from hnd.bench import cli


def test_adapt_trace_writes_the_table_the_runs_and_the_plot(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    # the second phase's rate is relative to the points: between where 2-bit and 8-bit just fit the target
    trace.write_text("time_s,rate,delay\n0,50mbit,10ms\n1.5,fit:2b..8b\n")
    out = tmp_path / "out"
    argv = ["--adapt-trace", str(trace), "--target-latency-ms", "5000", "--duration", "3", "--frames", "2"]
    assert cli.main([*argv, "--bits", "8,2", "--clip-size", "64x48", "--fps", "0", "--out", str(out)]) == 0
    data = json.loads((out / "adaptive.json").read_text())
    from hnd.bench.adapt_trace import LinkCosts, fit_rate_mbit
    from hnd.edge.adapt import OperatingPoint

    costs = LinkCosts(**data["run"]["costs"])
    assert costs.frames >= 3 and costs.rtt_ms >= 20 and costs.compute_scale > 0 and costs.extra_bytes > 0
    two, eight = (
        OperatingPoint(**p) for p in sorted(data["points"], key=lambda p: p["bytes_mean"]) if p["mode"] == "split"
    )
    fits = [fit_rate_mbit(p, costs, 5000) for p in (two, eight)]
    assert f"1.5 s: {(fits[0] * fits[1]) ** 0.5:.4g} Mbit/s" in data["run"]["trace_rows"]
    runs = [f["run"] for f in data["figures"]]
    assert runs == ["adaptive", "split-2b-tensor-temporal-k10-native", "split-8b-tensor-temporal-k10-native"]
    for f in data["figures"]:
        assert f["frames"] >= 1 and 0 <= f["within_share"] <= 1 and f["within_target"] <= f["frames"]
        assert f["rounds"] == 1 and f["meets_objective"] <= f["within_target"] <= f["answered"]
    assert all(f["answered"] >= 1 for f in data["figures"]), data["figures"]  # every setting's frames served
    assert data["machine"]["cores"] and (out / "points.json").exists() and (out / "adaptive.png").stat().st_size
    assert (
        "| adaptive |" in (out / "adaptive.md").read_text()
        and "| run | frames | dropped | within target | share | meets objective |" in capsys.readouterr().out
    )


def test_adapt_trace_errors_are_one_line(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("0,fast\n")
    assert cli.main(["--adapt-trace", str(trace)]) == 2  # no objective
    assert cli.main(["--adapt-trace", str(trace), "--max-kbps", "10"]) == 2  # a bad rate
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("hnd-bench --adapt-trace: error:") for line in err), err
    assert "objective" in err[0] and "rate 'fast'" in err[1]


def test_frames_meet_the_objective_within_the_target_at_the_agreement_floor():
    from hnd.bench.adapt_trace import RunResult
    from hnd.edge.adapt import Objective

    agreement = {"rich": 0.95, "poor": 0.6}
    frames = [(0.0, "rich", "OK", 900.0, 100, None), (1.0, "rich", "OK", 1100.0, 100, None)]
    frames += [(2.0, "poor", "OK", 100.0, 10, None), (3.0, "rich", "DEADLINE_EXCEEDED", None, 100, None)]
    f = RunResult("adaptive", frames, rounds=1).figures(Objective(1000.0, None, 0.8), agreement)
    assert (f["frames"], f["answered"], f["within_target"], f["meets_objective"]) == (4, 3, 2, 1)
    assert f["meets_share"] == 0.25 and f["mean_agreement"] == pytest.approx((0.95 * 2 + 0.6) / 3)
    # a fixed point below the floor meets it with no frame, however fast
    poor = RunResult("poor", [(0.0, "poor", "OK", 10.0, 10, None)] * 3, rounds=1)
    assert poor.figures(Objective(1000.0, None, 0.8), agreement)["meets_objective"] == 0
    assert poor.figures(Objective(1000.0), agreement)["meets_objective"] == 3


def test_rounds_interleave_the_settings_each_starting_one_later():
    from hnd.bench.adapt_trace import round_order

    assert round_order(3, 4) == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_timely_agreement_counts_every_camera_frame_and_a_late_answer_as_nothing():
    from hnd.bench.adapt_trace import DROPPED, RunResult
    from hnd.edge.adapt import Objective

    agreement = {"rich": 0.9, "poor": 0.5}
    frames = [(0.0, "rich", "OK", 900.0, 100, None), (1.0, "rich", "OK", 1100.0, 100, None)]  # the second late
    frames += [(2.0, "x", DROPPED, None, 0, None), (3.0, "poor", "OK", 100.0, 10, None)]
    f = RunResult("adaptive", frames, rounds=1).figures(Objective(1000.0), agreement, phases=[0.0, 1.5])
    assert (f["frames"], f["dropped"], f["within_target"]) == (4, 1, 2)
    assert f["timely_agreement"] == pytest.approx((0.9 + 0.5) / 4)  # the late and the dropped frames: 0
    assert f["mean_agreement"] == pytest.approx((0.9 + 0.9 + 0.5) / 3)  # over the answered frames
    assert [(ph["frames"], ph["within_target"]) for ph in f["phases"]] == [(2, 1), (2, 1)]
    assert [ph["timely_agreement"] for ph in f["phases"]] == [pytest.approx(0.45), pytest.approx(0.25)]


def test_fit_rates_are_where_a_point_just_meets_the_target():
    from hnd.bench.adapt_trace import LinkCosts, fit_rate, fit_rate_mbit
    from hnd.common.errors import UsageError
    from hnd.edge.adapt import OperatingPoint

    def split(bits: int, p95: float) -> OperatingPoint:
        return OperatingPoint(f"split-{bits}b-tensor", "split", {"bits": bits}, p95, p95, 100.0, 200.0, 1.0)

    points = [split(2, 250.0), split(8, 4_500.0)]
    # 100 ms round trip, compute 2 x 300 ms: 2,000 - 100 - 600 = 1,300 ms for 250 + 500 B (2-bit) or 5,000 B
    costs = LinkCosts(rtt_ms=100.0, compute_scale=2.0, extra_bytes=500.0, frames=5)
    assert fit_rate_mbit(points[0], costs, 2_000) == pytest.approx(8 * 750 / 1_300 / 1e3)
    assert fit_rate("fit:2b", points, costs, 2_000) == pytest.approx(8 * 750 / 1_300 / 1e3)
    # between: the geometric mean, 2-bit fits with the margin 8-bit misses by (sqrt(5,000 / 750) each way)
    both = fit_rate("fit:2b..8b", points, costs, 2_000)
    assert both == pytest.approx(8 * (750 * 5_000) ** 0.5 / 1_300 / 1e3)
    assert fit_rate("fit:split-8b-tensor*10", points, costs, 2_000) == pytest.approx(10 * 8 * 5_000 / 1_300 / 1e3)
    for bad, why in (("fit:3b", "no operating point"), ("fit:", "expected"), ("fit:2b*x", "expected")):
        with pytest.raises(UsageError, match=why):
            fit_rate(bad, points, costs, 2_000)
    with pytest.raises(UsageError, match="on any link"):
        fit_rate("fit:8b", points, costs, 650)  # 100 + 600 ms before any byte moves


def test_a_paced_camera_drops_the_frames_the_edge_was_too_busy_for():
    import time

    import numpy as np

    from hnd.bench.adapt_trace import CycledFrames

    start = time.monotonic()
    source = CycledFrames([np.zeros((2, 2, 3), np.uint8)], start + 0.5, interval_s=0.05, start=start)
    sent = []
    for frame in source:
        sent.append(frame.index)
        if frame.index == 1:
            time.sleep(0.17)  # busy past frames 2 and 3 (and maybe 4 on a loaded host)
    dropped = [round(t / 0.05) for t in source.dropped]
    assert sorted(sent + dropped) == list(range(max(sent + dropped) + 1))  # every camera frame, once
    assert {2, 3} <= set(dropped) and not set(sent) & set(dropped) and len(sent) >= 4


def test_a_trace_is_relative_when_a_rate_the_schedule_reads_is_a_fit_rate(tmp_path):
    from hnd.bench.adapt_trace import TraceResolver
    from hnd.bench.linkproxy import LinkSettings
    from hnd.edge.adapt import OperatingPoint

    points = [OperatingPoint("split-4b-tensor", "split", {}, 1_000, 1_000, 10, 10, 0.9)]
    absolute, relative = tmp_path / "absolute.csv", tmp_path / "relative.csv"
    absolute.write_text("time_s,rate\n# not a row: 0,fit:4b\n0,50mbit\n")  # a comment is no rate
    relative.write_text("0,50mbit\n20,fit:4b\n")
    assert not TraceResolver(str(absolute), LinkSettings(), points, 3_000).relative
    assert TraceResolver(str(relative), LinkSettings(), points, 3_000).relative
