"""python -m hnd.bench.tail: the tail alone, per execution option x batch size: ms, images/s, agreement with fp32.

    python -m hnd.bench.tail --device cuda                     # fp32, bf16, fp16, bf16+channels_last; batch 1..8
    python -m hnd.bench.tail --device cuda --options fp32,bf16+channels_last+compile=max-autotune
    python -m hnd.bench.tail --device cpu --config test/faster_rcnn-b3ch --options fp32,bf16 --batches 1,2

The bottlenecks are the config's head on the scikit-image photos resized to ``--frame`` (one padded size, so
batches of any size share a shape). Per option: each batch size timed ``--repeats`` times after a warm-up
(CUDA synchronised), and the detections of every photo compared with fp32's (IoU-matched F1 at IoU 0.5 and
``--score``, largest matched box / score difference). Option strings: ``PRECISION[+channels_last][+compile=MODE]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from hnd.common.files import atomic_write_json

DEFAULT_OPTIONS = "fp32,bf16,fp16,bf16+channels_last"


def parse_option(text: str):
    """``bf16+channels_last+compile=default`` -> TailOptions."""
    from hnd.server.accel import TailOptions

    parts = text.split("+")
    kw: dict[str, Any] = {"precision": parts[0]}
    for p in parts[1:]:
        if p == "channels_last":
            kw["channels_last"] = True
        elif p.startswith("compile="):
            kw["compile"] = p.split("=", 1)[1]
        else:
            raise ValueError(f"unknown option part {p!r} in {text!r}")
    return TailOptions(**kw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def run(
    config: str = "hnd/faster_rcnn-b3ch",
    device: str = "cuda",
    options: list[str] | None = None,
    batches: list[int] | None = None,
    repeats: int = 10,
    frame: tuple[int, int] = (480, 640),
    seed: int = 0,
    score: float = 0.5,
) -> dict[str, Any]:
    """Every option of ``options`` x batch size of ``batches`` (defaults: ``DEFAULT_OPTIONS``, 1, 2, 4, 8) on the
    config's seeded model; returns {config, device, torch, frame, padded_size, photos, score, rows}, a row per
    option: its agreement with the first option's detections and ms / images/s per batch size, or "refused"."""
    import copy

    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config, with_weights
    from hnd.common.split import split_model
    from hnd.server.accel import build_tail, check_options

    dev = torch.device(device)
    options = options or DEFAULT_OPTIONS.split(",")
    batches = batches or [1, 2, 4, 8]
    cfg = load_config(config)
    model = build_model_from_config(with_weights(cfg.model, None, seed), cfg.path).to(dev).eval()
    pairs = photo_bottlenecks(model, frame, dev)
    reference = None
    rows = []
    for text in options:
        opts = parse_option(text)
        try:
            check_options(opts, dev)
        except ValueError as exc:
            rows.append({"option": text, "refused": str(exc)})
            print(f"{text}: refused: {exc}", flush=True)
            continue
        tail = build_tail(split_model(copy.deepcopy(model))[1], opts, dev)
        dets = [tail(z, m)[0] for z, m in pairs]
        _sync(dev)
        if reference is None:
            reference = dets
        row = {"option": opts.summary(), **agreement(reference, dets, score), "batches": {}}
        for b in batches:
            row["batches"][b] = time_batch(tail, batch_of(pairs, b), repeats, dev)
        rows.append(row)
        print(format_row(row), flush=True)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "config": config,
        "device": name,
        "torch": torch.__version__,
        "frame": list(frame),
        "padded_size": list(pairs[0][1].padded_size),
        "photos": len(pairs),
        "score": score,
        "rows": rows,
    }


def photo_bottlenecks(model: torch.nn.Module, frame: tuple[int, int], dev: torch.device) -> list[tuple[Any, Any]]:
    """(z [1, C, h, w], SplitMeta) of the model's head on each scikit-image photo resized to ``frame`` (H, W)."""
    import cv2

    from hnd.common.split import split_model
    from hnd.edge.capture import sample_images
    from hnd.edge.torch_modes import to_tensor

    head, _ = split_model(model)
    photos = [to_tensor(cv2.resize(img, (frame[1], frame[0]))).to(dev) for img in sample_images()[0]]
    return [head([p]) for p in photos]


def batch_of(pairs: list[tuple[Any, Any]], b: int) -> tuple[torch.Tensor, Any]:
    """A batch of ``b`` bottlenecks ([b, C, h, w] and its SplitMeta), the photos' taken in turn."""
    from hnd.common.split import SplitMeta

    idx = [i % len(pairs) for i in range(b)]
    metas = [pairs[i][1] for i in idx]
    meta = SplitMeta(
        tuple(m.original_sizes[0] for m in metas),
        tuple(m.image_sizes[0] for m in metas),
        pairs[0][1].padded_size,
    )
    return torch.cat([pairs[i][0] for i in idx]), meta


def agreement(reference: list[dict], dets: list[dict], score: float) -> dict[str, Any]:
    """Per-photo detections vs the reference's (IoU 0.5, cut at ``score``): F1 min / mean, largest box and
    score differences, the reference's detection count."""
    from hnd.bench.agreement import detection_agreement

    agree = [detection_agreement(r, d, 0.5, score) for r, d in zip(reference, dets)]
    return {
        "f1_min": min(a["f1"] for a in agree),
        "f1_mean": float(np.mean([a["f1"] for a in agree])),
        "max_box_diff": max(a["max_box_diff"] for a in agree),
        "max_score_diff": max(a["max_score_diff"] for a in agree),
        "reference_detections": sum(a["reference"] for a in agree),
    }


def time_batch(tail, batch: tuple[torch.Tensor, Any], repeats: int, dev: torch.device) -> dict[str, float]:
    """Median ms of ``tail`` on ``batch`` over ``repeats`` synchronised calls after a warm-up, and images/s."""
    z, meta = batch
    tail(z, meta)  # warm-up (and compilation)
    _sync(dev)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        tail(z, meta)
        _sync(dev)
        times.append((time.perf_counter() - t) * 1e3)
    ms = float(np.median(times))
    return {"ms": ms, "images_per_s": 1e3 * z.shape[0] / ms}


def format_row(r: dict[str, Any]) -> str:
    if "refused" in r:
        return f"{r['option']:<34} refused: {r['refused']}"
    cells = "  ".join(f"b{b} {v['ms']:.1f} ms {v['images_per_s']:.0f}/s" for b, v in r["batches"].items())
    return (
        f"{r['option']:<34} F1 min {r['f1_min']:.3f} mean {r['f1_mean']:.3f}  max box {r['max_box_diff']:.3g} "
        f"score {r['max_score_diff']:.3g}  {cells}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.tail", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="hnd/faster_rcnn-b3ch")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--options", default=DEFAULT_OPTIONS, help="comma-separated option strings (default %(default)s)")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--frame", default="480x640", help="HxW the photos are resized to")
    p.add_argument("--score", type=float, default=0.5, help="score cut for the agreement F1")
    p.add_argument("--json", help="write the result as JSON")
    args = p.parse_args(argv)
    try:
        h, w = (int(v) for v in args.frame.lower().split("x"))
        options = args.options.split(",")
        for o in options:
            parse_option(o)
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError as exc:
        print(f"hnd.bench.tail: error: {exc}", file=sys.stderr)
        return 2
    result = run(args.config, args.device, options, batches, args.repeats, (h, w), score=args.score)
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
