"""hnd-bench: what the split buys -- bytes on the wire and end-to-end latency against full offload and
local inference, per network link.

    hnd-bench --samples --out bench-out                      # seeded random weights, 3 photos (says so)
    hnd-bench --config hnd/faster_rcnn-b3ch --checkpoint student.pt --images frames/ --frames 20 \\
              --links "wifi=50mbit/5ms,lte=10mbit/40ms,3g=1mbit/100ms" --bits 2,4,8 --granularity tensor,channel
    hnd-bench --quick --out /tmp/bench                        # tiny model, 2 frames: a smoke test (< 1 min)
    hnd-bench --quick --config test/keypoint_rcnn-b3ch-filter --mixed 4 --filter-threshold 0.5 --out /tmp/bf
                                                              # the same with the neural filter, mixed frames

The same frames go through every mode, interleaved frame by frame in one process lifetime, so the
ratios between modes hold on a noisy machine:

* ``split``: the edge runs the head, quantizes + zstd-codes the bottleneck (``hnd.common.codec``) and sends
  it through the real ``EdgeRunner`` / ``SplitClient`` to a real ``hnd-server`` on loopback (a separate
  process started like a deployment; ``--in-process`` or ``--quick`` use ``BackgroundServer`` instead).
  One setting per bits x granularity.
* ``offload``: the frame itself as JPEG q75, JPEG q95 and PNG, both at its original size and resized as the
  model's transform would resize it (``min_size`` / ``max_size``) before encoding ("resized"): same server,
  whole model there. Results of "resized" requests refer to the resized frame; boxes are scaled back to the
  original frame before they are compared.
* ``local``: the whole model on the edge (this process). Its detections are the reference for agreement.
* ``split ..., with filter``: when the model carries a neural filter (config ``model.filter``), each split
  setting once more with ``EdgeOptions.filter_threshold`` (the config's threshold or ``--filter-threshold``;
  ``--no-filter`` leaves these rows out). A frame whose filter probability is below the threshold is not
  encoded nor sent: 0 bytes on the wire, no server time, and its latency is its edge time (preprocess +
  stem + filter), with no link cost. Per setting the summary counts frames sent / filtered, and gives bytes
  per frame and latency over all frames (what the link carries on average) and over the sent frames only.
  Each setting's request count as the server's ``hnd_requests_total`` saw it is in ``server_requests``.

Frames: scikit-image's photos (default), ``--images``, ``--video``, or ``--mixed N``: N synthetic frames
(``hnd.train.synthetic``, the generator the filter is trained on) of which ``--empty-fraction`` (default
0.5) are empty scenes, the textured background without objects; the rest hold shapes (stick figures for
keypoint models). Each frame's label (objects or empty, by the filter's training rule) goes into the
results, so the filtered rows say how many frames with objects and how many empty ones were dropped.

Each side gets half the cores (``--threads``), as two machines would. Requests go one at a time
(``max_inflight=1``) and the server does not wait to fill batches (``--max-delay-ms 0``): this measures
per-frame latency, not pipelined throughput.

Link model
----------
Deterministic, applied per frame to the sizes of that frame's actual messages::

    latency_ms = edge_ms + 8 * (request_bytes + response_bytes) / bandwidth_bits_per_ms
                 + rtt_ms + loopback_ms + server_ms

* ``edge_ms``: what the edge computes before sending: preprocess + head + codec encode (split); image
  encode, plus the resize for "resized" variants (offload); preprocess + whole model (local).
* ``request_bytes`` / ``response_bytes``: the serialized ``hnd.v1.InferRequest`` / ``InferResponse``.
* ``bandwidth``: the link's rate, the same in both directions; ``rtt_ms``: one round trip.
* ``server_ms``: the server's own stages as it reports them: decode + queue + compute + encode.
* ``loopback_ms``: ``network_server - server_ms``, what gRPC and the loopback cost in the measured run.
* ``local`` has no link: ``latency_ms = edge_ms``; nor has a frame the neural filter dropped (its edge_ms is
  preprocess + stem + filter).

Compute noise: whatever the codec setting, a mode runs the same network on the same frame, so between
its settings that time differs only by machine noise (+-40 % on a shared 2-core machine). The model
therefore uses, per frame, the median of that network time over all runs of the mode (the head and tail
for split, the whole model for offload and local); codec / image encode and decode stay per setting.
``results.json`` keeps the raw per-run times (``*_raw``, ``latency_raw_ms``) next to the pooled ones, and
"measured e2e" in ``results.md`` is the raw end-to-end time of the loopback run.

Not modeled: gRPC / HTTP/2 / TCP / IP framing (a few percent: 5 B per message, 9 B per 16 KiB HTTP/2
frame, ~40 B per ~1.4 kB TCP segment, plus headers), TCP slow start, loss and jitter. No real traffic
shaping is done: a ``tc tbf`` link inside an ``unshare -n`` namespace would need the server and the edge
both re-executed inside it and still could not add delay (no netem on this kernel), while compute
dominates every figure here; the model is exact for what it states and cheap to sweep.

Outputs in ``--out``: ``results.md``, ``results.json`` (with a machine header), ``bytes_per_frame.png`` and
``latency_vs_bandwidth.png`` (bandwidth sweep at a fixed RTT, crossover points marked; the per-mode "best"
curves leave the filter settings out), and the ``--mixed`` frames in ``mixed-frames/``.
"""

