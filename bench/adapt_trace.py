"""hnd-bench --adapt-trace: the adaptive edge against each fixed operating point, over the same link trace.

    hnd-bench --adapt-trace trace.csv --target-latency-ms 1000 --out adapt-out
    hnd-bench --adapt-trace trace.csv --profile points.json --config C --checkpoint student.pt --video clip.mp4 \\
              --target-latency-ms 250 --min-agreement 0.8

A real ``hnd-server`` (in this process, on loopback) behind the shaping proxy (``hnd.bench.linkproxy``)
whose rate and delay follow ``trace.csv`` (rows ``time_s,rate[,delay]``, from the start of each run). A rate
may be relative to the points: ``fit:A`` is the rate at which point A's p95 frame is answered just within
the target, ``fit:A..B`` the geometric mean of two such rates, either ``*F`` (A: a point id or a part of it,
``4b``); they are resolved from the costs measured first (:func:`measure_costs`: the cheapest point on an
unshaped link), so a trace's phases mean the same whatever the machine's load. For
``--duration`` seconds (default: the trace's last change + 20 s) a camera delivers the same frames, cycled,
one every ``1 / --fps`` s (default: one per target; a frame the edge is too busy for is dropped and counts
as a miss), through the real edge pipeline (``EdgeRunner``, one request in flight): once with ``--adapt``
(``AdaptiveMode``, its profile at the measured compute), then
once per operating point fixed. Runs follow one another, each with the trace from its start; ``--rounds N``
repeats the set N times, each round starting one setting later (adaptive first, then second, ...), so a
load that drifts over the benchmark falls on every setting alike.

Per setting (its rounds together): frames answered, frames within the latency target, frames **meeting the
objective** (answered within the target by a point whose profiled agreement is at least
``--min-agreement``: a fixed point below it meets it with no frame), mean agreement (each answered frame
counts its point's agreement from the profile), timely agreement (over every camera frame: its point's
agreement if answered within the target, else 0), payload bytes per frame, p95 latency, and the adaptive
run's switches. Outputs in ``--out``: ``adaptive.md`` (table), ``adaptive.json`` (with the
machine, the trace and every frame's time, point, latency and bytes) and ``adaptive.png`` (the link's
rate, the adaptive run's point, and every run's latency over time).

Without ``--profile``, the points are measured here first, on the same frames (``hnd.bench.rate``, the
``--profile-out`` sweep: split temporal at ``--bits``, native size, agreement against the unsplit model).
Without ``--video`` / ``--images``, the frames are a synthetic camera clip (``hnd.train.synthetic_video``)
of ``--clip-size``; with the tiny ``test/`` configs this runs on a 2-core machine in minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hnd.common.errors import USER_ERRORS, UsageError, report
from hnd.common.files import atomic_write_json, atomic_write_text
from hnd.common.flags import HelpFormatter, add_config_argument, add_weights_arguments
from hnd.edge.adapt import Objective, OperatingPoint, Profile, load_profile
from hnd.edge.adapt_mode import AdaptiveMode, head_at, point_options
from hnd.edge.capture import ArrayFrames, Frame
from hnd.edge.client import ClientSettings, SplitClient
from hnd.edge.modes import EdgeMode, EdgeOptions
from hnd.edge.pipeline import EdgeRunner
from hnd.edge.records import FrameRecord

from hnd.bench.linkproxy import LinkProxy, LinkSettings, read_schedule

PROG = "hnd-bench --adapt-trace"
ADAPTIVE = "adaptive"
DROPPED = "DROPPED"  # a camera frame the edge was too busy for (the one before was still out)


@dataclass
class RunResult:
    """One run over the trace: every frame's (seconds since start, point, status, latency ms, payload bytes,
    the adaptive edge's bandwidth estimate in kbit/s when it chose the point)."""

    name: str
    frames: list[tuple[float, str, str, float | None, int, float | None]] = field(default_factory=list)
    switches: int = 0
    rounds: int = 0

    def add(self, other: RunResult) -> None:
        """Another round of the same setting (its times from its own start, like this one's)."""
        self.frames += other.frames
        self.switches += other.switches
        self.rounds += other.rounds

    def figures(
        self, objective: Objective, agreement: dict[str, float], phases: list[float] | None = None
    ) -> dict[str, Any]:
        """The table's figures; ``phases``: the trace's change times, for per-phase counts (by the time each
        frame's answer came). Frames: every frame the camera delivered, a DROPPED one (not sent: the one
        before was still out) counted as missing the target."""
        target, floor = objective.target_latency_ms, objective.min_agreement
        ok = [f for f in self.frames if f[2] == "OK" and f[3] is not None]
        within = [f for f in ok if target is None or f[3] <= target]
        meets = [f for f in within if floor is None or agreement[f[1]] >= floor]
        lat = np.array([f[3] for f in ok]) if ok else np.zeros(0)
        n = len(self.frames)
        out: dict[str, Any] = {
            "run": self.name,
            "rounds": self.rounds,
            "frames": n,
            "dropped": sum(f[2] == DROPPED for f in self.frames),
            "answered": len(ok),
            "within_target": len(within),
            "within_share": len(within) / n if n else 0.0,
            "meets_objective": len(meets),
            "meets_share": len(meets) / n if n else 0.0,
            "mean_agreement": float(np.mean([agreement[f[1]] for f in ok])) if ok else None,
            # a late answer is worth nothing to a real-time user: agreement if within the target, else 0
            "timely_agreement": sum(agreement[f[1]] for f in within) / n if n else 0.0,
            "bytes_per_frame": float(np.mean([f[4] for f in ok])) if ok else None,
            "p95_ms": float(np.percentile(lat, 95)) if ok else None,
            "switches": self.switches,
        }
        if phases:
            bounds = [*phases[1:], math.inf]
            per_phase: list[dict[str, Any]] = []
            for start, end in zip(phases, bounds):
                fs = [f for f in self.frames if start <= f[0] < end]
                w = [f for f in within if start <= f[0] < end]
                per_phase.append(
                    {
                        "frames": len(fs),
                        "within_target": len(w),
                        "meets_objective": sum(floor is None or agreement[f[1]] >= floor for f in w),
                        "timely_agreement": sum(agreement[f[1]] for f in w) / len(fs) if fs else 0.0,
                    }
                )
            out["phases"] = per_phase
        return out


