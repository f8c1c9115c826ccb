"""Edge modes: how one frame becomes a request (or a local result). One interface, several modes.

The interface (:class:`EdgeMode`), as the runner (:class:`hnd.edge.pipeline.EdgeRunner`) uses it::

    mode.check_server(info)            # once, after GetModelInfo: raise an HndError (one line) if the
                                       # server cannot serve this mode (fingerprint, bits, formats...)
    p = mode.prepare(frame)            # per frame, on the edge: -> Prepared, a typed request
                                       #   (p.request: pb.InferRequest, None when computed here)
                                       #   + its timings (p.ms: records.Timings) and byte counts
    ...the runner sends p.request (unary or stream), in a window of K in flight...
    dets = mode.detections(p, response)  # the frame's detections: the server's response decoded,
                                       #   or what prepare computed locally (response None)
    mode.after(p, record)              # every frame's final FrameRecord, in frame order, failed ones
                                       #   included: stream sessions reset state here (e.g. "next frame
                                       #   is a key frame" after a failure); default: nothing
    mode.close()                       # end of the run

``prepare`` owns every edge stage it runs and times them into ``Prepared.ms`` (capture is the source's;
network_server / total / overhead are the runner's). A mode can add record keys through
``Prepared.extra`` (merged into the record's top level). ``mode.name`` is the record's ``mode``
("split", "offload", "local"); ``mode.uses_server`` says whether the runner needs a client.

Modes here: :class:`OffloadMode` (the frame as JPEG/PNG; no torch). The torch modes (split with a
torch head, local) live in :mod:`hnd.edge.torch_modes`, so a torch-free edge never imports torch; the
ONNX split in :mod:`hnd.edge.onnx_mode`, the stream modes in :mod:`hnd.edge.streaming`. This module
imports none of them: :func:`hnd.edge.api.make_mode`, beside the API that picks, builds one from
:class:`EdgeOptions` and the parts given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from hnd.common import wire
from hnd.common.codec import CodecSettings
from hnd.common.meta import check_fingerprint
from hnd.common.timing import ms_since, now_ns
from hnd.edge.capture import Frame
from hnd.edge.client import EdgeError, next_request_id
from hnd.edge.records import Timings
from hnd.edge.window import Window
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import tensor_pb2

Detections = dict[str, Any]  # boxes [N, 4], labels [N], scores [N] (+ masks, keypoints): tensors or arrays


@dataclass
class EdgeOptions:
    mode: str = "split"  # split | offload | local
    codec: CodecSettings = CodecSettings()  # split: how the bottleneck is coded (validated)
    image_format: str = "jpeg"  # offload: jpeg | png | webp | h264 | hevc (video: InferStream)
    jpeg_quality: int = 90
    webp_quality: int = 80
    # Temporal coding (hnd.edge.streaming). Split: a key frame every key_interval frames (1: every frame
    # intra, as unary calls do), or when more than max_clamped of the values would clamp to the key's range.
    key_interval: int = 1
    max_clamped: float = 0.001
    # H.264 / HEVC offload (hnd.common.video): CRF, or a bitrate in bit/s; key frame interval; x264 preset.
    crf: float = 23.0
    bitrate: int | None = None
    gop: int = 30
    preset: str = "medium"
    video_fps: float = 10.0
    max_inflight: int = 2
    # Size the window (up to max_inflight) and the client's deadline from measured answers and the server's
    # limits (hnd.edge.window) instead of keeping them fixed: what hnd-edge does unless --max-inflight /
    # --timeout are given.
    auto_window: bool = False
    auto_deadline: bool = False
    stream: bool = False
    score_threshold: float | None = None
    retry_unavailable: bool = True  # after a reconnect, resend a frame that failed with UNAVAILABLE
    # Sends per frame, first included (each may hold gRPC's own retries): a frame whose replica died
    # or drained, or whose stream broke, goes again to whichever replica the balancer picks.
    max_attempts: int = 3
    # End the run (ServerGone) once the server has been unreachable this long, counted from the first
    # UNAVAILABLE since the last answer. None: reconnect for every frame, forever.
    give_up_after_s: float | None = 30.0
    keep_detections: bool = True  # put boxes / labels / scores in the records
    # Neural filter: frames whose probability of holding anything to detect is below this are not
    # sent (split) or not run (local). None: off. Needs a student with a filter (model.filter).
    filter_threshold: float | None = None
    # Frames whose head runs at once, on a pool of this many threads (a mode with an order-free head stage,
    # EdgeMode.compute: the ONNX split); coding and sending stay in frame order. 1: each frame prepared in turn.
    head_workers: int = 1


@dataclass
class Prepared:
    """A frame made ready to send (``request``), or already computed here (``local_result``).

    ms: the edge stages prepare ran; payload_bytes: the bottleneck / image bytes; message_bytes: the whole
    request; done_ns: monotonic time prepare finished (the runner resets it when it sends).
    """

    frame: Frame
    ms: Timings
    request: pb.InferRequest | None = None
    payload_bytes: int = 0
    message_bytes: int = 0
    local_result: list[Detections] | None = None
    done_ns: int = 0
    deadline_s: float = 0.0  # the deadline of its last send (a self-sized one moves between sends)
    filtered: bool | None = None  # None: no filter ran
    filter_probability: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    span: Any = None  # the frame's OpenTelemetry span while tracing is on (hnd.common.tracing)


class EdgeMode:
    """One way of running a frame (see the module docstring for the call order). Subclass and implement
    ``prepare``; override ``check_server`` / ``detections`` / ``after`` / ``close`` when the mode needs to."""

    name = "mode"
    uses_server = True

    def __init__(self, options: EdgeOptions, fingerprint: str = "") -> None:
        self.options = options
        self.fingerprint = fingerprint

    def check_server(self, info: pb.ModelInfo) -> None:
        """Raise an HndError (EdgeError, FingerprintMismatch) with one line when the server cannot serve this mode."""

    def prepare(self, frame: Frame) -> Prepared:
        raise NotImplementedError

    # A mode whose prepare splits into an order-free part (the head: no state, safe on several frames at once)
    # and an in-order rest (coding: temporal coding needs frame order) sets ``parallel_head`` and implements
    # ``compute`` and ``finish``: prepare(frame) is then finish(frame, compute(frame)).
    parallel_head = False

    def compute(self, frame: Frame) -> Any:
        """The order-free part of ``prepare`` (``parallel_head`` modes); may run on several frames at once."""
        raise NotImplementedError

    def finish(self, frame: Frame, computed: Any) -> Prepared:
        """The rest of ``prepare`` on ``compute``'s result, called in frame order (``parallel_head`` modes)."""
        raise NotImplementedError

    def detections(self, prepared: Prepared, response: pb.InferResponse | None) -> list[Detections]:
        """numpy arrays, whichever side computed them (the wire's decoding, or torch results made here)."""
        if response is None:
            return [wire.detections_as_numpy(d) for d in prepared.local_result or []]
        return [wire.detections_from_proto(d) for d in response.detections]

    def after(self, prepared: Prepared, record: Any) -> None:
        """Called with every frame's final FrameRecord, in frame order."""

    def reencode(self, prepared: Prepared, reason: str) -> bool:
        """Rebuild ``prepared.request`` before the runner resends it: reason "reconnect" (a new stream after
        UNAVAILABLE) or "refused" (the server had no reference for this stream frame). False: nothing to
        redo (resend as is, or, for "refused", record the refusal). Stream modes: hnd.edge.streaming."""
        return False

    def close(self) -> None:
        pass

    def use_window(self, window: Window) -> None:
        """The runner's in-flight window (its ``size`` changes as answers are measured when it sizes itself);
        called once, before the first frame. Default: unused."""

    def summary_sections(self) -> dict[str, Any]:
        """The mode's own summary figures by name (objects with as_dict() / format_lines()); default none."""
        return {}

    def new_request(self, frame: Frame) -> pb.InferRequest:
        """An InferRequest with this frame's id, the weights fingerprint and the score threshold set."""
        request = pb.InferRequest(request_id=next_request_id(frame.index), weights_fingerprint=self.fingerprint)
        if self.options.score_threshold is not None:
            request.score_threshold = self.options.score_threshold
        return request


