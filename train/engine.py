"""The training engine under every hnd-train recipe: epoch loop, held-out selection, checkpoints, resume.

As torchvision's references keep ``engine.py`` (``train_one_epoch``, ``evaluate``) apart from
``train.py`` (the recipe), the recipes here (``hnd.train.train``: HND / GHND distillation and supervised
training; ``hnd.train.filter``: the neural filter; the Entropic Student) only say *what* trains and
how a batch becomes a loss. They hand :func:`fit` a :class:`Recipe`:

* ``params``: the trainable parameters (or torch optimizer parameter groups). Nothing else is given
  to the optimizer; the recipe freezes the rest (``requires_grad_(False)``).
* ``step(images, targets) -> (loss, terms)``: one batch. ``images`` are on the device, ``targets`` as
  the loader gives them (move what the loss needs). ``loss`` is a scalar tensor the engine
  back-propagates; ``terms`` are floats logged per iteration (e.g. one per distilled layer). A
  recipe with an auxiliary loss (e.g. an entropy bottleneck's) adds it into ``loss``.
* ``train_modes()``: put the model in its training modes before each epoch (e.g. only the trained
  modules in train mode, frozen BatchNorms in eval mode).
* ``save(path, entries, best)``: write a checkpoint holding the recipe's weights and ``entries``
  (epoch, best value, selection, method, config; plus optimizer / scheduler / RNG / history in
  ``last.pt``). ``load(path) -> entries`` reads a ``last.pt`` back into the model for ``--resume``,
  ``check_resume(entries)`` refuses one written for another setup (raise :class:`HndError`).
* ``loss_average``: ``"batch"`` (the epoch's train_loss is the mean of the batch losses: sum-reduced
  losses) or ``"image"`` (weighted by batch size: mean-reduced losses).

and a :class:`Selection` (how to score an epoch on held-out data, or ``last``). :func:`fit` builds
the optimizer (``train.optimizer``) and the MultiStepLR schedule (``train.scheduler``, stepped once
per epoch) with an epoch-0 linear warmup (``train.warmup_iters``); each epoch it trains, scores,
writes ``best.pt`` when the score improves, appends to ``log.jsonl`` and writes ``last.pt``
atomically (weights, optimizer, scheduler, epoch, best value, RNG state, history), so that
``--resume`` continues and reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from hnd.common.config import Config, DatasetConfig, OptimizerConfig, TrainConfig
from hnd.common.errors import HndError

PROG = "hnd-train"

Step = Callable[[list[torch.Tensor], list[dict[str, Any]]], tuple[torch.Tensor, dict[str, float]]]


# ---------------------------------------------------------------------------------------------
# Options, paths, logging


@dataclass
class TrainOptions:
    """Command-line settings that are not part of the config."""

    output_dir: str | None = None
    device: str = "cpu"
    workers: int | None = None  # None: dataset.num_workers
    epochs: int | None = None  # None: train.epochs
    resume: bool = False
    select_by: str = "bbox"  # bbox | loss | last
    progress: bool = True
    train_bn: bool = False  # supervised from scratch: train the backbone's batch norms (see unfreeze_batchnorm)

    def epochs_of(self, tcfg: TrainConfig) -> int:
        """``--epochs``, else the config's ``train.epochs``."""
        return tcfg.epochs if self.epochs is None else self.epochs

    def workers_of(self, dataset: DatasetConfig) -> int:
        """``--workers``, else the config's ``dataset.num_workers``."""
        return dataset.num_workers if self.workers is None else self.workers


def default_output_dir(cfg: Config) -> Path:
    return Path("resource") / "train" / Path(str(cfg.path)).stem


def check_sections(cfg: Config) -> TrainConfig:
    """The train section of a config that can be trained (train and dataset sections present)."""
    if cfg.train is None or cfg.dataset is None:
        raise HndError(cfg.path, "hnd-train needs the train and dataset sections")
    return cfg.train


