"""YAML configs: one schema of dataclasses, one loader, clear errors.

A config file has the sections ``model`` (required), ``teacher``, ``dataset``, ``train``
and ``runtime``. Unknown keys, missing required keys and values of the wrong type are
errors that name the file and the dotted key. Relative paths in a config are taken
relative to the working directory, as in the original repository
(``./resource/ckpt/...``, ``./resource/dataset/coco2017``).

Weights are never silently random: a model section names a ``checkpoint`` (which must
exist), a torchvision ``weights_url``, or ``random_weights: SEED`` explicitly.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hnd.common import codec
from hnd.common.errors import HndError
from hnd.common.meta import BOTTLENECK_TYPES, MODEL_KINDS  # not models: configs load without torch


def filter_threshold_problem(threshold: float) -> str | None:
    """The one rule for a neural filter threshold (config, hnd-edge, hnd-bench, the edge's modes): a
    probability in [0, 1]. Returns what is wrong, or None."""
    if not 0.0 <= threshold <= 1.0:
        return f"must be a probability in [0, 1], got {threshold}"
    return None


class ConfigError(HndError):
    """A config that cannot be used; the message names the file, the key and the problem."""


def check_filter_threshold_flag(threshold: float, cfg: Config) -> float:
    """A ``--filter-threshold`` (hnd-edge, hnd-bench) for ``cfg``'s model: ConfigError when the model has no
    neural filter or the value breaks :func:`filter_threshold_problem`'s rule; else the threshold."""
    if cfg.model.filter is None:
        raise ConfigError(f"--filter-threshold: {cfg.path} has no neural filter (add a model.filter section)")
    problem = filter_threshold_problem(threshold)
    if problem:
        raise ConfigError(f"--filter-threshold {problem}")
    return threshold


@dataclass
class FilterConfig:
    """The GHND neural filter (Ext4ResNet on the stem output, in the head): the edge skips a frame
    whose probability of holding anything to detect is below ``threshold``.

    Its weights come from ``checkpoint`` when given (the original's separate ext file, ours from
    ``hnd-train`` with ``train.method: filter``, or any checkpoint holding the filter's keys; it
    overrides filter weights in ``model.checkpoint``), else from ``model.checkpoint`` (a full
    student saved with its filter), else from ``model.random_weights``.
    """

    threshold: float = 0.01  # the original's ext config; hnd-edge --filter-threshold overrides it
    checkpoint: str | None = None


@dataclass
class ModelConfig:
    """A detector and where its weights come from."""

    kind: str
    bottleneck_channels: int | None = None  # None: the teacher (plain ResNet-50 layer1)
    # hnd: layer1 replaced by the HND bottleneck; entropic: stem + layer1 replaced by sc2bench's
    # Entropic Student bottleneck (learned entropy coding; docs/ENTROPIC.md).
    bottleneck_type: str = "hnd"
    num_classes: int | None = None  # default 91, or 2 for keypoint_rcnn
    params: dict[str, Any] = field(default_factory=dict)  # torchvision kwargs: min_size, max_size, ...
    checkpoint: str | None = None  # our format, the original's, or a bare state dict
    weights_url: str | None = None  # torchvision full-model weights (downloaded only when named)
    random_weights: int | None = None  # seed; only when asked for explicitly
    filter: FilterConfig | None = None  # neural filter (students only); None: no filter, keys unchanged


@dataclass
class DataSplitConfig:
    images: str  # folder, relative to dataset.root
    annotations: str  # COCO json, relative to dataset.root
    remove_non_annotated_imgs: bool = False


@dataclass
class DatasetConfig:
    root: str
    name: str = "coco2017"
    num_workers: int = 4
    aspect_ratio_group_factor: int = 3
    splits: dict[str, DataSplitConfig] = field(default_factory=dict)


@dataclass
class OptimizerConfig:
    type: str = "adam"  # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1


@dataclass
class StageConfig:
    """A second training stage's schedule (the Entropic Student's detection fine-tuning)."""

    epochs: int = 5
    optimizer: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(type="sgd", lr=1e-4, momentum=0.9, weight_decay=5e-4)
    )
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(milestones=[3]))
    warmup_iters: int = 0


