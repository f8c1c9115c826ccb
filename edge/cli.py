"""hnd-edge: run the head on frames, stream bottlenecks to hnd-server, report size and latency.

    hnd-edge --server gpu-host:50051 --camera 0 --config hnd/faster_rcnn-b3ch --head head.pt
    hnd-edge --server 127.0.0.1:50051 --images frames/ --config test/faster_rcnn-b3ch --random-weights 0
    hnd-edge --server gpu-host:50051 --camera 0 --config ext/keypoint_rcnn-b3ch --filter-threshold 0.05
    hnd-edge --server gpu-host:50051 --camera 0 --head head.onnx --min-size 480 --max-size 640
    hnd-edge --server gpu-host:50051 --camera 0 --config entropic/faster_rcnn-b24ch-beta0.08 --head entropic_head.onnx

``--head head.onnx`` (from ``hnd-export-head ... head.onnx``) runs the head on ONNX Runtime and never
imports torch: an edge installed with ``pip install "hnd[edge]"`` has none. ``--min-size / --max-size``
split a frame at its own resolution (e.g. 480 for a 640x480 camera) instead of upsampling it to the
model's 800 px; the server accepts any resize within the limits it advertises. An Entropic Student's
ONNX head gives int32 symbols that the edge range-codes with the prior's tables from the same file.

With a neural filter in the config (``model.filter``) the edge skips frames whose probability of
holding anything to detect is below ``--filter-threshold`` (default: the config's threshold);
``--no-filter`` sends every frame.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from hnd.common import codec
from hnd.common.errors import USER_ERRORS, report
from hnd.common.files import atomic_write_json
from hnd.common.flags import (
    HelpFormatter,
    add_bits_argument,
    add_config_argument,
    add_filter_arguments,
    add_log_level_argument,
    add_weights_arguments,
    config_default,
    config_key,
)
from hnd.common.config import (
    ConfigError,
)
from hnd.edge import interrupts
from hnd.edge.adapt_mode import add_adapt_arguments
from hnd.edge.interrupts import Terminated
from hnd.edge.capture import Frame, FrameSource, LiveCapture, SourceLost, open_source, set_opencv_logging
from hnd.edge.client import LB_POLICIES, ClientSettings, SplitClient
from hnd.edge.draw import VideoSink, draw_detections
from hnd.edge.api import DEFAULT_GIVE_UP_S, EdgeSettings, IMAGE_FORMATS, MODES, open_detector, plan_edge
from hnd.edge.pipeline import EdgeRunner, ServerGone
from hnd.edge.live import EdgeMetrics, LiveStats
from hnd.edge.records import FrameRecord, RecordWriteError, RecordWriter, parse_rotate
from hnd.edge.summary import Summary

PROG = "hnd-edge"
# Exit codes: 0 every frame answered, 1 some frames failed, 2 the edge could not start (config, model,
# server check, source), 3 a live source stopped delivering for --source-timeout, 4 --output could not be
# written with --on-write-error stop, 5 gave up on the server, 130 / 143 ended by SIGINT (Ctrl-C) / SIGTERM
# (128 + the signal's number, as a shell reports it). Records and the summary (printed, --summary-json) so
# far are kept in every case.
EXIT_SOURCE_LOST = 3
EXIT_WRITE_ERROR = 4
EXIT_SERVER_GONE = 5


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Run the edge half of a split R-CNN and stream to hnd-server.",
        formatter_class=HelpFormatter,
    )
    _add_server_arguments(p)
    _add_source_arguments(p)
    _add_model_arguments(p)
    _add_coding_arguments(p)
    _add_request_arguments(p)
    _add_output_arguments(p)
    _add_live_arguments(p)
    _add_run_arguments(p)
    _add_head_arguments(p)
    add_adapt_arguments(p)
    return p


def _add_server_arguments(p: argparse.ArgumentParser) -> None:
    """Which server(s) to reach and how to spread frames over replicas."""
    p.add_argument(
        "--server",
        default="127.0.0.1:50051",
        help="hnd-server address HOST:PORT, or a gRPC target for several replicas: "
        "dns:///hnd-server.NAMESPACE.svc.cluster.local:50051 (a Kubernetes headless Service), "
        "ipv4:10.0.0.5:50051,10.0.0.6:50051",
    )
    p.add_argument(
        "--lb",
        default="round_robin",
        choices=LB_POLICIES,
        help="gRPC load balancing over the replicas the target resolves to (default round_robin: "
        "per request, skipping replicas whose health is NOT_SERVING; pick_first: one replica "
        "at a time, the next when it goes away)",
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        default=3,
        metavar="N",
        help="sends per frame when a replica fails UNAVAILABLE (dies, drains); gRPC's retry "
        "policy and the edge's resend, each bounded by N (1-5) and the request deadline",
    )
    p.add_argument(
        "--tls-server-name", metavar="NAME", help="name to check in the server certificate instead of the --server host"
    )


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where the frames come from (exactly one)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--camera", type=int, metavar="N", help="live camera index (latest frame, stale ones dropped)")
    src.add_argument(
        "--video",
        metavar="FILE_OR_URL",
        help="video file (every frame, in order), or a network stream FFmpeg reads (rtsp://, http://, udp://, ...: "
        "live, latest frame, reconnected when it drops)",
    )
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="image folder or glob (every image, in order)")
    p.add_argument("--live", action="store_true", help="treat --video as a live camera paced at its frame rate")


def _add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The config, the weights and the mode."""
    add_config_argument(p)
    add_weights_arguments(
        p,
        "full student checkpoint",
        "seeded random weights (demos, tests)",
        head_help="head-only export (hnd-export-head): torch weights, or .onnx for ONNX Runtime "
        "(no torch); the edge never holds the tail",
    )
    p.add_argument(
        "--mode",
        default="split",
        choices=MODES,
        help="split: the head here, the bottleneck to the server; offload: the whole frame as an image or "
        "video; local: the whole model here, nothing sent",
    )


