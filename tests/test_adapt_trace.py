"""hnd-bench --adapt-trace: adaptive against each fixed point over a link trace (a short one, tiny model)."""

from __future__ import annotations

import json

import pytest

from hnd.bench import cli


def test_adapt_trace_writes_the_table_the_runs_and_the_plot(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("time_s,rate,delay\n0,50mbit,10ms\n1.5,0.05mbit\n")
    out = tmp_path / "out"
    argv = ["--adapt-trace", str(trace), "--target-latency-ms", "5000", "--duration", "3", "--frames", "2"]
    assert cli.main([*argv, "--bits", "8,2", "--clip-size", "64x48", "--out", str(out)]) == 0
    data = json.loads((out / "adaptive.json").read_text())
    runs = [f["run"] for f in data["figures"]]
    assert runs == ["adaptive", "split-2b-tensor-temporal-k10-native", "split-8b-tensor-temporal-k10-native"]
    for f in data["figures"]:
        assert f["frames"] >= 1 and 0 <= f["within_share"] <= 1 and f["within_target"] <= f["frames"]
        assert f["rounds"] == 1 and f["meets_objective"] <= f["within_target"] <= f["answered"]
    assert all(f["answered"] >= 1 for f in data["figures"]), data["figures"]  # every setting's frames served
    assert data["machine"]["cores"] and (out / "points.json").exists() and (out / "adaptive.png").stat().st_size
    assert (
        "| adaptive |" in (out / "adaptive.md").read_text()
        and "| run | frames | within target | share | meets objective |" in capsys.readouterr().out
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
