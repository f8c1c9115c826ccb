"""The edge modes that run torch: split with a torch head, and local (the whole model here).

Neural filter (``EdgeOptions.filter_threshold``, both modes; the student must carry an Ext4ResNet):
preprocess -> stem -> filter; a frame whose probability is below the threshold is not encoded nor sent
(split) or not run further (local). Its record says ``filtered: true`` with ``filter_probability`` and
``ms.filter``, and its detections are the model kind's normal empty result.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from hnd.common.config import filter_threshold_problem
from hnd.common.neural_filter import empty_detections, get_filter
from hnd.common.split import EntropicHead, Head, Tail, split_model
from hnd.common.timing import ms_since, now_ns
from hnd.edge.capture import Frame
from hnd.edge.modes import EdgeMode, EdgeOptions, Prepared, check_split_server
from hnd.edge.records import Timings
from hnd.edge.streaming import BottleneckCoder, CodedSplitMode
from hnd.proto.v1 import split_inference_pb2 as pb


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 RGB -> [3, H, W] float32 in 0..1 (as torchvision's to_tensor)."""
    if not image.flags.writeable:  # a read-only frame (a shared or cached one): torch warns on a view of it
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1).float().div(255)


def _check_filter(options: EdgeOptions, module: nn.Module) -> bool:
    """True when the filter is on; ValueError when its threshold or the model cannot do it."""
    if options.filter_threshold is None:
        return False
    problem = filter_threshold_problem(options.filter_threshold)
    if problem:
        raise ValueError(f"filter_threshold {problem}")
    if get_filter(module) is None:
        raise ValueError("filter_threshold needs a student with a neural filter (config model.filter)")
    return True


class _FilterMixin:
    options: EdgeOptions

    def _run_filter(self, head: Head, features: torch.Tensor, ms: Timings) -> tuple[float, bool]:
        """(probability, filtered) of one frame's stem output [1, 64, h, w]; times ms.filter."""
        t = now_ns()
        probability = float(head.filter_probability(features)[0])
        ms.filter = ms_since(t)
        return probability, probability < self.options.filter_threshold

    @staticmethod
    def _filtered(head: Head, frame: Frame, ms: Timings, probability: float, mask_dtype: torch.dtype) -> Prepared:
        """A frame the filter dropped: no request, the kind's normal empty result."""
        h, w = frame.image.shape[:2]
        empty = empty_detections(head.kind, (h, w), head.num_keypoints or 17, mask_dtype)
        return Prepared(
            frame, ms, local_result=[empty], done_ns=now_ns(), filtered=True, filter_probability=probability
        )


class TorchSplitMode(_FilterMixin, CodedSplitMode):
    """Head (transform + stem + bottleneck encoder) in torch here, the quantized bottleneck on the wire."""

    name = "split"

    def __init__(self, options: EdgeOptions, head: Head, fingerprint: str) -> None:
        super().__init__(options, fingerprint)
        self.head = head
        self.filter_on = _check_filter(options, head)
        # An Entropic Student's head codes against its prior's tables (loaded with its weights).
        prior = head.prior_tables() if getattr(head, "bottleneck_type", None) == "entropic" else None
        self.coder = BottleneckCoder(options, prior)  # per frame, or key / delta frames on a stream

    def check_server(self, info: pb.ModelInfo) -> None:
        t = self.head.transform
        check_split_server(info, self.fingerprint, self.options.codec, (int(t.min_size[-1]), int(t.max_size)))
        self.coder.check_server(info)

    @torch.inference_mode()
    def prepare(self, frame: Frame) -> Prepared:
        ms = Timings(capture=frame.capture_ms)
        start = now_ns()
        request = self.new_request(frame)
        filtered: bool | None = None
        probability: float | None = None
        batch, meta = self.head.preprocess([to_tensor(frame.image)])
        ms.preprocess = ms_since(start)
        t = now_ns()
        if not self.filter_on:
            z = self.head.encode(batch)
            ms.head = ms_since(t)
        else:
            features = self.head.stem(batch)
            stem_ms = ms_since(t)
            probability, filtered = self._run_filter(self.head, features, ms)
            if filtered:
                ms.head = stem_ms  # the encoder never ran
                return self._filtered(self.head, frame, ms, probability, torch.uint8)  # masks as the wire gives
            t = now_ns()
            z = self.head.encode_features(features)
            ms.head = stem_ms + ms_since(t)
        return self.coded(frame, ms, request, z, meta, filtered, probability)


class LocalMode(_FilterMixin, EdgeMode):
    """The whole model here (no server): the reference the other modes are compared with."""

    name = "local"
    uses_server = False

    def __init__(self, options: EdgeOptions, model: nn.Module, fingerprint: str = "") -> None:
        super().__init__(options, fingerprint)
        self.model = model
        # head + tail share the model's modules; tail(head(x)) == model(x) bit for bit.
        self.split = split_model(model) if _check_filter(options, model) else None

    @torch.inference_mode()
    def prepare(self, frame: Frame) -> Prepared:
        ms = Timings(capture=frame.capture_ms)
        start = now_ns()
        if self.split is not None:
            return self._prepare_filtered(self.split, frame, ms, start)
        img = to_tensor(frame.image)
        ms.preprocess = ms_since(start)
        t = now_ns()
        result = self.model([img])
        ms.head = ms_since(t)  # the whole model: it all runs on the edge
        return Prepared(frame, ms, local_result=result, done_ns=now_ns())

    def _prepare_filtered(
        self, split: tuple[Head | EntropicHead, Tail], frame: Frame, ms: Timings, start: int
    ) -> Prepared:
        """preprocess -> stem -> filter -> (encoder -> tail) on the edge."""
        head, tail = split
        batch, meta = head.preprocess([to_tensor(frame.image)])
        ms.preprocess = ms_since(start)
        t = now_ns()
        features = head.stem(batch)
        stem_ms = ms_since(t)
        probability, filtered = self._run_filter(head, features, ms)
        if filtered:
            ms.head = stem_ms
            return self._filtered(head, frame, ms, probability, torch.float32)  # masks as torchvision gives
        t = now_ns()
        result = tail(head.encode_features(features), meta)
        ms.head = stem_ms + ms_since(t)  # the whole model but the filter: it all runs on the edge
        return Prepared(
            frame, ms, local_result=result, done_ns=now_ns(), filtered=False, filter_probability=probability
        )