class CycledFrames(ArrayFrames):
    """The frames over and over until ``until`` (monotonic seconds).

    ``interval_s``: a camera's pace, one frame every ``interval_s`` from ``start``; the edge gets the latest
    frame when it is ready for one (waiting for the next when it has sent the latest), and the frames it was
    too busy for are dropped (their times in ``dropped``, seconds since ``start``). None: as fast as answers
    come."""

    def __init__(
        self,
        images: list[np.ndarray],
        until: float,
        interval_s: float | None = None,
        start: float | None = None,
        max_frames: int | None = None,
    ) -> None:
        super().__init__(images)
        self.until, self.interval_s, self.max_frames = until, interval_s, max_frames
        self.start = time.monotonic() if start is None else start
        self.dropped: list[float] = []

    def __iter__(self):
        n = 0
        while time.monotonic() < self.until and (self.max_frames is None or n < self.max_frames):
            if self.interval_s:
                latest = int((time.monotonic() - self.start) / self.interval_s)
                if latest < n:  # sent the latest: wait for the camera's next
                    time.sleep(max(self.start + n * self.interval_s - time.monotonic(), 0.0))
                    if time.monotonic() >= self.until:
                        return
                else:
                    self.dropped += [round(k * self.interval_s, 3) for k in range(n, latest)]
                    n = latest
            for frame in ArrayFrames([self.images[n % len(self.images)]], [f"frame{n}"]):
                yield Frame(n, frame.source, frame.image, frame.captured_ns, frame.capture_ms, frame.wall_time)
            n += 1


