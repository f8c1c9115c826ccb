"""hnd-bench --rate-accuracy: bytes per frame against accuracy, for every way of getting a camera's frames
to the model, on the same frames.

    hnd-bench --rate-accuracy --video clip.mp4 [--annotations instances.json] --frames 20 --out ra-out
    hnd-bench --rate-accuracy --images DIR --bits 8,4,2 --granularity tensor,channel --sizes native,model

Settings (each gives bytes/frame and agreement, and COCO bbox mAP when annotations are given):

* **split** (the student's head on the edge): bits x granularity x coding x input size. ``intra`` codes
  every frame on its own (``hnd.common.codec``, today's runtime); ``temporal`` is the stream session
  (``hnd.common.stream_codec``): a key frame every ``--key-interval`` frames (or when more than
  ``--max-clamped`` of the values would clamp to the key's range), deltas between. Sizes: ``native`` runs
  the transform at the frame's own size (min_size = its short side, no upscaling), ``model`` at the
  config's min_size / max_size (800 / 1333 for the bundled configs).
* **offload** (the whole model on the server): JPEG at each ``--jpeg-quality``, WebP at each
  ``--webp-quality``, H.264 (libx264, tune zerolatency, no B-frames, key frame every ``--key-interval``
  frames) at each ``--crf``, HEVC at each ``--hevc-crf``; frames decoded as the server decodes them.
* **local**: the unsplit float model at the first size of ``--sizes``: the agreement reference.

Agreement is the IoU-matched F1 (``hnd.bench.agreement.match_f1``, IoU 0.5) of a setting's detections
against the reference's, per frame, averaged. Bytes are what goes on the wire for the frame's payload: the
bottleneck's coded symbols plus its quantization parameters, or the encoded image / access unit.

Everything runs in this process. That is the runtime's result, not an approximation of it: the runtime
path equals the in-process codec round trip bit for bit (tests/test_runtime.py), the temporal stream
equals the in-process quantization with its key's parameters (tests/test_streams.py), and the server
decodes images and video with the same libraries used here. Link latency is not measured here (that is the
main ``hnd-bench`` run); this sweep is about what each byte buys. Each frame's compute is timed, though:
the edge's part (head + encode, or the image / video encode) and the server's (decode + tail, or decode +
the whole model), on this machine.

``--profile-out points.json`` also writes every setting as an **operating point** for ``hnd-edge --adapt``
(``hnd.edge.adapt``): its id, how to reproduce it (mode, bits, granularity, coding, key interval, resize;
image format and quality / CRF), payload bytes per frame (mean and p95, key and delta frames apart), edge
and server ms (mean and p95), agreement F1 (and mAP with ``--annotations``), under the model's weights
fingerprint and this machine's description. ``hnd-edge`` refuses a profile of other weights.

Outputs in ``--out``: ``rate_accuracy.md``, ``rate_accuracy.json`` (with a machine header; per row also its
frames' bytes, kinds and times) and
``rate_accuracy.png`` (bytes/frame on a log axis vs agreement, one curve per family).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from hnd.common import codec
from hnd.common.errors import USER_ERRORS, HndError, UsageError, report
from hnd.common.files import atomic_write_json, atomic_write_text
from hnd.common.flags import DEFAULT_CONFIG, HelpFormatter, add_config_argument, add_weights_arguments
from hnd.common.split import split_model
from hnd.common.stream_codec import StreamDecoder, StreamEncoder
from hnd.common.video import VideoDecoder, VideoEncoder, VideoSettings, available_formats
from hnd.edge.pipeline import to_tensor

from hnd.bench.agreement import match_f1
from hnd.bench.plan import add_agreement_score_argument, agreement_score, parse_numbers

PROG = "hnd-bench --rate-accuracy"
FAMILIES = ("split intra", "split temporal", "JPEG", "WebP", "H.264", "HEVC", "local")


@dataclass(frozen=True)
class RateSetting:
    """One way of getting a frame to the model.

    family: one of FAMILIES. size: "native" or "model" (split and local); offload runs at the first size.
    params: bits / granularity / coding (split), quality (JPEG, WebP), crf (H.264, HEVC).
    """

    family: str
    name: str
    size: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def codec(self) -> codec.CodecSettings:
        """A split setting's codec settings (validated), from its params."""
        p = self.params
        return codec.CodecSettings(p["bits"], p["granularity"], p.get("compression", "zstd"))


