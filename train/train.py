"""hnd-train: HND / GHND distillation of the bottleneck, or supervised training of a teacher.

``hnd-train --config C [--resume] [--device cpu|cuda] [--workers N] [--epochs N] [--output-dir D]``

Distillation (``train.method: hnd | ghnd``), as in the original (docs/ORIGINAL_MODELS.md section 2):

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

import copy
import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d

from hnd.common.checkpoint import load_checkpoint, save_checkpoint
from hnd.common.config import Config
from hnd.common.build import build_model_from_config
from hnd.common.models import build_model
from hnd.train.data import (
    build_dataset,
    holdout_split,
    load_coco,
    make_loader,
    make_train_loader,
    set_loader_epoch,
    split_paths,
)
from hnd.train.engine import Recipe, RunPaths, Selection, TrainOptions, check_sections, count_parameters, fit
from hnd.common.errors import HndError
from hnd.train.evaluate import evaluate_model

BOTTLENECK_PREFIX = "backbone.body.layer1."
DISTILL_METHODS = ("hnd", "ghnd")


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
                raise HndError(
                    "teacher",
                    f"{key} has shape {tuple(t_sd[key].shape)}, the student's is "
                    f"{tuple(value.shape)} (do num_classes / num_keypoints agree?)",
                )
            value.copy_(t_sd[key])
            copied.append(key)
    return copied


def build_distillation_models(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """(teacher, student) of a distillation config; the student's non-bottleneck weights are the teacher's.

    The student's bottleneck is initialised from ``model.random_weights`` (or ``train.seed``);
    ``model.checkpoint`` is where training writes the result, so it is not read here.
    """
    if cfg.teacher is None:
        raise HndError(cfg.path, f"train.method {cfg.train.method} needs a teacher section")
    if cfg.teacher.kind != cfg.model.kind:
        raise HndError(cfg.path, f"teacher.kind {cfg.teacher.kind} and model.kind {cfg.model.kind} disagree")
    if cfg.teacher.bottleneck_channels is not None:
        raise HndError(cfg.path, "the teacher must not have a bottleneck (teacher.bottleneck_channels)")
    if cfg.model.bottleneck_channels is None:
        raise HndError(cfg.path, "the student needs model.bottleneck_channels")
    return teacher_and_seeded_student(cfg)


def teacher_and_seeded_student(cfg: Config, skip_prefix: str = BOTTLENECK_PREFIX) -> tuple[nn.Module, nn.Module]:
    """(teacher, student) of a checked distillation config (HND or Entropic): the teacher from its section;
    the student built from ``model.random_weights`` (or ``train.seed``), every weight outside ``skip_prefix``
    then copied from the teacher."""
    assert cfg.teacher is not None and cfg.train is not None
    teacher = build_model_from_config(cfg.teacher, cfg.path)
    m = cfg.model
    seed = m.random_weights if m.random_weights is not None else cfg.train.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student = build_model(
            m.kind, m.bottleneck_channels, m.num_classes, bottleneck_type=m.bottleneck_type, **m.params
        )
    copy_teacher_weights(teacher, student, skip_prefix)
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
        if all(n.startswith(body_prefix) and "." not in n[len(body_prefix) :] for n in names):
            body = model.backbone.body
            wanted = {n[len(body_prefix) :] for n in names}
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


def distillation_loss(
    student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over layers of sum-reduced MSE (the original's MSELoss(reduction='sum'), factor 1 each)."""
    terms = {n: nn.functional.mse_loss(student_feats[n], teacher_feats[n], reduction="sum") for n in student_feats}
    total = torch.stack(list(terms.values())).sum()
    return total, {n: float(v.detach()) for n, v in terms.items()}


def distill_layer_names(cfg: Config) -> list[str]:
    """train.distill_layers with the short forms (``layer2``) expanded to backbone.body names."""
    layers = list(cfg.train.distill_layers)
    if not layers:
        raise HndError(cfg.path, "train.distill_layers is empty")
    return [n if "." in n else f"backbone.body.{n}" for n in layers]


def distill_batch(
    student: nn.Module, teacher: nn.Module, images: list[torch.Tensor], layers: Sequence[str]
) -> tuple[torch.Tensor, dict[str, float]]:
    """Transform a batch once with the student's transform, run both backbones, return the loss."""
    with torch.no_grad():
        batch = student.transform(images)[0].tensors
        t_feats = backbone_features(teacher, batch, layers)
    s_feats = backbone_features(student, batch, layers)
    return distillation_loss(s_feats, t_feats)


# ---------------------------------------------------------------------------------------------
# Selection


@torch.no_grad()
def heldout_distillation_loss(
    student: nn.Module, teacher: nn.Module, loader: Any, layers: Sequence[str], device: str
) -> float:
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
# The recipe


@dataclass
class Data:
    train_set: Any
    train_loader: Any
    hold_ids: list[int]
    hold_loader: Any | None


