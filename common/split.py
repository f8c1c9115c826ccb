"""Cut one student R-CNN into the edge's Head and the server's Tail.

Head = transform + stem + bottleneck encoder; Tail = bottleneck decoder + layer2..4 +
FPN + RPN + ROI heads + postprocess. ``tail(*head(images)) == model(images)`` bit for
bit in eval mode (tests/test_split.py).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

from hnd.common.entropic import FPBottleneck, is_entropic
from hnd.common.meta import SplitMeta, concat_meta  # noqa: F401 - re-exported: their old home
from hnd.common.models import Bottleneck, model_kind
from hnd.common.neural_filter import Ext4ResNet, get_filter
from hnd.common.entropy_coder import EntropyCodingError, PriorTables


@dataclass
class FilteredBatch:
    """What :meth:`Head.encode_filtered` gives for a batch of B images, K of them kept.

    z: bottleneck [K, C, h+4, w+4] of the kept images, None when K == 0 (the encoder did not run).
    keep: [B] bool, probability >= threshold. probability: [B] class-1 probability of the filter.
    """

    z: torch.Tensor | None
    keep: torch.Tensor
    probability: torch.Tensor

    @property
    def kept(self) -> list[int]:
        return self.keep.nonzero().flatten().tolist()


# Head parameter names -> the full model's names (head exports and loads use the full names).
HEAD_PREFIXES = {
    "conv1.": "backbone.body.conv1.",
    "bn1.": "backbone.body.bn1.",
    "encoder.": "backbone.body.layer1.encoder.",
}
# The same for an Entropic Student's head (encoder + the prior whose tables the edge codes with).
ENTROPIC_HEAD_PREFIXES = {
    "encoder.": "backbone.body.bottleneck_layer.encoder.",
    "entropy_bottleneck.": "backbone.body.bottleneck_layer.entropy_bottleneck.",
}


def head_prefixes(head: nn.Module) -> dict[str, str]:
    """Head parameter-name prefixes -> full model names, for this kind of head."""
    return ENTROPIC_HEAD_PREFIXES if isinstance(head, EntropicHead) else HEAD_PREFIXES


def preprocess(transform: nn.Module, images: list[torch.Tensor]) -> tuple[torch.Tensor, SplitMeta]:
    """list of [3, H_i, W_i] floats in 0..1 -> (padded batch [B, 3, Hp, Wp], SplitMeta) via the model's transform."""
    original_sizes = tuple((int(img.shape[-2]), int(img.shape[-1])) for img in images)
    image_list, _ = transform(images)
    meta = SplitMeta(
        original_sizes=original_sizes,
        image_sizes=tuple((int(h), int(w)) for h, w in image_list.image_sizes),
        padded_size=(int(image_list.tensors.shape[-2]), int(image_list.tensors.shape[-1])),
    )
    return image_list.tensors, meta


