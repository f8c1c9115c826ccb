"""The edge's Python API: what an application imports to run split detection in its own loop.

    import hnd

    with hnd.connect("gpu-host:50051", head="head.onnx", bits=4, key_interval=30) as detector:
        det = detector.detect(frame)              # frame: [H, W, 3] uint8 RGB numpy array
        det.boxes, det.labels, det.scores         # float32 [N, 4] xyxy in the frame's pixels, int64 [N], float32 [N]
        for det in detector.detect_many(frames):  # pipelined over the in-flight window, in frame order
            ...

``connect`` takes hnd-edge's options as keywords (``--key-interval 30`` is ``key_interval=30``; the
flags about sources, record files and live displays are the CLI's own). ``hnd-edge`` is a thin CLI over
this module: it builds an :class:`EdgeSettings` from its flags and runs the same :class:`Detector`'s
runner over its frame source, so both share one code path. Errors are :class:`hnd.common.errors.HndError`
subclasses (``EdgeError`` and its ``ServerGone`` / ``WeightsMismatch`` / :class:`FrameFailed`,
``ConfigError``, ``UsageError``...); no gRPC type reaches the caller. With an ONNX head (``head="x.onnx"``)
or in offload mode nothing here imports torch.

:func:`make_mode` is the factory of edge modes (:mod:`hnd.edge.modes` defines the interface, the
modes live in their own modules, and this module, which picks, imports them).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from hnd.common import codec, tracing
from hnd.common.config import Config, ConfigError, RuntimeConfig, check_filter_threshold_flag, load_config, with_weights
from hnd.common.errors import HndError, UsageError
from hnd.common.flags import DEFAULT_CONFIG
from hnd.common.timing import now_ns
from hnd.edge.adapt import Objective
from hnd.edge.adapt_mode import adaptive_mode, objective_from_args
from hnd.edge.capture import Frame
from hnd.edge.client import LB_POLICIES, ClientSettings, EdgeError, SplitClient, check_target
from hnd.edge.modes import Detections, EdgeMode, EdgeOptions, OffloadMode
from hnd.edge.pipeline import INTERRUPTED, EdgeRunner, ServerGone
from hnd.edge.records import FrameRecord
from hnd.edge.summary import Summary
from hnd.proto.v1 import split_inference_pb2 as pb

__all__ = ["Detection", "Detector", "EdgeSettings", "FrameFailed", "connect", "make_mode", "open_detector"]

DEFAULT_GIVE_UP_S = 30.0
MODES = ("split", "offload", "local")
IMAGE_FORMATS = ("jpeg", "png", "webp", "h264", "hevc")


@dataclass
class EdgeSettings:
    """hnd-edge's options that are not about where frames come from or where records go, by flag name
    (``--max-inflight`` is ``max_inflight``); defaults are hnd-edge's (a test checks they agree).

    Beyond the flags: ``token`` (the bearer token itself, instead of ``token_file``).
    """

    server: str = "127.0.0.1:50051"
    config: str = DEFAULT_CONFIG
    checkpoint: str | None = None
    head: str | None = None
    random_weights: int | None = None
    mode: str = "split"
    bits: int | None = None
    granularity: str | None = None
    compression: str | None = None
    image_format: str = "jpeg"
    jpeg_quality: int = 90
    webp_quality: int = 80
    key_interval: int = 1
    max_clamped: float = 0.001
    crf: float = 23.0
    bitrate: int | None = None
    gop: int = 30
    preset: str = "medium"
    max_inflight: int | None = None
    stream: bool = False
    score_threshold: float | None = None
    filter_threshold: float | None = None
    no_filter: bool = False
    lb: str = "round_robin"
    max_attempts: int = 3
    timeout: float | None = None
    connect_timeout: float = ClientSettings.connect_timeout_s
    give_up_after: float | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token_file: str | None = None
    token: str | None = None
    threads: int | None = None
    head_workers: int | None = None
    ort_provider: list[str] | None = None
    min_size: int | None = None
    max_size: int | None = None
    # --adapt (hnd.edge.adapt_mode): the operating points file and the objective
    adapt: str | None = None
    target_latency_ms: float | None = None
    max_kbps: float | None = None
    min_agreement: float | None = None

    def __post_init__(self) -> None:
        # The choices hnd-edge's parser enforces, for keyword callers (the CLI's values passed them already).
        choices = {
            "mode": MODES,
            "image_format": IMAGE_FORMATS,
            "lb": LB_POLICIES,
            "granularity": (None, *codec.GRANULARITIES),
            "compression": (None, *codec.ALL_COMPRESSIONS),
            "bits": (None, codec.LEARNED_BITS, *codec.BITS),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                shown = ", ".join(str(a) for a in allowed if a is not None)
                raise UsageError(f"{name} {getattr(self, name)!r}: expected one of {shown}")
        if not self.connect_timeout > 0:
            raise UsageError(f"connect_timeout (--connect-timeout) must be > 0 seconds, got {self.connect_timeout!r}")

    @classmethod
    def from_args(cls, args: Any) -> EdgeSettings:
        """The settings among hnd-edge's parsed flags (an ``argparse.Namespace``); absent ones keep defaults."""
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})

    @classmethod
    def from_keywords(cls, **options: Any) -> EdgeSettings:
        """``EdgeSettings(**options)``, an unknown keyword a UsageError that lists the known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise UsageError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                f"(hnd.connect takes hnd-edge's options: {', '.join(sorted(known))})"
            )
        return cls(**options)


def make_mode(options: EdgeOptions, head: Any = None, fingerprint: str = "", model: Any = None) -> EdgeMode:
    """The mode ``options.mode`` names, over the parts given: a torch or ONNX head (split), the full model (local).

    Torch is imported only for a torch mode; the video and stream modes only when picked.
    """
    if options.mode == "offload":
        if options.image_format in ("h264", "hevc"):
            from hnd.edge.streaming import VideoOffloadMode

            return VideoOffloadMode(options, fingerprint)
        return OffloadMode(options, fingerprint)
    if options.mode == "split" and head is not None:
        from hnd.edge.onnx_head import OnnxHead

        if isinstance(head, OnnxHead):  # no torch on this path
            from hnd.edge.onnx_mode import OnnxSplitMode

            return OnnxSplitMode(options, head)
    if options.mode in ("split", "local"):
        from hnd.edge.torch_modes import LocalMode, TorchSplitMode  # torch only when a torch mode is used

        if options.mode == "split":
            if head is None:
                raise ValueError("split mode needs a head")
            return TorchSplitMode(options, head, fingerprint)
        if model is None:
            raise ValueError("local mode needs the full model")
        return LocalMode(options, model, fingerprint)
    raise ValueError(f"unknown edge mode {options.mode!r} (split, offload, local)")


@dataclass(frozen=True)
class Plan:
    """What can be settled before a frame source is opened: the config and the run's EdgeOptions."""

    cfg: Config
    options: EdgeOptions
    objective: Objective | None = None  # --adapt's