@dataclass
class RateRow:
    family: str
    name: str
    size: str
    params: dict[str, Any]
    bytes_per_frame: float
    bytes_first: int
    bytes_rest_mean: float | None  # frames after the first: the steady state of a temporal stream
    f1: float | None  # None with accuracy off (bytes only)
    map50_95: float | None = None
    map50: float | None = None
    key_frames: int | None = None
    clamp_keys: int | None = None
    clamped_share: float | None = None
    seconds: float = 0.0
    # Per frame, in order: payload bytes, "key" or "delta" (intra coding and images: every frame a key),
    # the edge's compute (head + encode, image encode; local: the whole model) and the server's (decode +
    # tail, decode + model), in ms. What a profile (--profile-out) summarizes.
    frame_bytes: list[int] = field(default_factory=list)
    frame_kinds: list[str] = field(default_factory=list)
    edge_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, s: RateSetting, run: SettingRun, f1: float | None) -> RateRow:
        """A setting's row from its frames' bytes, kinds and times, its agreement and extra figures."""
        sizes = run.sizes
        return cls(
            s.family,
            s.name,
            s.size,
            dict(s.params),
            float(np.mean(sizes)),
            int(sizes[0]),
            float(np.mean(sizes[1:])) if len(sizes) > 1 else None,
            f1,
            **run.extra,
            frame_bytes=[int(n) for n in sizes],
            frame_kinds=list(run.kinds),
            edge_ms=[round(v, 3) for v in run.edge_ms],
            server_ms=[round(v, 3) for v in run.server_ms],
        )


@dataclass
class SettingRun:
    """One setting over every frame: per frame its payload bytes, kind ("key" / "delta"), detections and
    edge / server compute (ms); extra: the row's extra figures (key frames, clamp keys, clamped share)."""

    sizes: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    dets: list[dict] = field(default_factory=list)
    edge_ms: list[float] = field(default_factory=list)
    server_ms: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, nbytes: int, kind: str, dets: dict, edge_ms: float, server_ms: float) -> None:
        self.sizes.append(nbytes)
        self.kinds.append(kind)
        self.dets.append(dets)
        self.edge_ms.append(edge_ms)
        self.server_ms.append(server_ms)


def parse_sizes(text: str) -> list[str]:
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    if not sizes or not set(sizes) <= {"native", "model"}:
        raise UsageError(f"--sizes: expected native and/or model, got {text!r}")
    return sizes


def rate_settings(
    bits: list[int],
    granularities: list[str],
    codings: list[str],
    sizes: list[str],
    jpeg: list[int],
    webp: list[int],
    crf: list[float],
    hevc_crf: list[float],
) -> list[RateSetting]:
    """The sweep: split bits x granularity x coding x size, offload qualities / CRFs, local at the first size."""
    out = [RateSetting("local", f"local, {sizes[0]}", sizes[0])]
    for size in sizes:
        for coding in codings:
            for b in bits:
                if b == codec.LEARNED_BITS:  # an Entropic Student: its learned entropy coding, intra only
                    if coding == "intra":
                        out.append(
                            RateSetting(
                                "split intra",
                                f"learned entropy coding, {size}",
                                size,
                                {"bits": b, "granularity": "channel", "coding": coding, "compression": codec.LEARNED},
                            )
                        )
                    continue
                for g in granularities if b in codec.AFFINE_BITS else ["tensor"]:
                    out.append(
                        RateSetting(
                            f"split {coding}",
                            f"{b}-bit {g}, {coding}, {size}",
                            size,
                            {"bits": b, "granularity": g, "coding": coding},
                        )
                    )
    out += [RateSetting("JPEG", f"JPEG q{q}", sizes[0], {"quality": q}) for q in jpeg]
    out += [RateSetting("WebP", f"WebP q{q}", sizes[0], {"quality": q}) for q in webp]
    formats = available_formats()
    if "h264" in formats:
        out += [RateSetting("H.264", f"H.264 crf {c:g}", sizes[0], {"crf": c}) for c in crf]
    if "hevc" in formats:
        out += [RateSetting("HEVC", f"HEVC crf {c:g}", sizes[0], {"crf": c}) for c in hevc_crf]
    return out


