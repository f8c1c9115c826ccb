"""Neural filter training and evaluation (GHND's Ext4ResNet, docs/ORIGINAL_MODELS.md section 4).

``hnd-train --config ext/keypoint_rcnn-b3ch`` (``train.method: filter``), as the original's ext runner:

* the student (``model.checkpoint``, e.g. the GHND keypoint b3ch model; or ``model.random_weights``)
  is loaded strictly and frozen; a fresh Ext4ResNet (seeded by ``train.seed``) is attached at
  ``backbone.body.layer1.encoder.ext_classifier`` and is the only thing that trains. It sees
  the stem output (max-pool, 64 channels, 1/4 resolution) of the student's transform;
* labels come from the annotations: 1 when the image holds something to detect, else 0
  (:func:`filter_label`); the empty images stay in (``remove_non_annotated_imgs`` is ignored);
* cross-entropy, SGD (lr 1e-3, momentum 0.9, weight decay 1e-4 in the original), MultiStepLR
  stepped once per epoch, epoch-0 linear warmup (as hnd-train's distillation);
* model selection by ROC-AUC on a held-out part of train (``train.holdout_fraction``), never val.

The best filter goes to ``<output-dir>/best.pt`` when ``--output-dir`` is given, else to
``model.filter.checkpoint`` (where hnd-edge, hnd-server and hnd-eval look for it), in the
original's ext layout (``{"model": Ext4ResNet keys without prefix, ...}``, see
hnd.common.checkpoint.save_filter). ``<output-dir>/best-model.pt`` holds the whole student
with the best filter (our checkpoint format), e.g. for ``hnd-export-head``. ``last.pt`` (filter,
optimizer, scheduler, RNG) lets ``--resume`` continue.

``hnd-eval --config C`` on a config with ``model.filter`` prints the ROC-AUC of the filter on a
split and a threshold table (threshold, TPR, FPR, share of frames dropped); ``--min-recall R``
picks the operating threshold: the highest threshold whose TPR >= R. ``--coco`` adds the COCO
metrics of the detector with and without the filter at that threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
import torch
from pycocotools.coco import COCO
from torch import nn

from hnd.common.build import build_model_from_config
from hnd.common.checkpoint import fingerprint, load_filter, read_checkpoint, save_checkpoint, save_filter
from hnd.common.config import Config, TrainConfig, load_config, with_weights
from hnd.common.errors import HndError
from hnd.common.files import atomic_write_json
from hnd.common.neural_filter import FILTER_FORMAT, attach_filter, empty_detections, get_filter, is_filter_state_dict
from hnd.common.split import Head, split_model
from hnd.train.data import (
    CocoDetection,
    has_valid_annotation,
    holdout_split,
    load_coco,
    make_loader,
    make_train_loader,
    set_loader_epoch,
    split_paths,
)
from hnd.train.engine import Recipe, RunPaths, Selection, TrainOptions, check_sections, count_parameters, fit
from hnd.train.evaluate import IOU_TYPES, coco_evaluate, predict_dataset, to_coco_results

FILTER_MODULE = "backbone.body.layer1.encoder.ext_classifier"


# ---------------------------------------------------------------------------------------------
# Labels


def filter_label(anns: list[dict], keypoints: bool = False) -> int:
    """1 when an image's COCO annotations hold something to detect, else 0 (the original's rule).

    The original: 1 if the image has at least one box, not every box has ``x2 <= 1 or y2 <= 1``,
    and, for the keypoint task, at least 10 visible keypoints in total. Its box test came from
    torchvision's ``has_only_empty_bbox``, written for [x, y, w, h] but applied to xyxy boxes;
    what it means is "a box without extent", so a box counts only when its width and height
    exceed 1 pixel (x2 - x1 > 1 and y2 - y1 > 1). Crowd annotations are ignored, as in the
    detector's training targets. This is the same rule hnd.train.data uses to drop
    non-annotated training images, so "kept for training" and "worth sending" agree.
    """
    return int(has_valid_annotation(anns, keypoints))


def image_labels(coco: COCO, ids: Sequence[int], keypoints: bool) -> dict[int, int]:
    """{image id: filter label} for the given images of a pycocotools COCO."""
    return {int(i): filter_label(coco.loadAnns(coco.getAnnIds(imgIds=[i])), keypoints) for i in ids}


# ---------------------------------------------------------------------------------------------
# ROC (numpy only)


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) over every distinct score, thresholds decreasing, first = +inf.

    A frame counts as positive (kept) when its score >= threshold, as sklearn's roc_curve.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be 1-d of one length")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC needs both classes (got {n_pos} positives and {n_neg} negatives)")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_each = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # ties share one point
    tps = np.cumsum(y)[last_of_each]
    fps = (last_of_each + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    return fpr, tpr, np.r_[np.inf, s[last_of_each]]


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (trapezoidal; ties count half), NaN when a class is missing."""
    try:
        fpr, tpr, _ = roc_curve(labels, scores)
    except ValueError:
        return float("nan")
    return float(np.trapezoid(tpr, fpr))


