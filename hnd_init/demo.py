"""hnd-demo: a local hnd-server and hnd-edge on sample photos; prints bytes per frame and latency.

    hnd-demo                                  # HND Faster R-CNN, 3-channel bottleneck, seeded weights
    hnd-demo --checkpoint student.pt --config hnd/faster_rcnn-b3ch

The server runs as its own process (``hnd-server``), as it would on a GPU host; the edge
runs here on the natural photos that ship with scikit-image (no download).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import cv2

from hnd.edge import cli as edge_cli
from hnd.edge.capture import sample_images
from hnd.common.errors import USER_ERRORS, report
from hnd.common.flags import HelpFormatter, add_bits_argument, add_config_argument, add_weights_arguments
from hnd.server.local import server_process


def write_samples(folder: Path, count: int) -> None:
    images, names = sample_images()
    for img, name in list(zip(images, names))[:count]:
        cv2.imwrite(str(folder / f"{name}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hnd-demo", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    add_config_argument(p)
    add_weights_arguments(
        p,
        "student checkpoint both sides load (default: seeded random weights)",
        "seed of the random weights both sides build when there is no --checkpoint",
        seed_default=0,
    )
    p.add_argument("--frames", type=int, default=4, help="sample photos to send (up to 6)")
    add_bits_argument(p, default=8)
    p.add_argument("--stream", action="store_true", help="send the frames on one InferStream instead of unary calls")
    p.add_argument(
        "--max-inflight",
        type=int,
        help="pipelining window K (default: hnd-edge's, sized from the server's answers: a CPU server on a busy "
        "machine gets one frame at a time instead of frames that queue past their deadline)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEMO_DEADLINE_S,
        metavar="S",
        help="per-photo deadline: the tail runs on this machine, where one call takes from seconds on an idle CPU "
        "to tens of seconds on a busy one (the config's deadline is sized for a GPU host)",
    )
    p.add_argument("--summary-json", help="write the summary as JSON")
    p.add_argument("--output", help="per-frame JSONL records")
    return p


DEMO_DEADLINE_S = 300.0


def _weights(args: argparse.Namespace) -> list[str]:
    """The weights flags both sides get: the checkpoint, or the seed of the random weights."""
    return ["--checkpoint", args.checkpoint] if args.checkpoint else ["--random-weights", str(args.random_weights)]


def edge_arguments(args: argparse.Namespace, target: str, folder: str, threads: str) -> list[str]:
    """hnd-edge's command line for the demo's flags: the window stays hnd-edge's own (sized from the
    server's answers) unless ``--max-inflight`` is given; the deadline is the demo's ``--timeout``."""
    edge_args = ["--server", target, "--images", folder, "--config", args.config, *_weights(args)]
    edge_args += ["--bits", str(args.bits), "--timeout", f"{args.timeout:g}", "--no-progress", "--threads", threads]
    if args.stream:
        edge_args.append("--stream")
    if args.max_inflight is not None:
        edge_args += ["--max-inflight", str(args.max_inflight)]
    if args.output:
        edge_args += ["--output", args.output]
    if args.summary_json:
        edge_args += ["--summary-json", args.summary_json]
    return edge_args


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)

    if not args.checkpoint:
        print(
            f"hnd-demo: {args.config} with seeded random weights (seed {args.random_weights}): "
            "bytes and latency are real, detections are not",
            file=sys.stderr,
        )
    # Server and edge share this machine's cores: give each half of them, as two machines would have.
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(
                server_process(args.config, _weights(args), ["--log-level", "WARNING", "--threads", threads])
            )
        except USER_ERRORS as exc:
            return report("hnd-demo", exc)
        tmp = stack.enter_context(tempfile.TemporaryDirectory())
        write_samples(Path(tmp), args.frames)
        return edge_cli.main(edge_arguments(args, server.target, tmp, threads))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