@dataclass
class RunPaths:
    """Where a run writes: ``best`` (the selected weights), ``last.pt`` (resume) and ``log.jsonl``."""

    out_dir: Path
    best: Path
    last: Path
    log: Path

    @classmethod
    def of(cls, cfg: Config, options: TrainOptions, configured_best: str | None) -> RunPaths:
        """``--output-dir`` (default ``resource/train/<config>``); best goes to ``<out>/best.pt`` when
        ``--output-dir`` is given or nothing is configured, else to ``configured_best``."""
        out_dir = Path(options.output_dir) if options.output_dir else default_output_dir(cfg)
        best = out_dir / "best.pt" if options.output_dir or not configured_best else Path(configured_best)
        return cls(out_dir, best, out_dir / "last.pt", out_dir / "log.jsonl")


class JsonlLog:
    """Append-only JSON-lines log (one record per line, flushed each time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def progress_bar(loader: Iterable, desc: str, enabled: bool) -> Iterable:
    """A tqdm bar over ``loader`` (only on a terminal), or the loader itself when disabled."""
    if not enabled:
        return loader
    return tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=None, leave=False)


# ---------------------------------------------------------------------------------------------
# Optimisation and state


def make_optimizer(params: Sequence[Any], opt_cfg: OptimizerConfig) -> torch.optim.Optimizer:
    if opt_cfg.type == "adam":
        return torch.optim.Adam(params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    if opt_cfg.type == "sgd":
        return torch.optim.SGD(params, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    raise HndError("train.optimizer.type", f"unknown optimizer {opt_cfg.type!r}")


def warmup_scheduler(
    optimizer: torch.optim.Optimizer, iterations: int, warmup_iters: int, warmup_factor: float = 1e-3
) -> torch.optim.lr_scheduler.LambdaLR:
    """torchvision references' warmup: factor warmup_factor -> 1 linearly over min(warmup_iters, iterations - 1)."""
    n = min(warmup_iters, iterations - 1)

    def factor(i: int) -> float:
        if i >= n:
            return 1.0
        alpha = i / n
        return warmup_factor * (1 - alpha) + alpha

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def rng_state() -> dict[str, Any]:
    """torch's (and CUDA's) RNG state, for ``last.pt``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_training_state(
    state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, float, int, list]:
    """Load optimizer, scheduler and RNG state of a ``last.pt``; returns (start epoch, best value, best epoch, history)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    set_rng_state(state["rng"])
    return (
        int(state["epoch"]) + 1,
        float(state["best_value"]),
        int(state["best_epoch"]),
        list(state.get("history", [])),
    )


# ---------------------------------------------------------------------------------------------
# What a recipe gives the engine


@dataclass
class Selection:
    """How an epoch is scored: ``evaluate()`` on held-out data, or the epoch number (``last``)."""

    name: str  # recorded as select_by: "bbox", "loss", "roc_auc", "last"
    evaluate: Callable[[], float] | None = None  # None: "last" (the score is the epoch number)
    record_key: str | None = None  # the epoch record's name for the score, e.g. "heldout_bbox_AP"
    higher_is_better: bool = True


@dataclass
class Recipe:
    """What one training method supplies to :func:`fit` (see the module docstring)."""

    method: str  # recorded in the checkpoints: hnd | ghnd | supervised | filter | ...
    params: Sequence[Any]  # trainable parameters, or optimizer parameter groups
    step: Step
    train_modes: Callable[[], None]
    save: Callable[[Path, dict[str, Any], bool], None]  # (path, entries, best)
    load: Callable[[Path], dict[str, Any]]  # last.pt into the model; returns its entries
    check_resume: Callable[[dict[str, Any]], None] = lambda entries: None
    loss_average: str = "batch"  # batch | image


@dataclass
class FitResult:
    best_value: float
    best_epoch: int
    select_by: str
    paths: RunPaths
    history: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What hnd-train's ``train()`` returns: best value / epoch, selection, paths, history."""
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "select_by": self.select_by,
            "best": str(self.paths.best),
            "last": str(self.paths.last),
            "log": str(self.paths.log),
            "history": self.history,
        }


