"""hnd-train: HND / GHND distillation of the bottleneck, or supervised training of a teacher.

``hnd-train --config C [--resume] [--device cpu|cuda] [--workers N] [--epochs N] [--output-dir D]``

Distillation (``train.method: hnd | ghnd``), as in the original (ORIGINAL.md section 2):

* teacher and student are built from the config; every student weight outside the
  bottleneck (``backbone.body.layer1``) is copied from the teacher, the stem conv included;
* only ``train.trainable`` (conv1 + the bottleneck) is trained; everything else is frozen.
  The teacher runs in eval mode under no_grad. Only the backbone runs
  (``distill_backbone_only``), up to the deepest distilled layer;
* loss = sum over ``train.distill_layers`` of MSE(reduction="sum") between student and
  teacher outputs of that module (HND: layer1; GHND: layer1..layer4), captured with
  forward hooks; both see the same transformed batch (the student's transform);
* Adam (or SGD) + MultiStepLR stepped once per epoch, plus an epoch-0 linear warmup
  (LambdaLR, factor 1e-3 -> 1 over min(warmup_iters, iterations - 1)).

``train.method: supervised`` trains the configured model with torchvision's detection losses
(the org configs: SGD, the same schedule and warmup), e.g. to get a teacher.

Model selection: a held-out part of the train split (``train.holdout_fraction``, seeded by
``train.seed``), never val or test. ``--select-by bbox`` (default) keeps the epoch with the
best held-out bbox AP; ``loss`` the lowest held-out distillation loss (cheaper: backbone only);
``last`` the last epoch. Every epoch writes ``<output-dir>/last.pt`` atomically (weights,
optimizer, scheduler, epoch, best value, config, RNG state) and appends to ``log.jsonl``;
``--resume`` continues from it and reproduces an uninterrupted run bit for bit.
The best model goes to ``<output-dir>/best.pt`` when ``--output-dir`` is given, else to the
config's ``model.checkpoint`` (where hnd-eval and hnd-server look for it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from hnd.train.errors import HndError

BOTTLENECK_PREFIX = "backbone.body.layer1."
DISTILL_METHODS = ("hnd", "ghnd")


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


# ---------------------------------------------------------------------------------------------
# Models


def copy_teacher_weights(teacher: nn.Module, student: nn.Module, skip_prefix: str = BOTTLENECK_PREFIX) -> list[str]:
    """Copy every student weight outside ``skip_prefix`` from the teacher (in place); return the copied keys.

    Raises HndError when a key is missing from the teacher or has another shape
    (e.g. a different num_classes).
    """
    t_sd = teacher.state_dict()
    copied = []
    with torch.no_grad():
        for key, value in student.state_dict().items():
            if key.startswith(skip_prefix):
                continue
            if key not in t_sd:
                raise HndError("teacher", f"has no weight {key} to copy into the student")
            if t_sd[key].shape != value.shape:
                raise HndError("teacher", f"{key} has shape {tuple(t_sd[key].shape)}, the student's is "
                                          f"{tuple(value.shape)} (do num_classes / num_keypoints agree?)")
            value.copy_(t_sd[key])
            copied.append(key)
    return copied


def build_distillation_models(cfg: Any) -> tuple[nn.Module, nn.Module]:
    """(teacher, student) of a distillation config; the student's non-bottleneck weights are the teacher's.

    The student's bottleneck is initialised from ``model.random_weights`` (or ``train.seed``);
    ``model.checkpoint`` is where training writes the result, so it is not read here.
    """
    from hnd.common.config import build_model_from_config
    from hnd.common.models import build_model

    if cfg.teacher is None:
        raise HndError(cfg.path, f"train.method {cfg.train.method} needs a teacher section")
    if cfg.teacher.kind != cfg.model.kind:
        raise HndError(cfg.path, f"teacher.kind {cfg.teacher.kind} and model.kind {cfg.model.kind} disagree")
    if cfg.teacher.bottleneck_channels is not None:
        raise HndError(cfg.path, "the teacher must not have a bottleneck (teacher.bottleneck_channels)")
    if cfg.model.bottleneck_channels is None:
        raise HndError(cfg.path, "the student needs model.bottleneck_channels")
    teacher = build_model_from_config(cfg.teacher, cfg.path)
    seed = cfg.model.random_weights if cfg.model.random_weights is not None else cfg.train.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_model(cfg.model.kind, cfg.model.bottleneck_channels, cfg.model.num_classes,
                              **cfg.model.params)
    copy_teacher_weights(teacher, student)
    return teacher, student


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_except(model: nn.Module, trainable: Sequence[str]) -> list[str]:
    """requires_grad only for parameters under the ``trainable`` module prefixes; return their names."""
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(_matches(name, trainable))
        if p.requires_grad:
            names.append(name)
    if not names:
        raise HndError("train.trainable", f"no parameter matches {list(trainable)}")
    return names


class SwappedBatchNorm2d(nn.BatchNorm2d):
    """A FrozenBatchNorm2d made trainable by :func:`unfreeze_batchnorm`; folded back on save."""


def unfreeze_batchnorm(model: nn.Module) -> int:
    """Replace every FrozenBatchNorm2d by a trainable BatchNorm2d with the same statistics; return how many.

    Our R-CNNs use FrozenBatchNorm2d (as the original and torchvision's pretrained models):
    fine for fine-tuning, but a network trained from random weights gets no normalisation
    at all. For from-scratch supervised training (``--train-bn``) the norms train as usual
    BatchNorm2d and :func:`fold_batchnorm` turns them back before the model is saved.
    """
    from torchvision.ops import FrozenBatchNorm2d

    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                bn = SwappedBatchNorm2d(child.weight.numel())
                with torch.no_grad():
                    bn.weight.copy_(child.weight)
                    bn.bias.copy_(child.bias)
                    bn.running_mean.copy_(child.running_mean)
                    bn.running_var.copy_((child.running_var + child.eps - bn.eps).clamp_(min=0))
                setattr(parent, name, bn.to(child.weight.device))
                count += 1
    return count


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose SwappedBatchNorm2d layers are FrozenBatchNorm2d again (eps 0, as built).

    Same eval-mode function; the state dict then loads into a model from ``build_model``.
    """
    import copy
    from torchvision.ops import FrozenBatchNorm2d

    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, SwappedBatchNorm2d):
                frozen = FrozenBatchNorm2d(child.num_features, eps=0.0)
                with torch.no_grad():
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var + child.eps)
                setattr(parent, name, frozen.to(child.weight.device))
    return model