def plan_edge(settings: EdgeSettings) -> Plan:
    """The config and options of ``settings``, validated (ConfigError / EdgeError) before anything loads."""
    check_early(settings)
    cfg = load_config(settings.config)
    return Plan(cfg, edge_options(settings, cfg), objective_from_args(settings))


def open_detector(settings: EdgeSettings, live: bool = False, plan: Plan | None = None) -> Detector:
    """The Detector of ``settings``: model loaded (head, full model or none), client connected and the
    server checked against it (GetModelInfo: fingerprint, bits, formats).

    live: frames come from a live source (a server that went away is waited for without end unless
    ``give_up_after`` says otherwise); ``plan``: from :func:`plan_edge`, when the caller made it already.
    """
    plan = plan or plan_edge(settings)
    tracing.configure_from_env("hnd-edge")  # OTEL_* settings; off unless they (or the application) say so
    cfg, options = plan.cfg, plan.options
    s = settings
    options.give_up_after_s = give_up_after(s, live)
    em = load_edge_model(
        cfg,
        s.mode,
        s.checkpoint,
        s.head,
        s.random_weights,
        s.ort_provider,
        s.threads,
        s.min_size,
        s.max_size,
        options.head_workers if s.adapt is None else 1,  # --adapt's modes run their heads in turn
    )
    client = make_client(s, cfg.runtime, live) if s.mode != "local" else None
    try:
        if plan.objective is None or s.adapt is None:
            mode = make_mode(options, em.head, em.fingerprint, em.model)
        else:  # --adapt: the operating point per frame, each point's mode made here
            mode = adaptive_mode(s.adapt, plan.objective, options, em.head, em.fingerprint, client, make_mode)
        info = check_server(client, mode, em.fingerprint) if client is not None else None
    except BaseException:
        if client is not None:
            client.close()
        raise
    runner = EdgeRunner(options, mode, client)
    if info is not None:
        runner.fit_server(info)
    return Detector(runner, info)


