"""OpenTelemetry tracing: off by default and then free (no opentelemetry import, no interceptor); on, one
trace per frame from the edge's span to the server's compute span, a frame retried on another replica
included, and each tail batch linked to its requests, with the SDK's in-memory exporter. Each case runs in a fresh interpreter (the global tracer
provider can be set once per process)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hnd.common import tracing
from hnd.common.errors import UsageError

CONFIG = "test/faster_rcnn-b3ch"

TRACED_RUN = """
import json, sys
import grpc, numpy as np
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)

import hnd
from hnd.server.service import RequestError

async def going_away(*args, **kwargs):  # replica a refuses every frame as a draining replica does
    raise RequestError(grpc.StatusCode.UNAVAILABLE, "replica going away", "stopping")

rng = np.random.default_rng(0)
frames = [np.kron(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8)) for _ in range(4)]
with hnd.serve(CONFIG, device="cpu") as a, hnd.serve(CONFIG, device="cpu") as b:
    a.service.infer = going_away
    with hnd.connect(f"ipv4:{a.target},{b.target}", config=CONFIG, random_weights=0, max_inflight=1) as d:
        dets = list(d.detect_many(frames))
    replicas = {"a": dict(a.service.call_metadata)["hnd-replica"], "b": dict(b.service.call_metadata)["hnd-replica"]}
spans = [
    {
        "name": s.name,
        "trace": format(s.context.trace_id, "032x"),
        "id": format(s.context.span_id, "016x"),
        "parent": format(s.parent.span_id, "016x") if s.parent else None,
        "error": s.status.status_code.name == "ERROR",
        "attrs": dict(s.attributes),
        "links": [format(link.context.span_id, "016x") for link in s.links],
    }
    for s in exporter.get_finished_spans()
]
print(json.dumps({"ok": [d.ok for d in dets], "replicas": replicas, "spans": spans}))
""".replace("CONFIG", repr(CONFIG))


def run(script: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_one_trace_per_frame_from_the_edge_to_the_servers_compute_across_a_retry():
    out = run(TRACED_RUN)
    spans, replicas = out["spans"], out["replicas"]
    assert out["ok"] == [True] * 4
    frames = [s for s in spans if s["name"] == "hnd.frame"]
    assert len(frames) == 4 and len({f["trace"] for f in frames}) == 4  # one trace per frame
    by_id = {s["id"]: s for s in spans}
    retried = 0
    for frame in frames:
        trace = [s for s in spans if s["trace"] == frame["trace"]]
        edge = sorted(
            s["name"] for s in trace if s["parent"] == frame["id"] and s["name"] != "hnd.v1.SplitInference/Infer"
        )
        assert edge == ["capture", "encode", "head", "preprocess"]
        calls = [s for s in trace if s["name"] == "hnd.v1.SplitInference/Infer"]
        assert all(c["parent"] == frame["id"] for c in calls)  # the server continues the edge's span
        answered = [c for c in calls if not c["error"]]
        assert len(answered) == 1 and answered[0]["attrs"]["hnd.replica"] == replicas["b"]
        stages = sorted(s["name"] for s in trace if s["parent"] == answered[0]["id"])
        assert stages == ["compute", "encode", "queue", "validate+decode"]
        assert answered[0]["attrs"]["hnd.batch_size"] == 1
        batches = [s for s in spans if s["name"] == "hnd.batch" and answered[0]["id"] in s["links"]]
        assert len(batches) == 1 and batches[0]["attrs"]["hnd.batch_size"] == 1  # batch membership as a link
        failed = [c for c in calls if c["error"]]
        assert all(c["attrs"]["hnd.replica"] == replicas["a"] for c in failed)
        retried += bool(failed)
        assert frame["attrs"]["hnd.status"] == "OK" and by_id[frame["id"]]["attrs"]["hnd.replica"] == replicas["b"]
    assert retried >= 1  # round robin sent some frames to a first: refused there, answered by b, one trace


def test_off_by_default_nothing_is_imported_and_no_span_is_made():
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import hnd
        with hnd.serve({CONFIG!r}, device="cpu") as s:
            with hnd.connect(s.target, config={CONFIG!r}, random_weights=0) as d:
                d.detect(np.zeros((64, 64, 3), np.uint8))
                tracer = d.runner.tracer
        print({{"tracer": tracer is None, "otel": any(m.startswith("opentelemetry") for m in sys.modules)}})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "{'tracer': True, 'otel': False}"


def test_otel_settings_are_checked():
    assert tracing.configure_from_env("x", {}) is False
    assert tracing.configure_from_env("x", {"OTEL_TRACES_EXPORTER": "none"}) is False
    assert tracing.configure_from_env("x", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}) is False
    with pytest.raises(UsageError, match="OTEL_TRACES_EXPORTER=zipkin: hnd exports to otlp, console"):
        tracing.configure_from_env("x", {"OTEL_TRACES_EXPORTER": "zipkin"})
