"""hnd-bench: what the split buys -- bytes on the wire and end-to-end latency against full offload and
local inference, per network link.

    hnd-bench --samples --out bench-out                      # seeded random weights, 3 photos (says so)
    hnd-bench --config hnd/faster_rcnn-b3ch --checkpoint student.pt --images frames/ --frames 20 \\
              --links "wifi=50mbit/5ms,lte=10mbit/40ms,3g=1mbit/100ms" --bits 2,4,8 --granularity tensor,channel
    hnd-bench --quick --out /tmp/bench                        # tiny model, 2 frames: a smoke test (< 1 min)
    hnd-bench --quick --config test/keypoint_rcnn-b3ch-filter --mixed 4 --filter-threshold 0.5 --out /tmp/bf
                                                              # the same with the neural filter, mixed frames

The same frames go through every mode, interleaved frame by frame in one process lifetime, so the
ratios between modes hold on a noisy machine:

* ``split``: the edge runs the head, quantizes + zstd-codes the bottleneck (``hnd.common.codec``) and sends
  it through the real ``EdgeRunner`` / ``SplitClient`` to a real ``hnd-server`` on loopback (a separate
  process started like a deployment; ``--in-process`` or ``--quick`` use ``BackgroundServer`` instead).
  One setting per bits x granularity.
* ``offload``: the frame itself as JPEG q75, JPEG q95 and PNG, both at its original size and resized as the
  model's transform would resize it (``min_size`` / ``max_size``) before encoding ("resized"): same server,
  whole model there. Results of "resized" requests refer to the resized frame; boxes are scaled back to the
  original frame before they are compared.
* ``local``: the whole model on the edge (this process). Its detections are the reference for agreement.
* ``split ..., with filter``: when the model carries a neural filter (config ``model.filter``), each split
  setting once more with ``EdgeOptions.filter_threshold`` (the config's threshold or ``--filter-threshold``;
  ``--no-filter`` leaves these rows out). A frame whose filter probability is below the threshold is not
  encoded nor sent: 0 bytes on the wire, no server time, and its latency is its edge time (preprocess +
  stem + filter), with no link cost. Per setting the summary counts frames sent / filtered, and gives bytes
  per frame and latency over all frames (what the link carries on average) and over the sent frames only.
  Each setting's request count as the server's ``hnd_requests_total`` saw it is in ``server_requests``.

Frames: scikit-image's photos (default), ``--images``, ``--video``, or ``--mixed N``: N synthetic frames
(``hnd.train.synthetic``, the generator the filter is trained on) of which ``--empty-fraction`` (default
0.5) are empty scenes, the textured background without objects; the rest hold shapes (stick figures for
keypoint models). Each frame's label (objects or empty, by the filter's training rule) goes into the
results, so the filtered rows say how many frames with objects and how many empty ones were dropped.

Each side gets half the cores (``--threads``), as two machines would. Requests go one at a time
(``max_inflight=1``) and the server does not wait to fill batches (``--max-delay-ms 0``): this measures
per-frame latency, not pipelined throughput.

Link model
----------
Deterministic, applied per frame to the sizes of that frame's actual messages::

    latency_ms = edge_ms + 8 * (request_bytes + response_bytes) / bandwidth_bits_per_ms
                 + rtt_ms + loopback_ms + server_ms

* ``edge_ms``: what the edge computes before sending: preprocess + head + codec encode (split); image
  encode, plus the resize for "resized" variants (offload); preprocess + whole model (local).
* ``request_bytes`` / ``response_bytes``: the serialized ``hnd.v1.InferRequest`` / ``InferResponse``.
* ``bandwidth``: the link's rate, the same in both directions; ``rtt_ms``: one round trip.
* ``server_ms``: the server's own stages as it reports them: decode + queue + compute + encode.
* ``loopback_ms``: ``network_server - server_ms``, what gRPC and the loopback cost in the measured run.
* ``local`` has no link: ``latency_ms = edge_ms``; nor has a frame the neural filter dropped (its edge_ms is
  preprocess + stem + filter).

Compute noise: whatever the codec setting, a mode runs the same network on the same frame, so between
its settings that time differs only by machine noise (+-40 % on a shared 2-core machine). The model
therefore uses, per frame, the median of that network time over all runs of the mode (the head and tail
for split, the whole model for offload and local); codec / image encode and decode stay per setting.
``results.json`` keeps the raw per-run times (``*_raw``, ``latency_raw_ms``) next to the pooled ones, and
"measured e2e" in ``results.md`` is the raw end-to-end time of the loopback run.

Not modeled: gRPC / HTTP/2 / TCP / IP framing (a few percent: 5 B per message, 9 B per 16 KiB HTTP/2
frame, ~40 B per ~1.4 kB TCP segment, plus headers), TCP slow start, loss and jitter. No real traffic
shaping is done: a ``tc tbf`` link inside an ``unshare -n`` namespace would need the server and the edge
both re-executed inside it and still could not add delay (no netem on this kernel), while compute
dominates every figure here; the model is exact for what it states and cheap to sweep.

Outputs in ``--out``: ``results.md``, ``results.json`` (with a machine header), ``bytes_per_frame.png`` and
``latency_vs_bandwidth.png`` (bandwidth sweep at a fixed RTT, crossover points marked; the per-mode "best"
curves leave the filter settings out), and the ``--mixed`` frames in ``mixed-frames/``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from hnd.common.checkpoint import CheckpointError, fingerprint
from hnd.common.config import (ConfigError, ModelConfig, build_model_from_config, load_config, resolve_config_path,
                               with_weights)
from hnd.common.files import atomic_write_text
from hnd.common.split import split_model
from hnd.common.timing import ms_since, now_ns, percentiles
from hnd.edge.capture import ArrayFrames, ImageFiles, SourceError, VideoFile, sample_images
from hnd.edge.client import ClientSettings, EdgeError, SplitClient
from hnd.edge.pipeline import EdgeOptions, EdgeRunner, to_tensor

from hnd.bench.linkmodel import (CROSSOVER_MBIT, FORMULA, SWEEP_MBIT, Link, crossovers, link_latency_ms, parse_links,
                                 transfer_ms)
from hnd.bench.report import FILTER_SUFFIX, machine_info, plot_bytes, plot_latency, render_markdown

PROG = "hnd-bench"
DEFAULT_CONFIG = "hnd/faster_rcnn-b3ch"
QUICK_CONFIG = "test/faster_rcnn-b3ch"
DEFAULT_LINKS = "wifi=50mbit/5ms,lte=10mbit/40ms,3g=1mbit/100ms"
DEFAULT_BITS = "2,4,8,16"
DEFAULT_FRAMES = 3
QUICK_FRAMES = 2
QUICK_BITS = (8, 4)
OUTPUTS = ("results.md", "results.json", "bytes_per_frame.png", "latency_vs_bandwidth.png")
FLOAT_BITS = (16, 32)  # codec modes where granularity means nothing
MIXED_SIZE = (320, 240)  # (width, height) of --mixed frames
MIXED_SEED = 0


# ---------------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class Setting:
    """One way of getting a frame's detections: a mode plus its codec / image options."""

    mode: str  # split | offload | local
    name: str
    options: EdgeOptions
    resized: bool = False  # offload: the frame resized to the model's input size before encoding

    @property
    def key(self) -> str:
        return f"{self.mode}: {self.name}"

    @property
    def filtered(self) -> bool:
        """True for the settings that run the neural filter before sending."""
        return self.options.filter_threshold is not None