@dataclass
class TrainConfig:
    method: str = "ghnd"  # hnd | ghnd | supervised | filter | entropic
    epochs: int = 20
    batch_size: int = 4
    log_freq: int = 1000
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    warmup_iters: int = 1000
    distill_layers: list[str] = field(default_factory=lambda: ["backbone.body.layer1"])
    trainable: list[str] = field(default_factory=lambda: ["backbone.body.conv1", "backbone.body.layer1"])
    holdout_fraction: float = 0.1
    seed: int = 0
    # entropic: stage 1's rate weight (loss += beta * bits) and stage 2's schedule (train/entropic.py).
    beta: float = 0.0
    stage2: StageConfig | None = None
    # entropic stage 1: learning rate of the prior (the entropy bottleneck's densities and quantiles);
    # None = train.optimizer.lr, as sc2bench. A higher one lets the rate converge in a short (CPU) run.
    prior_lr: float | None = None


@dataclass
class RuntimeConfig:
    """Codec settings and serving limits shared by hnd-server, hnd-edge and hnd-bench."""

    bits: int = 8
    granularity: str = "tensor"  # tensor | channel | original
    compression: str = "zstd"  # zstd | none
    level: int = 3
    port: int = 50051
    max_message_bytes: int = 32 * 1024 * 1024
    max_batch: int = 8
    max_delay_ms: float = 0.0
    max_queue: int = 64
    max_inflight: int = 4
    deadline_s: float = 30.0

    @property
    def codec(self) -> codec.CodecSettings:
        """bits / granularity / compression / level as the one validated codec type (CodecError if invalid;
        a loaded config has been checked, so it is valid there)."""
        return codec.CodecSettings(self.bits, self.granularity, self.compression, self.level)


@dataclass
class Config:
    model: ModelConfig
    teacher: ModelConfig | None = None
    dataset: DatasetConfig | None = None
    train: TrainConfig | None = None
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    path: str = field(default="<memory>", metadata={"from_file": False})


_CHOICES = {
    ("model", "kind"): MODEL_KINDS,
    ("model", "bottleneck_type"): BOTTLENECK_TYPES,
    ("teacher", "kind"): MODEL_KINDS,
    ("train", "method"): ("hnd", "ghnd", "supervised", "filter", "entropic"),
    ("optimizer", "type"): ("adam", "sgd"),
    ("runtime", "bits"): (codec.LEARNED_BITS, *codec.BITS),
    ("runtime", "granularity"): codec.GRANULARITIES,
    ("runtime", "compression"): codec.ALL_COMPRESSIONS,
}


