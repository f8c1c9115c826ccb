"""Split detection from a Python application: hnd.connect, then detect / detect_many on numpy frames.

    python examples/python_client.py --server 127.0.0.1:50051 --config test/faster_rcnn-b3ch \
        --random-weights 0 photo1.jpg photo2.jpg

The five lines an application needs are in ``detect_files``; everything else is argument parsing. Prints one
JSON line per image: its detections above ``--min-score`` and the frame's record (bytes on the wire, stage
times in ms, the replica that answered). Options are hnd-edge's, as keywords of hnd.connect.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator

import cv2
import numpy as np

import hnd


def read_rgb(path: str) -> np.ndarray:
    """[H, W, 3] uint8 RGB (OpenCV reads BGR)."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise hnd.HndError(path, "cannot read this image")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def detect_files(server: str, paths: list[str], min_score: float, **options) -> Iterator[dict]:
    """One dict per image, in order: the frames go out pipelined (``max_inflight`` at a time)."""
    with hnd.connect(server, **options) as detector:
        for path, det in zip(paths, detector.detect_many(read_rgb(p) for p in paths)):
            keep = det.scores >= min_score
            yield {
                "image": path,
                "boxes": det.boxes[keep].round(1).tolist(),  # float32 [N, 4] xyxy, the image's pixels
                "labels": det.labels[keep].tolist(),  # int64 [N], COCO category ids
                "scores": det.scores[keep].round(3).tolist(),  # float32 [N]
                "bytes": det.record.bytes.message,
                "total_ms": det.record.ms.total,
                "replica": det.record.replica,
            }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="127.0.0.1:50051")
    p.add_argument("--config", default="hnd/faster_rcnn-b3ch")
    p.add_argument("--head", help="head.onnx (ONNX Runtime, no torch) or a torch head export")
    p.add_argument("--checkpoint")
    p.add_argument("--random-weights", type=int)
    p.add_argument("--min-score", type=float, default=0.5)
    p.add_argument("images", nargs="+")
    args = p.parse_args(argv)
    weights = {
        k: v for k, v in (("checkpoint", args.checkpoint), ("random_weights", args.random_weights)) if v is not None
    }
    try:
        for line in detect_files(
            args.server, args.images, args.min_score, config=args.config, head=args.head, **weights
        ):
            print(json.dumps(line))
    except hnd.HndError as exc:  # every error the API raises: one line, no traceback
        print(f"python_client: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