class Head(nn.Module):
    """Edge side: images -> bottleneck.

    Runs torchvision's GeneralizedRCNNTransform (normalize, resize, pad to a multiple of
    32), the ResNet stem (conv1, bn1, relu, maxpool) and the bottleneck encoder.
    Holds no tail parameter. When the student carries a neural filter (at
    ``encoder.ext_classifier``), :meth:`encode_filtered` runs it on the stem output and the
    encoder only on the frames it keeps; :meth:`encode` and :meth:`forward` ignore it.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        body = model.backbone.body
        if not isinstance(getattr(body, "layer1", None), Bottleneck):
            raise TypeError("split_model needs a student (backbone.body.layer1 must be an HND bottleneck)")
        self.kind = model_kind(model)
        self.bottleneck_channels = body.layer1.bottleneck_channels
        # get_submodule, not attribute access, where the part's type matters: nn.Module.__getattr__ types
        # every attribute as "Tensor | Module" (and Tensor has a .relu method).
        self.transform = model.get_submodule("transform")
        self.conv1 = body.conv1
        self.bn1 = body.bn1
        self.relu = body.get_submodule("relu")
        self.maxpool = body.maxpool
        self.encoder = body.layer1.encoder
        # Shape of an empty keypoint result on the edge (frames the filter drops).
        predictor = getattr(model.roi_heads, "keypoint_predictor", None)
        self.num_keypoints = int(predictor.kps_score_lowres.out_channels) if predictor is not None else 0

    def preprocess(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, SplitMeta]:
        """list of [3, H_i, W_i] floats in 0..1 -> (padded batch [B, 3, Hp, Wp], SplitMeta)."""
        return preprocess(self.transform, images)

    def stem(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, Hp, Wp] -> [B, 64, Hp/4, Wp/4] (the tap point of the neural filter)."""
        return self.maxpool(self.relu(self.bn1(self.conv1(batch))))

    def encode_features(self, features: torch.Tensor) -> torch.Tensor:
        """Stem output [B, 64, h, w] -> bottleneck [B, C, h + 4, w + 4]."""
        return self.encoder(features)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, Hp, Wp] -> bottleneck [B, C, Hp/4 + 4, Wp/4 + 4]."""
        return self.encode_features(self.stem(batch))

    @property
    def filter(self) -> Ext4ResNet | None:
        """The neural filter (Ext4ResNet) of this student, or None."""
        return get_filter(self)

    @property
    def filter_threshold(self) -> float | None:
        """The configured default threshold of the filter, None without a filter."""
        ext = self.filter
        return ext.threshold if ext is not None else None

    def filter_probability(self, features: torch.Tensor) -> torch.Tensor:
        """Stem output [B, 64, h, w] -> [B] probability that a frame holds something to detect.

        Independent of train / eval mode (the original's Ext4ResNet returned logits in train mode).
        """
        ext = self.filter
        if ext is None:
            raise RuntimeError("this head has no neural filter (the config needs a model.filter section)")
        return ext.probability(features)

    def encode_filtered(self, batch: torch.Tensor, threshold: float) -> FilteredBatch:
        """[B, 3, Hp, Wp] -> stem -> filter -> encoder on the kept frames only (stem computed once).

        A frame is kept when its probability >= ``threshold`` (the original skipped p < threshold).
        Works for any B; the original filtered only batches of one.
        """
        features = self.stem(batch)
        probability = self.filter_probability(features)
        keep = probability >= threshold
        if bool(keep.all()):
            z = self.encode_features(features)
        elif bool(keep.any()):
            z = self.encode_features(features[keep])
        else:
            z = None
        return FilteredBatch(z, keep, probability)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, SplitMeta]:
        batch, meta = self.preprocess(images)
        return self.encode(batch), meta


class Tail(nn.Module):
    """Server side: bottleneck + SplitMeta -> detections, as the full model returns them.

    Runs the bottleneck decoder, layer2..4, FPN, RPN, ROI heads and the transform's
    postprocess (boxes, masks and keypoints scaled back to the original image sizes).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        body = model.get_submodule("backbone.body")  # typed (see Head)
        self.transform = model.transform  # postprocess only; holds no parameters
        # IntermediateLayerGetter's children after the bottleneck, and the output names it gives them.
        self.return_layers = dict(cast("dict[str, str]", body.return_layers))  # a plain dict attribute
        self.entropy_bottleneck: nn.Module | None = None
        if is_entropic(model):
            bottleneck: FPBottleneck = body.bottleneck_layer
            self.decoder = bottleneck.decoder
            # Only its medians are used: the tail re-rounds what it is given (see features()).
            self.entropy_bottleneck = bottleneck.entropy_bottleneck
            self.first_layer = "bottleneck_layer"
        else:
            self.decoder = body.layer1.decoder
            self.first_layer = "layer1"
        self.layers = nn.ModuleDict({name: body.get_submodule(name) for name in ("layer2", "layer3", "layer4")})
        self.fpn = model.backbone.fpn
        self.rpn = model.rpn
        self.roi_heads = model.roi_heads

    def features(self, z: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """Bottleneck -> FPN feature maps, as BackboneWithFPN would give them.

        HND: z [B, C, h+4, w+4]. Entropic: the latent [B, C, Hp/4 - 1, Wp/4 - 1], raw (from the head) or
        decoded (round(y - median) + median): rounding again is exact for a decoded latent, so
        tail(head(x)) and tail(codec round trip) both equal the model's own forward bit for bit.
        """
        if self.entropy_bottleneck is not None:
            m = self.entropy_bottleneck.medians().reshape(1, -1, 1, 1)
            z = torch.round(z - m) + m
        x = self.decoder(z)
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        out[self.return_layers[self.first_layer]] = x
        for name, layer in self.layers.items():
            x = layer(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return self.fpn(out)

    def forward(self, z: torch.Tensor, meta: SplitMeta) -> list[dict[str, torch.Tensor]]:
        if z.shape[0] != len(meta):
            raise ValueError(f"bottleneck batch {z.shape[0]} != {len(meta)} images in meta")
        features = self.features(z)
        # The RPN's anchor generator reads only the padded batch shape from ImageList.tensors:
        # an empty stand-in of that shape avoids sending or allocating the image.
        stand_in = z.new_empty((z.shape[0], 0, *meta.padded_size))
        image_sizes = [tuple(s) for s in meta.image_sizes]
        images = ImageList(stand_in, image_sizes)
        proposals, _ = self.rpn(images, features)
        detections, _ = self.roi_heads(features, proposals, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, [tuple(s) for s in meta.original_sizes])


class EntropicHead(nn.Module):
    """Edge side of an Entropic Student: images -> latent y [B, C, Hp/4 - 1, Wp/4 - 1] (raw, unrounded).

    Runs the transform and the bottleneck's encoder (there is no ResNet stem: the encoder replaces
    it). The codec rounds y against the prior's medians and entropy-codes it with the prior's tables
    (``hnd.common.entropy_coder``); :meth:`prior_tables` gives them from this head's weights.
    """

    bottleneck_type = "entropic"
    filter = None
    filter_threshold = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        bottleneck: FPBottleneck = model.backbone.body.bottleneck_layer
        self.kind = model_kind(model)
        self.bottleneck_channels = bottleneck.bottleneck_channels
        self.transform = model.get_submodule("transform")
        self.encoder = bottleneck.encoder
        self.entropy_bottleneck = bottleneck.entropy_bottleneck
        predictor = getattr(model.roi_heads, "keypoint_predictor", None)
        self.num_keypoints = int(predictor.kps_score_lowres.out_channels) if predictor is not None else 0

    def preprocess(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, SplitMeta]:
        """list of [3, H_i, W_i] floats in 0..1 -> (padded batch [B, 3, Hp, Wp], SplitMeta)."""
        return preprocess(self.transform, images)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        """[B, 3, Hp, Wp] -> latent y [B, C, Hp/4 - 1, Wp/4 - 1]."""
        return self.encoder(batch)

    def prior_tables(self):  # -> hnd.common.entropy_coder.PriorTables
        """The integer CDF tables and medians the codec codes with (refuses a model never update()d)."""
        return prior_tables_of(self.entropy_bottleneck)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, SplitMeta]:
        batch, meta = self.preprocess(images)
        return self.encode(batch), meta


def prior_tables_of(entropy_bottleneck: nn.Module):  # -> hnd.common.entropy_coder.PriorTables
    """PriorTables from an EntropyBottleneck's buffers (CPU numpy copies)."""
    eb = entropy_bottleneck
    if not eb.updated:
        raise EntropyCodingError(
            "the entropy bottleneck has no CDF tables yet: run update() "
            "(hnd.common.entropic.update_entropy_tables) before coding"
        )
    return PriorTables(
        eb._quantized_cdf.cpu().numpy(),
        eb._cdf_length.cpu().numpy(),
        eb._offset.cpu().numpy(),
        eb.medians().cpu().numpy(),
    )


def split_model(model: nn.Module, copy_modules: bool = False) -> tuple[Head | EntropicHead, Tail]:
    """Cut a student R-CNN (HND or Entropic) into (Head, Tail) sharing the model's modules.

    ``tail(*head(images))`` equals ``model(images)`` bit for bit in eval mode. With
    ``copy_modules`` the halves get deep copies, so the model can be freed or changed.
    """
    if copy_modules:
        model = copy.deepcopy(model)
    head: Head | EntropicHead = EntropicHead(model) if is_entropic(model) else Head(model)
    tail = Tail(model)
    head.train(model.training)
    tail.train(model.training)
    return head, tail


def head_state_dict(head: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The head's weights under the full model's key names."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    prefixes = head_prefixes(head)
    for key, value in head.state_dict().items():
        for short, full in prefixes.items():
            if key.startswith(short):
                out[full + key[len(short) :]] = value
                break
    return out


def is_head_key(full_key: str) -> bool:
    """True for full-model state-dict keys the head holds."""
    return any(full_key.startswith(full) for full in (*HEAD_PREFIXES.values(), *ENTROPIC_HEAD_PREFIXES.values()))