def connect(server: str, head: str | None = None, **options: Any) -> Detector:
    """A :class:`Detector` talking to hnd-server at ``server`` (HOST:PORT or a gRPC target such as
    ``dns:///hnd-server.hnd.svc:50051``), with hnd-edge's options as keywords.

    head: a head-only export (``.onnx`` runs on ONNX Runtime, no torch; else torch weights); or
    ``checkpoint=`` / ``random_weights=`` for the full student; ``mode="offload"`` sends the frame
    itself. Common options: ``config`` (the model config, as hnd-edge's ``--config``), ``bits``,
    ``key_interval`` (temporal coding on a stream), ``max_inflight`` (the pipelining window of
    ``detect_many``), ``score_threshold``, ``timeout``, ``connect_timeout`` (seconds to wait for a server
    that is not up yet, default 10), ``tls_ca`` / ``token``. The server is checked (same weights, a codec it
    takes) before this returns. Use it as a context manager, or ``close()`` it.

    Raises an HndError with one line: ConfigError / UsageError for options, EdgeError when the server
    is unreachable or cannot serve these options, FingerprintMismatch for other weights.
    """
    return open_detector(EdgeSettings.from_keywords(server=server, head=head, **options))


@dataclass(frozen=True)
class Detection:
    """One frame's detections, numpy arrays in the frame's pixel coordinates.

    boxes: float32 [N, 4] (x1, y1, x2, y2); labels: int64 [N] (COCO category ids); scores: float32 [N];
    masks: uint8 [N, H, W] (0 / 1, the frame's H x W) for Mask R-CNN, else None; keypoints: float32
    [N, K, 3] (x, y, visibility) for Keypoint R-CNN, else None, with keypoint_scores float32 [N, K].
    record: the frame's :class:`hnd.edge.records.FrameRecord`: bytes on the wire (``record.bytes``),
    per-stage milliseconds (``record.ms``, ``record.server_ms``), ``status`` / ``error``, the
    ``replica`` that answered, ``attempts``, and what the mode adds (``record.extra``: key / delta frame,
    operating point). A failed frame (``ok`` False) has empty arrays.
    """

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    record: FrameRecord
    masks: np.ndarray | None = None
    keypoints: np.ndarray | None = None
    keypoint_scores: np.ndarray | None = None

    @property
    def ok(self) -> bool:
        return self.record.ok

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def of(cls, record: FrameRecord, dets: Detections | None) -> Detection:
        """A record and its detections (the runner's numpy dict; None for a failed frame)."""
        if dets is None:
            empty = np.zeros((0,), np.float32)
            return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), empty, record)
        masks = dets.get("masks")
        if masks is not None:
            masks = np.asarray(masks)
            if masks.dtype != np.uint8:  # probabilities (local mode): binarized as the server does
                masks = (masks > 0.5).astype(np.uint8)
            masks = masks.reshape(masks.shape[0], *masks.shape[-2:])  # [N, 1, H, W] -> [N, H, W]
        keypoints = dets.get("keypoints")
        kp_scores = dets.get("keypoints_scores")
        return cls(
            np.asarray(dets["boxes"], np.float32),
            np.asarray(dets["labels"], np.int64),
            np.asarray(dets["scores"], np.float32),
            record,
            masks,
            None if keypoints is None else np.asarray(keypoints, np.float32),
            None if kp_scores is None else np.asarray(kp_scores, np.float32),
        )


class FrameFailed(EdgeError):
    """A frame the server did not answer (or refused): ``record`` says why (``record.status``, a gRPC
    status name such as RESOURCE_EXHAUSTED, and ``record.error``)."""

    def __init__(self, record: FrameRecord) -> None:
        super().__init__(f"frame {record.frame}: {record.status}: {record.error}")
        self.record = record