def run_trace(
    name: str,
    mode_for: Any,
    options: EdgeOptions,
    server_port: int,
    schedule: list[tuple[float, LinkSettings]],
    frames: list[np.ndarray],
    duration_s: float,
    fingerprint: str,
    interval_s: float | None = None,
    records: list[FrameRecord] | None = None,
    max_frames: int | None = None,
) -> RunResult:
    """One run: a fresh proxy following ``schedule``, a client through it, ``mode_for(client)``'s mode;
    ``interval_s``: the camera's pace (CycledFrames); ``records``: where every record goes too."""
    from hnd.edge.api import check_server

    result = RunResult(name, rounds=1)
    with LinkProxy(("127.0.0.1", server_port), schedule=schedule) as proxy:
        start = time.monotonic()
        client = SplitClient(ClientSettings(f"127.0.0.1:{proxy.port}"))
        try:
            mode: EdgeMode = mode_for(client)
            check_server(client, mode, fingerprint)
            runner = EdgeRunner(options, client=client, mode=mode)

            def on_record(record: FrameRecord, frame: Frame) -> None:
                point = record.extra.get("operating_point", name)
                kbps = (record.extra.get("link") or {}).get("kbps")
                t = round(time.monotonic() - start, 3)
                result.frames.append((t, point, record.status, record.ms.total, record.bytes.payload, kbps))
                if records is not None:
                    records.append(record)

            source = CycledFrames(frames, start + duration_s, interval_s, start, max_frames)
            runner.run(source, on_record)
            result.frames += [(t, name, DROPPED, None, 0, None) for t in source.dropped]
            result.frames.sort(key=lambda f: f[0])
            if isinstance(mode, AdaptiveMode):
                result.switches = mode.state.switches
        finally:
            client.close()
    return result


def run_all(
    model: Any,
    profile: Profile,
    objective: Objective,
    schedule: list[tuple[float, LinkSettings]] | Callable[[LinkCosts], list[tuple[float, LinkSettings]]],
    frames: list[np.ndarray],
    duration_s: float,
    progress=None,
    rounds: int = 1,
    interval_s: float | None = None,
) -> tuple[list[RunResult], list[tuple[float, LinkSettings]], LinkCosts]:
    """The adaptive run and one run per runnable operating point fixed, against one in-process server;
    ``rounds`` times, round ``r`` starting with the ``r``-th setting. One merged result per setting,
    adaptive first; the schedule run, and the costs measured first (:func:`measure_costs`, the cheapest
    point on an unshaped link). ``schedule``: the trace, or a function of the costs that gives it (a trace
    with ``fit:`` rates); ``interval_s``: the camera's pace. The adaptive edge gets the profile with its
    compute scaled to what the costs run measured (:func:`scaled_profile`)."""
    from hnd.common.checkpoint import fingerprint as fingerprint_of
    from hnd.common.split import split_model
    from hnd.edge.api import make_mode
    from hnd.server.local import background_server

    fp = fingerprint_of(model)
    head, _ = split_model(model)
    h, w = frames[0].shape[:2]
    native = head_at(head, min(h, w), max(h, w))
    base = EdgeOptions(max_inflight=1)

    def fixed_setting(point: OperatingPoint) -> tuple[str, Any, EdgeOptions]:
        options = point_options(EdgeOptions(max_inflight=1), point)
        options.stream = point.temporal
        point_head = native if point.reproduce.get("resize") == "native" else head

        def fixed(client: SplitClient, o: EdgeOptions = options, p: OperatingPoint = point, hd: Any = point_head):
            return make_mode(o, hd if p.mode == "split" else None, fp)

        return point.id, fixed, options

    with background_server(model) as server:
        # the cheapest point on an unshaped link first: what compute and overheads cost here, now
        records: list[FrameRecord] = []
        delay = LinkSettings(delay_ms=schedule_delay_ms(schedule))
        _, cheap, cheap_options = fixed_setting(cheapest_point(profile))
        run_trace(
            "costs", cheap, cheap_options, server.port, [(0.0, delay)], frames, COSTS_S, fp, None, records, COSTS_FRAMES
        )
        costs = measure_costs(records, cheapest_point(profile))
        if callable(schedule):
            schedule = schedule(costs)
        # the adaptive edge's profile at this machine's compute (the fit: rates use the same figures)
        here = scaled_profile(profile, costs.compute_scale)

        def adaptive(client: SplitClient) -> EdgeMode:
            # the runner's options too: the mode turns streaming on (InferStream) when any point is temporal
            return AdaptiveMode(
                base, here, objective, make_mode, head, fp, end_stream=client.end_stream, probe=client.probe_link
            )

        settings = [(ADAPTIVE, adaptive, base)] + [fixed_setting(p) for p in adaptive_points(profile, base)]
        merged: dict[str, RunResult] = {name: RunResult(name) for name, _, _ in settings}
        for order in round_order(len(settings), rounds):
            for name, mode_for, options in (settings[i] for i in order):
                result = run_trace(name, mode_for, options, server.port, schedule, frames, duration_s, fp, interval_s)
                merged[name].add(result)
                if progress:
                    progress(result)
    return list(merged.values()), schedule, costs