def model_at(model: torch.nn.Module, size: str, frame_hw: tuple[int, int]) -> torch.nn.Module:
    """The model with its transform at ``size``: "model" (as configured) or "native" (the frame's own size).

    A shallow copy sharing every weight; only the transform differs.
    """
    if size == "model":
        return model
    t = model.transform
    h, w = frame_hw
    m = copy.copy(model)
    m._modules = dict(model._modules)  # a shallow copy shares _modules: give the copy its own
    m.transform = GeneralizedRCNNTransform(
        min(h, w), max(h, w), t.image_mean, t.image_std, size_divisible=t.size_divisible, fixed_size=t.fixed_size
    )
    return m.eval()


def image_codec(
    family: str, quality: int
) -> tuple[Callable[[np.ndarray], bytes], Callable[[bytes | np.ndarray], np.ndarray]]:
    """(encode, decode) of RGB frames as ``family`` (JPEG / WebP) at ``quality``, as the edge and server do."""
    ext, flag = {"JPEG": (".jpg", cv2.IMWRITE_JPEG_QUALITY), "WebP": (".webp", cv2.IMWRITE_WEBP_QUALITY)}[family]

    def encode(rgb: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(ext, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [flag, quality])
        if not ok:
            raise HndError(f"cannot encode a frame as {family}")
        return buf.tobytes()

    def decode(data: bytes | np.ndarray) -> np.ndarray:
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise HndError(f"cannot decode the {family} frame just encoded")
        return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)

    return encode, decode


def image_roundtrip(family: str, quality: int) -> Callable[[np.ndarray], tuple[bytes, np.ndarray]]:
    encode, decode = image_codec(family, quality)

    def run(rgb: np.ndarray) -> tuple[bytes, np.ndarray]:
        data = encode(rgb)
        return data, decode(data)

    return run


@torch.inference_mode()
def run_sweep(
    model: torch.nn.Module,
    frames: list[np.ndarray],
    settings: list[RateSetting],
    key_interval: int = 30,
    max_clamped: float = 0.001,
    score: float = 0.5,
    preset: str = "medium",
    fps: float = 10.0,
    coco_gt=None,
    image_ids: list[int] | None = None,
    progress: Callable[[str], None] | None = None,
    accuracy: bool = True,
) -> list[RateRow]:
    """Every frame through every setting, in frame order; returns one row per setting.

    accuracy False: bytes only (no tail, no full model: the head runs once per frame and size).
    """
    hw = frames[0].shape[:2]
    models = {s.size: model_at(model, s.size, hw) for s in settings}
    splits = {size: split_model(m) for size, m in models.items()}
    inputs = [to_tensor(f) for f in frames]
    head_outputs = _HeadOutputs(splits, inputs)
    reference = None
    rows = []
    for s in settings:
        t0 = time.perf_counter()
        run = _run_setting(
            s, models, splits, inputs, frames, head_outputs, key_interval, max_clamped, preset, fps, accuracy
        )
        dets = run.dets
        f1 = None  # bytes only (accuracy off): no reference, no F1 or mAP
        if accuracy:
            if reference is None:
                if s.family != "local":
                    raise ValueError("the first setting must be the local reference")
                reference = dets
            f1 = float(np.mean([match_f1(r, d, 0.5, score) for r, d in zip(reference, dets)]))
        row = RateRow.of(s, run, f1)
        if accuracy and coco_gt is not None:
            if image_ids is None:
                raise ValueError("coco_gt needs image_ids (the COCO id of each frame)")
            row.map50_95, row.map50 = _coco_map(coco_gt, dets, image_ids)
        row.seconds = round(time.perf_counter() - t0, 2)
        rows.append(row)
        if accuracy and progress is not None:
            progress(f"{s.name}: {row.bytes_per_frame:,.0f} B/frame, F1 {row.f1:.3f} ({row.seconds:.0f} s)")
    if not accuracy and progress is not None:
        for row in rows:
            progress(f"{row.name}: {row.bytes_per_frame:,.0f} B/frame")
    return rows


