"""hnd-bench --adapt-trace: the adaptive edge against each fixed operating point, over the same link trace.

    hnd-bench --adapt-trace trace.csv --target-latency-ms 1000 --out adapt-out
    hnd-bench --adapt-trace trace.csv --profile points.json --config C --checkpoint student.pt --video clip.mp4 \\
              --target-latency-ms 250 --min-agreement 0.8

A real ``hnd-server`` (in this process, on loopback) behind the shaping proxy (``hnd.bench.linkproxy``)
whose rate and delay follow ``trace.csv`` (rows ``time_s,rate[,delay]``, from the start of each run). For
``--duration`` seconds (default: the trace's last change + 20 s) the same frames, cycled, go through the
real edge pipeline (``EdgeRunner``, one request in flight): once with ``--adapt`` (``AdaptiveMode``), then
once per operating point fixed. Runs follow one another, each with the trace from its start; ``--rounds N``
repeats the set N times, each round starting one setting later (adaptive first, then second, ...), so a
load that drifts over the benchmark falls on every setting alike.

Per setting (its rounds together): frames answered, frames within the latency target, frames **meeting the
objective** (answered within the target by a point whose profiled agreement is at least
``--min-agreement``: a fixed point below it meets it with no frame), mean agreement (each answered frame
counts its point's agreement from the profile), payload bytes per frame, p95 latency, and the adaptive
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
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
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

    def figures(self, objective: Objective, agreement: dict[str, float]) -> dict[str, Any]:
        target, floor = objective.target_latency_ms, objective.min_agreement
        ok = [f for f in self.frames if f[2] == "OK" and f[3] is not None]
        within = [f for f in ok if target is None or f[3] <= target]
        meets = [f for f in within if floor is None or agreement[f[1]] >= floor]
        lat = np.array([f[3] for f in ok]) if ok else np.zeros(0)
        n = len(self.frames)
        return {
            "run": self.name,
            "rounds": self.rounds,
            "frames": n,
            "answered": len(ok),
            "within_target": len(within),
            "within_share": len(within) / n if n else 0.0,
            "meets_objective": len(meets),
            "meets_share": len(meets) / n if n else 0.0,
            "mean_agreement": float(np.mean([agreement[f[1]] for f in ok])) if ok else None,
            "bytes_per_frame": float(np.mean([f[4] for f in ok])) if ok else None,
            "p95_ms": float(np.percentile(lat, 95)) if ok else None,
            "switches": self.switches,
        }


class CycledFrames(ArrayFrames):
    """The frames over and over until ``until`` (monotonic seconds)."""

    def __init__(self, images: list[np.ndarray], until: float) -> None:
        super().__init__(images)
        self.until = until

    def __iter__(self):
        n = 0
        while time.monotonic() < self.until:
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
) -> RunResult:
    """One run: a fresh proxy following ``schedule``, a client through it, ``mode_for(client)``'s mode."""
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

            runner.run(CycledFrames(frames, start + duration_s), on_record)
            if isinstance(mode, AdaptiveMode):
                result.switches = mode.state.switches
        finally:
            client.close()
    return result


def run_all(
    model: Any,
    profile: Profile,
    objective: Objective,
    schedule: list[tuple[float, LinkSettings]],
    frames: list[np.ndarray],
    duration_s: float,
    progress=None,
    rounds: int = 1,
) -> list[RunResult]:
    """The adaptive run and one run per runnable operating point fixed, against one in-process server;
    ``rounds`` times, round ``r`` starting with the ``r``-th setting. One merged result per setting,
    adaptive first."""
    from hnd.common.checkpoint import fingerprint as fingerprint_of
    from hnd.common.split import split_model
    from hnd.edge.api import make_mode
    from hnd.server.local import background_server

    fp = fingerprint_of(model)
    head, _ = split_model(model)
    h, w = frames[0].shape[:2]
    native = head_at(head, min(h, w), max(h, w))
    base = EdgeOptions(max_inflight=1)

    def adaptive(client: SplitClient) -> EdgeMode:
        # the runner's options too: the mode turns streaming on (InferStream) when any point is temporal
        return AdaptiveMode(base, profile, objective, make_mode, head, fp, end_stream=client.end_stream)

    settings: list[tuple[str, Any, EdgeOptions]] = [(ADAPTIVE, adaptive, base)]
    for point in adaptive_points(profile, base):
        options = point_options(EdgeOptions(max_inflight=1), point)
        options.stream = point.temporal
        point_head = native if point.reproduce.get("resize") == "native" else head

        def fixed(client: SplitClient, o: EdgeOptions = options, p: OperatingPoint = point, hd: Any = point_head):
            return make_mode(o, hd if p.mode == "split" else None, fp)

        settings.append((point.id, fixed, options))
    merged: dict[str, RunResult] = {name: RunResult(name) for name, _, _ in settings}
    with background_server(model) as server:
        for order in round_order(len(settings), rounds):
            for name, mode_for, options in (settings[i] for i in order):
                result = run_trace(name, mode_for, options, server.port, schedule, frames, duration_s, fp)
                merged[name].add(result)
                if progress:
                    progress(result)
    return list(merged.values())


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
        f"profile {r['profile']}.",
        "",
        "| run | frames | within target | share | meets objective | share | mean agreement | bytes/frame | p95 ms "
        "| switches |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for f in figures:
        agreement = "—" if f["mean_agreement"] is None else f"{f['mean_agreement']:.3f}"
        nbytes = "—" if f["bytes_per_frame"] is None else f"{f['bytes_per_frame']:,.0f}"
        p95 = "—" if f["p95_ms"] is None else f"{f['p95_ms']:,.0f}"
        lines.append(
            f"| {f['run']} | {f['frames']} | {f['within_target']} | {100 * f['within_share']:.0f} % | "
            f"{f['meets_objective']} | {100 * f['meets_share']:.0f} % | {agreement} | "
            f"{nbytes} | {p95} | {f['switches'] if f['run'] == ADAPTIVE else '—'} |"
        )
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
    schedule = read_schedule(args.adapt_trace, LinkSettings(delay_ms=parse_time_ms(args.delay, "--delay")))
    duration = args.duration or schedule[-1][0] + 20.0
    if args.rounds < 1:
        raise UsageError(f"--rounds must be >= 1, got {args.rounds}")
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
    say(f"{len(profile.points)} operating points; {duration:g} s per run")
    results = run_all(
        model,
        profile,
        objective,
        schedule,
        frames,
        duration,
        progress=lambda r: say(f"{r.name}: {len(r.frames)} frames"),
        rounds=args.rounds,
    )
    agreement = {p.id: p.agreement for p in profile.points}
    figures = [r.figures(objective, agreement) for r in results]
    trace_rows = ", ".join(f"{t:g} s: {s.rate_mbit:g} Mbit/s {s.delay_ms:g} ms" for t, s in schedule)
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
