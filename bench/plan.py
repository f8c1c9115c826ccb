"""hnd-bench's plan: the options, the settings every frame goes through, and the resolved run (``plan``).

``plan`` applies the defaults (``--quick``, no ``--config``), checks that the model can be benchmarked
(a student with weights), resolves the neural filter's threshold and writes the config the server loads;
its notes say what the outputs must say about the run (random weights, filter weights).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hnd.common.config import (
    Config,
    ConfigError,
    ModelConfig,
    check_filter_threshold_flag,
    load_config,
    resolve_config_path,
    with_weights,
)
from hnd.common.errors import UsageError
from hnd.common.flags import DEFAULT_CONFIG
from hnd.common.files import atomic_write_text
from hnd.edge.pipeline import EdgeOptions

from hnd.bench.linkmodel import Link, parse_links

PROG = "hnd-bench"
QUICK_CONFIG = "test/faster_rcnn-b3ch"
DEFAULT_LINKS = "wifi=50mbit/5ms,lte=10mbit/40ms,3g=1mbit/100ms"
DEFAULT_BITS = "2,4,8,16"
DEFAULT_FRAMES = 3
QUICK_FRAMES = 2
QUICK_BITS = (8, 4)
FLOAT_BITS = (16, 32)  # codec modes where granularity means nothing
FILTER_SUFFIX = ", with filter"  # a split setting's filtered twin is "<setting>, with filter"
DEFAULT_AGREEMENT_SCORE = 0.5


def agreement_score(given: float | None, random_weights: bool) -> float:
    """The score cut of agreement F1 (hnd-bench, hnd-bench --rate-accuracy): ``--agreement-score`` when
    given, else 0 with random weights (untrained heads score every box ~1/num_classes: keep them all so
    that there is something to compare), else :data:`DEFAULT_AGREEMENT_SCORE`."""
    if given is not None:
        return given
    return 0.0 if random_weights else DEFAULT_AGREEMENT_SCORE


def parse_numbers(text: str, flag: str, kind: type = int) -> list:
    """``--flag 8,4,2`` -> [8, 4, 2] (UsageError naming the flag when a value is not a number)."""
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag}: expected comma-separated {kind.__name__}s, got {text!r}") from None


def add_agreement_score_argument(parser: argparse.ArgumentParser) -> None:
    """``--agreement-score``, resolved by :func:`agreement_score`."""
    parser.add_argument(
        "--agreement-score",
        type=float,
        default=None,
        help=f"score cut for agreement F1 (default {DEFAULT_AGREEMENT_SCORE:g}; 0 with random weights)",
    )


# ---------------------------------------------------------------------------------------------------
# Settings: what one frame goes through


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

    def options_json(self) -> dict[str, Any]:
        """The options that tell this setting apart, as results.json records them."""
        o = self.options
        if self.mode == "split":
            return o.codec.as_dict()
        if self.mode == "offload":
            return {
                "image_format": o.image_format,
                "jpeg_quality": o.jpeg_quality if o.image_format == "jpeg" else None,
                "resized": self.resized,
            }
        return {}


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
        settings = dataclasses.replace(base.codec, bits=b, granularity=g)
        out.append(Setting("split", name, dataclasses.replace(base, mode="split", codec=settings)))
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
    return [
        Setting("split", s.name + FILTER_SUFFIX, dataclasses.replace(s.options, filter_threshold=threshold))
        for s in split
    ]


def all_settings(
    bits: list[int], granularities: list[str] | None, base: EdgeOptions, filter_threshold: float | None = None
) -> list[Setting]:
    """split settings, their filtered twins (when ``filter_threshold`` is set), offload, local."""
    local = Setting("local", "whole model on the edge", dataclasses.replace(base, mode="local"))
    split = split_settings(bits, granularities, base)
    filtered = filter_settings(split, filter_threshold) if filter_threshold is not None else []
    return split + filtered + offload_settings(base) + [local]


# ---------------------------------------------------------------------------------------------------
# The run


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
    # Server compute ms per frame by mode ("split", "offload") replacing the measured one in the link model.
    server_profile: dict[str, float] | None = None


@dataclass(frozen=True)
class FilterPlan:
    """The neural filter of the "with filter" rows: its threshold, where that came from, its weights."""

    threshold: float
    threshold_from: str  # "--filter-threshold" | "the config"
    weights: str  # in words, for the report
    trained: bool  # False: seeded random weights (which frames it drops means nothing)


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
    filter: FilterPlan | None = None  # threshold, where it came from, what the filter's weights are


def plan(o: BenchOptions, out: Path) -> Plan:
    """Apply defaults (--quick, no --config) and write the config the server will load."""
    notes: list[str] = []
    config, cfg, model_cfg, random = _resolve_model(o, notes)
    data = yaml.safe_load(Path(resolve_config_path(config)).read_text())  # becomes the server's config
    filter_info = _plan_filter(o, cfg, model_cfg, random, data, notes)
    if random:
        model_cfg = _keep_every_box(model_cfg, data, notes)
    derived = out / "bench-config.yaml"
    atomic_write_text(derived, yaml.safe_dump(data, sort_keys=False))
    weights = (
        ["--random-weights", str(model_cfg.random_weights)]
        if random
        else (["--checkpoint", str(Path(model_cfg.checkpoint).resolve())] if model_cfg.checkpoint else [])
    )
    links = parse_links(o.links)
    if o.quick:
        links = links[:1]
    half = max(1, (os.cpu_count() or 2) // 2)
    return Plan(
        config=config,
        config_path=str(derived),
        model=model_cfg,
        weights=weights,
        random=random,
        notes=notes,
        links=links,
        frames=o.mixed or o.frames or (QUICK_FRAMES if o.quick else DEFAULT_FRAMES),
        bits=list(QUICK_BITS) if o.quick else o.bits,
        agreement_score=agreement_score(o.agreement_score, random),
        in_process=o.in_process or o.quick,
        threads=o.threads or half,
        filter=filter_info,
    )


def _resolve_model(o: BenchOptions, notes: list[str]) -> tuple[str, Config, ModelConfig, bool]:
    """(config name, the loaded config, its model with the given weights, whether they are random); without
    --config and weights, the default config with seeded random weights (a note says so). ConfigError for a
    teacher or a model without weights."""
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
    return config, cfg, model_cfg, random


def _plan_filter(
    o: BenchOptions, cfg: Config, model_cfg: ModelConfig, random: bool, data: dict, notes: list[str]
) -> FilterPlan | None:
    """The "with filter" rows' filter (None: the model has none, or --no-filter), with a note on what its
    decisions mean; its checkpoint is made absolute in ``data`` (the server's config). ConfigError for a
    --filter-threshold the config cannot take, or one given with --no-filter."""
    flt = model_cfg.filter
    if o.filter_threshold is not None:
        check_filter_threshold_flag(o.filter_threshold, cfg)
        if o.no_filter:
            raise ConfigError("--filter-threshold and --no-filter contradict each other")
    if flt is None or o.no_filter:
        return None
    if flt.checkpoint is not None:
        # The server subprocess reads the derived config from the output folder: an absolute path.
        data["model"]["filter"]["checkpoint"] = str(Path(flt.checkpoint).resolve())
        weights_text, trained = f"trained, from {flt.checkpoint}", True
    elif not random:
        weights_text, trained = "from the model checkpoint", True
    else:
        weights_text, trained = f"seeded random (seed {model_cfg.random_weights}), like the detector", False
    threshold = o.filter_threshold if o.filter_threshold is not None else flt.threshold
    filter_info = FilterPlan(
        threshold=threshold,
        threshold_from="--filter-threshold" if o.filter_threshold is not None else "the config",
        weights=weights_text,
        trained=trained,
    )
    if trained:
        notes.append(
            f"Neural filter at threshold {threshold:g} ({filter_info.threshold_from}), weights "
            f"{weights_text}: its decisions are a trained classifier's; bytes and time of the "
            "dropped frames are real."
            + (" The detector's weights are random, so detections of the sent frames are not." if random else "")
        )
    else:
        notes.append(
            f"Neural filter at threshold {threshold:g} ({filter_info.threshold_from}) with random "
            "weights: which frames it drops says nothing about what they show. The filter rows "
            "measure the mechanics: what a dropped frame costs (bytes, edge time) and what the "
            "averages become at that drop rate."
        )
    return filter_info


def _keep_every_box(model_cfg: ModelConfig, data: dict, notes: list[str]) -> ModelConfig:
    """Random weights: score threshold 0 on both sides (``data``, the server's config, and the returned edge
    model), and a note saying what the run then measures."""
    notes.append(
        f"Random weights (seed {model_cfg.random_weights}): bytes and latency are real, detections "
        "are not; agreement only measures how much quantization moves the outputs, with the score "
        "threshold at 0 so that there are detections to compare."
    )
    # Untrained heads score every box ~1/num_classes: keep them all so agreement has something to compare.
    data["model"].setdefault("params", {})["box_score_thresh"] = 0.0
    return dataclasses.replace(model_cfg, params={**model_cfg.params, "box_score_thresh": 0.0})
