"""OpenTelemetry traces from camera to GPU: off by default, free when off (the ``[otel]`` extra).

On when the process has an OpenTelemetry SDK ``TracerProvider``: the application's own, or the one
:func:`configure_from_env` installs from the standard variables (``OTEL_TRACES_EXPORTER=otlp`` or ``console``;
the OTLP exporter then reads ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_*``, the resource
``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``; ``OTEL_SDK_DISABLED=true`` turns it all off). Off,
:func:`get_tracer` returns None once, at start, and no per-frame code runs (no import of opentelemetry either).

What is traced: the edge opens one span per frame (``hnd.frame``: capture, preprocess, head, encode as child
spans, rebuilt back to back from the frame's stage durations) and sends the W3C ``traceparent`` of that span
in each call's gRPC metadata (a resent frame carries the same one: one trace per frame, over every attempt
and replica). The server continues it with one span per call (``hnd.v1.SplitInference/Infer``,
``inference.GRPCInferenceService/ModelInfer``) and children for its stages (validate+decode, queue, compute,
encode, from the answer's own timings; the batch size as an attribute), and the batcher one ``hnd.batch`` span
per tail batch, linked to the span of every request it computed. InferStream messages are not traced per
frame: gRPC metadata belongs to the stream, not to each message.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any

from hnd.common.errors import UsageError

TRACEPARENT = "traceparent"
EXPORTERS = ("otlp", "console")


def _sdk_provider() -> Any:
    """The global TracerProvider when it is the SDK's (tracing on), else None."""
    if "opentelemetry.sdk.trace" not in sys.modules:  # nobody made an SDK provider: off, and nothing imported
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
    except ImportError:
        return None
    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def configure_from_env(service_name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Install an SDK TracerProvider as ``OTEL_TRACES_EXPORTER`` says (unless the application set one);
    returns whether tracing is on. ``OTEL_TRACES_EXPORTER`` unset or ``none``: off (unless already on).

    Raises UsageError when it names an unknown exporter or the ``[otel]`` extra is not installed.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    names = [n for n in names if n != "none"]
    if not names or _sdk_provider() is not None:
        return _sdk_provider() is not None
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise UsageError(f"OTEL_TRACES_EXPORTER={','.join(names)}: hnd exports to {', '.join(EXPORTERS)}")
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        raise UsageError(
            f"OTEL_TRACES_EXPORTER={','.join(names)}: tracing needs the [otel] extra (pip install 'hnd[otel]')"
        ) from None
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES over this default name.
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


def get_tracer(name: str) -> Any:
    """The tracer ``name`` when tracing is on, else None (callers test for None once and skip all tracing)."""
    if _sdk_provider() is None:
        return None
    from opentelemetry import trace

    return trace.get_tracer(name)


def inject(span: Any) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying ``span``'s context (W3C traceparent / tracestate)."""
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def extract(metadata: Iterable[tuple[str, Any]] | None) -> Any:
    """The OpenTelemetry context of incoming gRPC metadata (a new root when it carries none)."""
    from opentelemetry import propagate

    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    return propagate.extract(carrier)


def stage_spans(tracer: Any, parent: Any, start_ns: int, stages: Iterable[tuple[str, float]]) -> int:
    """Child spans of ``parent``, back to back from ``start_ns`` (epoch ns), one per (name, milliseconds) with a
    duration; returns where the last one ends. Stage durations are measured; the layout end to end is not."""
    from opentelemetry import trace

    context = trace.set_span_in_context(parent)
    t = start_ns
    for name, ms in stages:
        if ms is None:
            continue
        end = t + int(ms * 1e6)
        tracer.start_span(name, context=context, start_time=t).end(end_time=end)
        t = end
    return t


def current_span_context() -> Any:
    """The span context of the current span (the call's server span while it runs), for links."""
    from opentelemetry import trace

    return trace.get_current_span().get_span_context()


def batch_span(tracer: Any, members: list[Any], start_perf_ns: int, compute_ns: int, images: int) -> None:
    """One ``hnd.batch`` span for a tail batch computed from ``start_perf_ns`` (``time.perf_counter_ns``) for
    ``compute_ns``, linked to the span of every request in it (batch membership as links)."""
    from opentelemetry.trace import Link

    start = time.time_ns() - (time.perf_counter_ns() - start_perf_ns)
    links = [Link(c) for c in members if c is not None and c.is_valid]
    span = tracer.start_span("hnd.batch", links=links, start_time=start, attributes={"hnd.batch_size": images})
    span.end(end_time=start + compute_ns)
