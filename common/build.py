"""Models from config sections: the architecture, then its weights (checkpoint, URL or seed).

``hnd.common.config`` is the schema only; this module turns a ``ModelConfig`` into a module.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from hnd.common.checkpoint import CheckpointError, load_checkpoint, load_filter, load_weights
from hnd.common.config import ConfigError, ModelConfig
from hnd.common.entropic import entropic_bottleneck_of, is_entropic, update_entropy_tables
from hnd.common.models import build_model
from hnd.common.neural_filter import FILTER_PREFIX, attach_filter, get_filter

log = logging.getLogger(__name__)


def pick_device(name: str) -> torch.device:
    """``--device`` (hnd.common.flags.add_device_argument) as a torch device: ``auto`` is cuda when one
    is available, else cpu; asking for cuda where there is none is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


def build_architecture(model_cfg: ModelConfig) -> nn.Module:
    """The configured model with initial weights from torch's global RNG, filter attached when configured.

    The filter is attached after the detector is built, so the detector's initial weights (and
    keys) are the same with or without it.
    """
    model = build_model(
        model_cfg.kind,
        model_cfg.bottleneck_channels,
        model_cfg.num_classes,
        bottleneck_type=model_cfg.bottleneck_type,
        **model_cfg.params,
    )
    if model_cfg.filter is not None:
        attach_filter(model, model_cfg.filter.threshold)
    return model


def build_model_from_config(model_cfg: ModelConfig, config_path: str = "<config>") -> nn.Module:
    """Build the configured model and load its weights; eval mode.

    Order: ``checkpoint`` (must exist), else ``weights_url``, else ``random_weights`` (seeded,
    with a warning). With none of them it is an error: never a silent random model.
    With a ``filter`` section the neural filter's weights come from ``filter.checkpoint`` when
    given (loaded last, so it wins), else from ``checkpoint`` or the seed; a checkpoint without
    filter weights and no ``filter.checkpoint`` is an error, and so is a checkpoint holding a
    filter when the config has none.
    """
    flt = model_cfg.filter
    filter_file = flt.checkpoint if flt is not None else None
    if filter_file is not None and not Path(filter_file).is_file():
        raise ConfigError(
            f"{config_path}: model.filter.checkpoint {filter_file} does not exist "
            "(train it with hnd-train and train.method filter)"
        )

    def finish(model: nn.Module) -> nn.Module:
        if filter_file is not None:
            load_filter(filter_file, get_filter(model))
        return model.eval()

    if model_cfg.checkpoint is not None:
        if not Path(model_cfg.checkpoint).is_file():
            raise ConfigError(
                f"{config_path}: checkpoint {model_cfg.checkpoint} does not exist "
                "(train it with hnd-train, pass --checkpoint, or ask for --random-weights SEED)"
            )
        model = build_architecture(model_cfg)
        # Filter keys may be missing from the main file only when the filter comes from its own file.
        ckpt = load_checkpoint(model_cfg.checkpoint, model, optional=(FILTER_PREFIX,) if filter_file else ())
        if is_entropic(model) and not entropic_bottleneck_of(model).updated:
            # Tables computed here could differ from the edge's (other hardware): only a file's tables count.
            log.warning(
                "%s: the entropy bottleneck has no CDF tables (stage-1 checkpoint?): "
                "entropy coding is unavailable until hnd-train writes them",
                model_cfg.checkpoint,
            )
        if flt is not None and filter_file is None and not any(k.startswith(FILTER_PREFIX) for k in ckpt["model"]):
            raise CheckpointError(
                f"{model_cfg.checkpoint}: holds no neural filter weights; set "
                "model.filter.checkpoint to the filter's file"
            )
        return finish(model)
    if model_cfg.weights_url is not None:
        if flt is not None:
            raise ConfigError(f"{config_path}: model.filter needs a student; weights_url names torchvision weights")
        model = build_architecture(model_cfg)
        load_weights(model_cfg.weights_url, model)
        return model.eval()
    if model_cfg.random_weights is not None:
        log.warning("using seeded random weights (seed %d): detections are meaningless", model_cfg.random_weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_cfg.random_weights)
            model = build_architecture(model_cfg)
        if is_entropic(model):
            update_entropy_tables(model)  # seeded test models: tables from the seeded densities, on CPU
        return finish(model)
    raise ConfigError(
        f"{config_path}: the model has no weights: set model.checkpoint, model.weights_url or "
        "model.random_weights (or pass --checkpoint / --random-weights SEED)"
    )
