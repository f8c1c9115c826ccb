"""Temporal coding against a noisy head, side by side: bytes per frame and agreement, fp32 vs int8 heads.

    python -m hnd.bench.speed_temporal [--config hnd/faster_rcnn-b3ch] [--checkpoint P | --random-weights 0]
        [--frames 12] [--size 640x480] [--bits 4] [--hysteresis 0 0.25 0.5] [--json F] [--markdown F]

The frames are a synthetic camera video (``hnd.train.synthetic_video``: a photo background, moving shapes,
Gaussian sensor noise), split at their own size. Heads: the ONNX fp32 file (equal to torch within its
bound), the int8 file as ``hnd-export-head --int8`` writes it (space-to-depth stem, the bottleneck's
convolution in float32) and the same with that convolution int8 too; int8 calibrated on scikit-image
photos, not on the video. Codings: intra (each frame on its own, ``hnd.common.codec``) and the temporal
stream (``hnd.common.stream_codec``) at each hysteresis, with one key frame (the first). Per row: bytes of
the later frames (mean) and the first; agreement, the IoU-matched F1 against the unsplit model at the same
size (``hnd.bench.agreement.match_f1``, score >= 0); the RMS error of the server's bottleneck against the
fp32 head's unquantized one, in quantization steps. Ratios: each int8 row's later-frame bytes over the fp32
head's with the same coding, and each row's F1 minus its head's intra F1.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hnd.bench.agreement import match_f1
from hnd.bench.codec import cpu_name
from hnd.bench.rate import model_at
from hnd.common import codec
from hnd.common.build import build_model_from_config
from hnd.common.checkpoint import fingerprint
from hnd.common.config import load_config, with_weights
from hnd.common.files import atomic_write_json, atomic_write_text
from hnd.common.flags import add_weights_arguments
from hnd.common.split import split_model
from hnd.common.stream_codec import HYSTERESIS, StreamEncoder
from hnd.edge.capture import read_image, sample_images
from hnd.edge.onnx_export import export_onnx, head_metadata, quantize_int8
from hnd.edge.onnx_head import OnnxHead
from hnd.edge.pipeline import to_tensor

HEADS = ("fp32", "int8", "int8, bottleneck conv int8")
CALIBRATION = ("rocket", "immunohistochemistry", "hubble_deep_field")


@dataclass
class Row:
    head: str
    coding: str  # "intra" or "temporal h=<hysteresis>"
    later_bytes: float  # mean payload bytes of frames 2..N
    first_bytes: int
    f1: float  # mean over frames, against the unsplit model
    rms_steps: float  # RMS error of the server's bottleneck vs the fp32 head's float one, in steps
    vs_fp32_bytes: float = 0.0  # later_bytes / the fp32 head's with the same coding
    f1_vs_intra: float = 0.0  # f1 - this head's intra f1


@dataclass
class Results:
    machine: str
    config: str
    frames: int
    size: tuple[int, int]  # width, height
    bits: int
    rows: list[Row] = field(default_factory=list)
    load_average: list[float] = field(default_factory=list)


def video_frames(folder: Path, frames: int, size: tuple[int, int]) -> list[np.ndarray]:
    """RGB uint8 frames of a synthetic camera video (seed 0, one sequence, sensor noise 3 levels)."""
    from hnd.train.synthetic_video import make_synthetic_video

    written = make_synthetic_video(folder, frames=frames, size=size, video=False)
    out = []
    for path in sorted(glob.glob(str(written["images"] / "*.png"))):
        img, _, why = read_image(path)
        if img is None:
            raise RuntimeError(why)
        out.append(img)
    return out


def export_heads(model: torch.nn.Module, hw: tuple[int, int], folder: Path) -> dict[str, OnnxHead]:
    """HEADS as ONNX Runtime sessions at the frames' own size (2 threads)."""
    head, _ = split_model(model)
    meta = head_metadata(head.eval(), fingerprint(model), min_size=min(hw), max_size=max(hw))
    imgs, names = sample_images()
    calib = [img for img, n in zip(imgs, names) if n in CALIBRATION]
    export_onnx(head, meta, folder / "fp32.onnx")
    export_onnx(head, meta, folder / "s2d.onnx", stem="s2d", pixels="uint8")  # what hnd-export-head --int8 writes
    quantize_int8(folder / "s2d.onnx", folder / "int8.onnx", calib, meta, "photos")
    quantize_int8(folder / "s2d.onnx", folder / "int8-last.onnx", calib, meta, "photos", fp32_last=False)
    files = dict(zip(HEADS, ("fp32.onnx", "int8.onnx", "int8-last.onnx")))
    return {name: OnnxHead(folder / f, threads=2) for name, f in files.items()}