@dataclass
class _HeadOutputs:
    """``(size) -> [(z, meta)]``, one per frame: the head runs once per frame and size, on first use;
    ``ms[size]``: its time per frame (preprocess + stem + encoder)."""

    splits: dict[str, tuple[Any, Any]]  # size -> (head, tail)
    inputs: list[torch.Tensor]
    cache: dict[str, list] = field(default_factory=dict)
    ms: dict[str, list[float]] = field(default_factory=dict)

    def __call__(self, size: str) -> list:
        if size not in self.cache:
            head = self.splits[size][0]
            outs, times = [], []
            for x in self.inputs:
                t = time.perf_counter()
                outs.append(head([x]))
                times.append(_ms_since(t))
            self.cache[size], self.ms[size] = outs, times
        return self.cache[size]


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3


def _run_setting(
    s: RateSetting,
    models,
    splits,
    inputs,
    frames,
    head_outputs,
    key_interval,
    max_clamped,
    preset,
    fps,
    accuracy: bool = True,
) -> SettingRun:
    """One setting over every frame (bytes, kinds, detections and compute per frame; the row's extra figures)."""
    if not accuracy:  # bytes only: skip every tail / full-model pass
        splits = {k: (h, lambda z, meta: [None]) for k, (h, _) in splits.items()}
        models = {k: (lambda images: [None]) for k in models}
    if s.family == "local":
        m = models[s.size]
        run = SettingRun()
        for x in inputs:
            t = time.perf_counter()
            dets = m([x])[0]
            run.add(0, "key", dets, _ms_since(t), 0.0)
        return run
    if s.family.startswith("split"):
        if s.params["coding"] == "temporal":
            return _run_temporal(s, head_outputs, splits[s.size], key_interval, max_clamped)
        return _run_intra(s, head_outputs, splits[s.size])
    m = models[s.size]
    if s.family in ("JPEG", "WebP"):
        return _run_image(s, frames, m)
    return _run_video(s, frames, m, key_interval, preset, fps)


def _run_temporal(
    s: RateSetting, head_outputs: _HeadOutputs, split: tuple[Any, Any], key_interval: int, max_clamped: float
) -> SettingRun:
    """A split setting coded as one stream session (key frames and deltas); extra: key frames, clamp keys and
    the clamped share. Server time: the stream decoder the server runs, and the tail."""
    tail = split[1]
    run = SettingRun()
    enc = StreamEncoder(*s.codec.as_tuple(), key_interval=key_interval, max_clamped=max_clamped)
    dec = StreamDecoder()
    clamped = []
    for (z, meta), head_ms in zip(head_outputs(s.size), head_outputs.ms[s.size]):
        t = time.perf_counter()
        frame = enc.encode(z)
        edge_ms = head_ms + _ms_since(t)
        t = time.perf_counter()
        dec.decode(frame)
        # what the server reconstructs (tests/test_streams.py): the encoder's own symbols
        zq = enc.reconstruction()
        clamped.append(frame.clamped / frame.tensor.numel)
        dets = tail(torch.as_tensor(np.asarray(zq)), meta)[0]
        run.add(frame.tensor.wire_size, frame.kind, dets, edge_ms, _ms_since(t))
    run.extra = dict(key_frames=enc.keys, clamp_keys=enc.clamp_keys, clamped_share=float(np.mean(clamped)))
    return run


def _run_intra(s: RateSetting, head_outputs: _HeadOutputs, split: tuple[Any, Any]) -> SettingRun:
    """A split setting coding every frame on its own (affine bits, or an Entropic Student's learned coding)."""
    head, tail = split
    run = SettingRun()
    settings = s.codec
    prior = head.prior_tables() if settings.learned else None
    for (z, meta), head_ms in zip(head_outputs(s.size), head_outputs.ms[s.size]):
        t = time.perf_counter()
        encoded = settings.encode(z, prior=prior)
        edge_ms = head_ms + _ms_since(t)
        t = time.perf_counter()
        zq = codec.decode(encoded, prior=prior)  # == settings.roundtrip(z), bit for bit
        dets = tail(torch.as_tensor(np.asarray(zq)), meta)[0]
        run.add(encoded.wire_size, "key", dets, edge_ms, _ms_since(t))
    return run


def _run_image(s: RateSetting, frames: list[np.ndarray], m) -> SettingRun:
    """Offload as JPEG / WebP: each frame encoded, decoded as the server decodes it, then the whole model."""
    encode, decode = image_codec(s.family, s.params["quality"])
    run = SettingRun()
    for rgb in frames:
        t = time.perf_counter()
        data = encode(rgb)
        edge_ms = _ms_since(t)
        t = time.perf_counter()
        dets = m([to_tensor(decode(data))])[0]
        run.add(len(data), "key", dets, edge_ms, _ms_since(t))
    return run