class Detector:
    """Split (or offload, or local) detection of frames one by one or pipelined; made by :func:`connect`.

    ``detect(frame)`` sends one frame and waits for it; ``detect_many(frames)`` keeps up to
    ``max_inflight`` frames on the wire while the next is prepared, and yields in frame order.
    Temporal coding state (``key_interval``) spans calls: consecutive frames share one stream.
    ``summary``: the run's summary over every frame so far; ``info``: the server's hnd.v1 ModelInfo
    message (None in local mode). Not thread-safe: one caller at a time (hnd.aio wraps it for asyncio).
    """

    def __init__(self, runner: EdgeRunner, info: pb.ModelInfo | None = None) -> None:
        self.runner = runner
        self.info = info
        self.options = runner.options
        self._done: deque[Detection] = deque()
        self._index = itertools.count()
        self._closed = False
        runner.begin(on_record=self._on_record)

    @property
    def summary(self) -> Summary:
        return self.runner.running_summary()

    def _on_record(self, record: FrameRecord, frame: Frame) -> None:
        dets = self.runner.last_detections if record.ok else None  # per image of the request: one here
        self._done.append(Detection.of(record, dets[0] if dets else None))

    def _frame(self, image: Any, name: str | None = None) -> Frame:
        if self._closed:
            raise UsageError("detector: closed")
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            what = (
                f"{image.dtype} array of shape {list(image.shape)}"
                if isinstance(image, np.ndarray)
                else type(image).__name__
            )
            raise UsageError(f"frame: expected an [H, W, 3] uint8 RGB numpy array, got a {what}")
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise UsageError(f"frame: empty image of shape {list(image.shape)}")
        index = next(self._index)
        now = now_ns()
        return Frame(index, name or f"frame{index}", image, now, 0.0, time.time())

    def _check_gone(self) -> None:
        if self.runner.gave_up:
            raise ServerGone(self.runner.gave_up, self.summary)

    def _take(self, raise_errors: bool) -> Detection:
        det = self._done.popleft()
        if raise_errors and not det.ok:
            self._check_gone()
            raise FrameFailed(det.record)
        return det

    def _put(self, image: np.ndarray, name: str | None = None) -> None:
        self._check_gone()
        frame = self._frame(image, name)
        try:
            self.runner.put(frame)
        except KeyboardInterrupt:
            self._abandon()
            raise

    def _flush(self) -> None:
        try:
            self.runner.flush()
        except KeyboardInterrupt:
            self._abandon()
            raise

    def _take_all(self) -> list[Detection]:
        out = list(self._done)
        self._done.clear()
        return out

    def push(self, frame: np.ndarray, name: str | None = None) -> list[Detection]:
        """Send one frame ([H, W, 3] uint8 RGB) without waiting for it; returns the detections of earlier
        frames that are done, oldest first (at most ``max_inflight`` frames stay in flight). Failed frames
        come back with ``ok`` False. With :meth:`drain`, the callback-style use: a camera callback pushes."""
        self._put(frame, name)
        return self._take_all()

    def drain(self) -> list[Detection]:
        """Wait for every frame in flight; their detections, oldest first."""
        self._flush()
        return self._take_all()

    def detect(self, frame: np.ndarray) -> Detection:
        """Detections of one frame ([H, W, 3] uint8 RGB), waiting for its answer.

        Raises FrameFailed when the server did not answer it (status in ``.record``), ServerGone once the
        server has been unreachable for ``give_up_after`` seconds, UsageError for a frame that is not an
        [H, W, 3] uint8 array or while frames sent with :meth:`push` are not drained.
        """
        if self._done or self.runner.pending:
            raise UsageError("detector: frames sent with push() are still in flight; drain() them first")
        self._put(frame)
        self._flush()
        return self._take(raise_errors=True)

    def detect_many(self, frames: Iterable[np.ndarray], raise_errors: bool = True) -> Iterator[Detection]:
        """Detections of each frame ([H, W, 3] uint8 RGB), in frame order, with up to ``max_inflight``
        frames on the wire while the next is prepared.

        raise_errors: a frame the server did not answer raises FrameFailed (False: it is yielded with
        ``ok`` False and empty arrays). ServerGone once the server has been unreachable for
        ``give_up_after`` seconds. Stopping early abandons the frames still in flight.
        """
        finished = False
        try:
            for image in frames:
                self._put(image)
                while self._done:
                    yield self._take(raise_errors)
            self._flush()
            while self._done:
                yield self._take(raise_errors)
            finished = True
            self._check_gone()
        finally:
            if not finished:
                self._abandon()

    def _abandon(self) -> None:
        """Frames in flight are recorded as cancelled, without waiting, and dropped from the results."""
        self.runner.flush(abandon=(INTERRUPTED, "abandoned before the server answered"))
        self._done.clear()

    def close(self) -> None:
        """Stop: frames still in flight are abandoned; the mode and the connection are closed."""
        if self._closed:
            return
        self._closed = True
        try:
            self._abandon()
            self.runner.end()
        finally:
            self.runner.mode.close()
            if self.runner.client is not None:
                self.runner.client.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# --- settings -> parts (also what hnd-edge runs) ----------------------------------------------------