def _add_coding_arguments(p: argparse.ArgumentParser) -> None:
    """How a frame is coded: the bottleneck codec (split), the image format (offload), temporal coding."""
    add_bits_argument(p, None, config_default("bits"))
    p.add_argument(
        "--granularity",
        default=None,
        choices=codec.GRANULARITIES,
        help="quantization ranges: one per tensor, one per channel, or the original HND 8-bit scheme "
        + config_default("granularity"),
    )
    p.add_argument(
        "--compression",
        default=None,
        choices=codec.ALL_COMPRESSIONS,
        help="coding of the quantized bottleneck (learned: an Entropic Student's prior) "
        + config_default("compression"),
    )
    p.add_argument(
        "--image-format",
        default="jpeg",
        choices=IMAGE_FORMATS,
        help="offload mode's frame format; h264 / hevc: a low-latency video stream on InferStream",
    )
    p.add_argument("--jpeg-quality", type=int, default=90, help="offload: JPEG quality 1-100")
    p.add_argument("--webp-quality", type=int, default=80, help="offload: WebP quality 1-100")
    t = p.add_argument_group("temporal coding on InferStream (implies --stream; hnd.edge.streaming)")
    t.add_argument(
        "--key-interval",
        type=int,
        default=1,
        metavar="N",
        help="split: a key frame every N frames, deltas between (default 1: every frame intra)",
    )
    t.add_argument(
        "--max-clamped",
        type=float,
        default=0.001,
        metavar="F",
        help="split: a key frame as soon as more than this share of values would clamp to the key's "
        "range (default 0.001)",
    )
    t.add_argument("--crf", type=float, default=23.0, help="h264 / hevc: constant rate factor (default 23)")
    t.add_argument("--bitrate", type=int, default=None, metavar="BPS", help="h264 / hevc: target bit/s instead of CRF")
    t.add_argument("--gop", type=int, default=30, help="h264 / hevc: key frame interval in frames (default 30)")
    t.add_argument("--preset", default="medium", help="h264 / hevc: x264 / x265 preset (default medium)")


