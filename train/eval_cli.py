"""hnd-eval: COCO bbox / segm / keypoints mAP of a configured model (:mod:`hnd.train.evaluate`), or, for a
config with a neural filter, the filter's ROC (:mod:`hnd.train.filter`).

``hnd-eval --config C [--checkpoint P] [--bits N --granularity G] [--split-mode] [--split val]``

The CLI picks between the two evaluations, so it lives beside them (the filter's evaluation builds on the
COCO evaluation; the COCO evaluation does not know the filter).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from hnd.common import codec
from hnd.common.build import pick_device
from hnd.common.config import load_config
from hnd.common.errors import USER_ERRORS, HndError, report
from hnd.common.files import atomic_write_json
from hnd.common.flags import HelpFormatter, add_bits_argument, add_config_argument, add_device_argument
from hnd.train.evaluate import evaluate_config
from hnd.train.filter import eval_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hnd-eval",
        description="COCO bbox / segm / keypoints mAP of a configured model.",
        formatter_class=HelpFormatter,
    )
    add_config_argument(p, required=True)
    p.add_argument("--checkpoint", help="weights to evaluate (default: the config's model weights)")
    p.add_argument("--random-weights", type=int, metavar="SEED", help="evaluate seeded random weights")
    add_bits_argument(
        p,
        None,
        "at the split (students only; default: no quantization, the float bottleneck; 0 = --compression learned)",
    )
    p.add_argument(
        "--granularity",
        choices=codec.GRANULARITIES,
        default="tensor",
        help="with --bits: one range per tensor, one per channel, or the original HND 8-bit scheme",
    )
    p.add_argument(
        "--compression",
        choices=codec.ALL_COMPRESSIONS,
        help="payload coding at the split: zstd (default with --bits) or none; learned = the Entropic "
        "Student's entropy coding (no --bits). Reports the mean coded bytes per image",
    )
    p.add_argument("--split-mode", action="store_true", help="run head -> tail (lossless without --bits)")
    p.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        default="fp32",
        help="run the tail's dense part as hnd-server --precision does (fp16 needs CUDA; implies --split-mode)",
    )
    p.add_argument(
        "--key-interval",
        type=int,
        default=1,
        metavar="N",
        help="with --bits: code the split's images as one temporal stream in dataset order, a key "
        "frame every N (as hnd-edge --key-interval; default 1: every image intra)",
    )
    p.add_argument("--split", default="val", help="dataset split of the config (default val)")
    add_device_argument(p, "cpu")
    p.add_argument("--workers", type=int, help="data loader workers (default: the config's)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument("--max-images", type=int, help="evaluate only the first N images")
    p.add_argument(
        "--head",
        metavar="HEAD.onnx",
        help="run this ONNX head (hnd-export-head) as the edge does, then the codec (--bits, default 8) "
        "and the model's tail",
    )
    p.add_argument("--ort-provider", action="append", metavar="NAME", help="ONNX Runtime provider for --head")
    p.add_argument("--min-size", type=int, help="the split's resize: short side (default: the model's / head's)")
    p.add_argument("--max-size", type=int, help="the split's resize: cap on the long side")
    p.add_argument("--output", help="write metrics JSON here (atomically)")
    f = p.add_argument_group("neural filter (configs with model.filter; see hnd.train.filter)")
    f.add_argument(
        "--min-recall",
        type=float,
        default=0.9,
        help="operating threshold: the highest one whose TPR >= this (default 0.9)",
    )
    f.add_argument("--coco", action="store_true", help="also COCO metrics with and without the filter")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_codec_args(args)
        args.device = str(pick_device(args.device))
        if load_config(args.config).model.filter is not None:  # ROC of the neural filter (hnd.train.filter)
            return eval_main(args)
        metrics = evaluate_config(
            args.config,
            checkpoint=args.checkpoint,
            split=args.split,
            bits=args.bits,
            granularity=args.granularity,
            split_mode=args.split_mode,
            device=args.device,
            workers=args.workers,
            batch_size=args.batch_size,
            max_images=args.max_images,
            random_weights=args.random_weights,
            progress=True,
            key_interval=args.key_interval,
            compression=args.compression,
            precision=args.precision,
            head=args.head,
            ort_providers=args.ort_provider,
            min_size=args.min_size,
            max_size=args.max_size,
        )
    except USER_ERRORS as exc:
        return report("hnd-eval", exc)
    _print_metrics(metrics, _describe_setting(args, metrics))
    if args.output:
        atomic_write_json(args.output, metrics, sort_keys=True)
        print(f"metrics written to {args.output}")
    return 0


def _check_codec_args(args: argparse.Namespace) -> None:
    """HndError for --granularity original at other than 8 bits, or a --key-interval the codec cannot take.
    ``--bits 0`` is the learned coding, as for hnd-edge: it becomes ``--compression learned``."""
    if args.bits == codec.LEARNED_BITS:
        if args.compression not in (None, codec.LEARNED):
            raise HndError("--bits", f"0 is the learned coding; --compression {args.compression} needs 2-32 bits")
        args.bits, args.compression = None, codec.LEARNED
    if args.granularity == "original" and args.bits is not None:
        try:
            codec.CodecSettings(args.bits, args.granularity)
        except codec.CodecError as exc:
            raise HndError("--granularity", f"{exc}; use --bits 8") from None
    if args.key_interval < 1 or (args.key_interval > 1 and args.bits not in (2, 4, 6, 8)):
        raise HndError("--key-interval", "must be >= 1, and > 1 only with --bits 2, 4, 6 or 8")


def _describe_setting(args: argparse.Namespace, metrics: dict[str, Any]) -> str:
    """What ran, for the summary line: "full model", "head -> 4-bit channel codec -> tail", an ONNX head,
    the tail's precision, and the resize."""
    how = (
        "full model"
        if not metrics["split_mode"]
        else (
            "head -> learned entropy coding -> tail"
            if args.compression == "learned"
            else f"head -> {args.bits}-bit {args.granularity} codec"
            f"{f' (temporal, key every {args.key_interval})' if args.key_interval > 1 else ''} -> tail"
            if args.bits
            else "head -> tail"
        )
    )
    if metrics.get("head"):
        coding = (
            "learned entropy coding"
            if metrics["compression"] == "learned"
            else f"{metrics['bits']}-bit {args.granularity} codec"
        )
        how = f"ONNX {metrics['head_precision']} head {metrics['head']} -> {coding} -> tail"
    if args.precision != "fp32":
        how += f" ({args.precision} dense part)"
    return how + f", resize {metrics['min_size']}/{metrics['max_size']}"


def _print_metrics(metrics: dict[str, Any], how: str) -> None:
    """The summary line (model kind, setting, split, images, time, coded bytes) and pycocotools' tables."""
    coded = (
        f", {metrics['coded_bytes_per_image']:.1f} coded bytes per image" if "coded_bytes_per_image" in metrics else ""
    )
    print(
        f"{metrics['kind']} ({how}) on {metrics['split']}: {metrics['images']} images "
        f"in {metrics['seconds']:.1f} s{coded}"
    )
    for iou_type, text in metrics["summary"].items():
        print(f"IoU metric: {iou_type}")
        print(text)


if __name__ == "__main__":
    sys.exit(main())
