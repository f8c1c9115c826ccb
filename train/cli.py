"""hnd-train: train as the config's ``train.method`` says, picking the recipe.

``hnd-train --config C [--resume] [--device cpu|cuda] [--workers N] [--epochs N] [--output-dir D]``

* ``hnd`` / ``ghnd`` / ``supervised``: :func:`hnd.train.train.train_detector` (distillation of the bottleneck,
  or supervised training of a teacher);
* ``filter``: :func:`hnd.train.filter.train_filter` (the neural filter);
* ``entropic``: :func:`hnd.train.entropic.train_entropic` (the Entropic Student's two stages, built on the
  distillation pieces of :mod:`hnd.train.train`).

The picking lives here, beside the recipes, so that no recipe imports another that imports it back.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from hnd.common.build import pick_device
from hnd.common.config import Config, load_config
from hnd.common.errors import USER_ERRORS, HndError, report
from hnd.common.flags import HelpFormatter, add_config_argument, add_device_argument
from hnd.train.engine import TrainOptions, check_sections
from hnd.train.entropic import train_entropic
from hnd.train.filter import train_filter
from hnd.train.train import train_detector


def train(config: str | os.PathLike | Config, options: TrainOptions | None = None) -> dict[str, Any]:
    """Run training as configured; return a summary (best value, epoch, paths, history)."""
    options = options or TrainOptions()
    cfg = config if isinstance(config, Config) else load_config(config)
    method = check_sections(cfg).method
    if method == "filter":  # the neural filter's recipe
        return train_filter(cfg, options)
    if method == "entropic":  # the Entropic Student's two stages
        return train_entropic(cfg, options)
    return train_detector(cfg, options)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hnd-train", description="HND / GHND distillation or supervised training.", formatter_class=HelpFormatter
    )
    add_config_argument(p, required=True)
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/last.pt")
    add_device_argument(p, "cpu")
    p.add_argument("--workers", type=int, help="data loader workers (default: dataset.num_workers)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--output-dir", help="checkpoints and log.jsonl (default resource/train/<config name>)")
    p.add_argument(
        "--select-by",
        choices=["bbox", "loss", "last"],
        default="bbox",
        help="model selection on the held-out split: bbox AP (default), distillation loss, or last epoch",
    )
    p.add_argument(
        "--train-bn",
        action="store_true",
        help="supervised from scratch: train the backbone's (otherwise frozen) batch norms; "
        "best.pt folds them back into FrozenBatchNorm2d",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.device = str(pick_device(args.device))
        if args.epochs is not None and args.epochs < 1:
            raise HndError("--epochs", "must be >= 1")
        summary = train(
            args.config,
            TrainOptions(
                output_dir=args.output_dir,
                device=args.device,
                workers=args.workers,
                epochs=args.epochs,
                resume=args.resume,
                select_by=args.select_by,
                progress=not args.no_progress,
                train_bn=args.train_bn,
            ),
        )
    except USER_ERRORS as exc:
        return report("hnd-train", exc)
    except KeyboardInterrupt:
        print("hnd-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(
        f"best {summary['select_by']} {summary['best_value']:.4f} at epoch {summary['best_epoch']}: {summary['best']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