# ---------------------------------------------------------------------------------------------------
# Rates relative to the points: "fit:4b" is the rate at which the 4-bit point just meets the target

# the cheapest point on an unshaped link, to measure compute and overheads: this many frames, at most COSTS_S
COSTS_FRAMES, COSTS_S, COSTS_WARMUP = 16, 15.0, 4


@dataclass(frozen=True)
class LinkCosts:
    """What a frame costs besides its payload, measured on an unshaped link (the trace's delay) with the
    cheapest point, its first COSTS_WARMUP frames left out: rtt_ms (the smallest wire time), compute_scale
    (its edge + server compute, median, over the profile's), extra_bytes (request overhead beyond the
    payload, p90, plus the answer's bytes, p90)."""

    rtt_ms: float
    compute_scale: float
    extra_bytes: float
    frames: int


def cheapest_point(profile: Profile) -> OperatingPoint:
    return min(adaptive_points(profile, EdgeOptions()), key=lambda p: p.bytes_mean)


def scaled_profile(profile: Profile, scale: float) -> Profile:
    """``profile`` with every point's edge and server ms times ``scale``: a sweep's compute (measured in
    process, at its own score threshold, maybe on another machine or hour) brought to this server's."""
    points = [dataclasses.replace(p, edge_ms=p.edge_ms * scale, server_ms=p.server_ms * scale) for p in profile.points]
    return dataclasses.replace(profile, points=points)


def schedule_delay_ms(resolve: Any) -> float:
    """The first row's one-way delay of a trace (rows, or a TraceResolver)."""
    if isinstance(resolve, list):
        return resolve[0][1].delay_ms
    return float(getattr(resolve, "delay_ms", 0.0))


def measure_costs(records: list[FrameRecord], cheapest: OperatingPoint) -> LinkCosts:
    """LinkCosts from the cheapest point's answered records; UsageError with fewer than 3."""
    ok = [r for r in records if r.ok and r.server_ms is not None and r.ms.network_server is not None]
    ok = ok[COSTS_WARMUP:]  # a fresh server's and edge's first frames are slower (allocations, lazy init)
    if len(ok) < 3:
        raise UsageError(f"measuring the link's costs: {len(ok)} frames answered in {COSTS_S:g} s, need 3")
    compute = np.median([r.ms.edge_ms() + r.server_ms.total() for r in ok])
    wire = min(r.ms.network_server - r.server_ms.total() for r in ok)
    overhead = np.quantile([r.bytes.message - r.bytes.payload for r in ok], 0.9)
    answers = np.quantile([r.bytes.response or 0 for r in ok], 0.9)
    profiled = cheapest.edge_ms + cheapest.server_ms
    return LinkCosts(
        round(float(wire), 2), float(compute / profiled) if profiled > 0 else 1.0, float(overhead + answers), len(ok)
    )


