"""Head speed: torch eager vs channels_last vs ONNX Runtime fp32 vs int8, on the same frames in one run.

    python -m hnd.bench.head [--config hnd/faster_rcnn-b3ch] [--checkpoint P | --random-weights 0]
                             [--threads 1 2 4] [--repeats 5] [--json out.json] [--markdown out.md]

Inputs: scikit-image photos (astronaut 512x512, coffee 400x600) and a 640x480 frame (chelsea resized),
each at the model's resize (800 px) and at its own size (native: min_size = its short side). The head
is stem + bottleneck encoder on the padded batch; the int8 head is calibrated on other photos
(rocket, immunohistochemistry, hubble_deep_field), never random data. Per cell: the median of
``repeats`` runs after one warm-up, and the ratio to torch eager of the same frame, size and threads.
Also: the edge stages of a 640x480 frame at native size (numpy preprocess + ONNX head + 8-bit zstd
encode), and each runtime's agreement with torch eager (max |dz| and equal 8-bit symbols).

Against the machine's own limit: each cell's multiply-accumulates (``head_gmac``, counted from the
convolutions' shapes on that input), the achieved GMAC/s (best of the repeats) and its share of the
matrix-multiply rate of the same precision and threads measured in the same run through the same runtime
(``hnd.bench.gemm``: ORT MatMul fp32, MatMulInteger / QLinearMatMul int8, best of the repeats); and the
1 -> 2 thread speed-up of each runtime. The load average is recorded: the machine is shared.

An Entropic Student (``--config test/faster_rcnn-entropic-b24ch``, ``entropic/...``) runs the same way: its
head is the encoder, the ONNX graphs output the int32 symbols, agreement is over those symbols (max |ds|
in steps), the edge stages encode with learned entropy coding, and ``payload_bytes`` gives the coded bytes
of the 640x480 frame from each runtime next to torch eager's (the torch edge's).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from hnd.bench.codec import cpu_name
from hnd.bench.codec import median_ms as codec_median_ms
from hnd.bench import head_levers
from hnd.bench.gemm import GEMM_OPS, gemm_ceiling, gemm_rate
from hnd.common import codec, entropy_coder
from hnd.common.checkpoint import fingerprint
from hnd.common.build import build_model_from_config
from hnd.common.config import load_config, with_weights
from hnd.common.files import atomic_write_json, atomic_write_text
from hnd.common.flags import add_weights_arguments
from hnd.common.split import EntropicHead, Head, split_model
from hnd.edge.capture import sample_images
from hnd.edge.onnx_export import export_onnx, head_metadata, quantize_int8
from hnd.edge.onnx_head import OnnxHead

RUNTIMES = ("torch eager", "torch channels_last", "ORT fp32", "ORT int8")
MEASURED = ("astronaut", "coffee")
CALIBRATION = ("rocket", "immunohistochemistry", "hubble_deep_field")


@dataclass
class Cell:
    frame: str
    size: str  # "model" (the model's resize, 800 px for the COCO configs) or "native"
    input_hw: tuple[int, int]
    threads: int
    runtime: str
    ms: float
    vs_eager: float = 0.0
    max_abs_diff: float = 0.0
    symbols_equal: float = 1.0
    best_ms: float = 0.0
    gmac: float = 0.0  # multiply-accumulates of the head's convolutions on this input, 1e9
    gmac_per_s: float = 0.0  # gmac / best_ms
    vs_gemm: float = 0.0  # gmac_per_s / the GEMM rate of the same precision and threads (ORT runtimes)


@dataclass
class Results:
    machine: str
    config: str
    cells: list[Cell] = field(default_factory=list)
    edge_stages_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # threads -> stage -> ms
    bottleneck_type: str = "hnd"
    payload_bytes: dict[str, int] = field(default_factory=dict)  # runtime -> coded bytes, 640x480 native
    gemm_gmac_per_s: dict[str, dict[str, float]] = field(default_factory=dict)  # threads -> precision -> GMAC/s
    load_average: list[float] = field(default_factory=list)  # 1, 5, 15 min, at the start and at the end
    levers: list[head_levers.LeverRow] = field(default_factory=list)  # 640x480 native (HND heads)
    frames_per_s: dict[str, float] = field(default_factory=dict)  # int8 head over two cores, 640x480 native
    cores_used: dict[str, float] = field(default_factory=dict)  # CPU time / wall time of each frames/s figure


def median_ms(fn, repeats: int) -> float:
    """:func:`hnd.bench.codec.median_ms` after one warm-up call (ORT plans, torch allocator)."""
    fn()
    return codec_median_ms(fn, repeats)


def median_best_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, best) wall ms of ``repeats`` calls after one warm-up call."""
    fn()
    times = [codec_median_ms(fn, 1) for _ in range(repeats)]
    return float(np.median(times)), min(times)


