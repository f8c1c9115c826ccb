"""Entropic Student training (``train.method: entropic``): two stages on the one training engine.

Stage 1 (``train.epochs``, ``train.optimizer``, ``train.scheduler``): the whole bottleneck (encoder,
entropy bottleneck, decoder) learns, everything else frozen and copied from the teacher. Loss per batch:

    sum over layer1..layer4 of MSE_sum(student, teacher)   (GHND's feature distillation; the student's
                                                             bottleneck output stands for layer1)
    + beta * bits                                          (sc2bench's BppLoss: -sum log2 likelihood of
                                                             the noisy latent, over the batch)
    + aux                                                  (CompressAI's quantile loss: moves only the
                                                             quantiles, so update() finds the tails)

sc2bench trains its encoder this way on ImageNet and then fine-tunes on COCO; with COCO-format data
only, hnd does both on the detection data. Stage 1 selects its last epoch.

Between the stages (:func:`finish_prior`) the quantiles are solved exactly where the aux loss converges
(Adam moves them at most lr per step, far too slowly for a short run), then
:func:`hnd.common.entropic.update_entropy_tables` computes the integer CDF tables once (``force``); they
are saved with the weights and never recomputed (the fingerprint covers them).

Stage 2 (``train.stage2``: epochs, optimizer, scheduler, warmup): encoder and entropy bottleneck frozen,
the decoder, layer2..4, FPN, RPN and ROI heads fine-tune on torchvision's detection losses, the
latent hard-rounded against the medians and detached (sc2bench's updated/training mode); selection by
held-out bbox AP (``--select-by``), as every hnd-train recipe.

Outputs: ``<out>/stage1/{last,best}.pt`` and ``<out>/stage2/{last,best}.pt`` with their log.jsonl;
the final model (stage 2's best) goes to ``model.checkpoint`` unless ``--output-dir`` is given (then
``<out>/best.pt``). ``--resume`` continues whichever stage was interrupted; a finished stage 1 is not
re-run.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import torch
from hnd.common.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from hnd.common.config import Config
from hnd.common.entropic import (
    ENTROPIC_PREFIX,
    entropic_bottleneck_of,
    update_entropy_tables,
)
from hnd.train.train import (
    Data,
    distillation_data,
    set_distillation_modes,
    set_supervised_modes,
    teacher_and_seeded_student,
)
from hnd.train.engine import (
    FitResult,
    Recipe,
    RunPaths,
    Selection,
    TrainOptions,
    count_parameters,
    fit,
)
from hnd.common.errors import HndError
from hnd.common.files import atomic_write
from torch import nn


BOTTLENECK = "backbone.body.bottleneck_layer"
STAGE1_TRAINABLE = [BOTTLENECK]
STAGE2_FROZEN = [f"{BOTTLENECK}.encoder", f"{BOTTLENECK}.entropy_bottleneck"]
# Student module -> teacher module whose output it is distilled to.
DISTILL_PAIRS = {
    BOTTLENECK: "backbone.body.layer1",
    "backbone.body.layer2": "backbone.body.layer2",
    "backbone.body.layer3": "backbone.body.layer3",
    "backbone.body.layer4": "backbone.body.layer4",
}


def build_entropic_models(cfg: Config) -> tuple[nn.Module, nn.Module]:
    """(teacher, student): the student's layer2..4, FPN, RPN and ROI heads are the teacher's; its
    bottleneck starts from ``model.random_weights`` (or ``train.seed``)."""
    if cfg.teacher is None:
        raise HndError(cfg.path, "train.method entropic needs a teacher section")
    if cfg.model.bottleneck_type != "entropic":
        raise HndError(cfg.path, "train.method entropic needs model.bottleneck_type: entropic")
    return teacher_and_seeded_student(cfg, skip_prefix=ENTROPIC_PREFIX)


def rate_bits(likelihoods: torch.Tensor) -> torch.Tensor:
    """sc2bench's BppLoss with reduction 'sum': -sum log2(likelihood) over the batch, in bits."""
    return -torch.log2(likelihoods).sum()


