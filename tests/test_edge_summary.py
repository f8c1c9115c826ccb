"""The edge run's summary: exact quantiles and means for the runs people read by eye, a sketch's bounded
error only past many thousands of frames."""

from __future__ import annotations

import numpy as np
import pytest

from hnd.edge.records import ByteCounts, FrameRecord, Timings
from hnd.edge.summary import RELATIVE_ACCURACY, StreamingStat, Summary


def _answered(i: int, total: float) -> FrameRecord:
    return FrameRecord(i, "cam", 0.0, "split", bytes=ByteCounts(1000 + i, 1100 + i), ms=Timings(head=10.0, total=total))


def test_a_short_run_gets_exact_quantiles_and_a_mean_on_the_console():
    summary = Summary()
    for i, total in enumerate((12_204.0, 28_530.0)):  # two frames of a slow CPU server
        summary.add(_answered(i, total))
    stats = summary.as_dict()["ms"]["total"]
    for q in (50, 95, 99):
        assert stats[f"p{q}"] == np.percentile([12_204.0, 28_530.0], q)  # 20367, 27713.7, 28366.74
    assert stats["mean"] == 20_367.0 and summary.as_dict()["quantiles"].startswith("exact")
    header, *rows = [line.split() for line in summary.format().splitlines() if line.startswith(("stage", "total"))]
    assert header == ["stage", "(ms)", "mean", "p50", "p95", "p99"]
    assert rows == [["total", "20367.00", "20367.00", "27713.70", "28366.74"]]


def test_past_the_exact_limit_the_sketch_answers_within_its_bound_in_bounded_memory():
    values = np.random.default_rng(0).lognormal(4.0, 0.5, 300)
    stat = StreamingStat(exact_limit=200)
    for v in values[:200]:
        stat.add(v)
    assert stat.exact and stat.quantile(0.95) == np.percentile(values[:200], 95)
    for v in values[200:]:
        stat.add(v)
    assert not stat.exact and stat.values is None  # the kept values are freed
    for q in (0.5, 0.95, 0.99):
        assert stat.quantile(q) == pytest.approx(np.percentile(values, 100 * q), rel=2 * RELATIVE_ACCURACY + 1e-4)
    assert stat.mean == pytest.approx(values.mean(), rel=1e-12)