def split_settings(bits: list[int], granularities: list[str] | None, base: EdgeOptions) -> list[Setting]:
    """bits x granularities (float modes once); ``granularities=None``: tensor at every bits, channel at 8."""
    pairs: list[tuple[int, str]] = []
    for b in bits:
        if b in FLOAT_BITS:
            pairs.append((b, "tensor"))
        elif granularities is None:
            pairs += [(b, "tensor")] + ([(b, "channel")] if b == 8 else [])
        else:
            pairs += [(b, g) for g in granularities]
    out = []
    for b, g in dict.fromkeys(pairs):  # dedupe, keep order
        name = {16: "float16", 32: "float32"}.get(b, f"{b}-bit {g}")
        out.append(Setting("split", name, dataclasses.replace(base, mode="split", bits=b, granularity=g)))
    return out


def offload_settings(base: EdgeOptions) -> list[Setting]:
    """JPEG q75, JPEG q95 and PNG of the original frame and of the resized model input."""
    formats = [("jpeg q75", "jpeg", 75), ("jpeg q95", "jpeg", 95), ("png", "png", 95)]
    out = []
    for resized in (False, True):
        for name, fmt, q in formats:
            options = dataclasses.replace(base, mode="offload", image_format=fmt, jpeg_quality=q)
            out.append(Setting("offload", f"{name} {'resized' if resized else 'original'}", options, resized))
    return out


def filter_settings(split: list[Setting], threshold: float) -> list[Setting]:
    """Each split setting once more with the neural filter at ``threshold`` ("..., with filter")."""
    return [Setting("split", s.name + FILTER_SUFFIX, dataclasses.replace(s.options, filter_threshold=threshold))
            for s in split]


def all_settings(bits: list[int], granularities: list[str] | None, base: EdgeOptions,
                 filter_threshold: float | None = None) -> list[Setting]:
    """split settings, their filtered twins (when ``filter_threshold`` is set), offload, local."""
    local = Setting("local", "whole model on the edge", dataclasses.replace(base, mode="local"))
    split = split_settings(bits, granularities, base)
    filtered = filter_settings(split, filter_threshold) if filter_threshold is not None else []
    return split + filtered + offload_settings(base) + [local]


@dataclass
class Sample:
    """One frame through one setting: sizes, times and agreement with the reference.

    ``*_raw`` times are this run's; ``edge_ms`` / ``server_ms`` (what the link model uses) are the same with
    the model's compute replaced by its median over every run of this mode on this frame (``pool_compute``).
    """

    frame: int
    source: str
    raw_bytes: int  # H * W * 3 of the original frame
    request_bytes: int
    payload_bytes: int
    response_bytes: int
    edge_ms_raw: float  # preprocess + head (local: whole model) + encode (+ resize)
    edge_model_ms_raw: float  # the network's share of it: head (split), whole model (local), 0 (offload)
    server_ms_raw: float  # decode + queue + compute + encode, as the server reports them
    server_compute_ms_raw: float  # the network's share of it: tail (split), whole model (offload)
    loopback_ms: float
    measured_total_ms: float  # the edge's own end-to-end time on loopback
    edge_ms: float = 0.0
    server_ms: float = 0.0
    f1: float | None = None
    filtered: bool | None = None  # None: no filter ran; True: the filter dropped the frame (nothing sent)
    filter_probability: float | None = None
    filter_ms_raw: float = 0.0  # the filter's share of edge_ms_raw

    def __post_init__(self) -> None:
        self.edge_ms = self.edge_ms or self.edge_ms_raw
        self.server_ms = self.server_ms or self.server_ms_raw

    def latency_ms(self, link: Link, local: bool, raw: bool = False) -> float:
        """Modeled end-to-end latency over ``link``; the edge time alone for local mode and dropped frames."""
        edge, server = (self.edge_ms_raw, self.server_ms_raw) if raw else (self.edge_ms, self.server_ms)
        if local or self.filtered:
            return edge
        return link_latency_ms(edge, self.request_bytes, self.response_bytes, server, self.loopback_ms, link)