def fit_rate_mbit(point: OperatingPoint, costs: LinkCosts, target_ms: float) -> float:
    """The rate at which ``point``'s p95 frame (and the costs beside it) is answered just within the target."""
    room = target_ms - costs.rtt_ms - (point.edge_ms + point.server_ms) * costs.compute_scale
    if room <= 0:
        raise UsageError(f"{point.id} misses the {target_ms:g} ms target on any link (compute and round trip)")
    return 8 * (point.bytes_p95 + costs.extra_bytes) / room / 1e3


def find_point(points: list[OperatingPoint], name: str) -> OperatingPoint:
    """A point by id, or by one of its id's dash-separated parts (``4b``) when that names one point."""
    exact = [p for p in points if p.id == name]
    found = exact or [p for p in points if name in p.id.split("-")]
    if len(found) != 1:
        raise UsageError(f"fit:{name}: {'no' if not found else 'more than one'} operating point named so")
    return found[0]


def fit_rate(expr: str, points: list[OperatingPoint], costs: LinkCosts | None, target_ms: float | None) -> float:
    """Mbit/s of a ``fit:A`` (the rate at which A just fits the target), ``fit:A..B`` (their geometric mean:
    A fits with the margin B misses by) or either ``*F`` (times F). Without costs: checked, 1.0."""
    body, _, factor = expr[len("fit:") :].partition("*")
    try:
        scale = float(factor) if factor else 1.0
    except ValueError:
        raise UsageError(f"{expr}: expected fit:POINT[..POINT][*FACTOR]") from None
    names = body.split("..")
    if not body or len(names) > 2 or not all(names) or not scale > 0:
        raise UsageError(f"{expr}: expected fit:POINT[..POINT][*FACTOR]")
    if target_ms is None:
        raise UsageError(f"{expr}: a fit: rate needs --target-latency-ms")
    chosen = [find_point(points, n) for n in names]
    if costs is None:
        return 1.0
    rates = [fit_rate_mbit(p, costs, target_ms) for p in chosen]
    return float(np.prod(rates) ** (1 / len(rates))) * scale


class TraceResolver:
    """A trace whose ``fit:`` rates become Mbit/s once the costs are measured (``resolver(costs)``)."""

    def __init__(self, path: str, base: LinkSettings, points: list[OperatingPoint], target_ms: float | None):
        self.path, self.base, self.points, self.target_ms = path, base, points, target_ms
        fits: list[str] = []  # the fit: cells, as read_schedule meets them

        def check(expr: str) -> float:
            fits.append(expr)
            return fit_rate(expr, points, None, target_ms)

        rows = read_schedule(path, base, check)  # checked now
        self.relative = bool(fits)
        self.delay_ms = rows[0][1].delay_ms

    def __call__(self, costs: LinkCosts | None) -> list[tuple[float, LinkSettings]]:
        return read_schedule(self.path, self.base, lambda e: fit_rate(e, self.points, costs, self.target_ms))


def round_order(settings: int, rounds: int) -> list[list[int]]:
    """The settings' indices run in each round: round ``r`` starts with setting ``r`` (mod their number)."""
    return [[(r + i) % settings for i in range(settings)] for r in range(rounds)]


def adaptive_points(profile: Profile, options: EdgeOptions) -> list[OperatingPoint]:
    """The points an edge with a head can run (split and offload), fewest bytes first."""
    return sorted((p for p in profile.points if p.mode in ("split", "offload")), key=lambda p: p.bytes_mean)