def _run_video(s: RateSetting, frames: list[np.ndarray], m, key_interval: int, preset: str, fps: float) -> SettingRun:
    """Offload as H.264 / HEVC access units (a key frame every ``key_interval``); extra: the key frames."""
    fmt = {"H.264": "h264", "HEVC": "hevc"}[s.family]
    enc = VideoEncoder(VideoSettings(format=fmt, crf=s.params["crf"], gop=key_interval, fps=fps, preset=preset))
    dec = VideoDecoder(fmt)
    run = SettingRun()
    for rgb in frames:
        t = time.perf_counter()
        data, key = enc.encode(rgb)
        edge_ms = _ms_since(t)
        t = time.perf_counter()
        decoded = dec.decode(data, key_frame=key)[: rgb.shape[0], : rgb.shape[1]]
        dets = m([to_tensor(np.ascontiguousarray(decoded))])[0]
        run.add(len(data), "key" if key else "delta", dets, edge_ms, _ms_since(t))
    run.extra = {"key_frames": run.kinds.count("key")}
    return run


def _coco_map(coco_gt, dets: list[dict], image_ids: list[int]) -> tuple[float, float]:
    from hnd.train.evaluate import coco_evaluate, to_coco_results

    metrics, _ = coco_evaluate(coco_gt, to_coco_results(dets, image_ids, ["bbox"]), image_ids)
    return metrics["bbox"]["AP"], metrics["bbox"]["AP50"]


# ---------------------------------------------------------------------------------------------------
# Outputs