def sample_from_record(record: dict[str, Any], frame: int, raw_bytes: int, extra_edge_ms: float) -> Sample:
    """A Sample from an EdgeRunner record (the same record hnd-edge writes).

    A frame the neural filter dropped (``filtered: true``) has 0 bytes, no server times and no response:
    its edge time is preprocess + stem (its ``ms.head``) + filter, and that is its whole latency.
    """
    if record["status"] != "OK":
        raise EdgeError(f"frame {frame} ({record['source']}): {record['status']}: {record.get('error', '')}")
    ms = record["ms"]
    server = record.get("server_ms", {})
    server_ms = sum(server.values())
    network = ms.get("network_server", 0.0)
    return Sample(
        frame=frame, source=record["source"], raw_bytes=raw_bytes,
        request_bytes=record["bytes"]["message"], payload_bytes=record["bytes"]["payload"],
        response_bytes=record["bytes"].get("response", 0),
        edge_ms_raw=ms.get("preprocess", 0.0) + ms.get("head", 0.0) + ms.get("filter", 0.0) + ms.get("encode", 0.0)
        + extra_edge_ms,
        edge_model_ms_raw=ms.get("head", 0.0),
        server_ms_raw=server_ms, server_compute_ms_raw=server.get("compute", 0.0),
        loopback_ms=max(0.0, network - server_ms) if server else 0.0,
        measured_total_ms=ms["total"] + extra_edge_ms,
        filtered=record.get("filtered"), filter_probability=record.get("filter_probability"),
        filter_ms_raw=ms.get("filter", 0.0),
    )


def pool_compute(settings: list[Setting], samples: dict[str, list[Sample]]) -> None:
    """Give every run of a mode, per frame, the median network compute of that mode's runs on that frame.

    Whatever the codec setting, a mode runs the same network on the same frame (split: the head here, the
    tail there; offload: the whole model there; local: the whole model here), so its time differs between
    settings only by machine noise: on a shared 2-core machine +-40 %, more than most differences under
    study. Pooling keeps the settings' real differences (codec / image encode and decode, bytes) and drops
    that noise, and a per-mode "best setting" no longer picks whichever run was lucky. Raw times stay in
    ``*_raw``.

    With the neural filter the same holds per kind of work: the head (stem + encoder) of every run that
    encoded the frame, the stem alone of the runs whose filter dropped it, the filter of every run that ran
    it, and the tail of every run the server computed. A dropped frame has no server time.
    """
    def median(values: list[float]) -> float:
        return float(np.median(values)) if values else 0.0

    for mode in ("split", "offload", "local"):
        runs = [samples[s.key] for s in settings if s.mode == mode]
        for per_frame in zip(*runs):
            kept = [x for x in per_frame if not x.filtered]
            dropped = [x for x in per_frame if x.filtered]
            head = median([x.edge_model_ms_raw for x in kept])
            stem = median([x.edge_model_ms_raw for x in dropped])
            filt = median([x.filter_ms_raw for x in per_frame if x.filtered is not None])
            server_compute = median([x.server_compute_ms_raw for x in kept])
            for x in per_frame:
                edge = x.edge_ms_raw - x.edge_model_ms_raw + (stem if x.filtered else head)
                if x.filtered is not None:
                    edge += filt - x.filter_ms_raw
                x.edge_ms = edge
                x.server_ms = 0.0 if x.filtered else x.server_ms_raw - x.server_compute_ms_raw + server_compute


# ---------------------------------------------------------------------------------------------------
# Frames


def load_frames(images: str | None, video: str | None, count: int) -> tuple[list[np.ndarray], list[str]]:
    """The first ``count`` frames of a folder, a video or scikit-image's sample photos, in memory."""
    if images is not None:
        source = ImageFiles(images, max_frames=count)
    elif video is not None:
        source = VideoFile(video, max_frames=count)
    else:
        photos, names = sample_images()
        return photos[:count], names[:count]
    frames, names = [], []
    for f in source:
        if f.error is not None:
            raise SourceError(f.error)
        frames.append(f.image)
        names.append(Path(f.source).name if images is not None else f"{Path(f.source).name}#{f.index}")
    if not frames:
        raise SourceError(f"{images or video}: no frames")
    return frames, names


def mixed_frames(count: int, kind: str, folder: Path, empty_fraction: float = 0.5,
                 size: tuple[int, int] = MIXED_SIZE, seed: int = MIXED_SEED
                 ) -> tuple[list[np.ndarray], list[str], list[bool]]:
    """``count`` synthetic frames, ``round(empty_fraction * count)`` of them empty scenes, in a seeded order.

    Written by ``hnd.train.synthetic.make_synthetic_coco`` (the val split) into ``folder`` and read back, so
    they are the JPEGs a filter trained on that generator sees. Frames with objects hold shapes, or stick
    figures for a keypoint model; an empty scene is the same kind of textured background without them.
    Returns (frames, names, labels): label True when the frame holds something to detect by the filter's
    training rule (``hnd.train.filter.filter_label``).
    """
    from PIL import Image

    from hnd.train.filter import filter_label
    from hnd.train.synthetic import make_synthetic_coco

    keypoints = kind == "keypoint_rcnn"
    written = make_synthetic_coco(folder, images=0, val_images=count, size=size,
                                  kind="keypoints" if keypoints else "detection", seed=seed,
                                  empty_fraction=empty_fraction)["val"]
    doc = json.loads(Path(written["annotations"]).read_text())
    anns: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    frames, names, labels = [], [], []
    for info in doc["images"]:
        with Image.open(Path(written["images"]) / info["file_name"]) as img:
            frames.append(np.array(img.convert("RGB")))  # a writable copy (torch.from_numpy warns otherwise)
        names.append(info["file_name"])
        labels.append(bool(filter_label(anns.get(info["id"], []), keypoints)))
    return frames, names, labels


