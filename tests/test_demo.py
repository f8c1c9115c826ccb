"""hnd-demo end to end: a real hnd-server subprocess (hnd.server.local) and the edge on sample photos."""

from __future__ import annotations

import json

from hnd.common.checkpoint import fingerprint
from hnd.common.config import load_config, with_weights
from hnd.common.build import build_model_from_config
from hnd.edge.client import ClientSettings, SplitClient
from hnd.demo import main
from hnd.server.local import scrape_answered_requests, server_process


def test_server_process_serves_counts_and_stops():
    cfg = load_config("test/faster_rcnn-b3ch")
    fp = fingerprint(build_model_from_config(with_weights(cfg.model, None, 3), cfg.path))
    with server_process(
        "test/faster_rcnn-b3ch", ["--random-weights", "3"], ["--log-level", "WARNING"], metrics=True
    ) as server:
        client = SplitClient(ClientSettings(server.target))
        try:
            assert client.model_info().weights_fingerprint == fp  # same seed, same weights
        finally:
            client.close()
        assert server.metrics_url is not None and scrape_answered_requests(server.metrics_url) == 0.0
        proc = server.proc
    assert proc.poll() is not None  # stopped (SIGTERM, drained) when the block ends


def test_demo_runs_server_and_edge(tmp_path, capsys):
    summary = tmp_path / "summary.json"
    records = tmp_path / "records.jsonl"
    assert (
        main(
            [
                "--config",
                "test/faster_rcnn-b3ch",
                "--frames",
                "2",
                "--bits",
                "4",
                "--summary-json",
                str(summary),
                "--output",
                str(records),
            ]
        )
        == 0
    )
    data = json.loads(summary.read_text())
    assert data["frames"] == 2 and data["answered"] == 2 and data["failed"] == 0
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["status"] for r in lines] == ["OK", "OK"] and all(r["bytes"]["payload"] > 0 for r in lines)
    assert "seeded random weights" in capsys.readouterr().err