# ---------------------------------------------------------------------------------------------------
# Outputs


def render_markdown(figures: list[dict[str, Any]], header: dict[str, Any]) -> str:
    m, r = header["machine"], header["run"]
    lines = [
        "# hnd-bench --adapt-trace",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, GPU: {m.get('gpu') or 'none'}; load "
        f"{m.get('loadavg_1_5_15min')}; {m.get('date')}.",
        f"Trace: {r['trace']} ({r['trace_rows']}); {r['duration_s']:g} s per run, {r['rounds']} round(s) "
        f"interleaved; objective: {r['objective']}; "
        f"{r['frames']} frames {r['frame_size'][1]}x{r['frame_size'][0]} cycled; weights {r['weights']}; "
        f"profile {r['profile']}; "
        + (f"a frame every {1 / r['fps']:g} s." if r.get("fps") else "frames as fast as answers come."),
    ]
    c = r.get("costs")
    if c:
        lines.append(
            f"Costs measured first ({c['frames']} frames of the cheapest point, unshaped link): round trip "
            f"{c['rtt_ms']:g} ms, compute x{c['compute_scale']:.3f} the profile's (the adaptive edge's profile and "
            f"the fit: rates use it), {c['extra_bytes']:,.0f} B a frame beside the payload."
        )
    lines += [
        "",
        "| run | frames | dropped | within target | share | meets objective | share | mean agreement "
        "| timely agreement | bytes/frame | p95 ms | switches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        agreement = "—" if f["mean_agreement"] is None else f"{f['mean_agreement']:.3f}"
        nbytes = "—" if f["bytes_per_frame"] is None else f"{f['bytes_per_frame']:,.0f}"
        p95 = "—" if f["p95_ms"] is None else f"{f['p95_ms']:,.0f}"
        lines.append(
            f"| {f['run']} | {f['frames']} | {f['dropped']} | {f['within_target']} | {100 * f['within_share']:.0f} % | "
            f"{f['meets_objective']} | {100 * f['meets_share']:.0f} % | {agreement} | {f['timely_agreement']:.3f} | "
            f"{nbytes} | {p95} | {f['switches'] if f['run'] == ADAPTIVE else '—'} |"
        )
    phases = figures[0].get("phases") if figures else None
    if phases and len(phases) > 1:
        rates = r["trace_rows"].split(", ")
        lines += [
            "",
            "Per phase (by the time each frame's answer came): frames within target / frames, timely agreement.",
            "",
            "| run | " + " | ".join(rates) + " |",
            "|---|" + "---|" * len(rates),
        ]
        for f in figures:
            cells = [f"{ph['within_target']}/{ph['frames']}, {ph['timely_agreement']:.2f}" for ph in f["phases"]]
            lines.append(f"| {f['run']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(
    results: list[RunResult],
    schedule: list[tuple[float, LinkSettings]],
    points: list[OperatingPoint],
    duration_s: float,
    target_ms: float | None,
    path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_point, ax_lat) = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    times = [t for t, _ in schedule] + [duration_s]
    rates = [s.rate_mbit or float("nan") for _, s in schedule]
    ax_rate.step(times, rates + rates[-1:], where="post", color="k", label="the proxy's rate")
    adaptive = results[0]
    est = [(f[0], f[5] / 1e3) for f in adaptive.frames if f[5]]
    ax_rate.plot([t for t, _ in est], [v for _, v in est], ".", color="C0", label="adaptive edge's estimate")
    ax_rate.legend(fontsize=7)
    ax_rate.set_yscale("log")
    ax_rate.set_ylabel("link rate (Mbit/s)")
    order = {p.id: i for i, p in enumerate(points)}
    # rounds overlap on one time axis (each follows the trace from its start): markers, no lines
    ax_point.plot([f[0] for f in adaptive.frames], [order.get(f[1], -1) for f in adaptive.frames], "o", ms=3)
    ax_point.set_yticks(range(len(points)), [p.id for p in points], fontsize=7)
    ax_point.set_ylabel("adaptive: point")
    for r in results:
        ok = [f for f in r.frames if f[3] is not None]
        bold = r.name == ADAPTIVE
        ax_lat.plot([f[0] for f in ok], [f[3] for f in ok], "o" if bold else ".", ms=4 if bold else 3, label=r.name)
    if target_ms is not None:
        ax_lat.axhline(target_ms, color="red", ls="--", lw=1, label="target")
    ax_lat.set_yscale("log")
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_xlabel("time (s)")
    ax_lat.legend(fontsize=7)
    for ax in (ax_rate, ax_point, ax_lat):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from hnd.edge.adapt_mode import add_adapt_arguments

    p = argparse.ArgumentParser(
        prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=HelpFormatter
    )
    p.add_argument("--adapt-trace", required=True, metavar="CSV", help="the link trace: rows time_s,rate[,delay]")
    p.add_argument("--profile", metavar="JSON", help="operating points (default: measured here on the frames)")
    add_config_argument(p, default="test/faster_rcnn-b3ch")
    add_weights_arguments(p, "student checkpoint", "seeded random weights")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--video", metavar="FILE", help="video file (its first --frames frames, cycled)")
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="image files (the first --frames, cycled)")
    p.add_argument("--frames", type=int, default=8, help="distinct frames, cycled (default 8)")
    p.add_argument("--clip-size", default="160x120", help="WxH of the synthetic clip (default 160x120)")
    p.add_argument("--bits", default="8,4,2", help="split bits of a profile measured here (default 8,4,2)")
    p.add_argument("--key-interval", type=int, default=10, help="key interval of a profile measured here")
    p.add_argument("--delay", default="40ms", help="one-way delay where the trace gives none (default 40ms)")
    p.add_argument("--duration", type=float, help="seconds per run (default: last trace change + 20)")
    p.add_argument(
        "--fps",
        type=float,
        help="the camera's pace: a frame every 1/FPS s, the frames the edge is too busy for dropped (counted as "
        "missing the target); default one frame per --target-latency-ms; 0: as fast as answers come",
    )
    p.add_argument(
        "--rounds", type=int, default=1, help="runs of every setting, interleaved (each round starts one later)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--out", default="adapt-out", help="output folder (default adapt-out)")
    add_adapt_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except USER_ERRORS as exc:
        return report(PROG, exc)