@torch.inference_mode()
def resize_like_model(image: np.ndarray, transform: torch.nn.Module) -> np.ndarray:
    """The frame resized exactly as the model's GeneralizedRCNNTransform would (bilinear), as uint8 RGB."""
    resized, _ = transform.resize(to_tensor(image))
    return resized.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


# ---------------------------------------------------------------------------------------------------
# Detection agreement


def match_f1(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor], iou: float = 0.5,
             score: float = 0.5) -> float:
    """F1 of ``got`` against ``reference``: greedy same-label matching at IoU >= iou, both cut at score.

    Both empty counts as full agreement (1.0).
    """
    from torchvision.ops import box_iou

    r = reference["scores"] >= score
    g = got["scores"] >= score
    rb, rl = reference["boxes"][r], reference["labels"][r]
    order = torch.argsort(got["scores"][g], descending=True)
    gb, gl = got["boxes"][g][order], got["labels"][g][order]
    if len(rb) == 0 and len(gb) == 0:
        return 1.0
    if len(rb) == 0 or len(gb) == 0:
        return 0.0
    ious = box_iou(gb, rb)
    ious[gl[:, None] != rl[None, :]] = -1.0
    taken = torch.zeros(len(rb), dtype=torch.bool)
    tp = 0
    for i in range(len(gb)):
        cand = ious[i].masked_fill(taken, -1.0)
        j = int(cand.argmax())
        if cand[j] >= iou:
            taken[j] = True
            tp += 1
    return 2 * tp / (len(gb) + len(rb))


