"""hnd-make-synthetic-coco: a small COCO-format dataset of drawn shapes or stick figures
(:mod:`hnd.train.synthetic`), or annotated synthetic camera video (``--video``: :mod:`hnd.train.synthetic_video`).

    hnd-make-synthetic-coco data/synthetic --images 32 --kind keypoints
    hnd-make-synthetic-coco data/video --video --frames 40 --sequences 2

The CLI picks between the two generators, so it lives beside them rather than in either (the video
generator builds on the still one's shapes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hnd.common.flags import HelpFormatter
from hnd.train import synthetic
from hnd.train.synthetic_video import BACKGROUNDS, make_synthetic_video


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 128x96, not {text!r}") from None
    if w < 32 or h < 32:
        raise argparse.ArgumentTypeError("size must be at least 32x32")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hnd-make-synthetic-coco",
        description=(synthetic.__doc__ or "").split("\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument("out", help="output folder (COCO 2017 layout)")
    p.add_argument("--images", type=int, default=16, help="train images (default 16)")
    p.add_argument("--val-images", type=int, default=None, help="val images (default max(2, images/4))")
    p.add_argument("--size", type=_size, default=None, help="WxH (default 128x128; 320x240 with --video)")
    p.add_argument(
        "--kind",
        choices=["detection", "keypoints"],
        default="detection",
        help="boxes and masks, or person-like figures with keypoints",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of everything drawn")
    p.add_argument("--empty-fraction", type=float, default=0.0, help="share of images with no objects")
    p.add_argument("--max-objects", type=int, default=3, help="objects per image at most")
    p.add_argument("--format", choices=["jpg", "png"], default="jpg", help="image file format")
    v = p.add_argument_group("video (--video: annotated sequences instead of still images; hnd.train.synthetic_video)")
    v.add_argument(
        "--video",
        action="store_true",
        help="write moving-object sequences (PNG frames, COCO annotations, an .mp4) into the val split",
    )
    v.add_argument("--frames", type=int, default=40, help="frames per sequence (default 40)")
    v.add_argument("--sequences", type=int, default=1, help="sequences (default 1)")
    v.add_argument("--fps", type=float, default=10.0, help="frame rate (default 10)")
    v.add_argument(
        "--background",
        default="photo",
        help="photo (a scikit-image photo per sequence), texture, "
        "or a photo name: rocket, coffee, chelsea, astronaut (default photo)",
    )
    v.add_argument("--noise", type=float, default=3.0, help="sensor noise sigma in 8-bit levels (default 3)")
    v.add_argument(
        "--object-size",
        default="0.12,0.3",
        metavar="MIN,MAX",
        help="object height range as a fraction of the frame height (default 0.12,0.3)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.video:
        return _video_main(p, args)
    if not 0.0 <= args.empty_fraction <= 1.0:
        p.error("--empty-fraction must be in [0, 1]")
    if args.images < 0 or (args.val_images is not None and args.val_images < 0) or args.max_objects < 1:
        p.error("--images/--val-images must be >= 0 and --max-objects >= 1")
    written = synthetic.make_synthetic_coco(
        args.out,
        images=args.images,
        size=args.size or (128, 128),
        kind=args.kind,
        seed=args.seed,
        empty_fraction=args.empty_fraction,
        val_images=args.val_images,
        max_objects=args.max_objects,
        image_format=args.format,
    )
    for split, paths in written.items():
        print(f"{split}: {paths['images']} {paths['annotations']}")
    return 0


def _video_main(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.background not in BACKGROUNDS:
        p.error(f"--background must be one of {', '.join(BACKGROUNDS)}")
    if args.frames < 1 or args.sequences < 1 or args.noise < 0 or args.fps <= 0:
        p.error("--frames and --sequences must be >= 1, --noise >= 0, --fps > 0")
    w, h = args.size or (320, 240)  # video default: a small camera frame
    try:
        lo, hi = (float(v) for v in args.object_size.split(","))
    except ValueError:
        p.error(f"--object-size must look like 0.1,0.2, not {args.object_size!r}")
    if not 0 < lo <= hi < 0.9:
        p.error("--object-size: need 0 < MIN <= MAX < 0.9")
    if w % 2 or h % 2:
        p.error("--size must be even for H.264 (e.g. 320x240)")
    written = make_synthetic_video(
        args.out,
        frames=args.frames,
        size=(w, h),
        fps=args.fps,
        sequences=args.sequences,
        objects=args.max_objects,
        background=args.background,
        noise=args.noise,
        seed=args.seed,
        object_size=(lo, hi),
    )
    print(f"val: {written['images']} {written['annotations']} {written['video']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
