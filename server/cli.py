"""hnd-server: serve the tail of a split R-CNN over gRPC.

hnd-server --config hnd/faster_rcnn-b3ch --checkpoint student.pt --device cuda --host 0.0.0.0
hnd-server --config test/faster_rcnn-b3ch --random-weights 0        # demo / tests
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import torch

from hnd.common import codec
from hnd.common.build import build_model_from_config, pick_device
from hnd.common.config import ConfigError, RuntimeConfig, load_config, with_weights
from hnd.common.errors import USER_ERRORS, report
from hnd.common.flags import (
    HelpFormatter,
    add_config_argument,
    add_device_argument,
    add_log_level_argument,
    add_weights_arguments,
    config_default,
)
from hnd.server.accel import COMPILE_MODES, PRECISIONS, TailOptions, check_options
from hnd.server.app import ServerSettings, TlsFiles, read_token, serve
from hnd.server.service import MAX_INFLIGHT_MESSAGE_BYTES, MAX_QUEUE_BYTES, BatchingOptions, ModelRunner, ServerLimits
from hnd.server.streams import StreamLimits

DEFAULT_METRICS_PORT = 9100

PROG = "hnd-server"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Serve the tail of a split HND/GHND R-CNN over gRPC.", formatter_class=HelpFormatter
    )
    add_config_argument(p)
    add_weights_arguments(
        p, "full student checkpoint (default: the config's model.checkpoint)", "seeded random weights (demos, tests)"
    )
    add_device_argument(p, "auto")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=None, help="gRPC port " + config_default("port"))
    _add_batching_arguments(p)
    _add_limit_arguments(p)
    _add_security_arguments(p)
    _add_endpoint_arguments(p)
    _add_stream_arguments(p)
    add_log_level_argument(p, "INFO")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    _add_tail_arguments(p)
    return p


def _add_batching_arguments(p: argparse.ArgumentParser) -> None:
    """The batcher (hnd.server.service.BatchingOptions); unset ones come from the config's runtime section."""
    p.add_argument("--max-batch", type=int, default=None, help="images per tail batch " + config_default("max_batch"))
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=None,
        help="how long a batch waits to fill (0: it takes what queued meanwhile) " + config_default("max_delay_ms"),
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="waiting requests before RESOURCE_EXHAUSTED " + config_default("max_queue"),
    )
    p.add_argument(
        "--max-decode-queue",
        type=int,
        default=BatchingOptions.max_decode_queue,
        help="requests waiting for the decode thread or on it before RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    p.add_argument(
        "--max-queue-mib",
        type=int,
        default=MAX_QUEUE_BYTES >> 20,
        help="decoded payload MiB the waiting requests may hold in all (0: no byte bound) (default: %(default)s)",
    )


def _add_limit_arguments(p: argparse.ArgumentParser) -> None:
    """What one request may ask of the server (hnd.server.service.ServerLimits)."""
    p.add_argument(
        "--max-short-side",
        type=int,
        default=None,
        help="largest resized short side accepted, i.e. the largest edge min_size (default: the model's)",
    )
    p.add_argument(
        "--max-long-side",
        type=int,
        default=None,
        help="largest resized long side accepted, i.e. the largest edge max_size (default: the model's)",
    )
    p.add_argument(
        "--max-original-side",
        type=int,
        default=ServerLimits.max_original_side,
        help="largest original frame height / width a request may declare (default %(default)s)",
    )
    p.add_argument(
        "--max-mask-mib",
        type=int,
        default=ServerLimits.max_mask_bytes >> 20,
        help="Mask R-CNN: float32 masks one request may paste at its original size (default %(default)s)",
    )
    p.add_argument(
        "--max-inflight-mib",
        type=int,
        default=MAX_INFLIGHT_MESSAGE_BYTES >> 20,
        help="serialized request MiB held from receipt to answer over all calls; more is RESOURCE_EXHAUSTED "
        "(0: no bound) (default %(default)s)",
    )


