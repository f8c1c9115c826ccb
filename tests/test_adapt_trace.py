"""hnd-bench --adapt-trace: adaptive against each fixed point over a link trace (a short one, tiny model)."""

from __future__ import annotations

import json

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
    assert data["machine"]["cores"] and (out / "points.json").exists() and (out / "adaptive.png").stat().st_size
    assert (
        "| adaptive |" in (out / "adaptive.md").read_text()
        and "| run | frames | within target |" in capsys.readouterr().out
    )


def test_adapt_trace_errors_are_one_line(tmp_path, capsys):
    trace = tmp_path / "trace.csv"
    trace.write_text("0,fast\n")
    assert cli.main(["--adapt-trace", str(trace)]) == 2  # no objective
    assert cli.main(["--adapt-trace", str(trace), "--max-kbps", "10"]) == 2  # a bad rate
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("hnd-bench --adapt-trace: error:") for line in err), err
    assert "objective" in err[0] and "rate 'fast'" in err[1]