def check_split_server(
    info: pb.ModelInfo, fingerprint: str, settings: CodecSettings, resize: tuple[int, int] | None
) -> None:
    """What a split mode needs of the server: the same weights (FingerprintMismatch), ``settings``' codec
    mode and bits and (given) a resize it accepts (EdgeError).

    resize: the edge's (min_size, max_size). A server that advertises ``limits.max_short_side /
    max_long_side`` accepts any resize within them (a native-resolution split); one that does not,
    only its own.
    """
    check_fingerprint(info.weights_fingerprint, fingerprint)
    bits, compression = settings.bits, settings.compression
    entropic_server = tensor_pb2.COMPRESSION_LEARNED in info.accepted_compressions
    if settings.learned and not entropic_server:
        raise EdgeError(
            f"the server's {info.model_kind} is an HND student: it takes no learned entropy coding "
            f"(accepts bits {list(info.accepted_bits)}); use an Entropic Student config"
        )
    if not settings.learned and entropic_server:
        raise EdgeError(
            f"the server's {info.model_kind} is an Entropic Student: it takes only learned entropy "
            f"coding (--compression learned --bits 0), not {bits}-bit {compression}"
        )
    if bits not in info.accepted_bits:
        raise EdgeError(f"the server does not accept {bits}-bit bottlenecks (accepts {list(info.accepted_bits)})")
    if resize is None:
        return
    short, long = info.limits.max_short_side, info.limits.max_long_side
    if short and long:
        if resize[0] > short or resize[1] > long:
            raise EdgeError(
                f"resize {resize[0]}/{resize[1]} is beyond what the server accepts (short side <= "
                f"{short}, long side <= {long}); lower --min-size / --max-size"
            )
    elif (info.min_size, info.max_size) != resize:
        raise EdgeError(f"resize mismatch: edge {resize[0]}/{resize[1]}, server {info.min_size}/{info.max_size}")