def _add_security_arguments(p: argparse.ArgumentParser) -> None:
    """TLS (optionally mutual) and the bearer token; settings_from_args checks which go together."""
    p.add_argument("--tls-cert", help="server certificate (PEM); with --tls-key enables TLS")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="CA (PEM) that client certificates must chain to: mutual TLS")
    p.add_argument("--token-file", help="file holding the bearer token clients must send")


def _add_endpoint_arguments(p: argparse.ArgumentParser) -> None:
    """The other ports (metrics, plain health), what the server refuses, and how it lets connections go."""
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help=f"serve Prometheus metrics on this port (e.g. {DEFAULT_METRICS_PORT})",
    )
    p.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        help="address for --metrics-port, apart from --host: /metrics has no authentication (default 127.0.0.1; "
        "0.0.0.0 on Kubernetes so that Prometheus reaches the pod, with a NetworkPolicy)",
    )
    p.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also serve grpc.health.v1 alone, plain text, on this port (Kubernetes gRPC probes "
        "cannot use TLS; inference stays on --port)",
    )
    p.add_argument("--no-offload", action="store_true", help="refuse full-frame (JPEG/PNG) requests")
    p.add_argument("--drain-seconds", type=float, default=10.0, help="grace for in-flight requests on SIGTERM")
    p.add_argument(
        "--max-connection-age",
        type=float,
        default=None,
        metavar="S",
        help="close client connections after S seconds (GOAWAY, in-flight calls finish) so "
        "clients re-resolve and spread over new replicas (default: never)",
    )


def _add_stream_arguments(p: argparse.ArgumentParser) -> None:
    """Stream sessions (hnd.server.streams.StreamLimits)."""
    st = p.add_argument_group("stream sessions (temporal bottleneck frames, H.264 / HEVC offload; server/streams.py)")
    st.add_argument(
        "--max-stream-sessions",
        type=int,
        default=StreamLimits.max_sessions,
        help=f"InferStreams holding a reference or video decoder at once (default {StreamLimits.max_sessions}; "
        "0: no temporal coding)",
    )
    st.add_argument(
        "--max-reference-mib",
        type=int,
        default=StreamLimits.max_reference_bytes >> 20,
        help=f"largest bottleneck reference per stream (default {StreamLimits.max_reference_bytes >> 20})",
    )
    st.add_argument(
        "--max-video-sessions",
        type=int,
        default=StreamLimits.max_video_sessions,
        help=f"streams decoding H.264 / HEVC at once (default {StreamLimits.max_video_sessions})",
    )
    st.add_argument(
        "--max-video-pixels",
        type=int,
        default=StreamLimits.max_video_pixels,
        help=f"largest decoded video picture, width x height (default {StreamLimits.max_video_pixels})",
    )
    st.add_argument(
        "--session-idle-timeout",
        type=float,
        default=StreamLimits.idle_timeout_s,
        metavar="S",
        help=f"a stream session with no frame for S seconds gives its slot back (default {StreamLimits.idle_timeout_s:g})",
    )
    st.add_argument(
        "--max-client-sessions",
        type=int,
        default=StreamLimits.max_client_sessions,
        help=f"stream sessions one client (connection) may hold (default {StreamLimits.max_client_sessions})",
    )
    st.add_argument(
        "--max-client-video-sessions",
        type=int,
        default=StreamLimits.max_client_video_sessions,
        help=f"of them decoding video (default {StreamLimits.max_client_video_sessions})",
    )
    st.add_argument(
        "--max-session-mib",
        type=int,
        default=StreamLimits.max_session_bytes >> 20,
        help="what all stream sessions together may hold: references and video picture pools "
        f"(default {StreamLimits.max_session_bytes >> 20})",
    )