def _body_features(model: nn.Module, batch: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """Outputs of backbone.body children (by full name) for a transformed batch, running as little as needed."""
    prefix = "backbone.body."
    wanted = {n[len(prefix) :] for n in names}
    out: dict[str, torch.Tensor] = {}
    x = batch
    for child_name, child in model.backbone.body.items():
        x = child(x)
        if child_name in wanted:
            out[prefix + child_name] = x
            wanted.discard(child_name)
            if not wanted:
                break
    return out


def stage1_loss(
    student: nn.Module, teacher: nn.Module, images: list[torch.Tensor], beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Distillation (layer1..4) + beta * bits + aux for one batch; both models see the student's transform."""
    with torch.no_grad():
        batch = student.transform(images)[0].tensors
        t_feats = _body_features(teacher, batch, list(DISTILL_PAIRS.values()))
    s_feats = _body_features(student, batch, list(DISTILL_PAIRS))
    bottleneck = entropic_bottleneck_of(student)
    terms: dict[str, torch.Tensor] = {
        s: nn.functional.mse_loss(s_feats[s], t_feats[t], reduction="sum") for s, t in DISTILL_PAIRS.items()
    }
    if bottleneck.last_likelihoods is None:
        raise HndError("training", "the entropy bottleneck gave no likelihoods (tables already updated?)")
    bits = rate_bits(bottleneck.last_likelihoods)
    aux = bottleneck.entropy_bottleneck.loss()
    loss = torch.stack(list(terms.values())).sum() + beta * bits + aux
    logged = {k.rsplit(".", 1)[-1]: float(v.detach()) for k, v in terms.items()}
    logged.update(
        bits=float(bits.detach()), aux=float(aux.detach()), bits_per_image=float(bits.detach()) / max(len(images), 1)
    )
    return loss, logged


def stage1_param_groups(model: nn.Module, params: list[nn.Parameter], tcfg: Any) -> list[dict[str, Any]]:
    """Stage 1's optimizer groups: the encoder and decoder at ``train.optimizer.lr``, the prior (the entropy
    bottleneck's densities and quantiles) at ``train.prior_lr`` when set (else one lr, as sc2bench)."""
    prior = {id(p) for p in entropic_bottleneck_of(model).entropy_bottleneck.parameters()}
    rest = [p for p in params if id(p) not in prior]
    eb = [p for p in params if id(p) in prior]
    lr = tcfg.optimizer.lr if tcfg.prior_lr is None else tcfg.prior_lr
    return [{"params": rest, "lr": tcfg.optimizer.lr}, {"params": eb, "lr": lr}]


def finish_prior(model: nn.Module) -> None:
    """End of stage 1: the quantiles where the aux loss converges (solved, not left to Adam's pace), then
    the integer CDF tables from the trained densities, once."""
    entropic_bottleneck_of(model).entropy_bottleneck.solve_quantiles()
    update_entropy_tables(model, force=True)


def _set_requires_grad(model: nn.Module, trainable: list[str], frozen: list[str]) -> list[nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        on = any(name.startswith(t + ".") for t in trainable) and not any(name.startswith(f + ".") for f in frozen)
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


def stage2_trainable(model: nn.Module) -> list[str]:
    """Everything but the encoder and the entropy bottleneck: decoder, layer2..4, FPN, RPN, ROI heads."""
    return [
        f"{BOTTLENECK}.decoder",
        "backbone.body.layer2",
        "backbone.body.layer3",
        "backbone.body.layer4",
        "backbone.fpn",
        "rpn",
        "roi_heads",
    ]


def _stage_done(paths: RunPaths, epochs: int) -> bool:
    if not paths.last.is_file() or not paths.best.is_file():
        return False
    return int(read_checkpoint(paths.last).get("epoch", -1)) >= epochs - 1


def train_entropic(cfg: Config, options: TrainOptions) -> dict[str, Any]:
    """Both stages; returns hnd-train's summary (of stage 2) with ``stage1`` added."""
    tcfg = cfg.train
    assert tcfg is not None and cfg.dataset is not None
    if tcfg.stage2 is None:
        raise HndError(cfg.path, "train.method entropic needs train.stage2 (epochs, optimizer, scheduler)")
    if options.select_by not in ("bbox", "last"):
        raise HndError("--select-by", "the Entropic Student recipe selects stage 2 by bbox or last")
    run = RunPaths.of(cfg, options, cfg.model.checkpoint)  # the final best.pt; each stage has its own folder
    out, final = run.out_dir, run.best
    p1, p2 = (
        RunPaths(out / s, out / s / "best.pt", out / s / "last.pt", out / s / "log.jsonl") for s in ("stage1", "stage2")
    )
    workers = options.workers_of(cfg.dataset)
    data = distillation_data(cfg, "supervised", options.select_by, workers)
    torch.manual_seed(tcfg.seed)
    teacher, model = build_entropic_models(cfg)
    teacher.to(options.device).eval().requires_grad_(False)
    model.to(options.device)
    result1 = _stage1(cfg, options, model, teacher, data, p1)
    load_checkpoint(p1.best, model)  # the selected stage-1 weights (tables still empty)
    finish_prior(model)  # the tables, once
    result2 = _stage2(cfg, options, model, data, p2)
    if final.resolve() != p2.best.resolve():
        with open(p2.best, "rb") as best:  # streamed: a checkpoint can be hundreds of MB
            atomic_write(final, lambda f: shutil.copyfileobj(best, f))  # a reader sees the old file or the new one
    summary = result2.summary()
    summary["best"] = str(final)
    summary["stage1"] = result1.summary() if result1 is not None else {"last": str(p1.last), "skipped": True}
    return summary


def _stage1(
    cfg: Config, options: TrainOptions, model: nn.Module, teacher: nn.Module, data: Data, p1: RunPaths
) -> FitResult | None:
    """Stage 1 (layer1..4 distillation + beta * bits + aux) on the engine; None when --resume finds it done."""
    tcfg = cfg.train
    assert tcfg is not None
    epochs1 = options.epochs_of(tcfg)
    if options.resume and _stage_done(p1, epochs1):
        print(f"hnd-train: stage 1 finished earlier ({p1.last}); going on with stage 2")
        return None
    params1 = stage1_param_groups(model, _set_requires_grad(model, STAGE1_TRAINABLE, []), tcfg)
    recipe1 = Recipe(
        method="entropic-stage1",
        params=params1,
        step=lambda images, targets: stage1_loss(model, teacher, images, tcfg.beta),
        train_modes=lambda: set_distillation_modes(model, STAGE1_TRAINABLE),
        save=lambda path, entries, best: save_checkpoint(path, model, **entries),
        load=lambda path: load_checkpoint(path, model),
    )
    return fit(
        recipe1,
        data.train_loader,
        tcfg,
        Selection("last"),
        p1,
        epochs=epochs1,
        device=options.device,
        resume=options.resume and p1.last.is_file(),
        progress=options.progress,
        config=dataclasses.asdict(cfg),
        banner=f"entropic stage 1 {cfg.model.kind} beta {tcfg.beta}, {len(data.train_set)} train "
        f"images, {count_parameters(params1):,} trainable parameters",
        set_epoch=_set_loader_epoch,
    )


def _stage2(cfg: Config, options: TrainOptions, model: nn.Module, data: Data, p2: RunPaths) -> FitResult:
    """Stage 2 (supervised, the tables fixed) on the engine, selected by held-out bbox AP or last."""
    from hnd.train.evaluate import evaluate_model

    tcfg, device = cfg.train, options.device
    assert tcfg is not None and tcfg.stage2 is not None
    s2 = tcfg.stage2
    tcfg2 = dataclasses.replace(
        tcfg, epochs=s2.epochs, optimizer=s2.optimizer, scheduler=s2.scheduler, warmup_iters=s2.warmup_iters
    )
    params2 = _set_requires_grad(model, stage2_trainable(model), STAGE2_FROZEN)
    hold = data.hold_loader
    select = options.select_by if hold is not None else "last"
    selection = (
        Selection("bbox", lambda: evaluate_model(model, hold, device, cfg.model.kind)["bbox"]["AP"], "heldout_bbox_AP")
        if select == "bbox"
        else Selection("last")
    )

    def step2(images: list[torch.Tensor], targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict]:
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        return sum(losses.values()), {k: float(v.detach()) for k, v in losses.items()}

    def load2(path: Path) -> dict[str, Any]:
        ckpt = load_checkpoint(path, model)
        if not entropic_bottleneck_of(model).updated:
            raise HndError(path, "holds no CDF tables: not a stage-2 checkpoint")
        return ckpt

    def check2(state: dict[str, Any]) -> None:
        # Stage 2 must continue with the tables it started with (they are part of the weights).
        want = entropic_bottleneck_of(model).entropy_bottleneck._quantized_cdf
        have = state["model"].get(f"{BOTTLENECK}.entropy_bottleneck._quantized_cdf")
        if have is None or tuple(have.shape) != tuple(want.shape) or not torch.equal(have.cpu(), want.cpu()):
            raise HndError(p2.last, "was trained with other CDF tables than stage 1 gives now")

    recipe2 = Recipe(
        method="entropic-stage2",
        params=params2,
        step=step2,
        train_modes=lambda: set_supervised_modes(model),
        save=lambda path, entries, best: save_checkpoint(path, model, **entries),
        load=load2,
        check_resume=check2,
        loss_average="image",
    )
    return fit(
        recipe2,
        data.train_loader,
        tcfg2,
        selection,
        p2,
        epochs=s2.epochs,
        device=device,
        resume=options.resume and p2.last.is_file(),
        progress=options.progress,
        config=dataclasses.asdict(cfg),
        banner=f"entropic stage 2 {cfg.model.kind}, tables fixed, {count_parameters(params2):,} trainable parameters",
        set_epoch=_set_loader_epoch,
    )


def _set_loader_epoch(loader: Any, epoch: int) -> None:
    from hnd.train.data import set_loader_epoch

    set_loader_epoch(loader, epoch)