def _frames(args: argparse.Namespace) -> tuple[list[np.ndarray], str]:
    from hnd.bench.frames import load_frames

    if args.video or args.images:
        frames, _ = load_frames(args.images, args.video, args.frames)
        return frames, str(args.video or args.images)
    from PIL import Image

    from hnd.train.synthetic_video import make_synthetic_video

    try:
        w, h = (int(v) for v in args.clip_size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--clip-size {args.clip_size!r}: expected WxH, e.g. 160x120") from None
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_synthetic_video(tmp, frames=args.frames, size=(w, h), video=False, seed=0)
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(Path(clip["images"]).iterdir())]
    return frames, f"synthetic clip {w}x{h} (hnd.train.synthetic_video, seed 0)"


def _measure_profile(model: Any, frames: list[np.ndarray], args: argparse.Namespace, path: Path, header: dict) -> Path:
    from hnd.common.checkpoint import fingerprint

    from hnd.bench.plan import parse_numbers
    from hnd.bench.rate import rate_settings, run_sweep, write_profile

    settings = rate_settings(parse_numbers(args.bits, "--bits"), ["tensor"], ["temporal"], ["native"], [], [], [], [])
    rows = run_sweep(model, frames, settings, key_interval=args.key_interval, max_clamped=0.001, score=0.0)
    run = {"config": args.config, "weights": header["weights"], "key_interval": args.key_interval}
    run |= {"max_clamped": 0.001, "preset": "medium", "source": header["source"], "frames": len(frames), "score": 0.0}
    write_profile(path, rows, {"machine": header["machine"], "run": run}, fingerprint(model))
    return path