def distillation_data(cfg: Config, method: str, select_by: str, workers: int) -> Data:
    """Train loader over train minus the held-out part (``train.holdout_fraction``) that selects the
    model; val / test stay untouched. Distillation needs only the images: masks are not decoded."""
    tcfg = cfg.train
    assert tcfg is not None and cfg.dataset is not None
    _, train_ann, _ = split_paths(cfg.dataset, "train")
    all_ids = sorted(load_coco(train_ann).imgs)
    train_ids, hold_ids = holdout_split(all_ids, tcfg.holdout_fraction, tcfg.seed)
    train_set = build_dataset(
        cfg.dataset,
        "train",
        cfg.model.kind,
        train=True,
        seed=tcfg.seed,
        ids=train_ids,
        masks=False if method in DISTILL_METHODS else None,
    )
    train_loader = make_train_loader(train_set, cfg.dataset, tcfg, workers)
    hold_loader = None
    if hold_ids:
        hold_set = build_dataset(cfg.dataset, "train", cfg.model.kind, ids=hold_ids, remove_empty=False)
        hold_loader = make_loader(hold_set, 1 if select_by == "bbox" else tcfg.batch_size, workers)
    return Data(train_set, train_loader, hold_ids, hold_loader)


def detector_recipe(
    cfg: Config, options: TrainOptions, paths: RunPaths
) -> tuple[Recipe, nn.Module, nn.Module | None, list[str]]:
    """(recipe, model, teacher, distilled layers) of a distillation or supervised config.

    Distillation: the student's stem + bottleneck train against the teacher's features
    (:func:`distill_batch`); supervised: ``train.trainable`` trains on torchvision's detection losses.
    """
    tcfg = cfg.train
    assert tcfg is not None
    method, device = tcfg.method, options.device
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

    def distill_step(images: list[torch.Tensor], targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict]:
        assert teacher is not None
        return distill_batch(model, teacher, images, layers)

    def supervised_step(images: list[torch.Tensor], targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict]:
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        loss_dict = model(images, targets)
        return sum(loss_dict.values()), {k: float(v.detach()) for k, v in loss_dict.items()}

    def save(path: Path, entries: dict[str, Any], best: bool) -> None:
        if best:
            save_checkpoint(path, fold_batchnorm(model) if options.train_bn else model, **entries)
        else:
            save_checkpoint(path, model, **entries, train_bn=options.train_bn)

    def check_resume(state: dict[str, Any]) -> None:
        if state.get("train_bn", False) != options.train_bn:
            raise HndError(
                paths.last,
                f"was written by a run with train_bn {state.get('train_bn', False)}, not train_bn {options.train_bn}",
            )

    recipe = Recipe(
        method=method,
        params=params,
        step=distill_step if teacher is not None else supervised_step,
        train_modes=(lambda: set_distillation_modes(model, tcfg.trainable))
        if teacher is not None
        else (lambda: set_supervised_modes(model)),
        save=save,
        load=lambda path: load_checkpoint(path, model),
        check_resume=check_resume,
    )
    return recipe, model, teacher, layers


def train_detector(cfg: Config, options: TrainOptions) -> dict[str, Any]:
    """HND / GHND distillation or supervised training (``train.method`` hnd, ghnd, supervised) as configured;
    returns a summary (best value, epoch, paths, history). :func:`hnd.train.cli.train` picks this recipe."""
    tcfg = check_sections(cfg)
    method = tcfg.method
    if method not in DISTILL_METHODS + ("supervised",):
        raise HndError(cfg.path, f"train.method {method} is not handled by hnd-train")
    if options.select_by not in ("bbox", "loss", "last"):
        raise HndError("--select-by", f"unknown selection {options.select_by!r}")
    assert cfg.dataset is not None
    epochs = options.epochs_of(tcfg)
    workers = options.workers_of(cfg.dataset)
    paths = RunPaths.of(cfg, options, None if method == "supervised" else cfg.model.checkpoint)
    data = distillation_data(cfg, method, options.select_by, workers)
    select_by = options.select_by if data.hold_loader is not None else "last"
    if select_by == "loss" and method == "supervised":
        raise HndError("--select-by", "loss selection is for distillation; use bbox or last")
    recipe, model, teacher, layers = detector_recipe(cfg, options, paths)
    hold, device = data.hold_loader, options.device
    if select_by == "bbox":
        selection = Selection(
            "bbox", lambda: evaluate_model(model, hold, device, cfg.model.kind)["bbox"]["AP"], "heldout_bbox_AP"
        )
    elif select_by == "loss":
        assert teacher is not None
        selection = Selection(
            "loss",
            lambda: heldout_distillation_loss(model, teacher, hold, layers, device),
            "heldout_loss",
            higher_is_better=False,
        )
    else:
        selection = Selection("last")
    banner = (
        f"{method} {cfg.model.kind}"
        + (f" b{cfg.model.bottleneck_channels}ch" if cfg.model.bottleneck_channels else "")
        + f", {len(data.train_set)} train / {len(data.hold_ids)} held-out images, "
        f"{count_parameters(recipe.params):,} trainable parameters"
    )
    result = fit(
        recipe,
        data.train_loader,
        tcfg,
        selection,
        paths,
        epochs=epochs,
        device=device,
        resume=options.resume,
        progress=options.progress,
        config=dataclasses.asdict(cfg),
        banner=banner,
        set_epoch=set_loader_epoch,
    )
    return result.summary()
