"""The head's speed levers on ONNX Runtime, side by side on one frame: each lever's sessions run in turns,
round after round, so a load change hits them all alike.

Levers: the stem as exported (the model's 7x7 stride-2 conv1, or space-to-depth + a 4x4 conv:
``hnd.edge.onnx_export.SpaceToDepthStem``), int8 weights per channel or per tensor, the graph optimization
level (``basic`` leaves out the layout transforms: NCHWc for fp32, NHWC for int8), intra-op thread
spinning; and frames over the two cores: one session with 1 or 2 intra-op threads against two 1-thread
sessions running frames in two Python threads (ONNX Runtime releases the GIL). XNNPACK is listed when the
installed onnxruntime has its execution provider.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hnd.bench.gemm import gemm_ceiling, ort_session_options
from hnd.edge.onnx_head import INPUT, head_batch


@dataclass(frozen=True)
class Lever:
    name: str
    file: str  # a key of the files export_variants writes
    level: str = "all"  # graph optimization level: basic | extended | all
    spinning: bool = True  # ORT's default: intra-op threads spin between ops
    provider: str = "CPUExecutionProvider"


LEVERS = (
    Lever("fp32, direct stem (the fp32 file)", "fp32 direct"),
    Lever("fp32, s2d stem", "fp32 s2d"),
    Lever("int8, direct stem", "int8 direct"),
    Lever("fp32, direct stem, uint8 pixels (normalization folded)", "fp32 direct uint8"),
    Lever("int8, s2d stem", "int8 s2d"),
    Lever("int8, s2d stem, uint8 pixels (the int8 file)", "int8 s2d uint8"),
    Lever("int8, s2d stem, per-tensor weights", "int8 s2d per-tensor"),
    Lever("int8, s2d stem, graph level basic (no NHWC)", "int8 s2d", level="basic"),
    Lever("int8, s2d stem, no thread spinning", "int8 s2d", spinning=False),
    Lever("int8, s2d stem, XNNPACK", "int8 s2d", provider="XnnpackExecutionProvider"),
)


@dataclass
class LeverRow:
    name: str
    threads: int
    best_ms: float
    median_ms: float
    gmac_per_s: float  # from best_ms
    vs_gemm: float  # gmac_per_s / the same precision's GEMM rate, same threads
    max_abs_diff: float  # against the torch head, bottleneck units
    preprocess_ms: float = 0.0  # best: the frame to the graph's input (normalized float32, or uint8 pixels)


def export_variants(head, meta, calib: list[np.ndarray], folder: Path) -> dict[str, Path]:
    """The files the levers run: fp32 with either stem, int8 (per channel) with either, int8 s2d per tensor."""
    from hnd.edge.onnx_export import export_onnx, quantize_int8

    out = {}
    for stem in ("direct", "s2d"):
        out[f"fp32 {stem}"] = folder / f"fp32-{stem}.onnx"
        export_onnx(head, meta, out[f"fp32 {stem}"], stem=stem)
        out[f"int8 {stem}"] = folder / f"int8-{stem}.onnx"
        quantize_int8(out[f"fp32 {stem}"], out[f"int8 {stem}"], calib, meta, f"{len(calib)} photos")
    for stem, prec in (("direct", "fp32"), ("s2d", "int8")):
        name = f"{prec} {stem} uint8"
        fp32 = folder / f"fp32-{stem}-uint8.onnx"
        export_onnx(head, meta, fp32, stem=stem, pixels="uint8")
        out[name] = fp32
        if prec == "int8":
            out[name] = folder / f"int8-{stem}-uint8.onnx"
            quantize_int8(fp32, out[name], calib, meta, f"{len(calib)} photos")
    out["int8 s2d per-tensor"] = folder / "int8-s2d-per-tensor.onnx"
    quantize_int8(out["fp32 s2d"], out["int8 s2d per-tensor"], calib, meta, f"{len(calib)} photos", per_channel=False)
    return out


def session(
    path: Path, threads: int, level: str = "all", spinning: bool = True, provider: str = "CPUExecutionProvider"
):
    import onnxruntime as ort

    options = ort_session_options(threads)
    options.graph_optimization_level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
    return ort.InferenceSession(str(path), options, providers=providers)


def available(lever: Lever) -> bool:
    import onnxruntime as ort

    return lever.provider in ort.get_available_providers()


def measure(
    files: dict[str, Path],
    image: np.ndarray,
    ref: np.ndarray,
    gmac: float,
    gemm: dict[str, float],
    threads: int,
    rounds: int,
    levers: tuple[Lever, ...] = LEVERS,
    sizes: tuple[int, int] = (480, 640),
) -> list[LeverRow]:
    """Each available lever on ``image`` [H, W, 3] uint8 resized to ``sizes`` (min, max: 480 / 640 keeps a
    640x480 frame at its own size): the file's preprocessing, then the head, in turns for ``rounds`` rounds
    after a warm-up.

    ref: the torch head's bottleneck. gemm: precision -> GMAC/s at these threads (``bench.head.gemm_rates``).
    """

    runs = [
        (lv, session(files[lv.file], threads, lv.level, lv.spinning, lv.provider)) for lv in levers if available(lv)
    ]
    from hnd.edge.onnx_export import file_metadata

    metas = {lv.file: file_metadata(files[lv.file]) for lv, _ in runs}

    def prepare(lv: Lever) -> np.ndarray:
        return head_batch([image], metas[lv.file], *sizes)[0]

    diffs = [float(np.abs(s.run(None, {INPUT: prepare(lv)})[0] - ref).max()) for lv, s in runs]
    times: list[list[float]] = [[] for _ in runs]
    prep: list[list[float]] = [[] for _ in runs]
    for _ in range(rounds):
        for i, (lv, s) in enumerate(runs):
            start = time.perf_counter()
            feed = {INPUT: prepare(lv)}
            mid = time.perf_counter()
            s.run(None, feed)
            prep[i].append((mid - start) * 1e3)
            times[i].append((time.perf_counter() - mid) * 1e3)
    rows = []
    for (lv, _), ts, ps, diff in zip(runs, times, prep, diffs):
        best = min(ts)
        rate = gmac / best * 1e3
        rows.append(
            LeverRow(
                lv.name,
                threads,
                best,
                float(np.median(ts)),
                rate,
                rate / gemm_ceiling(gemm, lv.file[:4]),
                diff,
                min(ps),
            )
        )
    return rows


def frames_per_second(
    path: Path, image: np.ndarray, frames: int, sizes: tuple[int, int] = (480, 640), turns: int = 4
) -> tuple[dict[str, float], dict[str, float]]:
    """Frames/s over ``frames`` frames of ``image`` resized to ``sizes`` (min, max): the head alone on one session with 1 and 2
    intra-op threads, two 1-thread sessions and one 1-thread session shared, each running every other frame in
    its own Python thread (ONNX Runtime releases the GIL); then the edge's stages (preprocess, head, 4-bit
    temporal coding in frame order: ``hnd.edge.onnx_mode``) with 1 and 2 head workers, as ``EdgeRunner``
    runs them. Run in turns, ``turns`` times, best of them (on a shared machine the best turn is the one the
    others' load touched least). Returns (frames/s, cores used in that turn: this process's CPU time over the
    wall time; 2 workers that get ~1.0 found no second core free)."""
    from hnd.edge.onnx_export import file_metadata
    from hnd.edge.onnx_head import OnnxHead

    feed = {INPUT: head_batch([image], file_metadata(path), *sizes)[0]}
    one, two = session(path, 1), session(path, 2)
    pair = [session(path, 1), session(path, 1)]
    edge_head = OnnxHead(path, threads=1, min_size=sizes[0], max_size=sizes[1])

    def serial(s) -> float:
        s.run(None, feed)
        start = time.perf_counter()
        for _ in range(frames):
            s.run(None, feed)
        return frames / (time.perf_counter() - start)

    def parallel(sessions) -> float:
        for s in sessions:
            s.run(None, feed)

        def work(s, n: int) -> None:
            for _ in range(n):
                s.run(None, feed)

        workers = [threading.Thread(target=work, args=(s, frames // 2)) for s in sessions]
        start = time.perf_counter()
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        return 2 * (frames // 2) / (time.perf_counter() - start)

    best: dict[str, float] = {}
    cores: dict[str, float] = {}
    for _ in range(turns):
        for name, fn in (
            ("1 session x 1 thread", lambda: serial(one)),
            ("1 session x 2 threads", lambda: serial(two)),
            ("2 sessions x 1 thread", lambda: parallel(pair)),
            ("1 session x 1 thread, 2 callers", lambda: parallel([one, one])),
            ("edge stages, 1 head worker", lambda: edge_frames_per_second(edge_head, image, frames, 1)),
            ("edge stages, 2 head workers", lambda: edge_frames_per_second(edge_head, image, frames, 2)),
        ):
            cpu, start = time.process_time(), time.perf_counter()  # every thread of this process
            rate = fn()
            cpu, wall = time.process_time() - cpu, time.perf_counter() - start
            if rate > best.get(name, 0.0):
                best[name] = rate
                cores[name] = cpu / wall
    return best, cores


def edge_frames_per_second(head, image: np.ndarray, frames: int, workers: int) -> float:
    """Frames/s of the ONNX split's edge stages (``OnnxSplitMode``: compute on a pool of ``workers`` threads, at
    most ``workers`` frames ahead, then coding in frame order), the way ``EdgeRunner`` schedules them."""
    import concurrent.futures
    from collections import deque

    from hnd.common.codec import CodecSettings
    from hnd.edge.capture import Frame
    from hnd.edge.modes import EdgeOptions
    from hnd.edge.onnx_mode import OnnxSplitMode

    opts = EdgeOptions(codec=CodecSettings(bits=4), key_interval=30, stream=True, head_workers=workers)
    mode = OnnxSplitMode(opts, head)
    mode.prepare(Frame(0, "bench", image, time.monotonic_ns(), 0.0, time.time()))  # warm-up
    ahead: deque = deque()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for i in range(frames):
            frame = Frame(i, "bench", image, time.monotonic_ns(), 0.0, time.time())
            ahead.append((frame, pool.submit(mode.compute, frame)))
            while len(ahead) >= workers:
                f, fut = ahead.popleft()
                mode.finish(f, fut.result())
        while ahead:
            f, fut = ahead.popleft()
            mode.finish(f, fut.result())
    return frames / (time.perf_counter() - start)
