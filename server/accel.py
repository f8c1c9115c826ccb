"""Tail execution options for hnd-server: reduced precision, channels_last, torch.compile.

The tail splits into a **dense part** -- bottleneck decoder, layer2..4, FPN and the RPN head
(convolutions on whole feature maps, static shapes per padded size: where a GPU's time goes) --
and the **rest** -- anchors, proposal decoding and NMS, RoIAlign, the box / mask / keypoint
heads and postprocess (data-dependent shapes). Options apply to the dense part only:

* ``precision`` fp32 | bf16 | fp16: the dense part runs under ``torch.autocast`` (weights stay
  float32, so the fingerprint is that of the served checkpoint); its outputs are cast back to
  float32 and everything after the RPN head (proposals, NMS, RoIAlign, box / mask / keypoint
  heads, postprocess) stays float32. Inside the dense part autocast runs convolutions in the
  reduced type; torchvision's FrozenBatchNorm2d multiplies by float32 buffers, so activations
  return to float32 between convolutions. fp16 needs CUDA; bf16 runs on CPU too.
* ``channels_last``: the dense part's weights and input in NHWC memory format (same values).
* ``compile`` off | default | max-autotune | reduce-overhead: ``torch.compile`` of the dense part
  with static shapes; the batch is padded up to a bucket (1, 2, 4, 8, ...) so a few graphs serve
  every batch size, and at most ``MAX_GRAPHS`` (batch bucket, padded size) pairs are compiled
  (others run eagerly). ``reduce-overhead`` captures CUDA graphs and needs CUDA.

With every option at its default the server runs ``Tail`` itself (bit for bit the in-process
tail). Exactness of the others is stated and tested in tests/test_accel.py (docs/benchmarks/tail-options.md).
"""

from __future__ import annotations

import logging
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from hnd.common.errors import HndError
from hnd.common.split import SplitMeta, Tail

log = logging.getLogger("hnd.server")

PRECISIONS = ("fp32", "bf16", "fp16")
COMPILE_MODES = ("off", "default", "max-autotune", "reduce-overhead")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MAX_GRAPHS = 8
DENSE_PART = "bottleneck decoder, layer2..4, FPN, RPN head"
FP32_PART = "anchors, proposal decoding + NMS, RoIAlign, box/mask/keypoint heads, postprocess"


class AccelError(HndError, ValueError):
    """An option this device or installation cannot run (one line for the user)."""


@dataclass(frozen=True)
class TailOptions:
    precision: str = "fp32"
    channels_last: bool = False
    compile: str = "off"

    @property
    def is_default(self) -> bool:
        return self == TailOptions()

    def summary(self) -> str:
        """Short label, e.g. ``fp32`` or ``bf16+channels_last+compile=default``."""
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        if self.compile != "off":
            parts.append(f"compile={self.compile}")
        return "+".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