@torch.inference_mode()
def run(
    config: str,
    checkpoint: str | None,
    seed: int | None,
    frames: int,
    size: tuple[int, int],
    bits: int,
    hysteresis: list[float],
) -> Results:
    cfg = load_config(config)
    res = Results(cpu_name(), str(cfg.path), frames, size, bits, load_average=list(os.getloadavg()))
    base = build_model_from_config(with_weights(cfg.model, checkpoint, seed), cfg.path).eval()
    with tempfile.TemporaryDirectory() as tmp:
        video = video_frames(Path(tmp) / "video", frames, size)
        hw = video[0].shape[:2]
        model = model_at(base, "native", hw)
        _, tail = split_model(model)
        heads = export_heads(base, hw, Path(tmp))
        reference = [model([to_tensor(f)])[0] for f in video]
        outputs = {name: [h([f]) for f in video] for name, h in heads.items()}
    truth = [out.bottleneck for out, _ in outputs["fp32"]]
    codings = ["intra"] + [f"temporal h={h:g}" for h in hysteresis]
    for name in HEADS:
        for coding in codings:
            sizes, dets, errors = [], [], []
            enc = (
                None
                if coding == "intra"
                else StreamEncoder(
                    bits, key_interval=frames + 1, max_clamped=1.0, hysteresis=float(coding.split("=")[1])
                )
            )
            for (out, meta), z_true in zip(outputs[name], truth):
                z = out.bottleneck
                if enc is None:
                    payload = len(codec.encode(z, bits).payload)
                    zq = codec.roundtrip(z, bits)
                    step = codec.quantize(z, bits).scale[0]
                else:
                    frame = enc.encode(z)
                    payload, zq = len(frame.tensor.payload), enc.reconstruction()
                    step = frame.tensor.scale[0]
                sizes.append(payload)
                errors.append(float(np.sqrt(np.mean((zq - z_true) ** 2))) / step)
                dets.append(tail(torch.from_numpy(zq), meta)[0])
            f1 = float(np.mean([match_f1(r, d, 0.5, 0.0) for r, d in zip(reference, dets)]))
            res.rows.append(Row(name, coding, float(np.mean(sizes[1:])), sizes[0], f1, float(np.mean(errors))))
    by = {(r.head, r.coding): r for r in res.rows}
    for r in res.rows:
        r.vs_fp32_bytes = r.later_bytes / by[("fp32", r.coding)].later_bytes
        r.f1_vs_intra = r.f1 - by[(r.head, "intra")].f1
    res.load_average += list(os.getloadavg())
    return res


def markdown(res: Results) -> str:
    w, h = res.size
    load = [round(v, 2) for v in res.load_average]
    lines = [
        f"Machine: {res.machine}; config {res.config}; {res.frames} frames of a {w}x{h} synthetic camera video "
        f"split at native size; {res.bits}-bit per tensor, zstd 3; load average {load[:3]} -> {load[3:]}.",
        "",
        "| head | coding | later frames, B | first frame, B | vs fp32 head | F1 vs unsplit | F1 - intra | "
        "RMS error, steps |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res.rows:
        lines.append(
            f"| {r.head} | {r.coding} | {r.later_bytes:,.0f} | {r.first_bytes:,} | {r.vs_fp32_bytes:.2f}x | "
            f"{r.f1:.3f} | {r.f1_vs_intra:+.3f} | {r.rms_steps:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.speed_temporal", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="hnd/faster_rcnn-b3ch")
    add_weights_arguments(p)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--size", type=_size, default=(640, 480), help="WIDTHxHEIGHT of the video (both even)")
    p.add_argument("--bits", type=int, default=4, choices=(2, 4, 6, 8))
    p.add_argument("--hysteresis", type=float, nargs="+", default=[0.0, HYSTERESIS, 0.5])
    p.add_argument("--json", help="write the rows as JSON")
    p.add_argument("--markdown", help="write the table as markdown")
    args = p.parse_args(argv)
    seed = args.random_weights if args.checkpoint or args.random_weights is not None else 0
    res = run(
        args.config,
        args.checkpoint,
        None if args.checkpoint else seed,
        args.frames,
        args.size,
        args.bits,
        args.hysteresis,
    )
    text = markdown(res)
    print(text)
    if args.json:
        atomic_write_json(args.json, asdict(res))
    if args.markdown:
        atomic_write_text(args.markdown, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
