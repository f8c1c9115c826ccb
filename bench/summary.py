"""hnd-bench's results: per-setting summaries, bandwidth sweeps, and the whole run, as dataclasses.

``BenchResult`` is what one run produced; ``to_json`` (here, and only here) turns it into the dict that
``results.json`` holds and that ``hnd.bench.report`` renders, so results.md can be remade from a stored
results.json. Fields marked ``OMIT_NONE`` are left out of the JSON when they are None.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hnd.common.timing import percentiles

from hnd.bench.linkmodel import Link, transfer_ms
from hnd.bench.measure import Sample
from hnd.bench.plan import FilterPlan, Setting

Stats = dict[str, float]  # percentiles(): "p50", "p95", "mean"
OMIT_NONE = {"omit_none": True}


def _stats(values: list[float]) -> Stats:
    return percentiles(values, (50, 95))


def _stats_or_none(values: list[float]) -> Stats | None:
    return _stats(values) if values else None


def to_json(value: Any) -> Any:
    """Dataclasses (recursively, inside lists and dicts too) as plain JSON-ready values; the one serialiser."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and f.metadata.get("omit_none"):
                continue
            out[f.name] = to_json(v)
        return out
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------------
# Per setting


@dataclass
class GroupCount:
    """Frames of one label (with objects / empty) and what the filter did with them."""

    frames: int
    sent: int
    filtered: int


@dataclass
class FilterSummary:
    """What the filter did in one setting; ``with_objects`` / ``empty`` only when the frames have labels."""

    threshold: float | None
    sent: int
    filtered: int
    filtered_share: float
    probability: list[float | None]
    filtered_edge_ms: Stats | None  # preprocess + stem + filter of a dropped frame: its whole latency
    filter_ms_raw: Stats
    with_objects: GroupCount | None = field(default=None, metadata=OMIT_NONE)
    empty: GroupCount | None = field(default=None, metadata=OMIT_NONE)


@dataclass
class SentOnly:
    """The figures over the frames that went to the server only."""

    frames: int
    request_bytes: Stats | None
    payload_bytes: Stats | None
    edge_ms: Stats | None
    latency_ms: dict[str, Stats | None]


@dataclass
class SettingSummary:
    """Per-setting figures: sizes, ratios, times, agreement, latency per link, and the frames' Samples."""

    mode: str
    setting: str
    options: dict[str, Any]
    request_bytes: Stats
    payload_bytes: Stats
    response_bytes: Stats
    raw_rgb_bytes: Stats
    compression_ratio: float | None  # raw H*W*3 bytes of the original frames over the request bytes sent
    edge_ms: Stats
    server_ms: Stats | None
    edge_ms_raw: Stats
    server_ms_raw: Stats | None
    server_compute_ms_raw: Stats | None
    loopback_ms: Stats | None
    measured_total_ms: Stats
    agreement_f1: float | None
    latency_ms: dict[str, Stats]
    latency_raw_ms: dict[str, Stats]
    frames_total: int
    frames_sent: int
    frames_filtered: int
    server_requests: int | None  # as the server counted them (hnd_requests_total)
    sent_only: SentOnly | None
    filter: FilterSummary | None
    frames: list[Sample]


def summarize(
    setting: Setting,
    samples: list[Sample],
    links: list[Link],
    labels: list[bool] | None = None,
    server_requests: int | None = None,
) -> SettingSummary:
    """Per-setting figures: sizes, ratios, times, agreement, and latency per link.

    Bytes, edge times and latencies are over all frames (a frame the filter dropped counts with 0 bytes and
    its edge time as latency): what the link carries and what a frame costs on average. ``sent_only`` gives
    the same over the frames that went to the server; server times are over those frames. ``filter`` (filter
    settings only) counts what the filter dropped, by label when the frames have one (``labels``).
    """
    local = setting.mode == "local"
    request = [s.request_bytes for s in samples]
    sent = [s for s in samples if not s.filtered] if not local else []
    return SettingSummary(
        mode=setting.mode,
        setting=setting.name,
        options=setting.options_json(),
        request_bytes=_stats(request),
        payload_bytes=_stats([s.payload_bytes for s in samples]),
        response_bytes=_stats([s.response_bytes for s in samples]),
        raw_rgb_bytes=_stats([s.raw_bytes for s in samples]),
        compression_ratio=(sum(s.raw_bytes for s in samples) / sum(request)) if sum(request) else None,
        edge_ms=_stats([s.edge_ms for s in samples]),
        server_ms=_stats_or_none([s.server_ms for s in sent]),
        edge_ms_raw=_stats([s.edge_ms_raw for s in samples]),
        server_ms_raw=_stats_or_none([s.server_ms_raw for s in sent]),
        server_compute_ms_raw=_stats_or_none([s.server_compute_ms_raw for s in sent]),
        loopback_ms=_stats_or_none([s.loopback_ms for s in sent]),
        measured_total_ms=_stats([s.measured_total_ms for s in samples]),
        agreement_f1=float(np.mean([s.f1 for s in samples])) if samples and samples[0].f1 is not None else None,
        latency_ms={link.name: _stats([s.latency_ms(link, local) for s in samples]) for link in links},
        latency_raw_ms={link.name: _stats([s.latency_ms(link, local, raw=True) for s in samples]) for link in links},
        frames_total=len(samples),
        frames_sent=len(sent),
        frames_filtered=sum(1 for s in samples if s.filtered),
        server_requests=server_requests,
        sent_only=None
        if local
        else SentOnly(
            frames=len(sent),
            request_bytes=_stats_or_none([s.request_bytes for s in sent]),
            payload_bytes=_stats_or_none([s.payload_bytes for s in sent]),
            edge_ms=_stats_or_none([s.edge_ms for s in sent]),
            latency_ms={link.name: _stats_or_none([s.latency_ms(link, local) for s in sent]) for link in links},
        ),
        filter=filter_summary(setting, samples, labels) if setting.filtered else None,
        frames=list(samples),
    )