from __future__ import annotations

import argparse
import sys

from hnd.common import codec
from hnd.common.errors import USER_ERRORS, UsageError, report
from hnd.common.flags import HelpFormatter, add_config_argument, add_filter_arguments, add_weights_arguments

from hnd.bench.frames import MIXED_SIZE
from hnd.bench.linkmodel import FORMULA, parse_links
from hnd.bench.measure import parse_server_profile
from hnd.bench.plan import (
    DEFAULT_BITS,
    DEFAULT_CONFIG,
    DEFAULT_FRAMES,
    DEFAULT_LINKS,
    PROG,
    QUICK_CONFIG,
    QUICK_FRAMES,
    BenchOptions,
    add_agreement_score_argument,
    parse_numbers,
)
from hnd.bench.report import render_markdown
from hnd.bench.run import run_bench


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description=" ".join(__doc__.split("\n\n")[0].split()),
        epilog=f"Link model: {FORMULA}. What it covers and leaves out: hnd.bench.linkmodel.",
        formatter_class=HelpFormatter,
    )
    add_config_argument(p, default=None, note=f"default {DEFAULT_CONFIG} with --random-weights 0")
    add_weights_arguments(
        p, "student checkpoint both sides load (agreement is then meaningful)", "seeded random weights"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="image folder or glob")
    src.add_argument("--video", metavar="FILE", help="video file (its first --frames frames)")
    src.add_argument("--samples", action="store_true", help="scikit-image's natural photos (the default)")
    src.add_argument(
        "--mixed",
        type=int,
        metavar="N",
        help=f"N synthetic {MIXED_SIZE[0]}x{MIXED_SIZE[1]} frames, --empty-fraction of them empty "
        "scenes (written to OUT/mixed-frames): shows what the neural filter drops",
    )
    p.add_argument("--empty-fraction", type=float, default=0.5, help="share of empty --mixed frames (default 0.5)")
    add_filter_arguments(
        p,
        "neural filter threshold of the 'with filter' rows",
        "no 'with filter' rows even when the model has a filter",
    )
    p.add_argument("--links", default=DEFAULT_LINKS, help=f"NAME=RATE/RTT,... (default {DEFAULT_LINKS!r})")
    p.add_argument("--bits", default=DEFAULT_BITS, help=f"split bits settings (default {DEFAULT_BITS})")
    p.add_argument(
        "--granularity",
        default=None,
        help="tensor,channel: every bits x each (default: tensor at every bits, plus channel at 8)",
    )
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: {QUICK_CONFIG}, {QUICK_FRAMES} frames, bits 8 and 4, the first link, in-process server",
    )
    p.add_argument("--frames", type=int, default=None, help=f"frames to use (default {DEFAULT_FRAMES})")
    p.add_argument("--sweep-rtt-ms", type=float, default=20.0, help="RTT of the bandwidth sweep plot (default 20)")
    add_agreement_score_argument(p)
    p.add_argument("--in-process", action="store_true", help="BackgroundServer in this process, not a subprocess")
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: half the cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument(
        "--server-profile",
        metavar="MODE=MS,...",
        help="link model with another server: server compute per frame for split (tail) and / or "
        "offload (whole model) in ms, e.g. split=23.3,offload=21.2 (the H100 figures of docs/benchmarks/runtime.md)",
    )
    p.add_argument(
        "--rate-accuracy",
        action="store_true",
        help="bytes/frame vs accuracy sweep instead (split intra/temporal, JPEG, WebP, H.264, HEVC); "
        "its options: hnd-bench --rate-accuracy --help",
    )
    p.add_argument(
        "--adapt-trace",
        metavar="CSV",
        help="hnd-edge --adapt against each fixed operating point over a link trace through the shaping proxy "
        "instead; its options: hnd-bench --adapt-trace x --help",
    )
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    bits = parse_numbers(args.bits, "--bits")
    bad = [b for b in bits if b not in codec.BITS]
    if not bits or bad:
        raise UsageError(f"--bits: {bad or args.bits!r} not in {codec.BITS}")
    grans = [g.strip() for g in args.granularity.split(",")] if args.granularity else None
    if grans is not None and not set(grans) <= {"tensor", "channel"}:
        raise UsageError(f"--granularity: expected tensor and/or channel, got {args.granularity!r}")
    if args.frames is not None and args.frames < 1:
        raise UsageError("--frames must be >= 1")
    if args.mixed is not None and (args.mixed < 1 or args.frames is not None):
        raise UsageError("--mixed N: N >= 1 frames, and no --frames (N is the frame count)")
    if not 0.0 <= args.empty_fraction <= 1.0:
        raise UsageError(f"--empty-fraction must be in [0, 1], got {args.empty_fraction}")
    parse_links(args.links)  # fail before any model is built
    return BenchOptions(
        config=args.config,
        checkpoint=args.checkpoint,
        random_weights=args.random_weights,
        images=args.images,
        video=args.video,
        links=args.links,
        bits=bits,
        granularities=grans,
        out=args.out,
        quick=args.quick,
        frames=args.frames,
        sweep_rtt_ms=args.sweep_rtt_ms,
        agreement_score=args.agreement_score,
        in_process=args.in_process,
        threads=args.threads,
        progress=not args.no_progress,
        mixed=args.mixed,
        empty_fraction=args.empty_fraction,
        filter_threshold=args.filter_threshold,
        no_filter=args.no_filter,
        server_profile=parse_server_profile(args.server_profile) if args.server_profile else None,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--rate-accuracy" in argv:  # bytes vs accuracy sweep: its own options (hnd.bench.rate)
        from hnd.bench.rate import main as rate_main

        return rate_main(argv)
    if "--adapt-trace" in argv:  # adaptive vs fixed operating points over a link trace (hnd.bench.adapt_trace)
        from hnd.bench.adapt_trace import main as trace_main

        return trace_main(argv)
    args = build_parser().parse_args(argv)
    try:
        result = run_bench(options_from_args(args))
    except USER_ERRORS as exc:
        return report(PROG, exc)
    except KeyboardInterrupt:
        return 130
    print(render_markdown(result))
    print(
        f"{PROG}: wrote results.md, results.json, bytes_per_frame.png, latency_vs_bandwidth.png to {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
