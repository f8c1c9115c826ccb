"""The ONNX split mode: the head on ONNX Runtime (``hnd.edge.onnx_head``), the bottleneck on the wire; no torch.

Per frame: numpy/OpenCV preprocessing (torchvision's geometry) -> one ONNX Runtime run (stem + encoder,
and the neural filter's probability when the head has one) -> ``hnd.common.codec`` -> request. With the
filter on, a frame below the threshold is not encoded nor sent (its record says ``filtered``); the
graph computes the encoder anyway, so ``ms.head`` includes it and ``ms.filter`` stays unset.

An Entropic Student's head gives int32 symbols (its graph rounds against the prior's medians); they are
range-coded with the prior's tables from the file (``codec.encode_symbols``), the bytes the torch edge
sends for the same symbols.
"""

from __future__ import annotations

import numpy as np

from hnd.common.config import filter_threshold_problem
from hnd.common.timing import ms_since, now_ns
from hnd.edge.capture import Frame
from hnd.edge.client import EdgeError
from hnd.edge.modes import Detections, EdgeOptions, Prepared, check_split_server
from hnd.common.meta import SplitMeta
from hnd.edge.onnx_head import HeadOutput, OnnxHead
from hnd.edge.records import Timings
from hnd.edge.streaming import BottleneckCoder, CodedSplitMode
from hnd.proto.v1 import split_inference_pb2 as pb

__all__ = ["OnnxSplitMode", "empty_detections"]


def empty_detections(kind: str, image_size: tuple[int, int], num_keypoints: int = 17) -> Detections:
    """A frame with nothing detected, shaped as the kind's empty result off the wire (masks uint8)."""
    out: Detections = {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "scores": np.zeros((0,), np.float32),
    }
    if kind == "mask_rcnn":
        out["masks"] = np.zeros((0, 1, int(image_size[0]), int(image_size[1])), np.uint8)
    elif kind == "keypoint_rcnn":
        out["keypoints"] = np.zeros((0, num_keypoints, 3), np.float32)
        out["keypoints_scores"] = np.zeros((0, num_keypoints), np.float32)
    return out


class OnnxSplitMode(CodedSplitMode):
    """Split with an exported ONNX head (fp32 or int8); the record's mode is "split" like the torch head's."""

    name = "split"

    def __init__(self, options: EdgeOptions, head: OnnxHead) -> None:
        super().__init__(options, head.fingerprint)
        self.head = head
        learned = options.codec.learned  # CodecSettings: learned coding is bits 0, granularity channel
        if head.is_entropic and not learned:
            raise EdgeError(
                f"{head.path}: an Entropic Student's head codes only with learned entropy coding "
                f"(--compression learned --bits 0), not {options.codec.bits}-bit {options.codec.compression}"
            )
        if learned and not head.is_entropic:
            raise EdgeError(f"{head.path}: an HND student's head; learned entropy coding is for Entropic Students")
        # The torch split's coder: per frame, key / delta frames on a stream, or the prior's learned coding.
        self.coder = BottleneckCoder(options, head.prior)
        self.filter_on = options.filter_threshold is not None
        if self.filter_on:
            problem = filter_threshold_problem(options.filter_threshold)
            if problem:
                raise ValueError(f"filter_threshold {problem}")
            if head.filter_threshold is None:
                raise ValueError(f"{head.path}: this ONNX head has no neural filter output")

    def check_server(self, info: pb.ModelInfo) -> None:
        h = self.head
        if info.model_kind and (info.model_kind, info.bottleneck_channels) != (h.kind, h.bottleneck_channels):
            raise EdgeError(
                f"{h.path}: head of a {h.kind} with {h.bottleneck_channels} bottleneck channels, "
                f"server runs a {info.model_kind} with {info.bottleneck_channels}"
            )
        if info.bottleneck_type and info.bottleneck_type != h.bottleneck_type:
            what = {"hnd": "an HND student", "entropic": "an Entropic Student"}
            raise EdgeError(
                f"{h.path}: head of {what.get(h.bottleneck_type, h.bottleneck_type)}, "
                f"server runs {what.get(info.bottleneck_type, info.bottleneck_type)}"
            )
        check_split_server(info, self.fingerprint, self.options.codec, (h.min_size, h.max_size))
        self.coder.check_server(info)

    # The head is stateless (an ONNX Runtime session takes concurrent runs): the runner may compute several
    # frames at once (EdgeOptions.head_workers); the coder, stateful, codes them in frame order.
    parallel_head = True

    def prepare(self, frame: Frame) -> Prepared:
        return self.finish(frame, self.compute(frame))

    def compute(self, frame: Frame) -> tuple[Timings, HeadOutput, SplitMeta]:
        """Preprocess + head of one frame, timed; order-free."""
        ms = Timings(capture=frame.capture_ms)
        start = now_ns()
        batch, meta = self.head.preprocess([frame.image])
        ms.preprocess = ms_since(start)
        t = now_ns()
        out = self.head.run(batch)
        ms.head = ms_since(t)
        return ms, out, meta

    def finish(self, frame: Frame, computed: tuple[Timings, HeadOutput, SplitMeta]) -> Prepared:
        """The filter's decision and the coding of ``compute``'s output, in frame order."""
        o = self.options
        ms, out, meta = computed
        request = self.new_request(frame)
        probability: float | None = None
        filtered: bool | None = None
        if self.filter_on:
            probability = float(out.filter_probability[0])
            filtered = probability < o.filter_threshold
            if filtered:
                h, w = frame.image.shape[:2]
                empty = empty_detections(self.head.kind, (h, w), self.head.num_keypoints or 17)
                return Prepared(
                    frame, ms, local_result=[empty], done_ns=now_ns(), filtered=True, filter_probability=probability
                )
        return self.coded(frame, ms, request, out.bottleneck, meta, filtered, probability)
