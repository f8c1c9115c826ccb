"""COCO evaluation (bbox, segm, keypoints mAP with pycocotools), optionally through the split and codec.

``hnd-eval --config C [--checkpoint P] [--bits N --granularity G] [--split-mode] [--split val]``

With ``--bits`` the student runs as head -> ``hnd.common.codec`` -> tail, the
same quantization the runtime applies on the wire, so the accuracy printed here is the
accuracy hnd-server delivers. ``--split-mode`` without ``--bits`` runs head -> tail
losslessly (it equals the full model bit for bit).

Results follow torchvision's references/detection/coco_eval.py: boxes as [x, y, w, h],
masks pasted at the original size, binarised at 0.5 and RLE-encoded, keypoints flattened
[x, y, v] * K. An image or a whole run without predictions is evaluated (scores 0), never
an error (the original's filtered placeholder broke segm evaluation).
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn

from hnd.common import codec
from hnd.common.errors import HndError
from hnd.common.meta import FingerprintMismatch, check_fingerprint

if TYPE_CHECKING:
    from hnd.common.config import Config

IOU_TYPES = {"faster_rcnn": ("bbox",), "mask_rcnn": ("bbox", "segm"), "keypoint_rcnn": ("bbox", "keypoints")}
STAT_NAMES = {
    "bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
    "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"],
}
STAT_NAMES["segm"] = STAT_NAMES["bbox"]

Predictor = Callable[[list[torch.Tensor]], list[dict[str, torch.Tensor]]]


# ---------------------------------------------------------------------------------------------
# Predictions -> COCO results


def to_coco_results(
    outputs: Sequence[dict[str, torch.Tensor]], image_ids: Sequence[int], iou_types: Iterable[str]
) -> dict[str, list[dict]]:
    """torchvision detections (at original image size) -> COCO result lists per iou type.

    outputs[i]: ``boxes`` [N, 4] xyxy, ``scores`` [N], ``labels`` [N] (category ids), and
    ``masks`` [N, 1, H, W] probabilities (segm) or ``keypoints`` [N, K, 3] (keypoints).
    N is taken from ``scores``: extra masks or keypoints without a score are ignored.
    """
    results: dict[str, list[dict]] = {t: [] for t in iou_types}
    for out, image_id in zip(outputs, image_ids):
        scores = out["scores"].detach().cpu().tolist()
        n = len(scores)
        if n == 0:
            continue
        labels = out["labels"].detach().cpu().tolist()[:n]
        if "bbox" in results:
            boxes = out["boxes"].detach().cpu()[:n].clone()
            boxes[:, 2:] -= boxes[:, :2]
            for box, label, score in zip(boxes.tolist(), labels, scores):
                results["bbox"].append(_coco_result(image_id, label, score, "bbox", [round(v, 3) for v in box]))
        if "segm" in results:
            soft = out["masks"].detach().cpu()[:n]
            masks = (soft.reshape(n, *soft.shape[-2:]) > 0.5).numpy().astype(np.uint8)
            for mask, label, score in zip(masks, labels, scores):
                rle = mask_utils.encode(np.asfortranarray(mask))
                rle["counts"] = rle["counts"].decode("ascii")
                results["segm"].append(_coco_result(image_id, label, score, "segmentation", rle))
        if "keypoints" in results:
            kps = out["keypoints"].detach().cpu()[:n].reshape(n, -1)
            for kp, label, score in zip(kps.tolist(), labels, scores):
                results["keypoints"].append(
                    _coco_result(image_id, label, score, "keypoints", [round(v, 3) for v in kp])
                )
    return results


def _coco_result(image_id: int, label: int, score: float, key: str, value: Any) -> dict[str, Any]:
    """One COCO result record: the image, the category, ``key`` (bbox / segmentation / keypoints), the score."""
    return {"image_id": int(image_id), "category_id": int(label), key: value, "score": float(score)}


def _load_results(coco_gt: COCO, results: list[dict]) -> COCO:
    """COCO.loadRes, but an empty result list gives an empty detection set instead of an IndexError."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(copy.deepcopy(results))
    coco_dt = COCO()
    coco_dt.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "annotations": [],
        "categories": copy.deepcopy(coco_gt.dataset["categories"]),
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def coco_evaluate(
    coco_gt: COCO, results: dict[str, list[dict]], image_ids: Sequence[int]
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Run COCOeval per iou type on ``image_ids``; return ({type: {stat: value}}, {type: summary text}).

    Values are pycocotools' stats (-1 where a statistic has no ground truth, e.g. no small objects).
    """
    metrics: dict[str, dict[str, float]] = {}
    summaries: dict[str, str] = {}
    for iou_type, res in results.items():
        coco_dt = _load_results(coco_gt, res)
        ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        ev.params.imgIds = sorted(int(i) for i in image_ids)
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        lines = [ln for ln in text.getvalue().splitlines() if ln.lstrip().startswith("Average")]
        summaries[iou_type] = "\n".join(lines)
        metrics[iou_type] = {name: float(v) for name, v in zip(STAT_NAMES[iou_type], ev.stats)}
    return metrics, summaries


# ---------------------------------------------------------------------------------------------
# Running a model


class CodedSplit:
    """head -> codec.encode -> codec.decode -> tail, counting the coded bytes of every batch.

    Real coding, as the runtime does it (decode(encode(z)) is exactly codec.roundtrip(z)) at ``settings``:
    affine bits (zstd by default, as the runtime), or learned entropy coding against an Entropic
    Student's prior. ``coded_bytes`` holds
    one payload size per batch (one frame per batch by default, as the edge sends them).
    """

    def __init__(self, model: nn.Module, settings: codec.CodecSettings) -> None:
        from hnd.common.split import split_model

        self.head, self.tail = split_model(model)
        self.settings = settings
        self.prior = self.head.prior_tables() if settings.learned else None
        self.coded_bytes: list[int] = []
        self.images = 0

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        z, meta = self.head(images)
        # The codec works on CPU (as the wire does); bring the result back to the model's device.
        encoded = self.settings.encode(z.cpu(), prior=self.prior)
        self.coded_bytes.append(len(encoded.payload))
        self.images += len(images)
        z_hat = torch.as_tensor(codec.decode(encoded, prior=self.prior)).to(z.device)
        return self.tail(z_hat, meta)

    @property
    def bytes_per_image(self) -> float:
        return sum(self.coded_bytes) / max(self.images, 1)


class OnnxCodedSplit:
    """images -> ONNX Runtime head (``hnd.edge.onnx_head.OnnxHead``) -> codec -> the model's torch tail.

    The edge's path exactly: each image goes back to the uint8 frame it was read from (the loader's
    to_tensor divided it by 255, which ``round(x * 255)`` inverts exactly), through the edge's numpy
    preprocessing and the ONNX graph, then coded as the ONNX edge codes it (``codec.encode`` at
    ``bits``, or, for an Entropic Student's head, its int32 symbols range-coded against the prior in the
    file: ``codec.encode_symbols``), decoded as the server decodes it, then the tail. ``coded_bytes``
    holds one payload size per batch, as :class:`CodedSplit`.
    """

    def __init__(self, model: nn.Module, onnx_head: Any, bits: int = 8, granularity: str = "tensor") -> None:
        from hnd.common.checkpoint import fingerprint
        from hnd.common.split import split_model

        try:
            check_fingerprint(
                fingerprint(model), onnx_head.fingerprint, expected_is="evaluated model", given_is="ONNX head"
            )
        except FingerprintMismatch as exc:
            raise HndError(onnx_head.path, f"{exc}: export the head from the same checkpoint") from None
        model.eval()
        _, self.tail = split_model(model)
        self.head = onnx_head
        # An Entropic head's int32 symbols are range-coded against its prior; an HND head's float bottleneck
        # at these (validated) affine settings.
        self.settings = codec.CodecSettings(bits, granularity) if onnx_head.prior is None else None
        self.device = next(model.parameters()).device
        self.coded_bytes: list[int] = []
        self.images = 0

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        frames = [img.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy() for img in images]
        out, meta = self.head(frames)
        prior = self.head.prior
        if prior is not None:
            encoded = codec.encode_symbols(out.bottleneck, prior)
        else:
            assert self.settings is not None
            encoded = self.settings.encode(out.bottleneck)
        self.coded_bytes.append(len(encoded.payload))
        self.images += len(images)
        z = torch.from_numpy(codec.decode(encoded, prior=prior))
        return self.tail(z.to(self.device), meta)

    @property
    def bytes_per_image(self) -> float:
        return sum(self.coded_bytes) / max(self.images, 1)


def make_onnx_predictor(model: nn.Module, onnx_head: Any, bits: int = 8, granularity: str = "tensor") -> OnnxCodedSplit:
    """The edge's ONNX path in front of the model's tail (:class:`OnnxCodedSplit`)."""
    return OnnxCodedSplit(model, onnx_head, bits, granularity)


def make_predictor(
    model: nn.Module,
    bits: int | None = None,
    granularity: str = "tensor",
    split_mode: bool = False,
    compression: str | None = None,
    key_interval: int = 1,
    max_clamped: float = 0.001,
    precision: str = "fp32",
) -> Predictor:
    """images (list of [3, H, W] in 0..1) -> detections; full model, or head -> [codec] -> tail.

    ``bits`` (student only) codes the bottleneck between head and tail (:class:`CodedSplit`; affine
    bits with zstd unless ``compression`` says otherwise); ``compression="learned"`` codes an Entropic
    Student's latent with its prior (bits 0); ``split_mode`` without bits runs head -> tail losslessly.
    ``key_interval`` > 1 codes the images as one temporal stream, in the order given
    (``hnd.common.stream_codec``: a key frame every ``key_interval`` images, on a size change, or when
    more than ``max_clamped`` of the values would clamp; the other images quantized with their key's
    parameters), exactly what the runtime's ``hnd-edge --key-interval`` stream delivers to the tail.
    ``precision`` other than fp32 runs the tail as ``hnd-server --precision`` does (hnd.server.accel;
    implies split mode).
    """
    model.eval()
    split_mode = split_mode or precision != "fp32"
    if compression == "learned":
        bits, granularity = 0, "channel"
    if bits is None and not split_mode:
        return lambda images: model(images)
    from hnd.common.split import split_model

    _check_split_model(model, bits, compression)
    if bits is None:
        head, tail = split_model(model)
        tail = _served_tail(model, tail, precision)
        return lambda images: tail(*head(images))
    settings = codec.CodecSettings(bits, granularity, compression or "zstd")
    if key_interval > 1:
        return _stream_predictor(model, settings, key_interval, max_clamped, precision)
    coded = CodedSplit(model, settings)
    coded.tail = _served_tail(model, coded.tail, precision)
    return coded


def _check_split_model(model: nn.Module, bits: int | None, compression: str | None) -> None:
    """HndError unless ``model`` is a student, and (with ``bits``) coded as its kind is: an Entropic Student
    with learned entropy coding, an HND student with affine bits."""
    from hnd.common.models import is_student

    if not is_student(model):
        raise HndError("model", "--bits / --split-mode need a student (a model with a bottleneck)")
    from hnd.common.entropic import is_entropic

    if bits is not None and is_entropic(model) != (compression == "learned"):
        raise HndError(
            "--compression",
            "an Entropic Student is coded with --compression learned; HND students with --bits N"
            if is_entropic(model)
            else "learned entropy coding is for Entropic Student models",
        )


def _served_tail(model: nn.Module, tail: Any, precision: str) -> Any:
    """The tail as hnd-server runs it with --precision (fp32: the tail itself)."""
    if precision == "fp32":
        return tail
    from hnd.server.accel import TailOptions, build_tail

    return build_tail(tail, TailOptions(precision), next(model.parameters()).device)


def _stream_predictor(
    model: nn.Module, settings: codec.CodecSettings, key_interval: int, max_clamped: float, precision: str
) -> Predictor:
    """head -> the temporal stream codec (hnd.common.stream_codec), one image after the other -> tail."""
    if settings.learned:
        raise HndError("--key-interval", "temporal coding is for affine bottlenecks, not learned entropy coding")
    from hnd.common.split import split_model
    from hnd.common.stream_codec import StreamEncoder

    head, tail = split_model(model)
    tail = _served_tail(model, tail, precision)
    stream = StreamEncoder(*settings.as_tuple(), key_interval=key_interval, max_clamped=max_clamped)

    def predict_stream(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        out = []
        for img in images:  # one frame at a time: each is the next of the stream
            z, meta = head([img])
            zq = torch.as_tensor(stream.quantize(z).dequantize()).to(z.device)
            out += tail(zq, meta)
        return out

    return predict_stream


@torch.no_grad()
def predict_dataset(
    predictor: Predictor, loader: Iterable, device: torch.device | str = "cpu", progress: bool = False
) -> tuple[list[dict[str, torch.Tensor]], list[int], float]:
    """Run ``predictor`` over a loader of (images, targets); return (outputs on CPU, image ids, seconds)."""
    outputs: list[dict[str, torch.Tensor]] = []
    ids: list[int] = []
    start = time.perf_counter()
    it = loader
    if progress:
        from tqdm import tqdm

        it = tqdm(loader, desc="eval", unit="batch", disable=None)
    for images, targets in it:
        images = [img.to(device) for img in images]
        for out, target in zip(predictor(images), targets):
            outputs.append({k: v.cpu() for k, v in out.items()})
            ids.append(int(target["image_id"]))
    return outputs, ids, time.perf_counter() - start


def evaluate_model(
    model: nn.Module,
    loader: Any,
    device: torch.device | str = "cpu",
    kind: str | None = None,
    bits: int | None = None,
    granularity: str = "tensor",
    split_mode: bool = False,
    progress: bool = False,
    key_interval: int = 1,
    compression: str | None = None,
    precision: str = "fp32",
    onnx_head: Any = None,
) -> dict[str, Any]:
    """COCO metrics of ``model`` on ``loader.dataset`` (a CocoDetection): {iou_type: {stat: value}, ...}.

    Also returns ``summary`` (pycocotools' printed lines per iou type), ``images`` and ``seconds``,
    and with a codec (``bits`` or ``compression="learned"``) ``coded_bytes_per_image``, the mean
    payload the edge would send. The model is left in eval mode.
    """
    from hnd.common.models import model_kind

    kind = kind or model_kind(model)
    predictor: Predictor
    if onnx_head is not None:  # the edge's ONNX head in front of the model's tail
        predictor = make_onnx_predictor(model, onnx_head, bits if bits is not None else 8, granularity)
    else:
        predictor = make_predictor(
            model,
            bits=bits,
            granularity=granularity,
            split_mode=split_mode,
            key_interval=key_interval,
            compression=compression,
            precision=precision,
        )
    outputs, ids, seconds = predict_dataset(predictor, loader, device, progress=progress)
    results = to_coco_results(outputs, ids, IOU_TYPES[kind])
    metrics, summaries = coco_evaluate(loader.dataset.coco, results, ids)
    extra = (
        {"coded_bytes_per_image": round(predictor.bytes_per_image, 1)}
        if isinstance(predictor, (CodedSplit, OnnxCodedSplit))
        else {}
    )
    return {**metrics, **extra, "summary": summaries, "images": len(ids), "seconds": round(seconds, 3)}


# ---------------------------------------------------------------------------------------------
# CLI


def evaluate_config(
    config: str | os.PathLike,
    checkpoint: str | None = None,
    split: str = "val",
    bits: int | None = None,
    granularity: str = "tensor",
    split_mode: bool = False,
    device: str = "cpu",
    workers: int | None = None,
    batch_size: int = 1,
    max_images: int | None = None,
    random_weights: int | None = None,
    progress: bool = False,
    key_interval: int = 1,
    compression: str | None = None,
    precision: str = "fp32",
    head: str | None = None,
    ort_providers: Sequence[str] | None = None,
    min_size: int | None = None,
    max_size: int | None = None,
) -> dict[str, Any]:
    """Build the configured model (``checkpoint`` overrides the config's weights) and evaluate it on a split.

    ``head``: an ONNX head (``hnd-export-head``) run as the edge runs it, in front of the model's tail.
    ``min_size`` / ``max_size``: the split's resize (a native-resolution split), the ONNX head's or the model's.
    """
    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config, with_weights

    cfg = load_config(config)
    if cfg.dataset is None:
        raise HndError(cfg.path, "config has no dataset section")
    model_cfg = with_weights(cfg.model, checkpoint=checkpoint, random_weights=random_weights)
    model = build_model_from_config(model_cfg, cfg.path).to(device)
    setting = SplitSetting(bits, granularity, compression, key_interval, precision, split_mode)
    onnx_head = None
    if head is not None:
        onnx_head, setting = open_onnx_head(cfg, head, setting, ort_providers, min_size, max_size)
    elif min_size is not None or max_size is not None:
        resize_inputs(model, min_size, max_size)
    loader = eval_loader(cfg, split, batch_size, workers, max_images)
    # SplitSetting's fields are evaluate_model's codec keywords.
    metrics = evaluate_model(
        model, loader, device, cfg.model.kind, progress=progress, onnx_head=onnx_head, **asdict(setting)
    )
    metrics.update(evaluated_setting(cfg, model_cfg.checkpoint, model, split, setting, head, onnx_head))
    return metrics


@dataclass(frozen=True)
class SplitSetting:
    """How an evaluation runs the split: ``bits`` None is no codec (the full model, or head -> tail with
    ``split_mode``); ``compression`` None is zstd with ``bits``."""

    bits: int | None
    granularity: str
    compression: str | None
    key_interval: int
    precision: str
    split_mode: bool


def open_onnx_head(
    cfg: Config,
    head: str,
    setting: SplitSetting,
    ort_providers: Sequence[str] | None,
    min_size: int | None,
    max_size: int | None,
) -> tuple[Any, SplitSetting]:
    """The ONNX head at ``head`` (an ``OnnxHead``, CPU after ``ort_providers``) and the setting it is evaluated
    with: learned coding for an Entropic Student's head, else 8 bits unless given. HndError for a config
    without a bottleneck, or a setting the head cannot run."""
    from hnd.edge.onnx_head import OnnxHead

    if cfg.model.bottleneck_channels is None:
        raise HndError(cfg.path, "--head needs a student (a model with a bottleneck)")
    if setting.key_interval != 1 or setting.precision != "fp32":
        raise HndError("--head", "an ONNX head is evaluated with intra frames and an fp32 tail")
    providers = list(dict.fromkeys([*(ort_providers or []), "CPUExecutionProvider"]))
    onnx_head = OnnxHead(head, providers=providers, min_size=min_size, max_size=max_size)
    compression, bits = setting.compression, setting.bits
    if onnx_head.is_entropic:
        if compression not in (None, "learned") or bits not in (None, 0):
            raise HndError(head, "an Entropic Student's head is evaluated with learned entropy coding only")
        compression, bits = "learned", 0
    elif compression == "learned":
        raise HndError(head, "an HND student's head: learned entropy coding is for Entropic Students")
    return onnx_head, replace(setting, compression=compression, bits=8 if bits is None else bits)


def resize_inputs(model: nn.Module, min_size: int | None, max_size: int | None) -> None:
    """Sets the model's resize (a native-resolution split); None keeps that side's configured size."""
    t: Any = model.transform  # a GeneralizedRCNNTransform
    t.min_size = (int(min_size or t.min_size[-1]),)
    t.max_size = int(max_size or t.max_size)


def eval_loader(cfg: Config, split: str, batch_size: int, workers: int | None, max_images: int | None) -> Any:
    """A loader over the config's dataset ``split`` (its first ``max_images``), workers from the config unless
    given."""
    from hnd.train.data import build_dataset, make_loader

    dataset = build_dataset(cfg.dataset, split, cfg.model.kind, train=False)
    if max_images is not None:
        dataset.ids = dataset.ids[:max_images]
    return make_loader(dataset, batch_size, cfg.dataset.num_workers if workers is None else workers)


def evaluated_setting(
    cfg: Config,
    checkpoint: str | None,
    model: nn.Module,
    split: str,
    setting: SplitSetting,
    head: str | None,
    onnx_head: Any,
) -> dict[str, Any]:
    """What was evaluated, reported next to the metrics: config, weights (path and fingerprint), split, the
    codec setting, the ONNX head and the resize."""
    from hnd.common.checkpoint import fingerprint

    transform: Any = model.transform  # a GeneralizedRCNNTransform
    bits, granularity, compression = setting.bits, setting.granularity, setting.compression
    if compression == "learned":
        bits, granularity = 0, "channel"
    return dict(
        config=str(cfg.path),
        checkpoint=checkpoint,
        split=split,
        kind=cfg.model.kind,
        bottleneck_channels=cfg.model.bottleneck_channels,
        bits=bits,
        granularity=granularity if bits is not None else None,
        key_interval=setting.key_interval if bits is not None else None,
        split_mode=bool(setting.split_mode or bits is not None or setting.precision != "fp32"),
        precision=setting.precision,
        fingerprint=fingerprint(model),
        compression=(compression or "zstd") if bits is not None else None,
        head=head,
        head_precision=onnx_head.metadata.precision if onnx_head is not None else None,
        min_size=onnx_head.min_size if onnx_head is not None else int(transform.min_size[-1]),
        max_size=onnx_head.max_size if onnx_head is not None else int(transform.max_size),
    )