@dataclass
class EdgeModel:
    head: Any  # hnd.common.split.Head (torch) or hnd.edge.onnx_head.OnnxHead, None without a head
    fingerprint: str
    model: Any  # the full torch model (local mode only)


def ort_providers(names: list[str] | None) -> list[str]:
    """The providers to ask ONNX Runtime for: the given ones in order, CPU last as the fallback."""
    names = list(names or [])
    return names + ([] if "CPUExecutionProvider" in names else ["CPUExecutionProvider"])


def load_edge_model(
    cfg: Config,
    mode: str,
    checkpoint: str | None = None,
    head_path: str | None = None,
    random_weights: int | None = None,
    providers: list[str] | None = None,
    threads: int | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
    head_workers: int = 1,
) -> EdgeModel:
    """What the edge runs: the head (split), the full model (local) or nothing (offload).

    An ``.onnx`` head runs on ONNX Runtime and needs no torch; everything else imports torch here. Its intra-op
    threads, unless given: the cores over ``head_workers`` (the frames whose heads run at once).
    """
    if mode == "offload":
        return EdgeModel(None, "", None)
    if (min_size is not None or max_size is not None) and mode != "split":
        raise ConfigError("--min-size / --max-size set the split's resize: split mode only")
    if head_path is not None:
        from hnd.edge.onnx_head import OnnxHead, is_onnx_path

        if mode == "local":
            raise ConfigError("--head holds only the head; local mode needs --checkpoint or --random-weights")
        if is_onnx_path(head_path):
            if not threads and head_workers > 1:
                threads = max(1, (os.cpu_count() or 1) // head_workers)
            head = OnnxHead(head_path, ort_providers(providers), threads, min_size, max_size)
            return EdgeModel(head, head.fingerprint, None)
    elif providers:
        raise ConfigError("--ort-provider is for an ONNX head (--head head.onnx)")
    import torch

    from hnd.common.checkpoint import fingerprint, load_head
    from hnd.common.build import build_architecture, build_model_from_config
    from hnd.common.split import split_model

    if threads:
        torch.set_num_threads(threads)
    if head_path is not None:
        head, _ = split_model(build_architecture(cfg.model))  # the filter too, when configured
        fp = load_head(head_path, head)
    else:
        model = build_model_from_config(with_weights(cfg.model, checkpoint, random_weights), cfg.path)
        fp = fingerprint(model)
        if mode == "local":
            return EdgeModel(None, fp, model)
        if cfg.model.bottleneck_channels is None:
            raise ConfigError(f"{cfg.path}: model is a teacher (no bottleneck); split mode needs a student")
        head, _ = split_model(model)
    if min_size is not None or max_size is not None:
        t = head.transform
        t.min_size = (int(min_size or t.min_size[-1]),)
        t.max_size = int(max_size or t.max_size)
        if t.min_size[-1] < 1 or t.max_size < t.min_size[-1]:
            raise ConfigError(f"need 1 <= --min-size <= --max-size, got {t.min_size[-1]}/{t.max_size}")
    return EdgeModel(head, fp, None)


def filter_threshold(cfg: Config, args: EdgeSettings) -> float | None:
    """The neural filter's threshold for this run, None when it is off (no filter, --no-filter, offload)."""
    flt = cfg.model.filter
    given = getattr(args, "filter_threshold", None)
    if given is not None:
        check_filter_threshold_flag(given, cfg)
        if args.mode == "offload":
            raise ConfigError("--filter-threshold: the filter runs on the edge's head; offload mode has none")
        return given
    if flt is None or getattr(args, "no_filter", False) or args.mode == "offload":
        return None
    return flt.threshold


def codec_settings(args: EdgeSettings, rt: RuntimeConfig) -> codec.CodecSettings:
    """--bits / --granularity / --compression over the config's runtime section, validated (ConfigError)."""
    try:
        return codec.CodecSettings(
            bits=args.bits if args.bits is not None else rt.bits,
            granularity=args.granularity or rt.granularity,
            compression=args.compression or rt.compression,
            level=rt.level,
        )
    except codec.CodecError as exc:
        if (args.granularity or rt.granularity) == "original":
            raise ConfigError(f"--granularity original: {exc}; use --bits 8") from None
        raise ConfigError(f"--bits / --granularity / --compression: {exc}") from None


def check_early(args: EdgeSettings) -> None:
    """What can be refused before anything is loaded: the server address and --max-attempts."""
    if args.mode != "local":
        check_target(args.server)
    if not 1 <= args.max_attempts <= 5:
        raise ConfigError(f"--max-attempts {args.max_attempts}: expected 1 to 5 (gRPC's retry policy allows at most 5)")


def edge_options(args: EdgeSettings, cfg: Config) -> EdgeOptions:
    """The EdgeOptions of this run: command-line flags over the config's runtime section, validated."""
    rt = cfg.runtime
    if args.key_interval < 1 or args.gop < 1 or not 0.0 <= args.max_clamped <= 1.0:
        raise ConfigError("--key-interval and --gop must be >= 1, --max-clamped in [0, 1]")
    if args.key_interval > 1 and args.mode != "split":
        raise ConfigError(
            "--key-interval: temporal coding of the bottleneck is for split mode "
            "(offload video: --image-format h264 --gop N)"
        )
    return EdgeOptions(
        mode=args.mode,
        codec=codec_settings(args, rt),
        image_format=args.image_format,
        jpeg_quality=args.jpeg_quality,
        webp_quality=args.webp_quality,
        max_inflight=args.max_inflight or rt.max_inflight,
        # Unless given, the window grows from 1 up to the config's and the deadline from the config's, as the
        # server's answers show what it needs (hnd.edge.window).
        auto_window=args.max_inflight is None,
        auto_deadline=args.timeout is None,
        # key / delta frames and video need a stream session on the server
        stream=args.stream
        or args.key_interval > 1
        or (args.mode == "offload" and args.image_format in ("h264", "hevc")),
        key_interval=args.key_interval,
        max_clamped=args.max_clamped,
        crf=args.crf,
        bitrate=args.bitrate,
        gop=args.gop,
        preset=args.preset,
        score_threshold=args.score_threshold,
        max_attempts=args.max_attempts,
        filter_threshold=filter_threshold(cfg, args),
        head_workers=head_workers(args),
    )


def head_workers(args: EdgeSettings) -> int:
    """Frames whose heads run at once (an .onnx head): ``head_workers``, else 2 where the machine has 2 or more
    cores (hnd.bench.head: two frames over two 1-thread runs beat one frame on two threads), else 1."""
    if args.head_workers is not None:
        if args.head_workers < 1:
            raise ConfigError(f"--head-workers must be >= 1, got {args.head_workers}")
        return args.head_workers
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def give_up_after(args: EdgeSettings, live: bool) -> float | None:
    """Seconds without a server before the run ends (None: never): ``give_up_after``, else by source."""
    give_up = args.give_up_after
    if give_up is not None and give_up < 0:
        raise ConfigError(f"--give-up-after must be >= 0 seconds (0: never), got {give_up:g}")
    if give_up is None:  # files end after a while; a live camera keeps capturing and waits for its server
        give_up = None if live else DEFAULT_GIVE_UP_S
    return give_up if give_up else None


def make_client(args: EdgeSettings, rt: RuntimeConfig, live: bool) -> SplitClient:
    """The gRPC client of this run (TLS, token, balancing and retries from the flags)."""
    token = Path(args.token_file).read_text().strip() if args.token_file else args.token
    return SplitClient(
        ClientSettings(
            target=args.server,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            token=token,
            max_message_bytes=rt.max_message_bytes,
            timeout_s=args.timeout or rt.deadline_s,
            connect_timeout_s=args.connect_timeout,
            lb=args.lb,
            max_attempts=args.max_attempts,
            tls_server_name=args.tls_server_name,
            # A live source waits for a server that went away as long as it takes (capturing meanwhile);
            # files keep the bounded wait.
            reconnect_timeout_s=None if live else 30.0,
        )
    )


def check_server(client: SplitClient, mode: EdgeMode, fingerprint: str) -> pb.ModelInfo:
    """GetModelInfo, and the mode's check of it (one line naming the replica that answered)."""
    info = client.model_info()
    try:
        mode.check_server(info)
    except HndError as exc:
        raise EdgeError(f"{exc} (replica {client.info_replica})" if client.info_replica else str(exc)) from None
    # Every replica must hold these weights (split: the edge's own; offload: the first replica's).
    client.expected_fingerprint = fingerprint or info.weights_fingerprint
    return info