def _add_request_arguments(p: argparse.ArgumentParser) -> None:
    """How requests go out, and which frames go at all (the neural filter)."""
    p.add_argument(
        "--max-inflight",
        type=int,
        default=None,
        metavar="K",
        help="requests in flight (pipelining window K; default: sized from the server's answers, from 1 up to "
        f"{config_key('max_inflight')} and the server's advertised queue)",
    )
    p.add_argument("--stream", action="store_true", help="use the bidirectional InferStream instead of unary calls")
    p.add_argument("--score-threshold", type=float, default=None, help="server drops detections below this")
    add_filter_arguments(
        p,
        "neural filter: do not send frames whose probability of holding anything is below T",
        "send every frame even when the model has a filter",
    )


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Per-frame records, the summary and the annotated video."""
    p.add_argument(
        "--output",
        metavar="JSONL",
        help="per-frame records, appended and flushed record by record (an existing file is appended to)",
    )
    p.add_argument(
        "--output-rotate",
        metavar="SIZE|DURATION",
        help="rotate --output by size (100MB) to FILE.1..N or by time (1h, 1d) to FILE.<date>",
    )
    p.add_argument("--output-keep", type=int, default=10, metavar="N", help="rotated record files kept (default 10)")
    p.add_argument(
        "--on-write-error",
        default="continue",
        choices=("continue", "stop"),
        help="when --output cannot be written (disk full...): go on and count lost records (default), "
        "or stop cleanly with exit code 4",
    )
    p.add_argument("--summary-json", metavar="FILE", help="write the closing summary as JSON")
    p.add_argument("--save-video", metavar="MP4", help="frames with the detections drawn on them")
    p.add_argument(
        "--video-segment",
        metavar="DURATION",
        default=None,
        help="cut --save-video into segments of this long (10m, 1h): STEM-<UTC time>.mp4 each",
    )
    p.add_argument("--video-keep", type=int, default=None, metavar="N", help="video segments kept (default: all)")


def _add_live_arguments(p: argparse.ArgumentParser) -> None:
    """What a long run shows while it runs: stats lines, Prometheus metrics, the live view."""
    p.add_argument(
        "--stats-interval",
        type=float,
        default=None,
        metavar="S",
        help="every S seconds, write the last window's figures as one JSON line",
    )
    p.add_argument("--stats-file", default="-", metavar="FILE", help="where --stats-interval lines go (default stdout)")
    p.add_argument(
        "--window",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds of the sliding window behind the status line and stats lines (default 10)",
    )
    p.add_argument("--metrics-port", type=int, default=None, help="expose Prometheus metrics on this port")
    p.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    p.add_argument(
        "--view-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve a live view (annotated stream, charts) at http://127.0.0.1:PORT/",
    )
    p.add_argument("--view-host", default="127.0.0.1", help="address for --view-port (default 127.0.0.1)")
    p.add_argument(
        "--view-allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a host name the live view answers to besides its address, loopback names and (bound to all "
        "interfaces) this machine's names and IP addresses; repeat it (other Host headers get 403: DNS rebinding)",
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """When the run ends or gives up, and its connection's credentials."""
    p.add_argument(
        "--source-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="a live camera/stream that delivers no frame for S seconds (retried meanwhile) ends the "
        "run with exit code 3 (default 60)",
    )
    p.add_argument(
        "--max-frames", type=int, default=None, help="stop after this many frames (default: the whole source)"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help=f"per-request deadline in seconds (default: {config_key('deadline_s')}, raised to 4x the slowest "
        "recent answer of a slower server, at most 10x that)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=ClientSettings.connect_timeout_s,
        metavar="S",
        help="seconds to wait at start for a server that is not up yet (it may be starting) before ending the "
        f"run with one line naming the cause (default {ClientSettings.connect_timeout_s:g})",
    )
    p.add_argument(
        "--give-up-after",
        type=float,
        default=None,
        metavar="S",
        help=f"end the run (exit {EXIT_SERVER_GONE}) once the server has been unreachable, or has answered "
        "nothing within --timeout nor to a short GetModelInfo probe (a busy server is waited for), for S seconds "
        "since its last answer, every frame so far recorded (default: "
        f"{DEFAULT_GIVE_UP_S:g} for files; a live camera waits for its server; 0: never give up)",
    )
    p.add_argument("--tls-ca", help="CA certificate (PEM) of the server: use TLS")
    p.add_argument("--tls-cert", help="client certificate (PEM) for mutual TLS")
    p.add_argument("--tls-key", help="client private key (PEM) for mutual TLS")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and status line on stderr")
    add_log_level_argument(p, "WARNING")