def render_markdown(rows: list[RateRow], header: dict[str, Any]) -> str:
    lines = ["# hnd-bench rate-accuracy", ""]
    m = header["machine"]
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; load "
        f"{m['loadavg_1_5_15min']}; {m['date']}."
    )
    r = header["run"]
    lines.append(
        f"Frames: {r['frames']} x {r['frame_size'][1]}x{r['frame_size'][0]} from {r['source']}; weights: "
        f"{r['weights']}; key interval {r['key_interval']} (split temporal and H.264 / HEVC gop), "
        f"max clamped {r['max_clamped']:g}; agreement: F1 at IoU 0.5 and score >= {r['score']:g} "
        f"against {rows[0].name}."
    )
    for note in r.get("notes", []):
        lines.append(f"Note: {note}")
    has_map = any(row.map50_95 is not None for row in rows)
    lines += [
        "",
        "| setting | bytes/frame | first frame | later frames (mean) | agreement F1 |"
        + (" bbox mAP | mAP@0.5 |" if has_map else "")
        + " key frames | clamped |",
        "|---|---:|---:|---:|---:|" + ("---:|---:|" if has_map else "") + "---:|---:|",
    ]
    for row in rows:
        rest = "—" if row.bytes_rest_mean is None else f"{row.bytes_rest_mean:,.0f}"
        cells = [
            row.name,
            f"{row.bytes_per_frame:,.0f}",
            f"{row.bytes_first:,}",
            rest,
            "—" if row.f1 is None else f"{row.f1:.3f}",
        ]
        if has_map:
            cells += [
                "—" if row.map50_95 is None else f"{row.map50_95:.3f}",
                "—" if row.map50 is None else f"{row.map50:.3f}",
            ]
        cells += [
            "—" if row.key_frames is None else str(row.key_frames),
            "—" if row.clamped_share is None else f"{100 * row.clamped_share:.3f} %",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[RateRow], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    curves: dict[str, list[tuple[RateRow, float]]] = {}  # (row, its F1)
    for row in rows:
        if row.family == "local" or row.f1 is None:  # (plotted with accuracy on: every row has an F1)
            continue
        label = f"{row.family}, {row.size}" + (
            f", {row.params['granularity']}" if row.family.startswith("split") else ""
        )
        curves.setdefault(label, []).append((row, row.f1))
    for label, pts in curves.items():
        pts = sorted(pts, key=lambda rf: rf[0].bytes_per_frame)
        ax.plot([p.bytes_per_frame for p, _ in pts], [f1 for _, f1 in pts], marker="o", label=label)
        for p, f1 in pts:
            tag = (
                f"{p.params['bits']}b"
                if "bits" in p.params
                else (f"q{p.params['quality']}" if "quality" in p.params else f"crf{p.params['crf']:g}")
            )
            ax.annotate(tag, (p.bytes_per_frame, f1), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per frame (log)")
    ax.set_ylabel(f"agreement F1 vs {rows[0].name}")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# Operating points (--profile-out): what hnd-edge --adapt chooses among


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"mean": round(float(np.mean(values)), 3), "p95": round(float(np.percentile(values, 95)), 3)}


def point_reproduce(row: RateRow, key_interval: int, max_clamped: float, preset: str) -> tuple[str, str, dict]:
    """(id, mode, settings that make it) of a row: what hnd-edge needs to send frames this way."""
    p, size = row.params, row.size
    if row.family == "local":
        return f"local-{size}", "local", {"resize": size}
    if row.family.startswith("split"):
        temporal = p["coding"] == "temporal"
        reproduce = {
            "bits": p["bits"],
            "granularity": p["granularity"],
            "compression": p.get("compression", "zstd"),
            "coding": p["coding"],
            "key_interval": key_interval if temporal else 1,
            "max_clamped": max_clamped,
            "resize": size,
        }
        name = "learned" if p.get("compression") == codec.LEARNED else f"{p['bits']}b-{p['granularity']}"
        return (
            f"split-{name}-{p['coding']}" + (f"-k{key_interval}" if temporal else "") + f"-{size}",
            "split",
            reproduce,
        )
    fmt = {"JPEG": "jpeg", "WebP": "webp", "H.264": "h264", "HEVC": "hevc"}[row.family]
    if "quality" in p:
        return f"{fmt}-q{p['quality']}", "offload", {"image_format": fmt, "quality": p["quality"]}
    reproduce = {"image_format": fmt, "crf": p["crf"], "key_interval": key_interval, "preset": preset}
    return f"{fmt}-crf{p['crf']:g}-k{key_interval}", "offload", reproduce


def profile_point(row: RateRow, key_interval: int, max_clamped: float, preset: str) -> dict[str, Any]:
    """One operating point of the profile (the layout hnd.edge.adapt.OperatingPoint reads)."""
    pid, mode, reproduce = point_reproduce(row, key_interval, max_clamped, preset)
    keys = [n for n, k in zip(row.frame_bytes, row.frame_kinds) if k == "key"]
    deltas = [n for n, k in zip(row.frame_bytes, row.frame_kinds) if k == "delta"]
    return {
        "id": pid,
        "mode": mode,
        "family": row.family,
        "name": row.name,
        "reproduce": reproduce,
        "bytes": {
            **(_stats(row.frame_bytes) or {}),
            "key": _stats(keys),
            "delta": _stats(deltas),
            "key_frames": len(keys),
            "delta_frames": len(deltas),
        },
        "edge_ms": _stats(row.edge_ms),
        "server_ms": _stats(row.server_ms),
        "agreement_f1": row.f1,
        "map50_95": row.map50_95,
        "map50": row.map50,
    }


def write_profile(path: Path, rows: list[RateRow], header: dict[str, Any], fingerprint: str) -> None:
    """The operating-points file: the model's fingerprint, the machine, how the points were measured, the points."""
    from hnd.edge.adapt import profile_header

    r = header["run"]
    points = [profile_point(row, r["key_interval"], r["max_clamped"], r["preset"]) for row in rows]
    data = profile_header(fingerprint, r["config"], r["weights"], header["machine"])
    data["measured"] = {
        k: r[k] for k in ("source", "frames", "frame_size", "score", "annotations", "notes") if k in r
    } | {"agreement": f"IoU-matched F1 at IoU 0.5 against {rows[0].name}", "times": "ms per frame, this machine"}
    atomic_write_json(path, {**data, "points": points}, indent=1)


# ---------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=HelpFormatter
    )
    p.add_argument("--rate-accuracy", action="store_true", help=argparse.SUPPRESS)
    add_config_argument(p, default=None, note=f"default {DEFAULT_CONFIG} with --random-weights 0")
    add_weights_arguments(p, "student checkpoint (agreement and mAP are then meaningful)", "seeded random weights")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video", metavar="FILE", help="video file (its first --frames frames, in order)")
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="image files, in name order (a frame sequence)")
    p.add_argument(
        "--annotations",
        help="COCO annotation file of the frames (matched by file name, else in order): adds bbox mAP per setting",
    )
    p.add_argument("--frames", type=int, default=20, help="frames to use (default 20)")
    p.add_argument("--fps", type=float, default=10.0, help="frame rate for H.264 / HEVC rate control (default 10)")
    p.add_argument("--bits", default="8,4,2", help="split bits (default 8,4,2)")
    p.add_argument("--granularity", default="tensor", help="tensor and/or channel (default tensor)")
    p.add_argument("--coding", default="intra,temporal", help="intra and/or temporal (default both)")
    p.add_argument("--sizes", default="native", help="native and/or model (default native)")
    p.add_argument(
        "--key-interval", type=int, default=30, help="key frame interval, split temporal and H.264 gop (default 30)"
    )
    p.add_argument(
        "--max-clamped",
        type=float,
        default=0.001,
        help="temporal split: key frame when more than this share of values would clamp (default 0.001)",
    )
    p.add_argument("--jpeg-quality", default="50,75,95", help="JPEG qualities (default 50,75,95)")
    p.add_argument("--webp-quality", default="50,80", help="WebP qualities (default 50,80)")
    p.add_argument("--crf", default="18,23,28,33", help="H.264 CRFs (default 18,23,28,33)")
    p.add_argument("--hevc-crf", default="28", help="HEVC CRFs (default 28; empty for none)")
    p.add_argument("--preset", default="medium", help="x264 / x265 preset (default medium, libx264's default)")
    add_agreement_score_argument(p)
    p.add_argument(
        "--no-accuracy",
        action="store_true",
        help="bytes only: no tail and no full model (the head runs once per frame), no F1 or mAP",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="rate-out", help="output folder (default rate-out)")
    p.add_argument(
        "--profile-out",
        metavar="JSON",
        help="also write the settings as operating points for hnd-edge --adapt: per setting its id, how to "
        "reproduce it, bytes per frame (mean, p95; key and delta frames apart), edge and server ms, "
        "agreement (and mAP); the model's fingerprint and this machine",
    )
    return p