# ---------------------------------------------------------------------------------------------
# The loop


def train_one_epoch(
    recipe: Recipe,
    loader: Any,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    device: str,
    warmup_iters: int = 0,
    log: JsonlLog | None = None,
    log_freq: int = 100,
    progress: bool = True,
) -> dict[str, float]:
    """One pass over ``loader`` with ``recipe.step``; returns {"loss": mean loss, "images", "seconds", "lr"}."""
    warmup = warmup_scheduler(optimizer, len(loader), warmup_iters) if epoch == 0 and warmup_iters > 0 else None
    recipe.train_modes()
    total, n_images, start = 0.0, 0, time.perf_counter()
    bar = progress_bar(loader, f"epoch {epoch}", progress)
    for it, (images, targets) in enumerate(bar):
        images = [img.to(device) for img in images]
        loss, terms = recipe.step(images, list(targets))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise HndError(
                "training",
                f"loss is {value} at epoch {epoch} iteration {it} ({terms}); "
                "lower train.optimizer.lr or raise train.warmup_iters",
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if warmup is not None:
            warmup.step()
        total += value * (len(images) if recipe.loss_average == "image" else 1)
        n_images += len(images)
        rate = n_images / max(time.perf_counter() - start, 1e-9)
        lr = optimizer.param_groups[0]["lr"]
        if isinstance(bar, tqdm):
            bar.set_postfix(loss=f"{value:.4g}", img_s=f"{rate:.2f}", lr=f"{lr:.2e}")
        if it % log_freq == 0 or it == len(loader) - 1:
            if log is not None:
                log.write(
                    kind="iter", epoch=epoch, iter=it, loss=value, terms=terms, lr=lr, images_per_s=round(rate, 3)
                )
            if getattr(bar, "disable", True):  # no live progress bar (off, or not a terminal): print a line
                print(
                    f"{PROG}: epoch {epoch} iter {it}/{len(loader)} loss {value:.4g} lr {lr:.2e} {rate:.2f} img/s",
                    file=sys.stderr,
                    flush=True,
                )
    seconds = time.perf_counter() - start
    count = n_images if recipe.loss_average == "image" else len(loader)
    return {
        "loss": total / max(count, 1),
        "images": n_images,
        "seconds": seconds,
        "lr": optimizer.param_groups[0]["lr"],
    }


def fit(
    recipe: Recipe,
    loader: Any,
    tcfg: TrainConfig,
    selection: Selection,
    paths: RunPaths,
    *,
    epochs: int,
    device: str,
    resume: bool,
    progress: bool,
    config: dict[str, Any],
    banner: str,
    set_epoch: Callable[[Any, int], None] | None = None,
    shown_output: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``recipe`` for ``epochs`` epochs (from ``last.pt`` with ``resume``), selecting by ``selection``.

    ``banner``: what trains, on what (printed with the epochs, selection and output);
    ``set_epoch(loader, epoch)``: reseeds the loader's sampler per epoch; ``config``: the config as a dict,
    stored in every checkpoint.
    """
    log = JsonlLog(paths.log)
    optimizer = make_optimizer(recipe.params, tcfg.optimizer)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, tcfg.scheduler.milestones, tcfg.scheduler.gamma)
    start_epoch, state = 0, FitState.fresh(selection.higher_is_better)
    if resume:
        start_epoch, state = resume_from(paths.last, recipe, selection, optimizer, scheduler)
    print(
        f"{PROG}: {banner}, epochs {start_epoch}..{epochs - 1}, select by {selection.name}, "
        f"output {shown_output if shown_output is not None else paths.out_dir}",
        file=sys.stderr,
    )

    common = {"select_by": selection.name, "method": recipe.method, "config": config}
    for epoch in range(start_epoch, epochs):
        if set_epoch is not None:
            set_epoch(loader, epoch)
        stats = train_one_epoch(
            recipe,
            loader,
            optimizer,
            epoch,
            device,
            warmup_iters=tcfg.warmup_iters,
            log=log,
            log_freq=max(tcfg.log_freq, 1),
            progress=progress,
        )
        scheduler.step()  # once per epoch (the original's coco_runner stepped twice)
        record = epoch_record(epoch, stats)
        value = score_epoch(selection, epoch, record)
        if state.improves(value, epoch):
            recipe.save(paths.best, {"epoch": epoch, "best_value": float(value), **common}, True)
        record.update(best_epoch=state.best_epoch, best_value=state.best_value)
        state.history.append(record)
        log.write(kind="epoch", **record)
        recipe.save(paths.last, last_entries(optimizer, scheduler, epoch, state, common), False)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
        print(f"{PROG}: {json.dumps(shown)}", file=sys.stderr)
    return FitResult(state.best_value, state.best_epoch, selection.name, paths, state.history)


@dataclass
class FitState:
    """Where a run stands: the best score so far and its epoch (-1: none yet), and the epoch records."""

    higher_is_better: bool
    best_value: float
    best_epoch: int = -1
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def fresh(cls, higher_is_better: bool) -> FitState:
        """No epoch yet: the best is the worst score there is."""
        return cls(higher_is_better, -math.inf if higher_is_better else math.inf)

    def improves(self, value: float, epoch: int) -> bool:
        """Takes ``value`` (of ``epoch``) as the best when it beats the best so far; returns whether it did."""
        sign = 1.0 if self.higher_is_better else -1.0
        if sign * value > sign * self.best_value:
            self.best_value, self.best_epoch = value, epoch
            return True
        return False


def resume_from(
    last: Path, recipe: Recipe, selection: Selection, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, FitState]:
    """Loads ``last`` (``last.pt``) into the model, optimizer, scheduler and RNG; returns (the next epoch, the
    run's state). HndError when there is none, or it was written by another method or selection."""
    if not last.is_file():
        raise HndError(last, "nothing to resume (no checkpoint from an earlier run)")
    state = recipe.load(last)
    if state.get("method") != recipe.method or state.get("select_by") != selection.name:
        raise HndError(
            last,
            f"was written by a {state.get('method')} run selecting by "
            f"{state.get('select_by')}, not {recipe.method} / {selection.name}",
        )
    recipe.check_resume(state)
    start_epoch, best_value, best_epoch, history = restore_training_state(state, optimizer, scheduler)
    print(f"{PROG}: resuming {last} at epoch {start_epoch}", file=sys.stderr)
    return start_epoch, FitState(selection.higher_is_better, best_value, best_epoch, history)


def epoch_record(epoch: int, stats: dict[str, float]) -> dict[str, Any]:
    """The epoch's log record from ``train_one_epoch``'s stats (the score and the best are added later)."""
    return {
        "epoch": epoch,
        "train_loss": stats["loss"],
        "seconds": round(stats["seconds"], 3),
        "images_per_s": round(stats["images"] / max(stats["seconds"], 1e-9), 3),
    }


def score_epoch(selection: Selection, epoch: int, record: dict[str, Any]) -> float:
    """The epoch's score: ``selection.evaluate()`` (also put in ``record`` under its key), or the epoch number
    (``last``)."""
    if selection.evaluate is None:
        return float(epoch)
    value = selection.evaluate()
    if selection.record_key:
        record[selection.record_key] = value
    return value


def last_entries(
    optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, state: FitState, common: dict[str, Any]
) -> dict[str, Any]:
    """What ``last.pt`` holds besides the weights: optimizer, scheduler, epoch, best, RNG, history."""
    return {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "best_value": float(state.best_value),
        "best_epoch": state.best_epoch,
        **common,
        "rng": rng_state(),
        "history": state.history,
    }


def count_parameters(params: Sequence[Any]) -> int:
    """Elements in a parameter list or in optimizer parameter groups."""
    total = 0
    for p in params:
        total += sum(q.numel() for q in p["params"]) if isinstance(p, dict) else p.numel()
    return total
