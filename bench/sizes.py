"""Bottleneck size per channel count for a 640x480 frame, measured by running the head.

    python -m hnd.bench.sizes [--height 480 --width 640]

Prints a Markdown table: the resized and padded model input, the bottleneck shape and its size in
bytes at 32, 16, 8, 4 and 2 bits before entropy coding (zstd shrinks these further, by how much
depends on the weights: see ``python -m hnd.bench.codec``).
"""

from __future__ import annotations

import argparse

import torch

from hnd.common import codec
from hnd.common.models import build_model
from hnd.common.split import split_model

CHANNELS = (3, 6, 9, 12, 15)


def size_rows(height: int = 480, width: int = 640, channels: tuple[int, ...] = CHANNELS) -> list[dict]:
    """One dict per channel count: padded input, bottleneck shape and bytes per bit width."""
    rows = []
    for c in channels:
        head, _ = split_model(build_model("faster_rcnn", c))
        with torch.inference_mode():
            z, meta = head([torch.zeros(3, height, width)])
        n = z.numel()
        rows.append(
            {
                "channels": c,
                "resized": meta.image_sizes[0],
                "padded": meta.padded_size,
                "shape": tuple(z.shape[1:]),
                **{f"bytes_{b}": codec.packed_size(n, b) for b in (32, 16, 8, 4, 2)},
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| C | resized → padded input | z (C×h×w) | float32 B | float16 B | 8-bit B | 4-bit B | 2-bit B |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['channels']} | {r['resized'][0]}×{r['resized'][1]} → {r['padded'][0]}×{r['padded'][1]} | "
            f"{'×'.join(map(str, r['shape']))} | "
            + " | ".join(f"{r[f'bytes_{b}']:,}" for b in (32, 16, 8, 4, 2))
            + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.sizes", description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    args = p.parse_args(argv)
    print(markdown(size_rows(args.height, args.width)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
