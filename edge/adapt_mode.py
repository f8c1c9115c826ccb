"""hnd-edge --adapt: an edge mode that runs, frame by frame, the operating point the policy chooses.

:class:`AdaptiveMode` is an :class:`~hnd.edge.modes.EdgeMode` over one mode per operating point (split at the
point's bits / granularity / coding / resize, or offload as its image format and quality / CRF), built from
the profile (``hnd-bench --rate-accuracy --profile-out``). Per frame it asks :func:`hnd.edge.adapt.choose`
for the point, with the link estimate (:class:`hnd.edge.linkest.LinkEstimator`) fed by every answered
frame's record, and hands the frame to that point's mode. The runner sees one mode; answers, resends and
final records go back to the mode that prepared the frame, so each point's stream state follows its frames.

A **switch** between points, when either is temporal (key / delta bottlenecks, H.264 / HEVC), ends the
current InferStream (the frames it carries are still answered) and starts the new point with a key frame on
a new stream session: no delta ever refers to a reference the server holds for another point. The policy's
hysteresis keeps switches apart by at least ``min_samples`` observations.

Every record carries ``operating_point`` and the link estimate it was chosen under (``link``: kbit/s and
RTT ms); :class:`AdaptStats` (the summary's ``adapt`` section) counts frames, bytes and latency per point
and the switches. No torch here: an ONNX edge adapts too.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from hnd.common.codec import CodecSettings
from hnd.common.errors import HndError
from hnd.edge.adapt import (
    LinkEstimate,
    Objective,
    OperatingPoint,
    PolicyParams,
    PolicyState,
    Profile,
    calibrated,
    choose,
    expected_compute_ms,
    predict,
)
from hnd.edge.capture import Frame
from hnd.edge.client import EdgeError
from hnd.edge.linkest import LinkEstimator
from hnd.edge.modes import EdgeMode, EdgeOptions, Prepared
from hnd.edge.summary import StreamingStat
from hnd.edge.window import Window
from hnd.proto.v1 import split_inference_pb2 as pb

log = logging.getLogger("hnd.edge")

RUNNABLE = ("split", "offload")  # local points need the whole model here and no server: not switched to


def point_options(base: EdgeOptions, point: OperatingPoint) -> EdgeOptions:
    """``base`` with ``point``'s way of coding a frame (ValueError / CodecError when it is not one)."""
    r = point.reproduce
    o = dataclasses.replace(base, mode=point.mode)
    if point.mode == "split":
        o.codec = CodecSettings(int(r["bits"]), str(r["granularity"]), str(r.get("compression", "zstd")))
        o.key_interval = int(r.get("key_interval", 1)) if r.get("coding") == "temporal" else 1
        o.max_clamped = float(r.get("max_clamped", base.max_clamped))
        return o
    o.filter_threshold = None  # the filter runs on the head: split points only
    o.image_format = fmt = str(r["image_format"])
    if fmt == "jpeg":
        o.jpeg_quality = int(r["quality"])
    elif fmt == "webp":
        o.webp_quality = int(r["quality"])
    elif fmt in ("h264", "hevc"):
        o.crf, o.bitrate = float(r["crf"]), None
        o.gop = int(r.get("key_interval", base.gop))
        o.preset = str(r.get("preset", base.preset))
    else:
        raise ValueError(f"image format {fmt!r}")
    return o


def head_at(head: Any, min_size: int, max_size: int) -> Any:
    """``head`` resizing frames to ``min_size`` / ``max_size`` instead: a shallow copy sharing every weight
    (a torch head gets its own copy of the transform, an ONNX head its own sizes)."""
    out = copy.copy(head)
    if hasattr(head, "transform"):  # torch Head / EntropicHead: modules are shared, the transform is not
        out._modules = dict(head._modules)
        t = copy.copy(head.transform)
        t.min_size, t.max_size = (int(min_size),), int(max_size)
        out._modules["transform"] = t
    else:  # OnnxHead
        out.min_size, out.max_size = int(min_size), int(max_size)
    return out