@torch.inference_mode()
def head_gmac(head: Head | EntropicHead, batch_hw: tuple[int, int]) -> float:
    """Multiply-accumulates of the head's convolutions on one [1, 3, H, W] input, in 1e9: per Conv2d,
    output elements x (input channels / groups) x kernel area, read off a forward pass's shapes."""
    total = 0

    def count(module: torch.nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    hooks = [m.register_forward_hook(count) for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        head.encode(torch.zeros(1, 3, *batch_hw))
    finally:
        for h in hooks:
            h.remove()
    return total / 1e9


def gemm_rates(threads: int, repeats: int) -> dict[str, float]:
    """precision -> the machine's GMAC/s for a 1024^3 product through ONNX Runtime with ``threads`` threads."""
    return {p: gemm_rate(p, threads, repeats=max(repeats, 5)).gmac_per_s for p in GEMM_OPS}


def frames() -> dict[str, np.ndarray]:
    imgs, names = sample_images()
    by = dict(zip(names, imgs))
    out = {n: by[n] for n in MEASURED}
    out["640x480"] = cv2.resize(by["chelsea"], (640, 480), interpolation=cv2.INTER_AREA)
    return out


def run(
    config: str, checkpoint: str | None, seed: int | None, threads: list[int], repeats: int, lever_rounds: int = 0
) -> Results:
    """All cells; with ``lever_rounds`` (HND heads) also the levers (``hnd.bench.head_levers``) on the
    640x480 frame at native size, at 1 and 2 threads, and the int8 head's frames/s over two cores."""
    cfg = load_config(config)
    model = build_model_from_config(with_weights(cfg.model, checkpoint, seed), cfg.path)
    head, _ = split_model(model)
    head.eval()
    cl_head, _ = split_model(model, copy_modules=True)
    cl_head = cl_head.eval().to(memory_format=torch.channels_last)
    meta = head_metadata(head, fingerprint(model))
    imgs, names = sample_images()
    calib = [img for img, n in zip(imgs, names) if n in CALIBRATION]
    res = Results(machine=cpu_name(), config=str(cfg.path), bottleneck_type=meta.bottleneck_type)
    res.load_average = [round(v, 2) for v in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        int8 = Path(tmp) / "int8.onnx"
        export_onnx(head, meta, fp32)
        s2d = Path(tmp) / "fp32-s2d.onnx"  # int8 from the stem hnd-export-head --int8 uses
        pixels = "uint8" if isinstance(head, Head) else "float32"  # what hnd-export-head --int8 writes
        export_onnx(head, meta, s2d, stem="s2d", pixels=pixels)
        quantize_int8(s2d, int8, calib, meta, f"{len(calib)} photos")
        for n in threads:
            torch.set_num_threads(n)
            res.gemm_gmac_per_s[str(n)] = gemm_rates(n, repeats)
            sessions = {"ORT fp32": OnnxHead(fp32, threads=n), "ORT int8": OnnxHead(int8, threads=n)}
            for name, img in frames().items():
                h, w = img.shape[:2]
                for size, (mn, mx) in (("model", (meta.min_size, meta.max_size)), ("native", (min(h, w), max(h, w)))):
                    batch = _with_size(sessions["ORT fp32"], mn, mx).preprocess([img])[0]
                    batch_int8 = _with_size(sessions["ORT int8"], mn, mx).preprocess([img])[0]
                    cells = _measure(name, size, batch, n, head, cl_head, sessions, repeats, batch_int8)
                    _rate(cells, head_gmac(head, tuple(batch.shape[-2:])), res.gemm_gmac_per_s[str(n)])
                    res.cells += cells
            res.edge_stages_ms[str(n)] = _edge_stages(sessions, frames()["640x480"], repeats)
        res.payload_bytes = _payload_bytes(head, sessions, frames()["640x480"])
        if lever_rounds and isinstance(head, Head):
            _levers(res, head, meta, calib, Path(tmp), lever_rounds)
    res.load_average += [round(v, 2) for v in os.getloadavg()]
    return res


@torch.inference_mode()
def _levers(res: Results, head: Head, meta, calib: list[np.ndarray], folder: Path, rounds: int) -> None:
    files = head_levers.export_variants(head, meta, calib, folder)
    img = frames()["640x480"]
    sizes = (min(img.shape[:2]), max(img.shape[:2]))  # the frame at its own size (480 / 640)
    batch, _ = OnnxHead(files["fp32 direct"], min_size=sizes[0], max_size=sizes[1]).preprocess([img])
    ref = head.encode(torch.from_numpy(batch)).numpy()
    gmac = head_gmac(head, tuple(batch.shape[-2:]))
    for n in (1, 2):
        gemm = res.gemm_gmac_per_s.get(str(n)) or gemm_rates(n, 5)
        res.levers += head_levers.measure(files, img, ref, gmac, gemm, n, rounds, sizes=sizes)
    res.frames_per_s, res.cores_used = head_levers.frames_per_second(
        files["int8 s2d uint8"], img, 4 * rounds, sizes, turns=min(4, rounds)
    )


def _rate(cells: list[Cell], gmac: float, gemm: dict[str, float]) -> None:
    """Fill each cell's GMAC, GMAC/s and, for the ORT runtimes, its share of the same precision's GEMM rate."""
    for c in cells:
        c.gmac = gmac
        c.gmac_per_s = gmac / c.best_ms * 1e3
        if c.runtime.startswith("ORT"):
            c.vs_gemm = c.gmac_per_s / gemm_ceiling(gemm, "int8" if c.runtime.endswith("int8") else "fp32")


def _symbols(head: Head | EntropicHead, z: np.ndarray) -> np.ndarray:
    """What goes on the wire before coding: 8-bit symbols of an HND bottleneck, or an Entropic head's
    int32 symbols (its ONNX graphs already give them; a torch latent is rounded here)."""
    if isinstance(head, EntropicHead):
        return z if z.dtype == np.int32 else entropy_coder.quantize(z, head.prior_tables())
    return codec.quantize(z, 8).symbols


def _encode(head: Head | EntropicHead, z: np.ndarray) -> codec.EncodedTensor:
    """The edge's per-frame coding: 8-bit zstd (HND), or learned entropy coding of the symbols (Entropic)."""
    if isinstance(head, EntropicHead):
        return codec.encode_symbols(_symbols(head, z), head.prior_tables())
    return codec.encode(z, 8, "tensor", "zstd", 3)


@torch.inference_mode()
def _payload_bytes(head: Head | EntropicHead, sessions: dict[str, OnnxHead], img: np.ndarray) -> dict[str, int]:
    """Coded bytes of one 640x480 frame at native size from each runtime (torch eager: the torch edge's)."""
    s = _with_size(sessions["ORT fp32"], 480, 640)
    batch, _ = s.preprocess([img])
    out = {"torch eager": len(_encode(head, head.encode(torch.from_numpy(batch)).numpy()).payload)}
    for name, session in sessions.items():
        own, _ = _with_size(session, 480, 640).preprocess([img])  # the int8 file takes uint8 pixels
        out[name] = len(_encode(head, session.run(own).bottleneck).payload)
    return out


def _with_size(session: OnnxHead, min_size: int, max_size: int) -> OnnxHead:
    session.min_size, session.max_size = min_size, max_size
    return session


@torch.inference_mode()
def _measure(
    name: str,
    size: str,
    batch: np.ndarray,
    threads: int,
    head: Head | EntropicHead,
    cl_head: Head | EntropicHead,
    sessions: dict[str, OnnxHead],
    repeats: int,
    batch_int8: np.ndarray | None = None,
) -> list[Cell]:
    """batch: the normalized float32 batch; batch_int8: the int8 file's own input (uint8 pixels), default batch."""
    b8 = batch if batch_int8 is None else batch_int8
    x = torch.from_numpy(batch)
    xc = x.contiguous(memory_format=torch.channels_last)
    ref = head.encode(x).numpy()
    ref_q = _symbols(head, ref)
    entropic = isinstance(head, EntropicHead)
    outputs = {
        "torch eager": (lambda: head.encode(x), lambda: head.encode(x).numpy()),
        "torch channels_last": (lambda: cl_head.encode(xc), lambda: cl_head.encode(xc).contiguous().numpy()),
        "ORT fp32": (lambda: sessions["ORT fp32"].run(batch), lambda: sessions["ORT fp32"].run(batch).bottleneck),
        "ORT int8": (lambda: sessions["ORT int8"].run(b8), lambda: sessions["ORT int8"].run(b8).bottleneck),
    }
    cells = []
    for runtime in RUNTIMES:
        fn, value = outputs[runtime]
        z = value()
        med, best = median_best_ms(fn, repeats)
        cells.append(
            Cell(
                name,
                size,
                tuple(batch.shape[-2:]),
                threads,
                runtime,
                med,
                # Entropic: the difference in symbol steps (the ONNX graphs output symbols, not the latent).
                max_abs_diff=float(np.abs(_symbols(head, z).astype(np.int64) - ref_q).max())
                if entropic
                else float(np.abs(z - ref).max()),
                symbols_equal=float((_symbols(head, z) == ref_q).mean()),
                best_ms=best,
            )
        )
    eager = cells[0].ms
    for c in cells:
        c.vs_eager = eager / c.ms
    return cells


def _edge_stages(sessions: dict[str, OnnxHead], img: np.ndarray, repeats: int) -> dict[str, float]:
    """640x480 at native size (480/640) with the int8 head: preprocess, head, encode medians (8-bit zstd,
    or learned entropy coding of an Entropic head's symbols)."""
    s = _with_size(sessions["ORT int8"], 480, 640)
    batch, _ = s.preprocess([img])
    z = s.run(batch).bottleneck
    if s.prior is not None:
        prior = s.prior

        def encode() -> object:
            return codec.encode_symbols(z, prior)
    else:

        def encode() -> object:
            return codec.encode(z, 8, "tensor", "zstd", 3)

    out = {
        "preprocess": median_ms(lambda: s.preprocess([img]), repeats),
        "head": median_ms(lambda: s.run(batch), repeats),
        "encode": median_ms(encode, repeats),
    }
    out["total"] = sum(out.values())
    return out


def markdown(res: Results) -> str:
    part = "encoder + rounding" if res.bottleneck_type == "entropic" else "stem + encoder"
    intro = (
        f"Machine: {res.machine}; config {res.config}. Median ms per head run ({part}), "
        "ratio to torch eager on the same input and threads."
    )
    lines = [intro, ""]
    threads = sorted({c.threads for c in res.cells})
    keys = sorted({(c.frame, c.size, c.input_hw) for c in res.cells}, key=lambda k: (k[1], k[0]))
    lines.append("| frame | size | input | threads | " + " | ".join(RUNTIMES) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(RUNTIMES))
    for frame, size, hw in keys:
        for n in threads:
            row = {c.runtime: c for c in res.cells if (c.frame, c.size, c.threads) == (frame, size, n)}
            vals = " | ".join(f"{row[r].ms:.0f} ({row[r].vs_eager:.1f}x)" for r in RUNTIMES)
            lines.append(f"| {frame} | {size} | {hw[0]}x{hw[1]} | {n} | {vals} |")
    entropic = res.bottleneck_type == "entropic"
    what = "max |ds| in symbol steps, equal int32 symbols" if entropic else "max |dz|, equal 8-bit symbols"
    lines += ["", f"Agreement with torch eager (worst over frames and sizes): {what}", ""]
    lines.append("| runtime | max abs diff | symbols equal (min) |")
    lines.append("|---|---|---|")
    for r in RUNTIMES[1:]:
        cs = [c for c in res.cells if c.runtime == r]
        lines.append(
            f"| {r} | {max(c.max_abs_diff for c in cs):.2g} | {100 * min(c.symbols_equal for c in cs):.3f} % |"
        )
    coding = "learned entropy coding" if entropic else "8-bit zstd"
    lines += ["", f"Edge stages, 640x480 frame at native size (480/640), ORT int8 head, {coding}:", ""]
    lines.append("| threads | preprocess | head | encode | total |")
    lines.append("|---|---|---|---|---|")
    for threads_key, st in res.edge_stages_ms.items():
        lines.append(
            f"| {threads_key} | {st['preprocess']:.1f} | {st['head']:.1f} | {st['encode']:.1f} | {st['total']:.1f} |"
        )
    lines += _limit_tables(res) + _lever_tables(res)
    if res.payload_bytes:
        lines += ["", f"Coded bytes of the 640x480 frame at native size ({coding}), per runtime:", ""]
        lines.append("| " + " | ".join(res.payload_bytes) + " |")
        lines.append("|" + "---|" * len(res.payload_bytes))
        lines.append("| " + " | ".join(f"{b:,}" for b in res.payload_bytes.values()) + " |")
    return "\n".join(lines) + "\n"


def _lever_tables(res: Results) -> list[str]:
    if not res.levers:
        return []
    lines = [
        "",
        "Levers, 640x480 frame at native size, run in turns (best / median ms, GMAC/s, share of GEMM, max |dz|):",
    ]
    lines += [
        "",
        "| lever | threads | preprocess best ms | head best ms | head median ms | GMAC/s | of GEMM | max abs diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res.levers:
        lines.append(
            f"| {r.name} | {r.threads} | {r.preprocess_ms:.2f} | {r.best_ms:.1f} | {r.median_ms:.1f} | "
            f"{r.gmac_per_s:.0f} | {100 * r.vs_gemm:.0f} % | {r.max_abs_diff:.2g} |"
        )
    if res.frames_per_s:
        base = res.frames_per_s["1 session x 1 thread"]
        lines += [
            "",
            "The int8 head's frames/s over the two cores (640x480 native), the ratio to 1 thread, and the cores"
            " the process used (CPU time / wall time: below 2 with two workers, the others' load held a core):",
            "",
        ]
        lines += ["| " + " | ".join(res.frames_per_s) + " |", "|" + "---|" * len(res.frames_per_s)]
        lines.append("| " + " | ".join(f"{v:.1f} ({v / base:.2f}x)" for v in res.frames_per_s.values()) + " |")
        if res.cores_used:
            lines.append("| " + " | ".join(f"{res.cores_used[k]:.2f} cores" for k in res.frames_per_s) + " |")
    return lines


def _limit_tables(res: Results) -> list[str]:
    """The machine's GEMM rates, each ORT head's GMAC/s and share of them, and the 1 -> 2 thread speed-ups."""
    if not res.gemm_gmac_per_s:
        return []
    load = f"load average 1/5/15 min {res.load_average[:3]} at the start, {res.load_average[3:]} at the end"
    lines = ["", f"Matrix-multiply rate through ONNX Runtime, 1024^3, best GMAC/s ({load}):", ""]
    lines.append("| threads | " + " | ".join(f"{p} ({op})" for p, op in GEMM_OPS.items()) + " |")
    lines.append("|---|" + "---|" * len(GEMM_OPS))
    for key, rates in res.gemm_gmac_per_s.items():
        lines.append(f"| {key} | " + " | ".join(f"{rates[p]:.0f}" for p in GEMM_OPS) + " |")
    ort_runtimes = [r for r in RUNTIMES if r.startswith("ORT")]
    lines += ["", "The heads against it: best ms, GMAC/s and share of the same precision's GEMM rate:", ""]
    lines.append("| frame | size | threads | GMAC | " + " | ".join(ort_runtimes) + " |")
    lines.append("|---|---|---|---|" + "---|" * len(ort_runtimes))
    keys = sorted({(c.frame, c.size) for c in res.cells}, key=lambda k: (k[1], k[0]))
    threads = sorted({c.threads for c in res.cells})
    for frame, size in keys:
        for n in threads:
            row = {c.runtime: c for c in res.cells if (c.frame, c.size, c.threads) == (frame, size, n)}
            vals = " | ".join(
                f"{row[r].best_ms:.1f} ms, {row[r].gmac_per_s:.0f}, {100 * row[r].vs_gemm:.0f} %" for r in ort_runtimes
            )
            lines.append(f"| {frame} | {size} | {n} | {row[ort_runtimes[0]].gmac:.2f} | {vals} |")
    if 1 in threads and 2 in threads:
        lines += ["", "Speed-up of 2 threads over 1 (median ms ratio, per frame and size):", ""]
        lines.append("| frame | size | " + " | ".join(RUNTIMES) + " |")
        lines.append("|---|---|" + "---|" * len(RUNTIMES))
        for frame, size in keys:
            ms = {(c.runtime, c.threads): c.ms for c in res.cells if (c.frame, c.size) == (frame, size)}
            lines.append(
                f"| {frame} | {size} | " + " | ".join(f"{ms[(r, 1)] / ms[(r, 2)]:.2f}x" for r in RUNTIMES) + " |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hnd.bench.head", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="hnd/faster_rcnn-b3ch")
    add_weights_arguments(p)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lever-rounds", type=int, default=10, help="rounds of the levers' side-by-side runs (0: skip)")
    p.add_argument("--json", help="write all cells as JSON")
    p.add_argument("--markdown", help="write the tables as markdown")
    args = p.parse_args(argv)
    seed = args.random_weights if args.checkpoint or args.random_weights is not None else 0
    res = run(
        args.config,
        args.checkpoint,
        seed if not args.checkpoint else None,
        args.threads,
        args.repeats,
        args.lever_rounds,
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