def filter_summary(setting: Setting, samples: list[Sample], labels: list[bool] | None) -> FilterSummary:
    """What the filter did in one setting: frames sent / dropped (by label when known), its probabilities,
    and the edge time of a dropped frame (preprocess + stem + filter: its whole latency)."""
    dropped = [s for s in samples if s.filtered]
    out = FilterSummary(
        threshold=setting.options.filter_threshold,
        sent=len(samples) - len(dropped),
        filtered=len(dropped),
        filtered_share=len(dropped) / len(samples) if samples else 0.0,
        probability=[s.filter_probability for s in samples],
        filtered_edge_ms=_stats_or_none([s.edge_ms for s in dropped]),
        filter_ms_raw=_stats([s.filter_ms_raw for s in samples]),
    )
    if labels is not None:
        for name, want in (("with_objects", True), ("empty", False)):
            mine = [s for s, label in zip(samples, labels) if label == want]
            setattr(
                out,
                name,
                GroupCount(
                    frames=len(mine),
                    sent=sum(1 for s in mine if not s.filtered),
                    filtered=sum(1 for s in mine if s.filtered),
                ),
            )
    return out


# ---------------------------------------------------------------------------------------------------
# Bandwidth sweeps


def sweep_p50(samples: list[Sample], local: bool, mbits: np.ndarray, rtt_ms: float) -> np.ndarray:
    """p50 over frames of the modeled latency at each bandwidth (fixed RTT)."""
    lat = np.array([[s.latency_ms(Link("sweep", float(b), rtt_ms), local) for b in mbits] for s in samples])
    return np.median(lat, axis=0)


def wire_p50(samples: list[Sample], mbits: np.ndarray, rtt_ms: float) -> np.ndarray:
    """p50 over frames of the link's share alone (serialization both ways + RTT) at each bandwidth.

    For settings without the filter (a sent frame's link share is the same with it)."""
    lat = np.array(
        [[transfer_ms(s.request_bytes + s.response_bytes, float(b)) + rtt_ms for b in mbits] for s in samples]
    )
    return np.median(lat, axis=0)


def envelopes(
    settings: list[Setting], samples: dict[str, list[Sample]], mbits: np.ndarray, rtt_ms: float
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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


@dataclass
class Sweep:
    """The plotted bandwidth range (every 5th grid point); crossovers come from the full grid."""

    rtt_ms: float
    mbit: list[float]
    best: dict[str, list[float]]
    crossovers: list[dict[str, Any]]
    split_vs_best_offload: dict[str, list[dict[str, Any]]]


# ---------------------------------------------------------------------------------------------------
# The whole run


@dataclass
class FrameInfo:
    name: str
    height: int
    width: int
    objects: bool | None = field(default=None, metadata=OMIT_NONE)  # --mixed: holds something to detect


@dataclass
class MixedInfo:
    frames: int
    empty_fraction: float
    size: list[int]  # width, height
    seed: int
    folder: str


@dataclass
class RunInfo:
    """What ran, on what, and what the outputs must say about it."""

    config: str
    weights: str
    random_weights: bool
    notes: list[str]
    server: str
    threads: int
    formula: str
    agreement_score: float
    agreement_iou: float
    reference_detections: list[int]
    links: list[Link]
    frames: list[FrameInfo]
    mixed: MixedInfo | None
    filter: FilterPlan | None
    settings: list[str]


@dataclass
class BenchResult:
    """One hnd-bench run: ``to_json(result)`` is results.json."""

    machine: dict[str, Any]
    run: RunInfo
    results: list[SettingSummary]
    records: dict[str, list[dict[str, Any]]]  # per setting key, the EdgeRunner records
    sweep: Sweep