def _check_type(value: Any, hint: Any, where: str, path: str) -> Any:
    """Check ``value`` against a simple type hint (int, float, str, bool, list[...], dict[...], X | None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(value, inner[0], where, path)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, where, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_type(v, item, f"{where}[{i}]", path) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {k: _check_type(v, item, f"{where}.{k}", path) for k, v in value.items()}
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: {where}: expected {hint.__name__}, got {value!r}")
    return value


def _build(cls: type, data: Any, where: str, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("from_file", True)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"{path}: unknown key {prefix}{unknown[0]} (expected one of: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}: missing required key {key}")
            continue
        value = _check_type(data[name], hints[name], key, path)
        choices = _CHOICES.get((where.rsplit(".", 1)[-1], name))
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(f"{path}: {key}: {value!r} is not one of {', '.join(map(str, choices))}")
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any], path: str = "<memory>") -> Config:
    """Build and validate a Config from a parsed YAML mapping."""
    cfg = _build(Config, data, "", path)
    cfg.path = path
    for section in (cfg.model, cfg.teacher):
        if section is not None and section.bottleneck_channels is not None and section.bottleneck_channels < 1:
            raise ConfigError(f"{path}: bottleneck_channels must be >= 1")
    if cfg.teacher is not None and cfg.teacher.bottleneck_type != "hnd":
        raise ConfigError(f"{path}: teacher.bottleneck_type: the teacher has no bottleneck")
    if cfg.model.bottleneck_type == "entropic":
        if cfg.model.bottleneck_channels is None:
            raise ConfigError(f"{path}: model.bottleneck_type entropic needs model.bottleneck_channels (sc2bench: 24)")
        if cfg.model.filter is not None:
            raise ConfigError(
                f"{path}: model.filter: the neural filter taps the ResNet stem, which an Entropic Student does not have"
            )
    if cfg.teacher is not None and cfg.teacher.filter is not None:
        raise ConfigError(f"{path}: teacher.filter: a neural filter belongs to the student (model.filter)")
    flt = cfg.model.filter
    if flt is not None:
        if cfg.model.bottleneck_channels is None:
            raise ConfigError(
                f"{path}: model.filter needs a student (model.bottleneck_channels): "
                "the filter sits in the bottleneck encoder's slot"
            )
        problem = filter_threshold_problem(flt.threshold)
        if problem:
            raise ConfigError(f"{path}: model.filter.threshold {problem}")
    if cfg.train is not None and (cfg.train.method == "entropic") != (cfg.model.bottleneck_type == "entropic"):
        raise ConfigError(f"{path}: train.method entropic and model.bottleneck_type entropic go together")
    if cfg.train is not None and cfg.train.method == "entropic" and (cfg.train.stage2 is None or cfg.train.beta < 0):
        raise ConfigError(f"{path}: train.method entropic needs train.beta >= 0 and a train.stage2 section")
    if cfg.train is not None and cfg.train.prior_lr is not None and not cfg.train.prior_lr > 0:
        raise ConfigError(f"{path}: train.prior_lr must be > 0 (or absent: train.optimizer.lr)")
    if cfg.train is not None and cfg.train.method == "filter" and flt is None:
        raise ConfigError(
            f"{path}: train.method filter needs a model.filter section (e.g. filter: {{threshold: 0.01}})"
        )
    if cfg.teacher is not None and cfg.teacher.kind != cfg.model.kind:
        raise ConfigError(f"{path}: teacher.kind {cfg.teacher.kind} and model.kind {cfg.model.kind} disagree")
    rt = cfg.runtime
    if cfg.model.bottleneck_type == "entropic" and (rt.compression, rt.bits, rt.granularity) != (
        "learned",
        0,
        "channel",
    ):
        raise ConfigError(
            f"{path}: runtime: an Entropic Student's bottleneck is entropy-coded against its prior: "
            "set runtime {bits: 0, granularity: channel, compression: learned}"
        )
    if cfg.model.bottleneck_type != "entropic" and (rt.compression == "learned" or rt.bits == 0):
        raise ConfigError(
            f"{path}: runtime: compression learned / bits 0 is for Entropic Student models "
            "(model.bottleneck_type: entropic)"
        )
    try:  # the codec's own rules (CodecSettings), once the model's are met
        codec.CodecSettings(rt.bits, rt.granularity, rt.compression, rt.level)
    except codec.CodecError as exc:
        raise ConfigError(f"{path}: runtime: {exc}") from None
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a YAML config file; a name like ``test/faster_rcnn-b3ch`` also finds the bundled configs."""
    p = resolve_config_path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read: {exc}") from None
    return config_from_dict(data, str(p))


def resolve_config_path(path: str | Path) -> Path:
    """A config file path, or the name of a bundled config (``hnd/faster_rcnn-b3ch``)."""
    p = Path(path)
    if p.is_file():
        return p
    name = str(path).removesuffix(".yaml") + ".yaml"
    bundled = resources.files("hnd.configs").joinpath(name)
    if bundled.is_file():
        return Path(str(bundled))
    raise ConfigError(f"{path}: no such config file (nor a bundled config of that name)")


def with_weights(
    model_cfg: ModelConfig, checkpoint: str | None = None, random_weights: int | None = None
) -> ModelConfig:
    """The model config with command-line weight options applied (they override the file's)."""
    if checkpoint is not None and random_weights is not None:
        raise ConfigError("give either --checkpoint or --random-weights, not both")
    if checkpoint is not None:
        return dataclasses.replace(model_cfg, checkpoint=checkpoint, weights_url=None, random_weights=None)
    if random_weights is not None:
        return dataclasses.replace(model_cfg, checkpoint=None, weights_url=None, random_weights=random_weights)
    return model_cfg