def scale_boxes(dets: dict[str, torch.Tensor], from_hw: tuple[int, int],
                to_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Detections on a resized frame mapped back onto the original frame."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    out = dict(dets)
    out["boxes"] = dets["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=dets["boxes"].dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# The server


REQUESTS_METRIC = "hnd_requests_total"
REQUESTS_LABELS = {"method": "Infer", "code": "OK"}


def _scrape_requests(metrics_url: str) -> float:
    """hnd_requests_total{method="Infer",code="OK"} from a server's Prometheus endpoint (0 before the first)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:  # noqa: S310 - loopback
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == REQUESTS_METRIC and sample.labels == REQUESTS_LABELS:
                return float(sample.value)
    return 0.0


@contextlib.contextmanager
def serving(config_path: str, weights: list[str], model: torch.nn.Module, in_process: bool,
            threads: int) -> Iterator[tuple[str, str, Callable[[], float]]]:
    """A real hnd-server on loopback; yields (HOST:PORT, description, answered()).

    ``answered()`` reads the server's own count of answered Infer requests (``hnd_requests_total``), so the
    bench can check how many requests each setting really sent.
    """
    if in_process:
        from hnd.server.app import BackgroundServer, ServerSettings
        from hnd.server.service import BatchingOptions, ModelRunner

        settings = ServerSettings(port=0, batching=BatchingOptions(max_delay_ms=0.0))
        with BackgroundServer(ModelRunner(model, torch.device("cpu")), settings) as server:
            registry = server.service.metrics.registry
            yield (f"127.0.0.1:{server.port}", "in-process BackgroundServer (shares this process's threads)",
                   lambda: registry.get_sample_value(REQUESTS_METRIC, REQUESTS_LABELS) or 0.0)
        return
    from hnd.edge.demo import free_port, start_server_process, stop_server_process

    port, metrics_port = free_port(), free_port()
    extra = ["--log-level", "WARNING", "--threads", str(threads), "--max-delay-ms", "0", "--device", "cpu",
             "--metrics-port", str(metrics_port)]
    proc = start_server_process(config_path, port, weights, extra)
    try:
        yield (f"127.0.0.1:{port}", f"hnd-server subprocess, {threads} torch thread(s), --max-delay-ms 0",
               lambda: _scrape_requests(f"http://127.0.0.1:{metrics_port}/metrics"))
    finally:
        stop_server_process(proc)


# ---------------------------------------------------------------------------------------------------
# Running


@dataclass
class BenchOptions:
    """Everything ``run_bench`` needs; ``main`` fills it from the command line."""

    config: str | None = None
    checkpoint: str | None = None
    random_weights: int | None = None
    images: str | None = None
    video: str | None = None
    links: str = DEFAULT_LINKS
    bits: list[int] = field(default_factory=lambda: [int(b) for b in DEFAULT_BITS.split(",")])
    granularities: list[str] | None = None
    out: str = "bench-out"
    quick: bool = False
    frames: int | None = None
    sweep_rtt_ms: float = 20.0
    agreement_score: float | None = None  # default: 0.5 with trained weights, 0.0 with random ones
    in_process: bool = False
    threads: int | None = None  # per side; default half the cores
    progress: bool = True
    mixed: int | None = None  # N synthetic frames, some empty (instead of images / video / photos)
    empty_fraction: float = 0.5  # share of the --mixed frames that are empty scenes
    filter_threshold: float | None = None  # default: the config's model.filter.threshold
    no_filter: bool = False  # leave out the "with filter" rows even when the model has a filter


@dataclass
class Plan:
    """Resolved choices: what runs, on what, and what the output must say about it."""

    config: str
    config_path: str  # the file the server loads (a copy; score threshold 0 for random weights)
    model: ModelConfig  # the edge's model: the config's, with weights and score threshold applied
    weights: list[str]  # hnd-server's weight arguments
    random: bool
    notes: list[str]
    links: list[Link]
    frames: int
    bits: list[int]
    agreement_score: float
    in_process: bool
    threads: int
    filter: dict[str, Any] | None = None  # threshold, where it came from, what the filter's weights are


def plan(o: BenchOptions, out: Path) -> Plan:
    """Apply defaults (--quick, no --config) and write the config the server will load."""
    notes = []
    config = o.config or (QUICK_CONFIG if o.quick else DEFAULT_CONFIG)
    random_weights = o.random_weights
    if o.config is None and o.checkpoint is None and random_weights is None:
        random_weights = 0
        notes.append(f"No --config given: {config} with seeded random weights (--random-weights 0).")
    cfg = load_config(config)
    model_cfg = with_weights(cfg.model, o.checkpoint, random_weights)
    if model_cfg.bottleneck_channels is None:
        raise ConfigError(f"{cfg.path}: model is a teacher (no bottleneck); hnd-bench needs a student")
    random = model_cfg.checkpoint is None and model_cfg.weights_url is None
    if random and model_cfg.random_weights is None:
        raise ConfigError(f"{cfg.path}: the model has no weights: pass --checkpoint or --random-weights SEED")
    data = yaml.safe_load(Path(resolve_config_path(config)).read_text())
    flt = model_cfg.filter
    if o.filter_threshold is not None:
        if flt is None:
            raise ConfigError(f"--filter-threshold: {cfg.path} has no neural filter (add a model.filter section)")
        if o.no_filter:
            raise ConfigError("--filter-threshold and --no-filter contradict each other")
        if not 0.0 <= o.filter_threshold <= 1.0:
            raise ValueError(f"--filter-threshold must be a probability in [0, 1], got {o.filter_threshold}")
    filter_info = None
    if flt is not None and not o.no_filter:
        if flt.checkpoint is not None:
            # The server subprocess reads the derived config from the output folder: an absolute path.
            data["model"]["filter"]["checkpoint"] = str(Path(flt.checkpoint).resolve())
            weights_text, trained = f"trained, from {flt.checkpoint}", True
        elif not random:
            weights_text, trained = "from the model checkpoint", True
        else:
            weights_text, trained = f"seeded random (seed {model_cfg.random_weights}), like the detector", False
        threshold = o.filter_threshold if o.filter_threshold is not None else flt.threshold
        filter_info = {"threshold": threshold,
                       "threshold_from": "--filter-threshold" if o.filter_threshold is not None else "the config",
                       "weights": weights_text, "trained": trained}
        if trained:
            notes.append(f"Neural filter at threshold {threshold:g} ({filter_info['threshold_from']}), weights "
                         f"{weights_text}: its decisions are a trained classifier's; bytes and time of the "
                         "dropped frames are real." + (" The detector's weights are random, so detections "
                                                        "of the sent frames are not." if random else ""))
        else:
            notes.append(f"Neural filter at threshold {threshold:g} ({filter_info['threshold_from']}) with random "
                         "weights: which frames it drops says nothing about what they show. The filter rows "
                         "measure the mechanics: what a dropped frame costs (bytes, edge time) and what the "
                         "averages become at that drop rate.")
    if random:
        notes.append(f"Random weights (seed {model_cfg.random_weights}): bytes and latency are real, detections "
                     "are not; agreement only measures how much quantization moves the outputs, with the score "
                     "threshold at 0 so that there are detections to compare.")
        # Untrained heads score every box ~1/num_classes: keep them all so agreement has something to compare.
        data["model"].setdefault("params", {})["box_score_thresh"] = 0.0
        model_cfg = dataclasses.replace(model_cfg, params={**model_cfg.params, "box_score_thresh": 0.0})
    derived = out / "bench-config.yaml"
    atomic_write_text(derived, yaml.safe_dump(data, sort_keys=False))
    weights = ["--random-weights", str(model_cfg.random_weights)] if random else \
        (["--checkpoint", str(Path(model_cfg.checkpoint).resolve())] if model_cfg.checkpoint else [])
    links = parse_links(o.links)
    if o.quick:
        links = links[:1]
    half = max(1, (os.cpu_count() or 2) // 2)
    return Plan(
        config=config, config_path=str(derived), model=model_cfg, weights=weights, random=random, notes=notes,
        links=links, frames=o.mixed or o.frames or (QUICK_FRAMES if o.quick else DEFAULT_FRAMES),
        bits=list(QUICK_BITS) if o.quick else o.bits,
        agreement_score=o.agreement_score if o.agreement_score is not None else (0.0 if random else 0.5),
        in_process=o.in_process or o.quick, threads=o.threads or half, filter=filter_info,
    )


Measured = tuple[dict[str, list[Sample]], dict[str, list[dict]], dict[str, list[dict[str, torch.Tensor]]],
                 dict[str, int]]


def measure(settings: list[Setting], frames: list[np.ndarray], names: list[str], model: torch.nn.Module,
            fp: str, client: SplitClient, progress: bool, answered: Callable[[], float] | None = None) -> Measured:
    """Every frame through every setting, frame by frame (settings interleaved, so drift hits all alike).

    Returns per setting key its Samples, the EdgeRunner records, the detections (original frame coordinates)
    and the requests the server answered for it (its ``hnd_requests_total`` before and after each run; empty
    without ``answered``).
    """
    from tqdm import tqdm

    head, _ = split_model(model)
    runners = {s.key: EdgeRunner(s.options, head=head, fingerprint=fp, model=model, client=client) for s in settings}
    samples: dict[str, list[Sample]] = {s.key: [] for s in settings}
    records: dict[str, list[dict]] = {s.key: [] for s in settings}
    detections: dict[str, list[dict[str, torch.Tensor]]] = {s.key: [] for s in settings}
    requests: dict[str, int] = {s.key: 0 for s in settings} if answered is not None else {}
    bar = tqdm(total=len(frames) * len(settings), desc=PROG, unit="run", disable=not progress)
    try:
        step = max(1, len(settings) // len(frames))
        for i, (image, name) in enumerate(zip(frames, names)):
            # Rotate the order per frame so that no setting always runs right after the same neighbour.
            for s in settings[i * step % len(settings):] + settings[:i * step % len(settings)]:
                bar.set_postfix_str(f"{name}: {s.key}", refresh=False)
                extra_ms, sent = 0.0, image
                if s.resized:
                    t = now_ns()
                    sent = resize_like_model(image, head.transform)
                    extra_ms = ms_since(t)
                runner = runners[s.key]
                got: list[dict] = []
                before = answered() if answered is not None else 0.0
                runner.run(ArrayFrames([sent], [name]), on_record=lambda r, f: got.append(r))
                if answered is not None:
                    requests[s.key] += int(round(answered() - before))
                record = got[0]
                dets = runner.last_detections[0]
                if s.resized:
                    dets = scale_boxes(dets, sent.shape[:2], image.shape[:2])
                record["frame"] = i
                records[s.key].append(record)
                samples[s.key].append(sample_from_record(record, i, image.size, extra_ms))
                detections[s.key].append(dets)
                bar.update(1)
    finally:
        bar.close()
    return samples, records, detections, requests


def add_agreement(settings: list[Setting], samples: dict[str, list[Sample]],
                  detections: dict[str, list[dict[str, torch.Tensor]]], score: float) -> list[int]:
    """F1 of every setting's detections against local mode's (the unsplit float model), per frame.

    Returns the reference's detection count at the score cut per frame: F1 over zero boxes proves nothing.
    """
    reference = detections[next(s.key for s in settings if s.mode == "local")]
    for s in settings:
        for sample, dets, ref in zip(samples[s.key], detections[s.key], reference):
            sample.f1 = match_f1(ref, dets, 0.5, score)
    return [int((ref["scores"] >= score).sum()) for ref in reference]


# ---------------------------------------------------------------------------------------------------
# Summaries


def _stats(values: list[float]) -> dict[str, float]:
    return percentiles(values, (50, 95))


def _stats_or_none(values: list[float]) -> dict[str, float] | None:
    return _stats(values) if values else None


def summarize(setting: Setting, samples: list[Sample], links: list[Link], labels: list[bool] | None = None,
              server_requests: int | None = None) -> dict[str, Any]:
    """Per-setting figures: sizes, ratios, times, agreement, and latency per link.

    Bytes, edge times and latencies are over all frames (a frame the filter dropped counts with 0 bytes and
    its edge time as latency): what the link carries and what a frame costs on average. ``sent_only`` gives
    the same over the frames that went to the server; server times are over those frames. ``filter`` (filter
    settings only) counts what the filter dropped, by label when the frames have one (``labels``).
    """
    local = setting.mode == "local"
    o = setting.options
    request = [s.request_bytes for s in samples]
    sent = [s for s in samples if not s.filtered] if not local else []
    row: dict[str, Any] = {
        "mode": setting.mode, "setting": setting.name,
        "options": {"bits": o.bits, "granularity": o.granularity, "compression": o.compression, "level": o.level}
        if setting.mode == "split" else
        ({"image_format": o.image_format, "jpeg_quality": o.jpeg_quality if o.image_format == "jpeg" else None,
          "resized": setting.resized} if setting.mode == "offload" else {}),
        "request_bytes": _stats(request),
        "payload_bytes": _stats([s.payload_bytes for s in samples]),
        "response_bytes": _stats([s.response_bytes for s in samples]),
        "raw_rgb_bytes": _stats([s.raw_bytes for s in samples]),
        # Ratio of totals: raw H*W*3 bytes of the original frames over the request bytes sent for them.
        "compression_ratio": (sum(s.raw_bytes for s in samples) / sum(request)) if sum(request) else None,
        "edge_ms": _stats([s.edge_ms for s in samples]),
        "server_ms": _stats_or_none([s.server_ms for s in sent]),
        "edge_ms_raw": _stats([s.edge_ms_raw for s in samples]),
        "server_ms_raw": _stats_or_none([s.server_ms_raw for s in sent]),
        "server_compute_ms_raw": _stats_or_none([s.server_compute_ms_raw for s in sent]),
        "loopback_ms": _stats_or_none([s.loopback_ms for s in sent]),
        "measured_total_ms": _stats([s.measured_total_ms for s in samples]),
        "agreement_f1": float(np.mean([s.f1 for s in samples])) if samples and samples[0].f1 is not None else None,
        "latency_ms": {link.name: _stats([s.latency_ms(link, local) for s in samples]) for link in links},
        "latency_raw_ms": {link.name: _stats([s.latency_ms(link, local, raw=True) for s in samples])
                           for link in links},
        "frames_total": len(samples),
        "frames_sent": len(sent),
        "frames_filtered": sum(1 for s in samples if s.filtered),
        "server_requests": server_requests,  # as the server counted them (hnd_requests_total)
        "sent_only": None if local else {
            "frames": len(sent),
            "request_bytes": _stats_or_none([s.request_bytes for s in sent]),
            "payload_bytes": _stats_or_none([s.payload_bytes for s in sent]),
            "edge_ms": _stats_or_none([s.edge_ms for s in sent]),
            "latency_ms": {link.name: _stats_or_none([s.latency_ms(link, local) for s in sent]) for link in links},
        },
        "filter": filter_summary(setting, samples, labels) if setting.filtered else None,
        "frames": [dataclasses.asdict(s) for s in samples],
    }
    return row


def filter_summary(setting: Setting, samples: list[Sample], labels: list[bool] | None) -> dict[str, Any]:
    """What the filter did in one setting: frames sent / dropped (by label when known), its probabilities,
    and the edge time of a dropped frame (preprocess + stem + filter: its whole latency)."""
    dropped = [s for s in samples if s.filtered]
    out: dict[str, Any] = {
        "threshold": setting.options.filter_threshold,
        "sent": len(samples) - len(dropped), "filtered": len(dropped),
        "filtered_share": len(dropped) / len(samples) if samples else 0.0,
        "probability": [s.filter_probability for s in samples],
        "filtered_edge_ms": _stats_or_none([s.edge_ms for s in dropped]),
        "filter_ms_raw": _stats([s.filter_ms_raw for s in samples]),
    }
    if labels is not None:
        for name, want in (("with_objects", True), ("empty", False)):
            mine = [s for s, label in zip(samples, labels) if label == want]
            out[name] = {"frames": len(mine), "sent": sum(1 for s in mine if not s.filtered),
                         "filtered": sum(1 for s in mine if s.filtered)}
    return out


def sweep_p50(samples: list[Sample], local: bool, mbits: np.ndarray, rtt_ms: float) -> np.ndarray:
    """p50 over frames of the modeled latency at each bandwidth (fixed RTT)."""
    lat = np.array([[s.latency_ms(Link("sweep", float(b), rtt_ms), local) for b in mbits] for s in samples])
    return np.median(lat, axis=0)


def wire_p50(samples: list[Sample], mbits: np.ndarray, rtt_ms: float) -> np.ndarray:
    """p50 over frames of the link's share alone (serialization both ways + RTT) at each bandwidth.

    For settings without the filter (a sent frame's link share is the same with it)."""
    lat = np.array([[transfer_ms(s.request_bytes + s.response_bytes, float(b)) + rtt_ms for b in mbits]
                    for s in samples])
    return np.median(lat, axis=0)


def envelopes(settings: list[Setting], samples: dict[str, list[Sample]], mbits: np.ndarray,
              rtt_ms: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-setting sweep curves, and per mode the best (lowest) of its settings at each bandwidth.

    The best-of-mode envelopes leave the filter settings out: they answer dropped frames with nothing.
    """
    curves = {s.key: sweep_p50(samples[s.key], s.mode == "local", mbits, rtt_ms) for s in settings}
    best: dict[str, np.ndarray] = {}
    for mode in ("split", "offload", "local"):
        mine = [curves[s.key] for s in settings if s.mode == mode and not s.filtered]
        if mine:
            best[mode if mode == "local" else f"best {mode}"] = np.min(mine, axis=0)
    return curves, best


# ---------------------------------------------------------------------------------------------------
# The whole run


def run_bench(o: BenchOptions) -> dict[str, Any]:
    """Measure, model, write results.md / results.json / plots into ``o.out``; returns the JSON data."""
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    p = plan(o, out)
    load_before = [round(v, 2) for v in os.getloadavg()]
    for note in p.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    cfg = load_config(p.config_path)
    rt = cfg.runtime
    model = build_model_from_config(p.model, cfg.path)
    fp = fingerprint(model)
    labels: list[bool] | None = None
    if o.mixed:
        frames, names, labels = mixed_frames(p.frames, p.model.kind, out / "mixed-frames", o.empty_fraction)
    else:
        frames, names = load_frames(o.images, o.video, p.frames)
    base = EdgeOptions(compression=rt.compression, level=rt.level, max_inflight=1, keep_detections=False)
    settings = all_settings(p.bits, o.granularities, base, p.filter["threshold"] if p.filter else None)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(p.threads)  # the edge's half of the machine
    try:
        with serving(p.config_path, p.weights, model, p.in_process, p.threads) as (target, server_desc, answered):
            client = SplitClient(ClientSettings(target=target, max_message_bytes=rt.max_message_bytes,
                                                timeout_s=max(rt.deadline_s, 600.0)))
            try:
                info = client.model_info()
                if info.weights_fingerprint != fp:
                    raise EdgeError(f"weights fingerprint mismatch: edge {fp}, server {info.weights_fingerprint}")
                samples, records, detections, requests = measure(settings, frames, names, model, fp, client,
                                                                 o.progress, answered)
            finally:
                client.close()
    finally:
        torch.set_num_threads(previous_threads)
    reference_counts = add_agreement(settings, samples, detections, p.agreement_score)
    pool_compute(settings, samples)

    rows = [summarize(s, samples[s.key], p.links, labels, requests.get(s.key)) for s in settings]
    mbits = np.geomspace(*CROSSOVER_MBIT, 2000)
    curves, best = envelopes(settings, samples, mbits, o.sweep_rtt_ms)
    marks = crossovers(best, mbits)
    shown = (mbits >= SWEEP_MBIT[0]) & (mbits <= SWEEP_MBIT[1])
    result: dict[str, Any] = {
        "machine": {**machine_info(), "loadavg_at_start": load_before},
        "run": {
            "config": p.config, "weights": ("seeded random, seed " + p.weights[1]) if p.random else
            (p.weights[1] if p.weights else "from the config"), "random_weights": p.random,
            "notes": p.notes, "server": server_desc, "threads": p.threads, "formula": FORMULA,
            "agreement_score": p.agreement_score, "agreement_iou": 0.5,
            "reference_detections": reference_counts,
            "links": [dataclasses.asdict(link) for link in p.links],
            "frames": [{"name": n, "height": int(f.shape[0]), "width": int(f.shape[1]),
                        **({"objects": labels[i]} if labels is not None else {})}
                       for i, (f, n) in enumerate(zip(frames, names))],
            "mixed": {"frames": p.frames, "empty_fraction": o.empty_fraction, "size": list(MIXED_SIZE),
                      "seed": MIXED_SEED, "folder": str(out / "mixed-frames")} if o.mixed else None,
            "filter": p.filter,
            "settings": [s.key for s in settings],
        },
        "results": rows,
        "records": records,
        "sweep": {  # the plotted range, every 5th grid point; crossovers come from the full grid
            "rtt_ms": o.sweep_rtt_ms, "mbit": mbits[shown][::5].tolist(),
            "best": {k: v[shown][::5].tolist() for k, v in best.items()},
            "crossovers": marks,
            "split_vs_best_offload": {
                s.key: crossovers({s.key: curves[s.key], "best offload": best["best offload"]}, mbits)
                for s in settings if s.mode == "split"},
        },
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", render_markdown(result))
    plot_bytes(rows, out / "bytes_per_frame.png")
    wire = {s.key: wire_p50(samples[s.key], mbits[shown], o.sweep_rtt_ms) for s in settings
            if s.mode != "local" and not s.filtered}
    plot_latency({k: v[shown] for k, v in curves.items()}, {k: v[shown] for k, v in best.items()}, wire, mbits[shown],
                 [c for c in marks if SWEEP_MBIT[0] <= c["mbit"] <= SWEEP_MBIT[1]], o.sweep_rtt_ms,
                 out / "latency_vs_bandwidth.png")
    for name in OUTPUTS:
        (out / name).chmod(0o644)  # atomic writes create 0600 temp files; results are for sharing
    return result


# ---------------------------------------------------------------------------------------------------
# Command line


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog=f"Link model: {FORMULA}. What it covers and leaves out: hnd.bench.linkmodel.")
    p.add_argument("--config", help=f"YAML config or bundled name (default {DEFAULT_CONFIG} with --random-weights 0)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--checkpoint", help="student checkpoint both sides load (agreement is then meaningful)")
    w.add_argument("--random-weights", type=int, metavar="SEED", help="seeded random weights")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR_OR_GLOB", help="image folder or glob")
    src.add_argument("--video", metavar="FILE", help="video file (its first --frames frames)")
    src.add_argument("--samples", action="store_true", help="scikit-image's natural photos (the default)")
    src.add_argument("--mixed", type=int, metavar="N",
                     help=f"N synthetic {MIXED_SIZE[0]}x{MIXED_SIZE[1]} frames, --empty-fraction of them empty "
                          "scenes (written to OUT/mixed-frames): shows what the neural filter drops")
    p.add_argument("--empty-fraction", type=float, default=0.5, help="share of empty --mixed frames (default 0.5)")
    f = p.add_mutually_exclusive_group()
    f.add_argument("--filter-threshold", type=float, default=None, metavar="T",
                   help="neural filter threshold of the 'with filter' rows (default: the config's "
                        "model.filter.threshold; needs a model.filter section)")
    f.add_argument("--no-filter", action="store_true", help="no 'with filter' rows even when the model has a filter")
    p.add_argument("--links", default=DEFAULT_LINKS, help=f"NAME=RATE/RTT,... (default {DEFAULT_LINKS!r})")
    p.add_argument("--bits", default=DEFAULT_BITS, help=f"split bits settings (default {DEFAULT_BITS})")
    p.add_argument("--granularity", default=None,
                   help="tensor,channel: every bits x each (default: tensor at every bits, plus channel at 8)")
    p.add_argument("--out", default="bench-out", help="output folder (default bench-out)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: {QUICK_CONFIG}, {QUICK_FRAMES} frames, bits 8 and 4, the first link, "
                        "in-process server")
    p.add_argument("--frames", type=int, default=None, help=f"frames to use (default {DEFAULT_FRAMES})")
    p.add_argument("--sweep-rtt-ms", type=float, default=20.0, help="RTT of the bandwidth sweep plot (default 20)")
    p.add_argument("--agreement-score", type=float, default=None,
                   help="score cut for agreement F1 (default 0.5; 0 with random weights)")
    p.add_argument("--in-process", action="store_true", help="BackgroundServer in this process, not a subprocess")
    p.add_argument("--threads", type=int, default=None, help="torch threads per side (default: half the cores)")
    p.add_argument("--no-progress", action="store_true")
    return p


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    from hnd.common import codec

    bits = _ints(args.bits)
    bad = [b for b in bits if b not in codec.BITS]
    if not bits or bad:
        raise ValueError(f"--bits: {bad or args.bits!r} not in {codec.BITS}")
    grans = [g.strip() for g in args.granularity.split(",")] if args.granularity else None
    if grans is not None and not set(grans) <= {"tensor", "channel"}:
        raise ValueError(f"--granularity: expected tensor and/or channel, got {args.granularity!r}")
    if args.frames is not None and args.frames < 1:
        raise ValueError("--frames must be >= 1")
    if args.mixed is not None and (args.mixed < 1 or args.frames is not None):
        raise ValueError("--mixed N: N >= 1 frames, and no --frames (N is the frame count)")
    if not 0.0 <= args.empty_fraction <= 1.0:
        raise ValueError(f"--empty-fraction must be in [0, 1], got {args.empty_fraction}")
    if args.filter_threshold is not None and not 0.0 <= args.filter_threshold <= 1.0:
        raise ValueError(f"--filter-threshold must be a probability in [0, 1], got {args.filter_threshold}")
    parse_links(args.links)  # fail before any model is built
    return BenchOptions(
        config=args.config, checkpoint=args.checkpoint, random_weights=args.random_weights, images=args.images,
        video=args.video, links=args.links, bits=bits, granularities=grans, out=args.out, quick=args.quick,
        frames=args.frames, sweep_rtt_ms=args.sweep_rtt_ms, agreement_score=args.agreement_score,
        in_process=args.in_process, threads=args.threads, progress=not args.no_progress,
        mixed=args.mixed, empty_fraction=args.empty_fraction, filter_threshold=args.filter_threshold,
        no_filter=args.no_filter,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_bench(options_from_args(args))
    except (ValueError, ConfigError, CheckpointError, EdgeError, SourceError, OSError, RuntimeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(render_markdown(result))
    print(f"{PROG}: wrote results.md, results.json, bytes_per_frame.png, latency_vs_bandwidth.png to {args.out}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