def _add_tail_arguments(p: argparse.ArgumentParser) -> None:
    """How the tail's dense part runs (hnd.server.accel.TailOptions)."""
    a = p.add_argument_group("tail execution (dense part: decoder, layer2..4, FPN, RPN head)")
    a.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="autocast type of the dense part; proposals, RoI heads and postprocess stay fp32 "
        "(fp16 needs CUDA; default fp32: bit for bit the in-process tail)",
    )
    a.add_argument("--channels-last", action="store_true", help="dense part in NHWC memory format")
    a.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        default="off",
        help="torch.compile the dense part per (batch bucket, padded size); reduce-overhead = CUDA graphs (CUDA only)",
    )


def settings_from_args(args: argparse.Namespace, runtime: RuntimeConfig) -> ServerSettings:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    for flag in (
        "max_stream_sessions",
        "max_reference_mib",
        "max_video_sessions",
        "max_video_pixels",
        "max_client_sessions",
        "max_client_video_sessions",
        "max_session_mib",
    ):
        if getattr(args, flag) < 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    if not args.session_idle_timeout > 0:
        raise ConfigError(f"--session-idle-timeout must be > 0 seconds, got {args.session_idle_timeout:g}")
    if args.max_video_pixels < 64:
        raise ConfigError(f"--max-video-pixels must be >= 64, got {args.max_video_pixels}")
    for flag in ("max_short_side", "max_long_side", "max_original_side", "max_mask_mib"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    return ServerSettings(
        host=args.host,
        port=args.port if args.port is not None else runtime.port,
        limits=ServerLimits(
            max_message_bytes=runtime.max_message_bytes,
            codec=codec.DEFAULT_LIMITS,
            max_short_side=args.max_short_side,
            max_long_side=args.max_long_side,
            max_original_side=args.max_original_side,
            max_mask_bytes=args.max_mask_mib << 20,
            max_inflight_message_bytes=(args.max_inflight_mib << 20) or None,
            streams=StreamLimits(
                max_sessions=args.max_stream_sessions,
                max_reference_bytes=args.max_reference_mib << 20,
                max_video_sessions=args.max_video_sessions,
                max_video_pixels=args.max_video_pixels,
                idle_timeout_s=args.session_idle_timeout,
                max_client_sessions=args.max_client_sessions,
                max_client_video_sessions=args.max_client_video_sessions,
                max_session_bytes=args.max_session_mib << 20,
            ),
        ),
        batching=BatchingOptions(
            max_batch=args.max_batch or runtime.max_batch,
            max_delay_ms=args.max_delay_ms if args.max_delay_ms is not None else runtime.max_delay_ms,
            max_queue=args.max_queue or runtime.max_queue,
            max_queue_bytes=(args.max_queue_mib << 20) or None,
            max_decode_queue=args.max_decode_queue,
        ),
        tls=TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None,
        token=read_token(args.token_file) if args.token_file else None,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        offload=not args.no_offload,
        drain_s=args.drain_seconds,
        max_connection_age_s=args.max_connection_age,
        health_port=args.health_port,
    )


def load_server(args: argparse.Namespace) -> tuple[ModelRunner, ServerSettings]:
    """The model runner and server settings of hnd-server's parsed flags (what ``main`` serves, and what
    :func:`hnd.server.api.serve` serves in a thread); ConfigError / OSError for bad input."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    settings = settings_from_args(args, cfg.runtime)
    model_cfg = with_weights(cfg.model, args.checkpoint, args.random_weights)
    if model_cfg.bottleneck_channels is None:
        raise ConfigError(f"{cfg.path}: model is a teacher (no bottleneck); hnd-server serves a student's tail")
    device = pick_device(args.device)
    options = TailOptions(args.precision, args.channels_last, args.compile)
    check_options(options, device)  # before building the model: refuse at once
    return ModelRunner(build_model_from_config(model_cfg, cfg.path), device, options), settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        runner, settings = load_server(args)
    except USER_ERRORS as exc:
        return report(PROG, exc)
    try:
        asyncio.run(serve(runner, settings))
    except OSError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