def rates_at(labels: ArrayLike, scores: ArrayLike, threshold: float) -> dict[str, float]:
    """TPR, FPR and the share of frames dropped (score < threshold) at one threshold."""
    y = np.asarray(labels).astype(bool)
    keep = np.asarray(scores, dtype=np.float64) >= threshold
    return {
        "threshold": float(threshold),
        "tpr": float(keep[y].mean()) if y.any() else float("nan"),
        "fpr": float(keep[~y].mean()) if (~y).any() else float("nan"),
        "dropped": float(1.0 - keep.mean()) if keep.size else float("nan"),
    }


def threshold_table(labels: ArrayLike, scores: ArrayLike) -> list[dict[str, float]]:
    """One row per ROC threshold (decreasing): threshold, tpr, fpr, dropped (share of frames below it)."""
    _, _, thresholds = roc_curve(labels, scores)
    return [rates_at(labels, scores, t) for t in thresholds[1:]]


def operating_point(table: list[dict[str, float]], min_recall: float) -> dict[str, float]:
    """The row with the highest threshold whose TPR >= min_recall (TPR only grows as thresholds fall)."""
    for row in table:
        if row["tpr"] >= min_recall:
            return row
    return table[-1]


# ---------------------------------------------------------------------------------------------
# Models and data


def build_filter_student(cfg: Config, device: str = "cpu") -> nn.Module:
    """The configured student, loaded strictly without a filter, with a fresh Ext4ResNet attached
    (initialised from ``train.seed``); eval mode, everything frozen but the filter."""
    if cfg.model.filter is None:
        raise HndError(cfg.path, "train.method filter needs a model.filter section")
    if cfg.model.bottleneck_channels is None:
        raise HndError(cfg.path, "the neural filter needs a student (model.bottleneck_channels)")
    student_cfg = dataclasses.replace(cfg.model, filter=None)  # the filter is what we are about to train
    model = build_model_from_config(student_cfg, cfg.path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed if cfg.train is not None else 0)
        attach_filter(model, cfg.model.filter.threshold)
    model.requires_grad_(False)

    get_filter(model).requires_grad_(True)
    return model.to(device).eval()


def check_trainable(cfg: Config) -> None:
    """train.trainable must be left at hnd-train's default or name the filter: nothing else trains here."""
    trainable = list(cfg.train.trainable)
    if trainable == TrainConfig().trainable:
        return
    if not trainable or any(not (t == FILTER_MODULE or t.startswith(FILTER_MODULE + ".")) for t in trainable):
        raise HndError(cfg.path, f"train.trainable: train.method filter trains only {FILTER_MODULE} (got {trainable})")


def _dataset(cfg: Config, split: str, ids: Sequence[int] | None, train: bool, seed: int) -> CocoDetection:
    """Images of a split (empty ones included) without masks / keypoints in the targets."""
    images, ann_file, _ = split_paths(cfg.dataset, split)  # remove_non_annotated_imgs: the filter needs them
    coco = load_coco(ann_file)
    chosen = sorted(coco.imgs) if ids is None else list(ids)
    if not chosen:
        raise HndError(ann_file, "no images in this split")
    return CocoDetection(images, coco, ids=chosen, flip_prob=0.5 if train else 0.0, seed=seed, ann_path=ann_file)


def _label_tensor(targets: Sequence[dict], labels: dict[int, int], device: str) -> torch.Tensor:
    return torch.tensor([labels[int(t["image_id"])] for t in targets], dtype=torch.int64, device=device)


