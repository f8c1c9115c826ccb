"""Teacher and student R-CNNs.

The teacher is torchvision's ResNet-50-FPN Faster / Mask / Keypoint R-CNN. The
student is the same model with ``backbone.body.layer1`` replaced by the HND
bottleneck: an encoder that squeezes the 64-channel stem output into C channels
(what the edge sends) and a decoder that restores layer1's 256 channels. Layer
order and state-dict key names follow the original code (Bottleneck4LargeResNet,
see docs/ORIGINAL_MODELS.md section 1) so its checkpoints load.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn
from torchvision.models import resnet50
from torchvision.models.detection import FasterRCNN, KeypointRCNN, MaskRCNN
from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from hnd.common.entropic import DEFAULT_CHANNELS, build_entropic_backbone, entropic_bottleneck_of, is_entropic

from hnd.common.meta import BOTTLENECK_TYPES, MODEL_KINDS  # defined without torch, so configs load without it

# torchvision COCO weights the original initialised its teachers (and students) from.
TORCHVISION_WEIGHT_URLS = {
    "faster_rcnn": "https://download.pytorch.org/models/fasterrcnn_resnet50_fpn_coco-258fb6c6.pth",
    "mask_rcnn": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
    "keypoint_rcnn": "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
}

_DEFAULT_NUM_CLASSES = {"faster_rcnn": 91, "mask_rcnn": 91, "keypoint_rcnn": 2}


class BottleneckEncoder(nn.Module):
    """Edge half of the bottleneck: [B, 64, h, w] stem output -> [B, C, h+4, w+4] bottleneck z.

    Four 2x2 convolutions with padding 1 (each grows the map by one pixel per side
    and a half); z is the raw, signed output of the last conv, as in the original.
    ``ext_classifier`` is the slot of the original's neural filter (Ext4ResNet); it
    stays None unless a filter is attached, and the encoder ignores it here: the
    head decides whether to run the encoder.
    """

    def __init__(self, bottleneck_channels: int) -> None:
        super().__init__()
        c = bottleneck_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(64, 64, kernel_size=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.Conv2d(64, 256, kernel_size=2, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 64, kernel_size=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.Conv2d(64, c, kernel_size=2, padding=1, bias=False),
        )
        self.ext_classifier: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


def make_bottleneck_decoder(bottleneck_channels: int) -> nn.Sequential:
    """Server half: [B, C, h+4, w+4] -> [B, 256, h, w] (four unpadded 2x2 convs)."""
    c = bottleneck_channels
    return nn.Sequential(
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, 64, kernel_size=2, bias=False),
        nn.BatchNorm2d(64),
        nn.Conv2d(64, 128, kernel_size=2, bias=False),
        nn.BatchNorm2d(128),
        nn.ReLU(inplace=True),
        nn.Conv2d(128, 256, kernel_size=2, bias=False),
        nn.BatchNorm2d(256),
        nn.Conv2d(256, 256, kernel_size=2, bias=False),
        nn.BatchNorm2d(256),
        nn.ReLU(inplace=True),
    )


class Bottleneck(nn.Module):
    """Replacement for ResNet-50's layer1: [B, 64, h, w] -> [B, 256, h, w].

    State-dict keys: ``encoder.encoder.{0,1,2,3,5,6,7}.*`` and ``decoder.{0,2,3,4,5,7,8,9,10}.*``
    (the original's Bottleneck4LargeResNet).
    """

    def __init__(self, bottleneck_channels: int) -> None:
        super().__init__()
        if bottleneck_channels < 1:
            raise ValueError(f"bottleneck_channels must be >= 1, got {bottleneck_channels}")
        self.bottleneck_channels = bottleneck_channels
        self.encoder = BottleneckEncoder(bottleneck_channels)
        self.decoder = make_bottleneck_decoder(bottleneck_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def _detector_class(kind: str) -> type[nn.Module]:
    if kind == "faster_rcnn":
        return FasterRCNN
    if kind == "mask_rcnn":
        return MaskRCNN
    if kind == "keypoint_rcnn":
        return KeypointRCNN
    raise ValueError(f"unknown model kind {kind!r}; expected one of {', '.join(MODEL_KINDS)}")


def build_model(
    kind: str,
    bottleneck_channels: int | None = None,
    num_classes: int | None = None,
    bottleneck_type: str = "hnd",
    **kwargs: Any,
) -> nn.Module:
    """Build a teacher (``bottleneck_channels=None``), an HND student or an Entropic Student R-CNN.

    Args:
        kind: ``faster_rcnn``, ``mask_rcnn`` or ``keypoint_rcnn``.
        bottleneck_channels: C of the bottleneck replacing ``backbone.body.layer1``; None for the teacher.
        num_classes: including background; defaults 91 (COCO) or 2 (person keypoints).
        bottleneck_type: ``hnd`` (layer1 replaced by the HND bottleneck) or ``entropic`` (stem and
            layer1 replaced by sc2bench's entropy-coded bottleneck, ``hnd.common.entropic``).
        **kwargs: passed to torchvision's FasterRCNN / MaskRCNN / KeypointRCNN
            (min_size, max_size, box_score_thresh, num_keypoints, ...).

    Returns:
        the model in eval mode. Parameters are randomly initialised from torch's
        global RNG; seed it for reproducible weights. Weights come from
        ``hnd.common.build.build_model_from_config`` (or ``hnd.common.checkpoint.load_weights``).
    """
    detector = _detector_class(kind)
    if num_classes is None:
        num_classes = _DEFAULT_NUM_CLASSES[kind]
    # FrozenBatchNorm2d with eps 0 as in the original (torchvision 0.4.2's frozen BN had no eps,
    # and torchvision itself sets eps 0 for these COCO_V1 weights).
    if bottleneck_type not in BOTTLENECK_TYPES:
        raise ValueError(f"unknown bottleneck_type {bottleneck_type!r}; expected one of {', '.join(BOTTLENECK_TYPES)}")
    if bottleneck_type == "entropic":
        backbone = build_entropic_backbone(bottleneck_channels or DEFAULT_CHANNELS)
    else:
        frozen_bn = partial(FrozenBatchNorm2d, eps=0.0)
        body = resnet50(weights=None, norm_layer=frozen_bn)
        backbone = _resnet_fpn_extractor(body, trainable_layers=5)
        if bottleneck_channels is not None:
            backbone.body.layer1 = Bottleneck(bottleneck_channels)
    model = detector(backbone, num_classes=num_classes, **kwargs)
    return model.eval()


def is_student(model: nn.Module) -> bool:
    """True for a splittable student: an HND bottleneck at ``backbone.body.layer1`` or an Entropic Student."""
    return isinstance(getattr(model.backbone.body, "layer1", None), Bottleneck) or is_entropic(model)


def bottleneck_type_of(model: nn.Module) -> str | None:
    """``hnd``, ``entropic``, or None for a teacher."""
    if is_entropic(model):
        return "entropic"
    return "hnd" if isinstance(getattr(model.backbone.body, "layer1", None), Bottleneck) else None


def model_kind(model: nn.Module) -> str:
    """``faster_rcnn``, ``mask_rcnn`` or ``keypoint_rcnn`` of a built model."""
    if isinstance(model, KeypointRCNN):
        return "keypoint_rcnn"
    if isinstance(model, MaskRCNN):
        return "mask_rcnn"
    if isinstance(model, FasterRCNN):
        return "faster_rcnn"
    raise TypeError(f"not an R-CNN built by hnd: {type(model).__name__}")


def bottleneck_channels_of(model: nn.Module) -> int | None:
    """C of the student's bottleneck (HND or Entropic), None for a teacher."""
    if is_entropic(model):
        return entropic_bottleneck_of(model).bottleneck_channels
    layer1 = getattr(model.backbone.body, "layer1", None)
    return layer1.bottleneck_channels if isinstance(layer1, Bottleneck) else None