def check_options(options: TailOptions, device: torch.device) -> None:
    """Refuse, with one line, what cannot run here."""
    if options.precision not in PRECISIONS:
        raise AccelError(f"--precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    if options.compile not in COMPILE_MODES:
        raise AccelError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {options.compile!r}")
    cuda = device.type == "cuda"
    if options.precision == "fp16" and not cuda:
        raise AccelError("--precision fp16 needs a CUDA device (CPUs lack fast float16 kernels; bf16 runs on CPU)")
    if options.compile == "reduce-overhead" and not cuda:
        raise AccelError("--compile reduce-overhead captures CUDA graphs and needs a CUDA device")
    if options.compile != "off" and not cuda and shutil.which("g++") is None and shutil.which("c++") is None:
        raise AccelError("--compile on CPU needs a C++ compiler (g++) for torch.compile's generated kernels")


def batch_bucket(b: int) -> int:
    """The smallest power of two >= b: compiled graphs exist for these batch sizes only."""
    return 1 << (b - 1).bit_length()


class DenseTail(nn.Module):
    """z [B, C, h, w] -> (FPN maps {name: [B, 256, H_l, W_l]}, RPN objectness and box deltas per level)."""

    def __init__(self, tail: Tail) -> None:
        super().__init__()
        self.tail = tail

    def forward(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        features = self.tail.features(z)
        objectness, deltas = self.tail.rpn.head(list(features.values()))
        return features, objectness, deltas


class AcceleratedTail(nn.Module):
    """Tail with the dense part run per ``TailOptions``; same call and result as ``Tail``.

    forward(z [B, C, h+4, w+4], SplitMeta) -> B detection dicts (float32, original image sizes).
    """

    def __init__(self, tail: Tail, options: TailOptions, device: torch.device) -> None:
        super().__init__()
        check_options(options, device)
        self.tail = tail
        self.options = options
        self.device = device
        self.dense = DenseTail(tail)
        if options.channels_last:
            self.dense.to(memory_format=torch.channels_last)
        self._compiled = None
        self._graphs: set[tuple] = set()
        self._eager: set[tuple] = set()  # shapes past the cap (warned once each)
        if options.compile != "off":
            self._compiled = torch.compile(
                self.dense, mode=None if options.compile == "default" else options.compile, dynamic=False
            )

    def _dense(self, z: torch.Tensor) -> tuple[OrderedDict[str, torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        b = z.shape[0]
        fn: Callable[..., Any] = self.dense
        if self._compiled is not None:
            bucket = batch_bucket(b)
            key = (bucket, *z.shape[1:])
            if key in self._graphs or len(self._graphs) < MAX_GRAPHS:
                self._graphs.add(key)
                fn = self._compiled
                if bucket != b:  # pad with zero bottlenecks; their outputs are dropped below
                    z = torch.cat([z, z.new_zeros((bucket - b, *z.shape[1:]))])
            elif key not in self._eager:
                self._eager.add(key)
                log.warning("more than %d compiled shapes: shape %s runs eagerly", MAX_GRAPHS, tuple(z.shape))
        if self.options.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        dtype = DTYPES.get(self.options.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            features, objectness, deltas = fn(z)

        def back(t: torch.Tensor) -> torch.Tensor:
            return t[:b].float().contiguous()

        return (
            OrderedDict((k, back(v)) for k, v in features.items()),
            [back(t) for t in objectness],
            [back(t) for t in deltas],
        )

    def forward(self, z: torch.Tensor, meta: SplitMeta) -> list[dict[str, torch.Tensor]]:
        if z.shape[0] != len(meta):
            raise ValueError(f"bottleneck batch {z.shape[0]} != {len(meta)} images in meta")
        tail = self.tail
        features, objectness, deltas = self._dense(z)
        images = ImageList(z.new_empty((z.shape[0], 0, *meta.padded_size)), [tuple(s) for s in meta.image_sizes])
        # RegionProposalNetwork.forward (eval) after its head, as torchvision writes it.
        rpn = tail.rpn
        maps = list(features.values())
        anchors = rpn.anchor_generator(images, maps)
        num_anchors_per_level = [o[0].shape[0] * o[0].shape[1] * o[0].shape[2] for o in objectness]
        objectness_flat, deltas_flat = concat_box_prediction_layers(objectness, deltas)
        proposals = rpn.box_coder.decode(deltas_flat.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _ = rpn.filter_proposals(proposals, objectness_flat, images.image_sizes, num_anchors_per_level)
        detections, _ = tail.roi_heads(features, boxes, images.image_sizes)
        return tail.transform.postprocess(detections, images.image_sizes, [tuple(s) for s in meta.original_sizes])


def build_tail(tail: Tail, options: TailOptions, device: torch.device) -> nn.Module:
    """The tail the server runs: ``Tail`` itself for default options, else an ``AcceleratedTail``."""
    check_options(options, device)
    return tail if options.is_default else AcceleratedTail(tail, options, device)


def tail_info(options: TailOptions, device: torch.device) -> dict:
    """What ran, for GetModelInfo and records: options, device name, which part is reduced / stays fp32."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        **options.as_dict(),
        "summary": options.summary(),
        "device": name,
        "reduced_precision_part": DENSE_PART if options.precision != "fp32" else "",
        "fp32_part": FP32_PART if options.precision != "fp32" else "everything",
    }