class OffloadMode(EdgeMode):
    """The frame itself on the wire, compressed as JPEG (``jpeg_quality``) or PNG; the whole model on the server."""

    name = "offload"

    def __init__(self, options: EdgeOptions, fingerprint: str = "") -> None:
        super().__init__(options, fingerprint)
        if options.filter_threshold is not None:
            raise ValueError("the neural filter runs on the edge's head: split or local mode, not offload")

    def check_server(self, info: pb.ModelInfo) -> None:
        if not info.accepted_image_formats:
            raise EdgeError("the server does not accept full frames (started with --no-offload)")

    def prepare(self, frame: Frame) -> Prepared:
        o = self.options
        ms = Timings(capture=frame.capture_ms, preprocess=0.0, head=0.0)
        request = self.new_request(frame)
        t = now_ns()
        bgr = cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR)
        if o.image_format == "png":
            ok, buf = cv2.imencode(".png", bgr)
            request.image.format = pb.EncodedImage.FORMAT_PNG
        elif o.image_format == "webp":
            ok, buf = cv2.imencode(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, o.webp_quality])
            request.image.format = pb.EncodedImage.FORMAT_WEBP
        else:
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, o.jpeg_quality])
            request.image.format = pb.EncodedImage.FORMAT_JPEG
        if not ok:
            raise EdgeError(f"{frame.source}: cannot encode frame as {o.image_format}")
        request.image.data = buf.tobytes()
        ms.encode = ms_since(t)
        return Prepared(
            frame, ms, request=request, payload_bytes=len(request.image.data), message_bytes=request.ByteSize()
        )


def detections_json(dets: list[Detections], keep: bool) -> list[dict[str, Any]]:
    """The records' JSON form of detections (torch tensors or numpy arrays): counts, and boxes / labels /
    scores / keypoints when ``keep``."""
    out = []
    for d in dets:
        item: dict[str, Any] = {"count": int(len(d["scores"]))}
        if keep:
            item["boxes"] = [[round(float(v), 2) for v in box] for box in np.asarray(d["boxes"]).tolist()]
            item["labels"] = [int(v) for v in np.asarray(d["labels"]).tolist()]
            item["scores"] = [round(float(s), 4) for s in np.asarray(d["scores"]).tolist()]
            if "keypoints" in d:
                item["keypoints"] = [
                    [[round(float(v), 1) for v in p] for p in kp] for kp in np.asarray(d["keypoints"]).tolist()
                ]
        out.append(item)
    return out
