"""deploy/grafana/hnd-server.json: a dashboard Grafana can import, querying only metrics hnd-server exports,
grouped only by labels those metrics have."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

from hnd.server.metrics import ServerMetrics

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "hnd-server.json"
SUFFIXES = {Counter: ("_total",), Gauge: ("",), Histogram: ("_bucket", "_sum", "_count")}


def exported() -> dict[str, set[str]]:
    """Every sample name the server's registry can export -> the labels it carries (histogram buckets: le)."""
    out: dict[str, set[str]] = {}
    for metric in vars(ServerMetrics()).values():
        kind = next((k for k in SUFFIXES if isinstance(metric, k)), None)
        if kind is None:
            continue
        for suffix in SUFFIXES[kind]:
            labels = set(metric._labelnames) | ({"le"} if suffix == "_bucket" else set())
            out[metric._name.removesuffix("_total") + suffix] = labels | {"instance", "job"}  # Prometheus adds these
    return out


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_every_query_names_an_exported_metric_and_its_labels():
    metrics = exported()
    assert "hnd_requests_total" in metrics and "hnd_stage_seconds_bucket" in metrics  # the reading works
    used = set()
    for expr in queries():
        names = set(re.findall(r"\bhnd_[a-z_]+", expr))
        assert names, expr
        unknown = names - set(metrics)
        assert not unknown, f"{expr}: not exported by hnd-server: {unknown}"
        used |= names
        labels = set().union(*(metrics[n] for n in names))
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            assert {g.strip() for g in group.split(",")} <= labels, expr
        for label in re.findall(r"([a-z_]+)=~?\"", expr):
            assert label in labels, expr
    # every family the server exports is on the dashboard
    family = lambda name: re.sub(r"_(total|bucket|sum|count)$", "", name)  # noqa: E731
    assert {family(n) for n in metrics} - {family(n) for n in used} == set()