def _main(args: argparse.Namespace) -> int:
    import torch

    from hnd.common.build import build_model_from_config
    from hnd.common.checkpoint import fingerprint
    from hnd.common.config import load_config, with_weights
    from hnd.edge.adapt_mode import objective_from_args

    from hnd.bench.linkmodel import parse_time_ms
    from hnd.bench.report import machine_info

    objective = objective_from_args(
        argparse.Namespace(
            adapt=args.profile or "(measured here)",
            mode="split",
            target_latency_ms=args.target_latency_ms,
            max_kbps=args.max_kbps,
            min_agreement=args.min_agreement,
        )
    )
    assert objective is not None
    base_link = LinkSettings(delay_ms=parse_time_ms(args.delay, "--delay"))
    schedule = read_schedule(args.adapt_trace, base_link, lambda expr: 1.0)  # fit: rates: checked below
    duration = args.duration or schedule[-1][0] + 20.0
    if args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
    fps = (
        args.fps if args.fps is not None else (1e3 / objective.target_latency_ms if objective.target_latency_ms else 0)
    )
    if fps < 0:
        raise UsageError(f"--fps must be >= 0, got {args.fps:g}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    model = build_model_from_config(with_weights(cfg.model, args.checkpoint, args.random_weights), cfg.path).eval()
    frames, source = _frames(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = args.checkpoint or f"random (seed {args.random_weights if args.random_weights is not None else 'config'})"
    header = {"machine": machine_info(), "weights": weights, "source": source}
    profile_path = (
        Path(args.profile) if args.profile else _measure_profile(model, frames, args, out / "points.json", header)
    )
    profile = load_profile(profile_path)
    profile.check_weights(fingerprint(model))
    say = lambda line: print(f"{PROG}: {line}", file=sys.stderr, flush=True)  # noqa: E731
    trace = TraceResolver(
        args.adapt_trace, base_link, adaptive_points(profile, EdgeOptions()), objective.target_latency_ms
    )
    say(
        f"{len(profile.points)} operating points; {duration:g} s per run"
        + (f", a frame every {1 / fps:g} s" if fps else "")
    )
    results, schedule, costs = run_all(
        model,
        profile,
        objective,
        trace if trace.relative else trace(None),
        frames,
        duration,
        progress=lambda r: say(f"{r.name}: {len(r.frames)} frames"),
        rounds=args.rounds,
        interval_s=1 / fps if fps else None,
    )
    agreement = {p.id: p.agreement for p in profile.points}
    figures = [r.figures(objective, agreement, [t for t, _ in schedule]) for r in results]
    trace_rows = ", ".join(f"{t:g} s: {s.rate_mbit:.4g} Mbit/s {s.delay_ms:g} ms" for t, s in schedule)
    header["run"] = {
        "trace": args.adapt_trace,
        "trace_rows": trace_rows,
        "duration_s": duration,
        "rounds": args.rounds,
        "objective": objective.describe(),
        "frames": len(frames),
        "frame_size": list(frames[0].shape[:2]),
        "weights": weights,
        "source": source,
        "profile": str(profile_path),
        "fps": fps or None,
        "costs": asdict(costs),
    }
    text = render_markdown(figures, header)
    atomic_write_text(out / "adaptive.md", text)
    atomic_write_json(
        out / "adaptive.json",
        {
            **header,
            "points": [asdict(p) for p in profile.points],
            "figures": figures,
            "runs": [asdict(r) for r in results],
        },
        indent=1,
    )
    plot(
        results,
        schedule,
        adaptive_points(profile, EdgeOptions()),
        duration,
        objective.target_latency_ms,
        out / "adaptive.png",
    )
    print(text)
    say(f"wrote adaptive.md, adaptive.json, adaptive.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