class AdaptStats:
    """The summary's ``adapt`` section: frames, bytes and latency per operating point, switches, and how
    many frames ran with no point meeting the objective."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.switches = 0
        self.infeasible_frames = 0
        self.points: dict[str, dict[str, Any]] = {}

    def add(self, record: Any) -> None:
        pid = record.extra.get("operating_point")
        if pid is None:
            return
        s = self.points.setdefault(
            pid, {"frames": 0, "answered": 0, "bytes": StreamingStat(), "latency_ms": StreamingStat(), "within": 0}
        )
        s["frames"] += 1
        if record.ok:
            s["answered"] += 1
            s["bytes"].add(record.bytes.payload)
            if record.ms.total is not None:
                s["latency_ms"].add(record.ms.total)
                target = self.objective.target_latency_ms
                s["within"] += target is None or record.ms.total <= target

    def as_dict(self) -> dict[str, Any]:
        return {
            "objective": self.objective.describe(),
            "switches": self.switches,
            "frames_with_no_point_meeting_the_objective": self.infeasible_frames,
            "points": {
                pid: {
                    "frames": s["frames"],
                    "answered": s["answered"],
                    "payload_bytes": s["bytes"].stats((50,)),
                    "latency_ms": s["latency_ms"].stats((50, 95)),
                    "within_target": s["within"],
                }
                for pid, s in self.points.items()
            },
        }

    def format_lines(self) -> list[str]:
        lines = [
            f"adaptive: {self.objective.describe()}  switches {self.switches}"
            + (f"  frames with no point meeting it {self.infeasible_frames}" if self.infeasible_frames else "")
        ]
        lines.append(f"{'operating point':<40}{'frames':>8}{'B/frame':>10}{'p50 ms':>10}{'p95 ms':>10}")
        for pid, s in self.points.items():
            lat = s["latency_ms"]
            lines.append(
                f"{pid:<40}{s['frames']:>8}{s['bytes'].mean if s['bytes'].count else 0:>10,.0f}"
                f"{lat.quantile(0.5):>10.1f}{lat.quantile(0.95):>10.1f}"
            )
        return lines


class AdaptiveMode(EdgeMode):
    """One mode per runnable operating point; the policy picks which prepares each frame.

    make: ``make(options, head, fingerprint)`` builds a point's mode (``hnd.edge.api.make_mode``: the factory
    lives beside the API that picks modes, so this module imports none of them); end_stream: ends the
    current InferStream so the next request opens a new one (``SplitClient.end_stream``); say: where the
    once-per-change notes go (stderr); clock: monotonic seconds (tests pass their own); probe: a timed small
    call, (bytes, ms) or None, made once the server is checked (``SplitClient.probe_link``: the first measurement).
    """

    name = "adaptive"

    def __init__(
        self,
        options: EdgeOptions,
        profile: Profile,
        objective: Objective,
        make: Callable[..., EdgeMode],
        head: Any = None,
        fingerprint: str = "",
        end_stream: Callable[[], None] | None = None,
        params: PolicyParams = PolicyParams(),
        estimator: LinkEstimator | None = None,
        say: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        probe: Callable[[], tuple[int, float] | None] | None = None,
    ) -> None:
        super().__init__(options, fingerprint)
        profile.check_weights(fingerprint)
        self.profile, self.objective, self.params = profile, objective, params
        self.head = head
        self.end_stream = end_stream
        self.estimator = estimator or LinkEstimator(inflight=options.max_inflight)
        self.window: Window | None = None  # the runner's: a self-sized one holds fewer than max_inflight
        self.say = say or (lambda line: print(f"hnd-edge: {line}", file=sys.stderr))
        self.clock = clock
        self.probe = probe
        self._make = make
        self.points, left_out = self._runnable(profile.points)
        for why in left_out:
            self.say(why)
        if not self.points:
            raise EdgeError(f"{profile.path}: no operating point this edge can run")
        # every point goes on one InferStream when any needs a stream session
        options.stream = options.stream or any(p.temporal for p in self.points)
        self.state = PolicyState()
        self.stats = AdaptStats(objective)
        self.info: pb.ModelInfo | None = None
        self._modes: dict[tuple[str, tuple[int, int] | None], EdgeMode] = {}
        self._owner: dict[int, EdgeMode] = {}  # frame index -> the mode that prepared it
        # frame index -> (sent at, request bytes, expected compute ms, raw predicted latency ms), oldest first
        self._sent: dict[int, tuple[float, int, float, float]] = {}
        self._current: EdgeMode | None = None
        self._estimate = LinkEstimate()

    def _runnable(self, points: list[OperatingPoint]) -> tuple[list[OperatingPoint], list[str]]:
        """The points this edge can send, and one line per point left out (why)."""
        kept, left = [], []
        for p in points:
            why = None
            if p.mode not in RUNNABLE:
                why = f"a {p.mode} point"
            elif p.mode == "split" and self.head is None:
                why = "a split point and this edge has no head"
            else:
                try:
                    point_options(self.options, p)
                except (HndError, KeyError, TypeError, ValueError) as exc:
                    why = f"cannot be reproduced here ({exc})"
            if why is None:
                kept.append(p)
            else:
                left.append(f"operating point {p.id} left out: {why}")
        return kept, left

    # --- the EdgeMode interface ------------------------------------------------------------------

    def check_server(self, info: pb.ModelInfo) -> None:
        """Every point's own check against the server (a point the server cannot serve is left out, said
        once); EdgeError when none is left. Split points at ``native`` size are checked at the first frame of
        each size, all of them before the policy chooses (:meth:`_choose`)."""
        self.info = info
        for p in list(self.points):
            if p.mode == "split" and p.reproduce.get("resize") == "native":
                continue
            self._mode_for(p, None)
        if not self.points:
            raise EdgeError(f"{self.profile.path}: the server can serve none of the operating points")
        measured = self.probe() if self.probe is not None else None
        if measured is not None:  # a first measurement, so the first frame is not blindly the cheapest
            self.estimator.observe_probe(self.clock(), *measured)

    def _resize(self, point: OperatingPoint, frame: Frame | None) -> tuple[int, int] | None:
        if point.mode != "split" or point.reproduce.get("resize") != "native" or frame is None:
            return None
        h, w = frame.image.shape[:2]
        return (min(h, w), max(h, w))

    def _mode_for(self, point: OperatingPoint, frame: Frame | None) -> EdgeMode | None:
        """The point's mode (built on first use and checked against the server); None when the server
        cannot serve it (then the point is left out, said once)."""
        key = (point.id, self._resize(point, frame))
        if key in self._modes:
            return self._modes[key]
        head = self.head
        if key[1] is not None:
            head = head_at(self.head, *key[1])
        try:
            mode = self._make(
                point_options(self.options, point), head if point.mode == "split" else None, self.fingerprint
            )
            if self.info is not None:
                mode.check_server(self.info)
        except (HndError, ValueError) as exc:
            self.say(f"operating point {point.id} left out: {exc}")
            self.points.remove(point)
            return None
        self._modes[key] = mode
        return mode

    def prepare(self, frame: Frame) -> Prepared:
        mode, point = self._choose(frame)
        if mode is not self._current:
            self._switch_to(mode, point)
        p = mode.prepare(frame)
        self._owner[frame.index] = mode
        p.extra["operating_point"] = point.id
        p.extra["link"] = _link_json(self._estimate)
        raw = dataclasses.replace(self._estimate, latency_bias_ms=0.0)  # what the calibration is measured against
        compute = expected_compute_ms(point, raw)
        self._sent[frame.index] = (self.clock(), p.message_bytes, compute, predict(point, raw, self.params).latency_ms)
        return p

    def _choose(self, frame: Frame) -> tuple[EdgeMode, OperatingPoint]:
        # split points at the frame's own size are checked against the server at the first frame of each
        # size, all of them before any choice: else the policy named a point it was about to leave out
        for p in [p for p in self.points if self._resize(p, frame) is not None]:
            self._mode_for(p, frame)
        while True:
            if not self.points:
                raise EdgeError(f"{self.profile.path}: the server can serve none of the operating points")
            # the estimate as the policy sees it (compute scaled as in choose): the frame's expected compute and
            # raw prediction (prepare) are measured against it
            self._estimate = calibrated(self.points, self.link_estimate())
            decision = choose(self.points, self._estimate, self.objective, self.state, self.params)
            if decision.note:
                self.say(decision.note)
            mode = self._mode_for(decision.point, frame)
            if mode is None:  # left out just now: choose again among the rest
                self.state = dataclasses.replace(self.state, current=None)
                continue
            self.state = decision.state
            self.stats.switches = self.state.switches
            self.stats.infeasible_frames += not decision.feasible
            if decision.switched:
                pred = predict(decision.point, self._estimate, self.params)
                log.info(
                    "frame %d: operating point %s (predicted p95 %.0f ms, %.0f kbit/s on %s)",
                    frame.index,
                    decision.point.id,
                    pred.latency_ms,
                    pred.kbps,
                    _link_json(self._estimate),
                )
            return mode, decision.point

    def _switch_to(self, mode: EdgeMode, point: OperatingPoint) -> None:
        """Start ``point``: a new stream session and a key frame when it or the point before is temporal."""
        before = self._current
        self._current = mode
        if before is None:
            return
        if self.options.stream and self.end_stream is not None:
            self.end_stream()
        restart_key_frames(mode)

    def detections(self, prepared: Prepared, response: pb.InferResponse | None):
        owner = self._owner.get(prepared.frame.index) or self._current
        return super().detections(prepared, response) if owner is None else owner.detections(prepared, response)

    def reencode(self, prepared: Prepared, reason: str) -> bool:
        owner = self._owner.get(prepared.frame.index)
        return owner.reencode(prepared, reason) if owner is not None else False

    def after(self, prepared: Prepared, record: Any) -> None:
        owner = self._owner.pop(prepared.frame.index, None)
        sent = self._sent.pop(prepared.frame.index, None)
        if owner is not None:
            owner.after(prepared, record)
        if owner or self._current:  # the record names the point's mode (split, offload), not "adaptive"
            record.mode = (owner or self._current).name
        record.extra.setdefault("operating_point", self.state.current)
        if record.ok and record.server_ms is not None and record.ms.network_server is not None:
            server = record.server_ms.total()
            self.estimator.observe(
                self.clock(),
                record.bytes.message,
                record.bytes.response or 0,
                record.ms.network_server,
                server,
                point=record.extra.get("operating_point"),
                compute_ms=record.ms.edge_ms() + server,
                predicted_ms=None if sent is None else sent[3],
                total_ms=record.ms.total,
            )
        self.stats.add(record)

    def summary_sections(self) -> dict[str, Any]:
        return {"adapt": self.stats}

    def use_window(self, window: Window) -> None:
        self.window = window

    def link_estimate(self) -> LinkEstimate:
        """The estimate now, for the frames the runner's window keeps in flight now (an auto-sized window
        starts at one and grows or halves with what it measures; without a runner, ``max_inflight``)."""
        self.estimator.inflight = self.window.size if self.window is not None else self.options.max_inflight
        oldest = next(iter(self._sent.values()), None)  # the frame longest in flight bounds the rate
        outstanding = None if oldest is None else oldest[:3]
        return self.estimator.estimate(self.clock(), self.state.current, outstanding)

    def close(self) -> None:
        for mode in self._modes.values():
            mode.close()


def restart_key_frames(mode: EdgeMode) -> None:
    """The mode's next frame is a key frame (a temporal split's stream encoder, or a video encoder)."""
    coder = getattr(mode, "coder", None)
    if coder is not None and coder.encoder is not None:
        coder.encoder.force_key_frame()
    encoder = getattr(mode, "encoder", None)
    if encoder is not None and hasattr(encoder, "force_key_frame"):
        encoder.force_key_frame()


def _link_json(est: LinkEstimate) -> dict[str, float | None]:
    return {
        "kbps": None if not est.bandwidth_bps else round(est.bandwidth_bps / 1e3, 1),
        "rtt_ms": None if est.rtt_ms is None else round(est.rtt_ms, 2),
    }


# ---------------------------------------------------------------------------------------------------
# hnd-edge's flags


def add_adapt_arguments(p: Any) -> None:
    """hnd-edge's --adapt and its objective."""
    g = p.add_argument_group("adaptation (hnd.edge.adapt): pick the operating point per frame for the measured link")
    g.add_argument(
        "--adapt",
        metavar="POINTS_JSON",
        help="operating points measured by hnd-bench --rate-accuracy --profile-out (same weights): run, frame "
        "by frame, the one that best meets the objective on the link the edge measures",
    )
    g.add_argument("--target-latency-ms", type=float, metavar="MS", help="--adapt objective: p95 end-to-end latency")
    g.add_argument("--max-kbps", type=float, metavar="K", help="--adapt objective: payload bitrate cap, kbit/s")
    g.add_argument(
        "--min-agreement", type=float, metavar="F", help="--adapt objective: agreement F1 with the unsplit model"
    )