@torch.no_grad()
def filter_scores(
    head: Head, loader: Any, labels: dict[int, int], device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(labels [N], class-1 probabilities [N], image ids) of the filter over a loader, eval mode."""
    was_training = head.training
    head.eval()
    ys, ps, ids = [], [], []
    try:
        for images, targets in loader:
            batch, _ = head.preprocess([img.to(device) for img in images])
            ps.append(head.filter_probability(head.stem(batch)).cpu().numpy())
            ids += [int(t["image_id"]) for t in targets]
            ys += [labels[i] for i in ids[-len(targets) :]]
    finally:
        head.train(was_training)
    return np.asarray(ys, dtype=np.int64), np.concatenate(ps) if ps else np.zeros(0), ids


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class FilterData:
    """The filter's data: image labels (holds objects or not) from the annotations, the training loader,
    and the held-out part of train that selects the model (None unless it holds both classes)."""

    labels: dict[int, int]  # image id -> 1 when it holds an object
    train_set: CocoDetection
    train_loader: Any
    hold_ids: list[int]
    hold_loader: Any | None
    positives: int  # training images with objects


def _filter_data(cfg: Config, tcfg: TrainConfig, workers: int) -> FilterData:
    assert cfg.dataset is not None
    _, ann_file, _ = split_paths(cfg.dataset, "train")
    coco = load_coco(ann_file)
    labels = image_labels(coco, sorted(coco.imgs), cfg.model.kind == "keypoint_rcnn")
    train_ids, hold_ids = holdout_split(sorted(coco.imgs), tcfg.holdout_fraction, tcfg.seed)
    n_pos = sum(labels[i] for i in train_ids)
    if n_pos == 0 or n_pos == len(train_ids):
        raise HndError(
            ann_file,
            f"the filter needs images with and without objects to learn from "
            f"({n_pos} of {len(train_ids)} training images hold objects)",
        )
    train_set = _dataset(cfg, "train", train_ids, train=True, seed=tcfg.seed)
    train_loader = make_train_loader(train_set, cfg.dataset, tcfg, workers)
    hold_loader = None
    if hold_ids and len({labels[i] for i in hold_ids}) == 2:
        hold_set = _dataset(cfg, "train", hold_ids, train=False, seed=tcfg.seed)
        hold_loader = make_loader(hold_set, tcfg.batch_size, workers)
    return FilterData(labels, train_set, train_loader, hold_ids, hold_loader, n_pos)


def _filter_recipe(
    model: nn.Module, data: FilterData, device: Any, paths: RunPaths
) -> tuple[Recipe, Callable[[], float]]:
    """The engine's recipe for the filter of ``model`` (the rest frozen), and its held-out ROC AUC."""
    head, _ = split_model(model)
    ext = get_filter(model)
    criterion = nn.CrossEntropyLoss()
    student_fp = fingerprint({k: v for k, v in model.state_dict().items() if not k.startswith(FILTER_MODULE + ".")})

    def train_modes() -> None:
        # Only the filter trains (its BatchNorms use batch statistics); the transform in train mode
        # picks a random size for multi-size configs (keypoints), as in distillation.
        model.eval()
        ext.train()
        head.transform.train()

    def step(images: list[torch.Tensor], targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            batch, _ = head.preprocess(images)
            features = head.stem(batch)
        return criterion(ext.logits(features), _label_tensor(targets, data.labels, device)), {}

    def heldout_roc_auc() -> float:
        head.transform.eval()
        y, p, _ = filter_scores(head, data.hold_loader, data.labels, device)
        return roc_auc(y, p)

    def check_resume(state: dict[str, Any]) -> None:
        if state.get("student_fingerprint") != student_fp:
            raise HndError(paths.last, "was trained on another student (its fingerprint differs)")

    recipe = Recipe(
        method="filter",
        params=list(ext.parameters()),
        step=step,
        train_modes=train_modes,
        save=lambda path, entries, best: save_filter(path, ext, student_fingerprint=student_fp, **entries),
        load=lambda path: load_filter(path, ext),
        check_resume=check_resume,
        loss_average="image",
    )
    return recipe, heldout_roc_auc


def train_filter(cfg: Config, options: TrainOptions) -> dict[str, Any]:
    """hnd-train for ``train.method: filter``; returns the same summary as hnd.train.cli.train."""
    tcfg = check_sections(cfg)
    assert cfg.dataset is not None
    if cfg.model.filter is None:
        raise HndError(cfg.path, "train.method filter needs a model.filter section")
    check_trainable(cfg)
    device = options.device
    epochs = options.epochs_of(tcfg)
    workers = options.workers_of(cfg.dataset)
    paths = RunPaths.of(cfg, options, cfg.model.filter.checkpoint)
    select_by = "last" if options.select_by == "last" else "roc_auc"

    data = _filter_data(cfg, tcfg, workers)
    if data.hold_loader is None and select_by == "roc_auc":
        print("hnd-train: the held-out images do not hold both classes; keeping the last epoch", file=sys.stderr)
        select_by = "last"
    # Model: the frozen student and its trainable filter; head = transform + stem + encoder (+ filter).
    torch.manual_seed(tcfg.seed)
    model = build_filter_student(cfg, device)
    ext = get_filter(model)
    recipe, heldout_roc_auc = _filter_recipe(model, data, device, paths)
    selection = (
        Selection("roc_auc", heldout_roc_auc, "heldout_roc_auc") if select_by == "roc_auc" else Selection("last")
    )
    config_dict = dataclasses.asdict(cfg)
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
        config=config_dict,
        set_epoch=set_loader_epoch,
        shown_output=paths.best,
        banner=f"filter on {cfg.model.kind} b{cfg.model.bottleneck_channels}ch, {len(data.train_set)} train "
        f"({data.positives} with objects) / {len(data.hold_ids)} held-out images, "
        f"{count_parameters(recipe.params):,} trainable parameters",
    )

    # The whole student with the best filter, in our format (hnd-export-head, --checkpoint).
    model_path = paths.out_dir / "best-model.pt"
    if result.best_epoch >= 0:
        load_filter(paths.best, ext)
        save_checkpoint(
            model_path,
            model.eval(),
            epoch=result.best_epoch,
            best_value=float(result.best_value),
            method="filter",
            select_by=select_by,
            config=config_dict,
        )
    return {**result.summary(), "best_model": str(model_path)}


# ---------------------------------------------------------------------------------------------
# Evaluation


def make_filtered_predictor(model: nn.Module, threshold: float) -> Any:
    """images -> detections through head -> filter -> (encoder -> tail for kept images); dropped
    images get the kind's normal empty result (hnd.common.neural_filter.empty_detections)."""
    head, tail = split_model(model.eval())

    def predict(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        batch, meta = head.preprocess(images)
        fb = head.encode_filtered(batch, threshold)
        out: list[dict[str, torch.Tensor]] = [
            empty_detections(head.kind, meta.original_sizes[i], head.num_keypoints or 17) for i in range(len(images))
        ]
        if fb.z is not None:
            kept = fb.kept
            for i, det in zip(kept, tail(fb.z, meta.select(kept))):
                out[i] = det
        return out

    return predict


def _filter_file(path: str) -> bool:
    """True when ``path`` holds only neural filter weights (ours or the original's ext layout)."""
    ckpt = read_checkpoint(path)
    return ckpt["format"] == FILTER_FORMAT or is_filter_state_dict(ckpt["model"])


def evaluate_filter(
    config: str | Config,
    checkpoint: str | None = None,
    split: str = "val",
    min_recall: float = 0.9,
    device: str = "cpu",
    workers: int | None = None,
    batch_size: int = 1,
    max_images: int | None = None,
    random_weights: int | None = None,
    coco: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """ROC-AUC and threshold table of the configured filter on a split; optionally COCO metrics with
    and without it. ``checkpoint`` may be a full student (with its filter) or a filter-only file."""
    cfg = config if isinstance(config, Config) else load_config(config)
    _check_filter_eval(cfg, min_recall)
    model = _model_with_filter(cfg, checkpoint, random_weights).to(device)
    head, _ = split_model(model)
    dataset = _dataset(cfg, split, None, train=False, seed=0)
    if max_images is not None:
        dataset.ids = dataset.ids[:max_images]
    loader = make_loader(dataset, batch_size, cfg.dataset.num_workers if workers is None else workers)
    labels = image_labels(dataset.coco, dataset.ids, cfg.model.kind == "keypoint_rcnn")
    start = time.perf_counter()
    y, p, ids = filter_scores(head, loader, labels, device)
    result: dict[str, Any] = {
        "config": str(cfg.path),
        "split": split,
        "kind": cfg.model.kind,
        "images": len(ids),
        "positives": int(y.sum()),
        "negatives": int(len(y) - y.sum()),
        "seconds": round(time.perf_counter() - start, 3),
        **_roc_figures(y, p, min_recall, cfg.model.filter.threshold),
        "fingerprint": fingerprint(model),
        "scores": {str(i): float(s) for i, s in zip(ids, p)},
    }
    if result["positives"] and result["negatives"]:
        table = threshold_table(y, p)
        result["table"] = table
        result["operating_point"] = operating_point(table, min_recall)
    else:
        result["table"], result["operating_point"] = [], None
    if coco:
        threshold = (result["operating_point"] or result["at_config_threshold"])["threshold"]
        result.update(_coco_with_and_without(model, threshold, dataset, loader, cfg.model.kind, device, progress))
        result["coco_threshold"] = threshold
    return result


def _check_filter_eval(cfg: Config, min_recall: float) -> None:
    """HndError for a config without a filter or a dataset, or a --min-recall outside [0, 1]."""
    if cfg.model.filter is None:
        raise HndError(cfg.path, "has no neural filter (model.filter)")
    if cfg.dataset is None:
        raise HndError(cfg.path, "config has no dataset section")
    if not 0.0 <= min_recall <= 1.0:
        raise HndError("--min-recall", f"must be in [0, 1], got {min_recall}")


def _model_with_filter(cfg: Config, checkpoint: str | None, random_weights: int | None) -> nn.Module:
    """The configured student; a filter-only ``checkpoint`` replaces the config's filter weights, any other is
    the whole student's."""
    model_cfg = cfg.model
    if checkpoint is not None and _filter_file(checkpoint):
        model_cfg = dataclasses.replace(model_cfg, filter=dataclasses.replace(model_cfg.filter, checkpoint=checkpoint))
        checkpoint = None
    model_cfg = with_weights(model_cfg, checkpoint=checkpoint, random_weights=random_weights)
    return build_model_from_config(model_cfg, cfg.path)


def _roc_figures(y: np.ndarray, p: np.ndarray, min_recall: float, config_threshold: float) -> dict[str, Any]:
    """ROC-AUC and the rates at the config's threshold, for labels ``y`` and filter probabilities ``p``."""
    return {
        "roc_auc": roc_auc(y, p),
        "min_recall": min_recall,
        "config_threshold": config_threshold,
        "at_config_threshold": rates_at(y, p, config_threshold),
    }


def _coco_with_and_without(
    model: nn.Module, threshold: float, dataset: CocoDetection, loader: Any, kind: str, device: str, progress: bool
) -> dict[str, Any]:
    """COCO metrics of the detector alone and behind the filter at ``threshold`` (its dropped frames: no
    detections)."""
    iou_types = IOU_TYPES[kind]
    out = {}
    for name, predictor in (
        ("coco_without_filter", lambda imgs: model(imgs)),
        ("coco_with_filter", make_filtered_predictor(model, threshold)),
    ):
        outputs, out_ids, _ = predict_dataset(predictor, loader, device, progress=progress)
        metrics, _ = coco_evaluate(dataset.coco, to_coco_results(outputs, out_ids, iou_types), out_ids)
        out[name] = metrics
    return out


def format_filter_report(result: dict[str, Any], max_rows: int = 20) -> str:
    """ROC-AUC, the operating point and a threshold table of at most ``max_rows`` ROC points."""
    lines = [
        f"neural filter ({result['kind']}) on {result['split']}: {result['images']} images, "
        f"{result['positives']} with objects / {result['negatives']} without",
        f"ROC-AUC {result['roc_auc']:.4f}",
    ]
    table, op = result["table"], result["operating_point"]
    if table:
        step = max(1, math.ceil(len(table) / max_rows))
        rows = table[::step]
        cfg_row = result["at_config_threshold"]
        rows = sorted({id(r): r for r in rows + [table[-1], op, cfg_row]}.values(), key=lambda r: -r["threshold"])
        lines.append(f"{'threshold':>12}{'TPR':>8}{'FPR':>8}{'dropped':>9}")
        for r in rows:
            mark = "  <- operating point" if r is op else ("  <- config threshold" if r is cfg_row else "")
            lines.append(f"{r['threshold']:>12.6g}{r['tpr']:>8.3f}{r['fpr']:>8.3f}{r['dropped']:>9.3f}{mark}")
        lines.append(
            f"operating threshold for TPR >= {result['min_recall']:g}: {op['threshold']:.6g} "
            f"(TPR {op['tpr']:.3f}, FPR {op['fpr']:.3f}, {100 * op['dropped']:.1f}% of frames dropped)"
        )
    else:
        lines.append("(one class only in this split: no ROC curve)")
    for name in ("coco_without_filter", "coco_with_filter"):
        if name in result:
            stats = ", ".join(f"{t} AP {m['AP']:.4f}" for t, m in result[name].items())
            label = (
                "without filter"
                if name.endswith("without_filter")
                else f"with filter at {result['coco_threshold']:.6g}"
            )
            lines.append(f"COCO {label}: {stats}")
    return "\n".join(lines)


def eval_main(args: Any) -> int:
    """hnd-eval on a config with a neural filter (called by hnd.train.eval_cli.main)."""
    result = evaluate_filter(
        args.config,
        checkpoint=args.checkpoint,
        split=args.split,
        min_recall=getattr(args, "min_recall", 0.9),
        device=args.device,
        workers=args.workers,
        batch_size=args.batch_size,
        max_images=args.max_images,
        random_weights=args.random_weights,
        coco=getattr(args, "coco", False),
        progress=True,
    )
    print(format_filter_report(result))
    if args.output:
        atomic_write_json(args.output, result, sort_keys=True)
        print(f"metrics written to {args.output}")
    return 0
