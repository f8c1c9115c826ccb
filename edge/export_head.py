"""hnd-export-head: write the head of a student checkpoint for edge devices, as torch weights or ONNX.

    hnd-export-head student.pt head.pt                      # head weights (torch), for --head on a torch edge
    hnd-export-head student.pt head.onnx                    # ONNX graph + metadata, for a torch-free edge
    hnd-export-head student.pt head-int8.onnx --int8 --calibration frames/ --calibration-frames 64
    hnd-export-head student.pt head.onnx --min-size 480 --max-size 640   # a 640x480 camera at its own size
    hnd-export-head entropic.pt entropic_head.onnx                # Entropic Student: encoder -> int32 symbols

The format follows the output's suffix (``.onnx``: ONNX) unless ``--format`` says. Both carry the full
model's weights fingerprint, so the server still recognises the edge. ``--config`` names the
architecture the same way for both formats: the model is built from the config and the checkpoint
loaded into it (its transform sizes and neural filter threshold go into the ONNX metadata); without it
the architecture is read off the checkpoint, and the transform off what hnd-train recorded in it
(``model_info``), so an export resizes as the server's model does without extra flags. int8 calibration must use real frames from the
camera the edge will run on (a few dozen covering its scenes and lighting), never random data.

An Entropic Student's ONNX head outputs the latent already rounded against the prior's medians (int32
symbols); its integer coding tables travel in the file's metadata, so the torch-free edge range-codes
exactly what the server decodes (docs/ENTROPIC.md). ``--int8`` works for it too (measured, not exact).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hnd.common.checkpoint import checkpoint_transform, export_head, save_head, transform_info
from hnd.common.errors import USER_ERRORS, UsageError, report
from hnd.common.flags import HelpFormatter, add_config_argument

PROG = "hnd-export-head"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="full student checkpoint (ours or the original's)")
    p.add_argument("output", help="file to write (atomically): .onnx for ONNX, anything else for torch")
    p.add_argument("--format", choices=("onnx", "torch"), default=None, help="default: from the output's suffix")
    add_config_argument(
        p,
        default=None,
        note="the model is built from it and the checkpoint checked against it, for either format "
        "(default: the architecture and transform the checkpoint records)",
    )
    p.add_argument("--random-weights", type=int, metavar="SEED", help="with --config: seeded random weights (tests)")
    p.add_argument("--min-size", type=int, help="ONNX: resize short side to this (default: the model's)")
    p.add_argument("--max-size", type=int, help="ONNX: cap on the long side (default: the model's)")
    p.add_argument("--int8", action="store_true", help="ONNX: static int8 quantization (needs --calibration)")
    p.add_argument(
        "--pixels",
        choices=("float32", "uint8"),
        help="ONNX: the graph's input: the normalized float32 batch (exact against the torch head) or uint8 "
        "pixels with the normalization folded into the first convolution (less edge preprocessing; the "
        "border's mean pixel rounded to uint8). Default: uint8 for --int8, float32 otherwise",
    )
    p.add_argument("--calibration", metavar="DIR_OR_GLOB", help="real frames for int8 calibration")
    p.add_argument("--calibration-frames", type=int, default=32, metavar="N", help="frames to calibrate on")
    p.add_argument(
        "--calibration-method",
        default="minmax",
        choices=("minmax", "entropy", "percentile"),
        help="ONNX Runtime's calibration of the int8 activation ranges",
    )
    return p


class ExportError(UsageError):
    """A bad combination of options or inputs (one line for the user)."""


def export(args: argparse.Namespace) -> str:
    """Everything main() does; returns the line to print. Raises ExportError / CheckpointError / OSError."""
    fmt = args.format or ("onnx" if Path(args.output).suffix.lower() == ".onnx" else "torch")
    onnx_only = [
        f"--{n.replace('_', '-')}"
        for n in ("min_size", "max_size", "calibration", "pixels")
        if getattr(args, n) is not None
    ] + (["--int8"] if args.int8 else [])
    if args.random_weights is not None and args.config is None:
        raise ExportError("--random-weights needs --config (the architecture to build)")
    if args.checkpoint is None and args.random_weights is None:
        raise ExportError("give the checkpoint to export (or --config with --random-weights)")
    if fmt == "torch":
        if onnx_only:
            raise ExportError(f"{', '.join(onnx_only)}: only for an ONNX export (give a .onnx output)")
        if args.config is None:
            fp = export_head(args.checkpoint, args.output)
        else:  # the same architecture naming as an ONNX export: the config's model, checked against the file
            from hnd.edge.onnx_export import student_model

            model = student_model(args.checkpoint, args.config, args.random_weights)
            fp = save_head(args.output, model.state_dict(), transform_info(model))
        return f"{args.output}: head of model {fp} (torch weights)"
    if args.int8 and not args.calibration:
        raise ExportError("--int8 needs --calibration DIR_OR_GLOB: real frames like the camera's (not random data)")
    if args.calibration and not args.int8:
        raise ExportError("--calibration is for --int8")
    if args.calibration_frames < 1:
        raise ExportError("--calibration-frames must be >= 1")
    for name in ("min_size", "max_size"):
        if getattr(args, name) is not None and getattr(args, name) < 32:
            raise ExportError(f"--{name.replace('_', '-')} must be at least 32")
    frames = _calibration_frames(args.calibration, args.calibration_frames) if args.int8 else []

    from hnd.edge.onnx_export import export_onnx, head_metadata, quantize_int8, student_head

    head, fp = student_head(args.checkpoint, args.config, args.random_weights)
    meta = head_metadata(head, fp, min_size=args.min_size, max_size=args.max_size)
    if meta.min_size > meta.max_size:
        raise ExportError(f"min size {meta.min_size} exceeds max size {meta.max_size}")
    resize = f"resize {meta.min_size}/{meta.max_size}"
    sized = args.config is not None or args.min_size is not None or args.max_size is not None
    if not sized and checkpoint_transform(args.checkpoint) is None:  # the file is silent: say where sizes came from
        resize += " (torchvision's default: the checkpoint names no transform; --config or --min-size/--max-size)"
    # uint8 pixels pay for int8 (the input is then exact, and preprocessing ~3x cheaper); the fp32 file stays
    # exact against the torch head unless asked (hnd.bench.head's levers measure both).
    pixels = args.pixels or ("uint8" if args.int8 and meta.bottleneck_type == "hnd" else "float32")
    if pixels == "uint8" and meta.bottleneck_type != "hnd":
        raise ExportError("--pixels uint8 is for HND / GHND heads (an Entropic Student's head takes float32)")
    if not args.int8:
        export_onnx(head, meta, args.output, pixels=pixels)
        return f"{args.output}: head of model {fp} (ONNX fp32, {pixels} input, {resize})"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        export_onnx(head, meta, fp32, stem="s2d", pixels=pixels)  # the stem int8 runs fastest (hnd.bench.head)
        what = f"{len(frames)} frames of {args.calibration} ({args.calibration_method})"
        quantize_int8(fp32, args.output, frames, meta, what, args.calibration_method)
    return f"{args.output}: head of model {fp} (ONNX int8, calibrated on {what}, {pixels} input, {resize})"


def _calibration_frames(pattern: str, count: int) -> list:
    from hnd.edge.capture import ImageFiles, SourceError

    try:
        source = ImageFiles(pattern)
    except SourceError as exc:
        raise ExportError(f"--calibration: {exc}") from None
    paths = source.paths
    if len(paths) > count:  # spread the picks over the whole (sorted) set, not just its start
        paths = [paths[round(i * (len(paths) - 1) / (count - 1))] for i in range(count)] if count > 1 else paths[:1]
    source.paths = paths
    frames = []
    for frame in source:
        if frame.error is not None:
            raise ExportError(f"--calibration: {frame.error}")
        frames.append(frame.image)
    return frames


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(export(args))
    except (*USER_ERRORS, ValueError) as exc:  # ValueError: onnxruntime's quantizer on unusable frames
        return report(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