def _frames_and_gt(args) -> tuple[list[np.ndarray], list[str], Any, list[int] | None]:
    from hnd.bench.frames import load_frames

    frames, names = load_frames(args.images, args.video, args.frames)
    if len({f.shape for f in frames}) != 1:
        raise UsageError("the frames must all have one size (a camera's frames)")
    if args.annotations is None:
        return frames, names, None, None
    from hnd.train.data import load_coco

    coco = load_coco(args.annotations)
    by_name = {Path(im["file_name"]).name: im["id"] for im in coco.dataset["images"]}
    if all(n in by_name for n in names):
        ids = [by_name[n] for n in names]
    else:
        ordered = sorted(
            coco.dataset["images"], key=lambda im: (im.get("video_id", 0), im.get("frame_index", 0), im["id"])
        )
        if len(ordered) < len(frames):
            raise UsageError(args.annotations, f"{len(ordered)} images for {len(frames)} frames")
        ids = [im["id"] for im in ordered[: len(frames)]]
    return frames, names, coco, ids


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except USER_ERRORS as exc:
        return report(PROG, exc)


def write_results(
    rows: list[RateRow], header: dict[str, Any], frames: list[np.ndarray], out: Path, accuracy: bool
) -> None:
    """rate_accuracy.md / .json (and .png with accuracy) into ``out``; the table on stdout."""
    text = render_markdown(rows, header)
    atomic_write_text(out / "rate_accuracy.md", text)
    atomic_write_json(out / "rate_accuracy.json", {**header, "rows": [asdict(r) for r in rows]}, indent=1)
    written = ["rate_accuracy.md", "rate_accuracy.json"]
    if accuracy:
        plot(
            rows,
            out / "rate_accuracy.png",
            f"{Path(str(header['run']['source'])).name}: {len(frames)} frames "
            f"{frames[0].shape[1]}x{frames[0].shape[0]}, {header['run']['weights']}",
        )
        written.append("rate_accuracy.png")
    print(text)
    print(f"{PROG}: wrote {', '.join(written)} to {out}", file=sys.stderr)


