"""Codec figures on real bottlenecks: bytes per frame, compression, speed, and zstd against entropy.

    python -m hnd.bench.codec [--repeats 30] [--level 3] [--json out.json]

The bottlenecks come from a seeded random-weight Faster R-CNN student head (3 channels, torchvision's
default resize to 800 px) on scikit-image's photos astronaut, coffee and chelsea; no weights, no
downloads. Trained bottlenecks have different statistics, so treat the byte counts as an example,
and the timings as the codec's own cost.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hnd.common.files import atomic_write_json
from hnd.common import codec

PHOTOS = ("astronaut", "coffee", "chelsea")
# (bits, granularity, compression); float32 without compression is the reference size.
SETTINGS = [
    (32, "tensor", "none"),
    (32, "tensor", "zstd"),
    (16, "tensor", "zstd"),
    (8, "original", "zstd"),
    (8, "tensor", "none"),
    (8, "tensor", "zstd"),
    (8, "channel", "zstd"),
    (6, "tensor", "zstd"),
    (6, "channel", "zstd"),
    (4, "tensor", "zstd"),
    (4, "channel", "zstd"),
    (2, "tensor", "zstd"),
    (2, "channel", "zstd"),
]


@dataclass
class Row:
    photo: str
    shape: tuple[int, ...]
    bits: int
    granularity: str
    compression: str
    level: int
    payload_bytes: int
    wire_bytes: int  # the hnd.v1.Tensor message, serialized
    ratio_vs_float32: float
    entropy_bytes: float  # order-0 entropy of the symbols, pooled over the tensor
    payload_vs_entropy: float
    encode_ms: float
    decode_ms: float
    max_abs_error: float


def bottlenecks(seed: int = 0) -> dict[str, torch.Tensor]:
    """photo name -> bottleneck [1, 3, h, w] of the seeded student head."""
    from skimage import data

    from hnd.common.models import build_model
    from hnd.common.split import split_model

    torch.manual_seed(seed)
    head, _ = split_model(build_model("faster_rcnn", bottleneck_channels=3))
    out = {}
    with torch.inference_mode():
        for name in PHOTOS:
            image = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
            z, _ = head([image])
            out[name] = z.clone()
    return out


def entropy_bytes(symbols: np.ndarray) -> float:
    """Order-0 (memoryless) entropy of the symbols, in bytes: the bound a symbol-by-symbol coder meets."""
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(p * np.log2(p)).sum() * symbols.size / 8)


def median_ms(fn, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``fn``, in ms."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name: str, z: torch.Tensor, bits: int, granularity: str, compression: str, level: int, repeats: int) -> Row:
    from hnd.common.wire import tensor_to_proto

    e = codec.encode(z, bits, granularity, compression, level)
    y = torch.from_numpy(codec.decode(e))
    entropy = entropy_bytes(codec.quantize(z, bits, granularity).symbols)
    return Row(
        photo=name,
        shape=tuple(z.shape),
        bits=bits,
        granularity=e.granularity,
        compression=compression,
        level=level,
        payload_bytes=len(e.payload),
        wire_bytes=tensor_to_proto(e).ByteSize(),
        ratio_vs_float32=4 * z.numel() / len(e.payload),
        entropy_bytes=entropy,
        payload_vs_entropy=len(e.payload) / entropy if entropy else float("inf"),
        encode_ms=median_ms(lambda: codec.encode(z, bits, granularity, compression, level), repeats),
        decode_ms=median_ms(lambda: codec.decode(e), repeats),
        max_abs_error=float((y - z).abs().max()),
    )


def run(repeats: int = 30, level: int = 3) -> tuple[dict[str, torch.Tensor], list[Row]]:
    zs = bottlenecks()
    return zs, [measure(n, z, *s, level, repeats) for s in SETTINGS for n, z in zs.items()]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def table(rows: list[Row]) -> str:
    """Markdown: one line per setting; bytes per photo, means of the rest over photos."""
    shapes = {r.photo: "x".join(map(str, r.shape[1:])) for r in rows}
    head = "| bits | granularity | compression | " + " | ".join(f"{p} {shapes[p]} B" for p in PHOTOS)
    head += " | x smaller than float32 | payload / entropy | encode ms | decode ms | max abs error |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for bits, granularity, compression in SETTINGS:
        group = [r for r in rows if (r.bits, r.granularity, r.compression) == (bits, granularity, compression)]
        by_photo = {r.photo: r for r in group}
        mean = lambda key, group=group: statistics.fmean(getattr(r, key) for r in group)
        lines.append(
            f"| {bits} | {granularity if bits <= 8 else '-'} | {compression} | "
            + " | ".join(f"{by_photo[p].payload_bytes:,}" for p in PHOTOS)
            + f" | {mean('ratio_vs_float32'):.1f} | {mean('payload_vs_entropy'):.2f} | {mean('encode_ms'):.2f}"
            f" | {mean('decode_ms'):.2f} | {max(r.max_abs_error for r in group):.3g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per setting (median reported)")
    parser.add_argument("--level", type=int, default=3, help="zstd level")
    parser.add_argument("--json", metavar="PATH", help="also write every measurement as JSON")
    args = parser.parse_args(argv)
    zs, rows = run(args.repeats, args.level)
    print(f"CPU: {cpu_name()}; zstd level {args.level}; times are medians of {args.repeats} runs")
    print("bottleneck values: " + ", ".join(f"{n} [{float(z.min()):.3g}, {float(z.max()):.3g}]" for n, z in zs.items()))
    print(table(rows))
    if args.json:
        atomic_write_json(args.json, {"cpu": cpu_name(), "rows": [asdict(r) for r in rows]}, indent=1)


if __name__ == "__main__":
    main()