def set_distillation_modes(student: nn.Module, trainable: Sequence[str]) -> None:
    """Train mode only where weights train (the bottleneck's BatchNorms use batch statistics);
    frozen parts stay in eval mode so no running statistic of theirs moves. The transform is
    in train mode so multi-size configs (keypoints) pick a random size as in training."""
    student.eval()
    for name, module in student.named_modules():
        if name and _matches(name, trainable):
            module.train()
    student.transform.train()


def set_supervised_modes(model: nn.Module) -> None:
    """Train mode (RPN / ROI heads need it for their losses), but frozen BatchNorms in eval mode."""
    model.train()
    for module in model.modules():
        if isinstance(module, _BatchNorm) and not any(p.requires_grad for p in module.parameters()):
            module.eval()


# ---------------------------------------------------------------------------------------------
# Distillation loss


@contextmanager
def capture_outputs(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks that store the outputs of the named modules into the yielded dict."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise HndError("train.distill_layers", f"the model has no module {name}") from None
            handles.append(module.register_forward_hook(lambda _m, _i, out, n=name: store.__setitem__(n, out)))
        yield store
    finally:
        for h in handles:
            h.remove()


def backbone_features(model: nn.Module, batch: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Outputs of the named modules for a transformed batch [B, 3, H, W]; runs as little as needed.

    When every name is a child of ``backbone.body`` the body runs only up to the deepest
    of them (HND needs layer1 only); otherwise the whole backbone (FPN included) runs.
    """
    body_prefix = "backbone.body."
    with capture_outputs(model, names) as store:
        if all(n.startswith(body_prefix) and "." not in n[len(body_prefix):] for n in names):
            body = model.backbone.body
            wanted = {n[len(body_prefix):] for n in names}
            x = batch
            for child_name, child in body.items():
                x = child(x)
                wanted.discard(child_name)
                if not wanted:
                    break
        else:
            model.backbone(batch)
    missing = [n for n in names if n not in store]
    if missing:
        raise HndError("train.distill_layers", f"{', '.join(missing)} produced no output in the backbone")
    return store


def distillation_loss(student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over layers of sum-reduced MSE (the original's MSELoss(reduction='sum'), factor 1 each)."""
    terms = {n: nn.functional.mse_loss(student_feats[n], teacher_feats[n], reduction="sum") for n in student_feats}
    total = torch.stack(list(terms.values())).sum()
    return total, {n: float(v.detach()) for n, v in terms.items()}


def distill_layer_names(cfg: Any) -> list[str]:
    """train.distill_layers with the short forms (``layer2``) expanded to backbone.body names."""
    layers = list(cfg.train.distill_layers)
    if not layers:
        raise HndError(cfg.path, "train.distill_layers is empty")
    return [n if "." in n else f"backbone.body.{n}" for n in layers]


def distill_batch(student: nn.Module, teacher: nn.Module, images: list[torch.Tensor], layers: Sequence[str]
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Transform a batch once with the student's transform, run both backbones, return the loss."""
    with torch.no_grad():
        batch = student.transform(images)[0].tensors
        t_feats = backbone_features(teacher, batch, layers)
    s_feats = backbone_features(student, batch, layers)
    return distillation_loss(s_feats, t_feats)


# ---------------------------------------------------------------------------------------------
# Optimisation


def make_optimizer(params: list[nn.Parameter], opt_cfg: Any) -> torch.optim.Optimizer:
    if opt_cfg.type == "adam":
        return torch.optim.Adam(params, lr=opt_cfg.lr, weight_decay=opt_cfg.weight_decay)
    if opt_cfg.type == "sgd":
        return torch.optim.SGD(params, lr=opt_cfg.lr, momentum=opt_cfg.momentum, weight_decay=opt_cfg.weight_decay)
    raise HndError("train.optimizer.type", f"unknown optimizer {opt_cfg.type!r}")


def warmup_scheduler(optimizer: torch.optim.Optimizer, iterations: int, warmup_iters: int,
                     warmup_factor: float = 1e-3) -> torch.optim.lr_scheduler.LambdaLR:
    """torchvision references' warmup: factor warmup_factor -> 1 linearly over min(warmup_iters, iterations - 1)."""
    n = min(warmup_iters, iterations - 1)

    def factor(i: int) -> float:
        if i >= n:
            return 1.0
        alpha = i / n
        return warmup_factor * (1 - alpha) + alpha

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# Logging helpers


class JsonlLog:
    """Append-only JSON-lines log (one record per line, flushed each time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def _progress(loader: Any, desc: str, enabled: bool) -> Any:
    if not enabled:
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=desc, unit="batch", dynamic_ncols=True, disable=None, leave=False)


# ---------------------------------------------------------------------------------------------
# One epoch


def train_one_epoch(model: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, epoch: int, device: str,
                    teacher: nn.Module | None = None, layers: Sequence[str] = (), trainable: Sequence[str] = (),
                    warmup_iters: int = 0, log: JsonlLog | None = None, log_freq: int = 100,
                    progress: bool = True) -> dict[str, float]:
    """One pass over ``loader``: distillation when ``teacher`` is given, detection losses otherwise.

    Returns {"loss": mean loss, "images": n, "seconds": s, "lr": last lr}.
    """
    warmup = warmup_scheduler(optimizer, len(loader), warmup_iters) if epoch == 0 and warmup_iters > 0 else None
    if teacher is not None:
        set_distillation_modes(model, trainable)
    else:
        set_supervised_modes(model)
    total, n_images, start = 0.0, 0, time.perf_counter()
    bar = _progress(loader, f"epoch {epoch}", progress)
    for it, (images, targets) in enumerate(bar):
        images = [img.to(device) for img in images]
        if teacher is not None:
            loss, terms = distill_batch(model, teacher, images, layers)
        else:
            targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            loss_dict = model(images, targets)
            loss = sum(loss_dict.values())
            terms = {k: float(v.detach()) for k, v in loss_dict.items()}
        value = float(loss.detach())
        if not math.isfinite(value):
            raise HndError("training", f"loss is {value} at epoch {epoch} iteration {it} ({terms}); "
                                       "lower train.optimizer.lr or raise train.warmup_iters")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if warmup is not None:
            warmup.step()
        total += value
        n_images += len(images)
        rate = n_images / max(time.perf_counter() - start, 1e-9)
        lr = optimizer.param_groups[0]["lr"]
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4g}", img_s=f"{rate:.2f}", lr=f"{lr:.2e}")
        if it % log_freq == 0 or it == len(loader) - 1:
            if log is not None:
                log.write(kind="iter", epoch=epoch, iter=it, loss=value, terms=terms, lr=lr,
                          images_per_s=round(rate, 3))
            if getattr(bar, "disable", True):  # no live progress bar (off, or not a terminal): print a line
                print(f"hnd-train: epoch {epoch} iter {it}/{len(loader)} loss {value:.4g} lr {lr:.2e} "
                      f"{rate:.2f} img/s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    return {"loss": total / max(len(loader), 1), "images": n_images, "seconds": seconds,
            "lr": optimizer.param_groups[0]["lr"]}


@torch.no_grad()
def heldout_distillation_loss(student: nn.Module, teacher: nn.Module, loader: Any, layers: Sequence[str],
                              device: str) -> float:
    """Mean per-image distillation loss on held-out data, student fully in eval mode."""
    student.eval()
    total, n = 0.0, 0
    for images, _ in loader:
        images = [img.to(device) for img in images]
        loss, _ = distill_batch(student, teacher, images, layers)
        total += float(loss)
        n += len(images)
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------
# The run


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_training_state(state: dict[str, Any], optimizer: torch.optim.Optimizer,
                           scheduler: Any) -> tuple[int, float, int, list]:
    """Load optimizer, scheduler and RNG state of a ``last.pt``; returns (start epoch, best value, best epoch, history)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["lr_scheduler"])
    _set_rng_state(state["rng"])
    return (int(state["epoch"]) + 1, float(state["best_value"]), int(state["best_epoch"]),
            list(state.get("history", [])))


def default_output_dir(cfg: Any) -> Path:
    return Path("resource") / "train" / Path(str(cfg.path)).stem


def train(config: str | os.PathLike | Any, options: TrainOptions | None = None) -> dict[str, Any]:
    """Run training as configured; return a summary (best value, epoch, paths, history)."""
    from hnd.common.checkpoint import load_checkpoint, save_checkpoint
    from hnd.common.config import build_model_from_config, load_config
    from hnd.train.data import build_dataset, holdout_split, load_coco, make_loader, set_loader_epoch, split_paths
    from hnd.train.evaluate import evaluate_model

    options = options or TrainOptions()
    cfg = config if hasattr(config, "model") else load_config(config)
    if cfg.train is None or cfg.dataset is None:
        raise HndError(cfg.path, "hnd-train needs the train and dataset sections")
    tcfg = cfg.train
    method = tcfg.method
    if method == "filter":  # the neural filter has its own loop and selection (hnd.train.filter)
        from hnd.train.filter import train_filter

        return train_filter(cfg, options)
    if method not in DISTILL_METHODS + ("supervised",):
        raise HndError(cfg.path, f"train.method {method} is not handled by hnd-train")
    if options.select_by not in ("bbox", "loss", "last"):
        raise HndError("--select-by", f"unknown selection {options.select_by!r}")
    device = options.device
    epochs = tcfg.epochs if options.epochs is None else options.epochs
    workers = cfg.dataset.num_workers if options.workers is None else options.workers
    out_dir = Path(options.output_dir) if options.output_dir else default_output_dir(cfg)
    if options.output_dir or method == "supervised" or not cfg.model.checkpoint:
        best_path = out_dir / "best.pt"
    else:
        best_path = Path(cfg.model.checkpoint)
    last_path = out_dir / "last.pt"
    log = JsonlLog(out_dir / "log.jsonl")

    # Data: the held-out part of train selects the model; val / test stay untouched.
    _, train_ann, _ = split_paths(cfg.dataset, "train")
    all_ids = sorted(load_coco(train_ann).imgs)
    train_ids, hold_ids = holdout_split(all_ids, tcfg.holdout_fraction, tcfg.seed)
    # Distillation needs only the images: skip decoding masks.
    train_set = build_dataset(cfg.dataset, "train", cfg.model.kind, train=True, seed=tcfg.seed, ids=train_ids,
                              masks=False if method in DISTILL_METHODS else None)
    train_loader = make_loader(train_set, tcfg.batch_size, workers, train=True,
                               aspect_ratio_group_factor=cfg.dataset.aspect_ratio_group_factor, seed=tcfg.seed)
    hold_loader = None
    if hold_ids:
        hold_set = build_dataset(cfg.dataset, "train", cfg.model.kind, ids=hold_ids, remove_empty=False)
        hold_loader = make_loader(hold_set, 1 if options.select_by == "bbox" else tcfg.batch_size, workers)
    select_by = options.select_by if hold_loader is not None else "last"
    if select_by == "loss" and method == "supervised":
        raise HndError("--select-by", "loss selection is for distillation; use bbox or last")

    # Models.
    torch.manual_seed(tcfg.seed)
    teacher: nn.Module | None = None
    if method in DISTILL_METHODS:
        teacher, model = build_distillation_models(cfg)
        teacher.to(device).eval().requires_grad_(False)
        layers = distill_layer_names(cfg)
    else:
        model = build_model_from_config(cfg.model, cfg.path)
        layers = []
    if options.train_bn:
        if method != "supervised":
            raise HndError("--train-bn", "is for supervised training; distillation keeps the teacher's norms frozen")
        unfreeze_batchnorm(model)
    model.to(device)
    trainable_names = set(freeze_except(model, tcfg.trainable))
    params = [p for n, p in model.named_parameters() if n in trainable_names]
    optimizer = make_optimizer(params, tcfg.optimizer)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, tcfg.scheduler.milestones, tcfg.scheduler.gamma)
    higher_is_better = select_by != "loss"
    best_value = -math.inf if higher_is_better else math.inf
    best_epoch = -1
    start_epoch = 0
    history: list[dict[str, Any]] = []

    if options.resume:
        if not last_path.is_file():
            raise HndError(last_path, "nothing to resume (no checkpoint from an earlier run)")
        state = load_checkpoint(last_path, model)
        if (state.get("method"), state.get("select_by"), state.get("train_bn", False)) != \
                (method, select_by, options.train_bn):
            raise HndError(last_path, f"was written by a {state.get('method')} run selecting by "
                                      f"{state.get('select_by')} (train_bn {state.get('train_bn', False)}), "
                                      f"not {method} / {select_by} (train_bn {options.train_bn})")
        start_epoch, best_value, best_epoch, history = restore_training_state(state, optimizer, scheduler)
        print(f"hnd-train: resuming {last_path} at epoch {start_epoch}", file=sys.stderr)

    n_train = sum(p.numel() for p in params)
    print(f"hnd-train: {method} {cfg.model.kind}"
          + (f" b{cfg.model.bottleneck_channels}ch" if cfg.model.bottleneck_channels else "")
          + f", {len(train_set)} train / {len(hold_ids)} held-out images, {n_train:,} trainable parameters, "
            f"epochs {start_epoch}..{epochs - 1}, select by {select_by}, output {out_dir}", file=sys.stderr)

    for epoch in range(start_epoch, epochs):
        set_loader_epoch(train_loader, epoch)
        stats = train_one_epoch(model, train_loader, optimizer, epoch, device, teacher=teacher, layers=layers,
                                trainable=tcfg.trainable, warmup_iters=tcfg.warmup_iters, log=log,
                                log_freq=max(tcfg.log_freq, 1), progress=options.progress)
        scheduler.step()  # once per epoch (the original's coco_runner stepped twice)
        record: dict[str, Any] = {"epoch": epoch, "train_loss": stats["loss"], "seconds": round(stats["seconds"], 3),
                                  "images_per_s": round(stats["images"] / max(stats["seconds"], 1e-9), 3)}
        if select_by == "bbox":
            metrics = evaluate_model(model, hold_loader, device, cfg.model.kind)
            record["heldout_bbox_AP"] = value = metrics["bbox"]["AP"]
        elif select_by == "loss":
            record["heldout_loss"] = value = heldout_distillation_loss(model, teacher, hold_loader, layers, device)
        else:
            value = float(epoch)
        improved = value > best_value if higher_is_better else value < best_value
        if improved:
            best_value, best_epoch = value, epoch
            save_checkpoint(best_path, fold_batchnorm(model) if options.train_bn else model, epoch=epoch,
                            best_value=float(value), select_by=select_by, method=method,
                            config=dataclasses.asdict(cfg))
        record.update(best_epoch=best_epoch, best_value=best_value)
        history.append(record)
        log.write(kind="epoch", **record)
        save_checkpoint(last_path, model, optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(),
                        epoch=epoch, best_value=float(best_value), best_epoch=best_epoch, select_by=select_by,
                        method=method, config=dataclasses.asdict(cfg), rng=_rng_state(), history=history,
                        train_bn=options.train_bn)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in record.items()}
        print(f"hnd-train: {json.dumps(shown)}", file=sys.stderr)
    return {"best_value": best_value, "best_epoch": best_epoch, "select_by": select_by, "best": str(best_path),
            "last": str(last_path), "log": str(log.path), "history": history}


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hnd-train", description="HND / GHND distillation or supervised training.")
    p.add_argument("--config", required=True, help="YAML config (file or bundled name, e.g. ghnd/faster_rcnn-b3ch)")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/last.pt")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--workers", type=int, help="data loader workers (default: dataset.num_workers)")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--output-dir", help="checkpoints and log.jsonl (default resource/train/<config name>)")
    p.add_argument("--select-by", choices=["bbox", "loss", "last"], default="bbox",
                   help="model selection on the held-out split: bbox AP (default), distillation loss, or last epoch")
    p.add_argument("--train-bn", action="store_true",
                   help="supervised from scratch: train the backbone's (otherwise frozen) batch norms; "
                        "best.pt folds them back into FrozenBatchNorm2d")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from hnd.common.checkpoint import CheckpointError
    from hnd.common.config import ConfigError

    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise HndError("--device", "CUDA is not available on this machine")
        if args.epochs is not None and args.epochs < 1:
            raise HndError("--epochs", "must be >= 1")
        summary = train(args.config, TrainOptions(output_dir=args.output_dir, device=args.device,
                                                  workers=args.workers, epochs=args.epochs, resume=args.resume,
                                                  select_by=args.select_by, progress=not args.no_progress,
                                                  train_bn=args.train_bn))
    except (HndError, ConfigError, CheckpointError) as exc:
        print(f"hnd-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hnd-train: interrupted; continue with --resume", file=sys.stderr)
        return 130
    print(f"best {summary['select_by']} {summary['best_value']:.4f} at epoch {summary['best_epoch']}: {summary['best']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