def sweep_from_args(args: argparse.Namespace, cfg: Any) -> list[RateSetting]:
    """The sweep the flags ask for (UsageError naming the flag otherwise); an Entropic Student's config
    turns the default --bits into its one learned setting."""
    if args.profile_out and args.no_accuracy:
        raise UsageError("--profile-out needs the agreement of each setting: drop --no-accuracy")
    if args.frames < 1 or args.key_interval < 1 or not 0 <= args.max_clamped <= 1:
        raise UsageError("--frames and --key-interval must be >= 1, --max-clamped in [0, 1]")
    bits = parse_numbers(args.bits, "--bits")
    if not bits or not set(bits) <= {codec.LEARNED_BITS, *codec.BITS}:
        raise UsageError(
            f"--bits: expected values of {codec.BITS} (or 0: an Entropic Student's learned coding), got {args.bits!r}"
        )
    grans = [g.strip() for g in args.granularity.split(",") if g.strip()]
    codings = [c.strip() for c in args.coding.split(",") if c.strip()]
    if not grans or not set(grans) <= {"tensor", "channel"} or not codings or not set(codings) <= {"intra", "temporal"}:
        raise UsageError("--granularity: tensor and/or channel; --coding: intra and/or temporal")
    if (cfg.model.bottleneck_type == "entropic") != (bits == [codec.LEARNED_BITS]):
        if cfg.model.bottleneck_type == "entropic" and args.bits == build_parser().get_default("bits"):
            bits = [codec.LEARNED_BITS]  # an Entropic Student has one split setting: its learned coding
        else:
            raise UsageError(
                "--bits 0 (learned entropy coding) is for Entropic Student configs, and an Entropic "
                "Student takes only --bits 0"
            )
    settings = rate_settings(
        bits,
        grans,
        codings,
        parse_sizes(args.sizes),
        parse_numbers(args.jpeg_quality, "--jpeg-quality"),
        parse_numbers(args.webp_quality, "--webp-quality"),
        parse_numbers(args.crf, "--crf", float),
        parse_numbers(args.hevc_crf, "--hevc-crf", float),
    )
    return settings


def _main(args) -> int:
    from hnd.common.config import load_config, with_weights
    from hnd.common.build import build_model_from_config

    from hnd.bench.report import machine_info

    config = args.config or "hnd/faster_rcnn-b3ch"
    cfg = load_config(config)
    settings = sweep_from_args(args, cfg)
    if args.threads:
        torch.set_num_threads(args.threads)
    random_weights = args.random_weights
    if args.config is None and args.checkpoint is None and random_weights is None:
        random_weights = 0
    frames, names, coco, ids = _frames_and_gt(args)
    model = build_model_from_config(with_weights(cfg.model, args.checkpoint, random_weights), cfg.path)
    score = agreement_score(args.agreement_score, random_weights is not None)
    notes = []
    if random_weights is not None:
        notes.append(
            f"seeded random weights (seed {random_weights}): bytes are real, agreement only says how "
            "far each setting moves the untrained model's output, and mAP means nothing"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_sweep(
        model,
        frames,
        settings,
        key_interval=args.key_interval,
        max_clamped=args.max_clamped,
        score=score,
        preset=args.preset,
        fps=args.fps,
        coco_gt=coco,
        image_ids=ids,
        progress=lambda line: print(f"{PROG}: {line}", file=sys.stderr),
        accuracy=not args.no_accuracy,
    )
    header = {
        "machine": machine_info(),
        "run": {
            "source": args.video or args.images,
            "frames": len(frames),
            "frame_size": list(frames[0].shape[:2]),
            "config": config,
            "weights": args.checkpoint or f"random (seed {random_weights})",
            "key_interval": args.key_interval,
            "max_clamped": args.max_clamped,
            "score": score,
            "preset": args.preset,
            "annotations": args.annotations,
            "accuracy": not args.no_accuracy,
            "notes": notes,
        },
    }
    write_results(rows, header, frames, out, accuracy=not args.no_accuracy)
    if args.profile_out:
        from hnd.common.checkpoint import fingerprint

        write_profile(Path(args.profile_out), rows, header, fingerprint(model))
        print(f"{PROG}: wrote {len(rows)} operating points to {args.profile_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