def objective_from_args(args: Any) -> Objective | None:
    """The --adapt objective (None without --adapt); ConfigError naming the flag when it cannot be used."""
    from hnd.common.config import ConfigError

    given = {
        "--target-latency-ms": args.target_latency_ms,
        "--max-kbps": args.max_kbps,
        "--min-agreement": args.min_agreement,
    }
    if args.adapt is None:
        flags = [k for k, v in given.items() if v is not None]
        if flags:
            raise ConfigError(f"{', '.join(flags)}: an objective of --adapt POINTS_JSON")
        return None
    if all(v is None for v in given.values()):
        raise ConfigError("--adapt needs an objective: --target-latency-ms, --max-kbps and/or --min-agreement")
    for flag in ("--target-latency-ms", "--max-kbps"):
        if given[flag] is not None and not given[flag] > 0:
            raise ConfigError(f"{flag} must be > 0, got {given[flag]:g}")
    if args.min_agreement is not None and not 0 <= args.min_agreement <= 1:
        raise ConfigError(f"--min-agreement must be in [0, 1], got {args.min_agreement:g}")
    if args.mode != "split":
        raise ConfigError("--adapt switches between the profile's split and offload points: leave --mode split")
    # what each point sets itself: a flag that says otherwise would be silently overridden
    overridden = {
        "--bits": getattr(args, "bits", None) is not None,
        "--granularity": getattr(args, "granularity", None) is not None,
        "--compression": getattr(args, "compression", None) is not None,
        "--key-interval": getattr(args, "key_interval", 1) != 1,
        "--image-format": getattr(args, "image_format", "jpeg") != "jpeg",
    }
    conflicting = [flag for flag, set_ in overridden.items() if set_]
    if conflicting:
        raise ConfigError(f"{', '.join(conflicting)}: --adapt takes how to code each frame from the operating points")
    return Objective(args.target_latency_ms, args.max_kbps, args.min_agreement)


def adaptive_mode(
    path: str,
    objective: Objective,
    options: EdgeOptions,
    head: Any,
    fingerprint: str,
    client: Any,
    make: Callable[..., EdgeMode],
) -> AdaptiveMode:
    """hnd-edge --adapt's mode: the profile at ``path`` (refused in one line when it holds other weights);
    ``make(options, head, fingerprint)`` builds each point's mode."""
    from hnd.edge.adapt import load_profile

    profile = load_profile(path)
    return AdaptiveMode(
        options, profile, objective, make, head, fingerprint, end_stream=client.end_stream, probe=client.probe_link
    )
