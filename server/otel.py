"""The server's side of OpenTelemetry tracing (:mod:`hnd.common.tracing`): an interceptor, installed only while
tracing is on, that continues each unary inference call's trace from its ``traceparent`` metadata.

One SERVER span per call (its method's full name), with the replica, the request's bytes and the batch size
as attributes, and children for the service's stages rebuilt back to back from the answer's own timings
(hnd.v1's ``ServerTimings``, or the v2 answer's ``*_us`` parameters): validate+decode, queue, compute,
encode. A refused call's span carries its gRPC status as an error.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from hnd.common import tracing
from hnd.server.kserve import V2_SERVICE
from hnd.server.service import SERVICE_NAME

TRACED = (f"/{SERVICE_NAME}/Infer", f"/{V2_SERVICE}/ModelInfer")
STAGES = (("validate+decode", "decode_us"), ("queue", "queue_us"), ("compute", "compute_us"), ("encode", "encode_us"))


def _timings(response: Any) -> dict[str, int]:
    """The server's stage times (us) and batch size of an hnd.v1 InferResponse or a v2 ModelInferResponse."""
    keys = [k for _, k in STAGES] + ["batch_size"]
    if hasattr(response, "timings"):
        return {k: int(getattr(response.timings, k)) for k in keys}
    return {k: int(response.parameters[k].int64_param) for k in keys if k in response.parameters}


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps the traced methods' handlers in a span that continues the caller's trace."""

    def __init__(self, tracer: Any, replica: Any) -> None:
        self.tracer = tracer
        self.replica = replica  # () -> the replica's name (known once the port is bound)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in TRACED or handler.unary_unary is None:
            return handler
        inner, tracer = handler.unary_unary, self.tracer
        parent = tracing.extract(handler_call_details.invocation_metadata)

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            from opentelemetry.trace import SpanKind, Status, StatusCode, use_span

            start = time.time_ns()
            span = tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, start_time=start)
            span.set_attribute("hnd.replica", self.replica())
            if isinstance(request, bytes):
                span.set_attribute("hnd.request_bytes", len(request))
            try:
                with use_span(span, end_on_exit=False):  # current while it runs: the batcher links to it
                    response = await inner(request, context)
            except BaseException as exc:
                code = context.code() if hasattr(context, "code") else None
                name = getattr(code, "name", None) or type(exc).__name__
                span.set_status(Status(StatusCode.ERROR, f"{name}: {context.details() or exc}"))
                span.set_attribute("rpc.grpc.status_code", name)
                span.end()
                raise
            t = _timings(response)
            tracing.stage_spans(tracer, span, start, [(stage, t[k] / 1000) for stage, k in STAGES if k in t])
            span.set_attribute("hnd.batch_size", t.get("batch_size", 0))
            span.end()
            return response

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
