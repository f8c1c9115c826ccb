"""The GHND neural filter (ICPR'20 ``Ext4ResNet``): a tiny classifier on the stem output that lets
the edge skip frames with nothing to detect.

It sits in the student at ``backbone.body.layer1.encoder.ext_classifier`` (the slot of the
original's ``ExtEncoder``), so it belongs to the head: the head's state dict, the head-only
export and the weights fingerprint include it. Layer order and key names follow the original
(docs/ORIGINAL_MODELS.md section 4), so its filter checkpoints load:

    extractor.{1,4,7}.{weight,bias}  convs 64->64 k4 s2, 64->32 k3 s2, 32->16 k2 s1
    extractor.{2,5,8}.*              BatchNorm2d 64, 32, 16
    linear.{weight,bias}             Linear(16 * 8 * 8 = 1024, 2)

23 keys, 88,402 parameters. Class 1 means "something to detect"; a frame whose class-1
probability is below the threshold (0.01 in the original's config) is not sent.

Filter checkpoint files (``hnd.common.checkpoint.load_filter``) are read with the same safe loader as every other
checkpoint (``torch.load(weights_only=True)`` plus the allowlist of the original's extras):

* the original's ext checkpoint: ``{"model": Ext4ResNet keys without prefix, "optimizer",
  "best_value", "lr_scheduler", "config", "args"}``;
* ours (``hnd.common.checkpoint.save_filter``): the same layout plus ``format: "hnd-filter"``, ``version`` and
  ``fingerprint`` (of the filter's own state dict), so the original code can read it too;
* a full student checkpoint or head export that holds the filter under its prefix;
* a bare state dict, with or without the prefix.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from hnd.common.config import filter_threshold_problem
from hnd.common.models import Bottleneck

FILTER_PREFIX = "backbone.body.layer1.encoder.ext_classifier."
FILTER_FORMAT = "hnd-filter"
FILTER_FORMAT_VERSION = 1
DEFAULT_THRESHOLD = 0.01  # the original's ext config
STEM_CHANNELS = 64


class Ext4ResNet(nn.Module):
    """Binary "anything to detect?" classifier on ResNet stem features.

    Input: [B, 64, h, w] (the stem's max-pool output, any h, w). The first adaptive pool
    brings every input to 64x64 so the linear layer sees a fixed 16x8x8 map.
    ``forward`` returns logits [B, 2] in train mode and softmax probabilities [B, 2] in
    eval mode, as the original; :meth:`logits` and :meth:`probability` do not depend on the mode.

    ``threshold`` is a plain attribute (not in the state dict, so not in the fingerprint): the
    default operating point set by the config; the edge may override it per run.
    """

    def __init__(self, in_channels: int = STEM_CHANNELS, threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        self.extractor = nn.Sequential(
            nn.AdaptiveAvgPool2d((64, 64)),
            nn.Conv2d(in_channels, 64, kernel_size=4, stride=2),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 32, kernel_size=3, stride=2),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.Conv2d(32, 16, kernel_size=2, stride=1),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d((8, 8)),
        )
        self.linear = nn.Linear(16 * 8 * 8, 2)
        self.threshold = float(threshold)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 64, h, w] -> [B, 2] logits."""
        return self.linear(self.extractor(x).flatten(1))

    def probability(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 64, h, w] -> [B] probability of class 1 (something to detect)."""
        return self.logits(x).softmax(dim=1)[:, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.logits(x)
        return z if self.training else z.softmax(dim=1)


def get_filter(model: nn.Module) -> Ext4ResNet | None:
    """The filter attached to a student (or a Head), or None."""
    encoder = getattr(model, "encoder", None)  # a Head holds the encoder directly
    if encoder is None:
        layer1 = getattr(getattr(getattr(model, "backbone", None), "body", None), "layer1", None)
        encoder = getattr(layer1, "encoder", None)
    ext = getattr(encoder, "ext_classifier", None)
    return ext if isinstance(ext, Ext4ResNet) else None


def attach_filter(
    model: nn.Module, threshold: float = DEFAULT_THRESHOLD, module: Ext4ResNet | None = None
) -> Ext4ResNet:
    """Put an Ext4ResNet (``module`` or a freshly initialised one) at
    ``backbone.body.layer1.encoder.ext_classifier`` of a student; returns it.

    A fresh filter draws its initial weights from torch's global RNG *after* the model was
    built, so a model's own weights do not depend on whether a filter gets attached.
    """
    layer1 = model.backbone.body.layer1
    if not isinstance(layer1, Bottleneck):
        raise TypeError("a neural filter needs a student (backbone.body.layer1 must be an HND bottleneck)")
    problem = filter_threshold_problem(threshold)
    if problem:
        raise ValueError(f"filter threshold {problem}")
    ext = module if module is not None else Ext4ResNet(STEM_CHANNELS)
    ext.threshold = float(threshold)
    device = next(layer1.parameters()).device
    layer1.encoder.ext_classifier = ext.to(device).train(layer1.training)
    return ext


def is_filter_state_dict(sd: Mapping[str, Any]) -> bool:
    """True for a state dict of Ext4ResNet keys without prefix (the original's ext checkpoint)."""
    return bool(sd) and all(k.startswith(("extractor.", "linear.")) for k in sd)


def filter_state_dict_from(sd: Mapping[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """The Ext4ResNet keys (without prefix) of a filter-only, full-model or head state dict; {} if none."""
    if is_filter_state_dict(sd):
        return OrderedDict(sd)
    return OrderedDict((k[len(FILTER_PREFIX) :], v) for k, v in sd.items() if k.startswith(FILTER_PREFIX))


def empty_detections(
    kind: str, image_size: tuple[int, int], num_keypoints: int = 17, mask_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The result of a frame with nothing detected, shaped as the model kind's normal empty result.

    boxes [0, 4] float32, labels [0] int64, scores [0] float32; plus masks [0, 1, H, W]
    (``mask_dtype``: float32 as torchvision returns them, uint8 as they come off the wire) for
    mask_rcnn, or keypoints [0, K, 3] and keypoints_scores [0, K] float32 for keypoint_rcnn.
    (The original's filtered placeholder carried 100 masks and 0 scores, which broke segm evaluation.)
    """
    out = {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64), "scores": torch.zeros((0,))}
    if kind == "mask_rcnn":
        out["masks"] = torch.zeros((0, 1, int(image_size[0]), int(image_size[1])), dtype=mask_dtype)
    elif kind == "keypoint_rcnn":
        out["keypoints"] = torch.zeros((0, num_keypoints, 3))
        out["keypoints_scores"] = torch.zeros((0, num_keypoints))
    elif kind != "faster_rcnn":
        raise ValueError(f"unknown model kind {kind!r}")
    return out