def _add_head_arguments(p: argparse.ArgumentParser) -> None:
    """How the head runs on this device: threads, ONNX Runtime providers, the split's resize."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of the head: torch's, or ONNX Runtime's intra-op threads (default: theirs; an .onnx "
        "head on N head workers: the cores over the workers)",
    )
    p.add_argument(
        "--head-workers",
        type=int,
        default=None,
        metavar="N",
        help="an .onnx head: frames whose heads run at once, over the cores (coding and sending stay in frame "
        "order; default: 2 on a machine with 2 or more cores, else 1)",
    )
    p.add_argument(
        "--ort-provider",
        action="append",
        metavar="NAME",
        help="ONNX Runtime execution provider for an .onnx head, in priority order (repeat it; "
        "CPUExecutionProvider is always the fallback), e.g. CUDAExecutionProvider",
    )
    p.add_argument("--min-size", type=int, default=None, help="resize the short side to this (default: the model's)")
    p.add_argument("--max-size", type=int, default=None, help="cap on the long side (default: the model's)")


def run_edge(args: argparse.Namespace) -> Summary:
    """Everything main() does, as a function tests call; raises ConfigError / EdgeError / SourceError.

    The pipeline: settings -> plan (config, options) -> frame source -> the API's Detector (model,
    client checked against the server, runner) -> its outputs (records, video, live stats and view) ->
    run -> summary.
    """
    global _current_runner
    _current_runner = None
    settings = EdgeSettings.from_args(args)
    plan = plan_edge(settings)
    source = open_source(
        args.camera, args.video, args.images, args.max_frames, live=args.live, lost_after_s=args.source_timeout
    )
    try:
        detector = open_detector(settings, live=isinstance(source, LiveCapture), plan=plan)
    except BaseException:
        source.close()
        raise
    runner, client, info = detector.runner, detector.runner.client, detector.info
    _current_runner = runner
    outputs = EdgeOutputs.open(args, runner, client, source)
    try:
        return runner.run(source, outputs.on_record, progress=not args.no_progress and sys.stderr.isatty())
    except KeyboardInterrupt as exc:
        if runner.summary is not None:
            runner.summary.interrupted = interrupted_exit(exc)[0]
        raise
    finally:
        # However the run ended (done, interrupted, server gone, source lost), its summary is written.
        outputs.close()
        detector.close()
        if runner.summary is not None and info is not None and info.HasField("tail"):
            runner.summary.server_tail = f"{info.tail.summary} on {info.tail.device}"
        write_summary_json(args, runner.summary)


def write_summary_json(args: argparse.Namespace, summary: Summary | None) -> None:
    if args.summary_json and summary is not None:
        atomic_write_json(args.summary_json, summary.as_dict())


@dataclass
class EdgeOutputs:
    """Where each frame's record goes besides the summary: the records file, the annotated video, the live
    stats (status line, --stats-interval, --metrics-port) and the live view."""

    runner: EdgeRunner
    writer: RecordWriter | None
    video: VideoSink | None
    live: LiveStats
    view: Any  # hnd.edge.view.LiveView (tornado) or None

    @classmethod
    def open(
        cls, args: argparse.Namespace, runner: EdgeRunner, client: SplitClient | None, source: FrameSource
    ) -> EdgeOutputs:
        writer = None
        if args.output:
            writer = RecordWriter(
                args.output, rotate=args.output_rotate, keep=args.output_keep, on_error=args.on_write_error
            )
            if writer.appended_to:
                print(
                    f"{PROG}: appending to {args.output} ({writer.appended_to:,} bytes already there)", file=sys.stderr
                )
        video = None
        if args.save_video:
            segment_s = parse_duration(args.video_segment, "--video-segment")
            video = VideoSink(args.save_video, segment_s=segment_s, keep=args.video_keep)
        live = make_live_stats(args, runner, client, source, writer)
        view = None
        if args.view_port is not None:
            from hnd.edge.view import LiveView  # tornado only when asked for

            min_score = args.score_threshold if args.score_threshold is not None else 0.5
            view = LiveView(args.view_port, args.view_host, min_score=min_score, allowed_hosts=args.view_allow_host)
            live.listeners.append(view.window)
            print(f"{PROG}: live view on {view.url}", file=sys.stderr)
        live.start()
        return cls(runner, writer, video, live, view)

    def on_record(self, record: FrameRecord, frame: Frame) -> None:
        if self.writer is not None:
            self.writer.write(record)
        self.live.add(record)
        dets = self.runner.last_detections if record.ok else None
        if self.view is not None:
            self.view.publish(frame.image, dets[0] if dets else None, record)
        if self.video is not None and frame.image is not None:
            self.video.write(draw_detections(frame.image, dets[0]) if dets else frame.image)

    def close(self) -> None:
        live, summary = self.live, self.runner.summary
        live.stop()
        if self.view is not None:
            self.view.close()
        if summary is not None:
            live.emit(force_stats=True)  # the last window, also for a run shorter than one interval
        if self.writer is not None:
            self.writer.close()
            if summary is not None:
                summary.records_lost = self.writer.lost
        if self.video is not None:
            self.video.close()
        if live.stats_out is not None and live.stats_out is not sys.stdout:
            live.stats_out.close()


_current_runner: EdgeRunner | None = None  # the run in progress, for SIGUSR1


def parse_duration(value: str | None, flag: str) -> float | None:
    """ "90", "90s", "10m", "1h", "1d" -> seconds (None stays None)."""
    if value is None:
        return None
    try:
        kind, seconds = parse_rotate(value if value.strip()[-1:].isalpha() else f"{value}s")
    except ValueError:
        kind, seconds = "", 0
    if kind != "time" or seconds <= 0:
        raise ConfigError(f"{flag} {value!r}: give a duration such as 90s, 10m, 1h")
    return float(seconds)


def make_live_stats(
    args: argparse.Namespace,
    runner: EdgeRunner,
    client: SplitClient | None,
    source: FrameSource,
    writer: RecordWriter | None,
) -> LiveStats:
    """The status line (tqdm postfix on a terminal), --stats-interval lines and --metrics-port of this run."""

    def counters() -> dict[str, Any]:
        s = runner.summary
        waiting = client.waiting_since if client is not None else None
        return {
            "frames": s.frames if s else 0,
            "answered": s.answered if s else 0,
            "failed": s.failed if s else 0,
            "dropped": getattr(source, "dropped", 0),
            "reconnects": client.reconnects if client is not None else 0,
            "records_lost": writer.lost if writer is not None else 0,
            "waiting_s": time.monotonic() - waiting if waiting is not None else None,
            "source_stalled_s": getattr(source, "stalled_s", 0.0) or None,
        }

    def status(line: str) -> None:
        if runner.bar is not None and not runner.bar.disable:
            runner.bar.set_postfix_str(line)

    stats_out = None
    if args.stats_interval is not None:
        stats_out = sys.stdout if args.stats_file == "-" else open(args.stats_file, "a", encoding="utf-8")  # noqa: SIM115
    metrics = None
    if args.metrics_port is not None:
        metrics = EdgeMetrics()
        metrics.serve(args.metrics_port, args.metrics_host)
    try:
        return LiveStats(
            counters,
            window_s=args.window,
            stats_interval_s=args.stats_interval,
            stats_out=stats_out,
            status=status,
            metrics=metrics,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _print_running_summary(signum, frame) -> None:
    # SIGUSR1 prints the summary so far, as dd does; the run goes on.
    runner = _current_runner
    if runner is not None and runner.summary is not None:
        print(runner.running_summary().format(), file=sys.stderr, flush=True)


def interrupted_exit(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The signal that ended the run and the shell's exit code for it: 128 + its number (130, 143)."""
    sig = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    return sig.name, 128 + sig.value


def _print_summary_so_far() -> None:
    runner = _current_runner
    if runner is not None and runner.summary is not None:
        print(runner.summary.format(), flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        interrupts.install()  # SIGTERM and Ctrl-C end the run between two steps, never inside grpc
        signal.signal(signal.SIGUSR1, _print_running_summary)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    set_opencv_logging(logging.getLogger().getEffectiveLevel())
    try:
        summary = run_edge(args)
    except ServerGone as exc:
        if exc.summary is not None:
            print(exc.summary.format())
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_SERVER_GONE
    except SourceLost as exc:
        _print_summary_so_far()
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_SOURCE_LOST
    except RecordWriteError as exc:
        print(f"{PROG}: error: {exc} (--on-write-error stop); records before it were written", file=sys.stderr)
        return EXIT_WRITE_ERROR
    except USER_ERRORS as exc:
        return report(PROG, exc)
    except KeyboardInterrupt as exc:
        name, code = interrupted_exit(exc)
        _print_summary_so_far()
        print(f"{PROG}: interrupted ({name}); records and summary so far were written", file=sys.stderr)
        return code
    print(summary.format())
    return 0 if summary.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
