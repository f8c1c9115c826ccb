"""The edge's side of temporal coding on InferStream: the split's key / delta bottleneck frames
(``BottleneckCoder``, used by every split mode) and H.264 / HEVC offload (``VideoOffloadMode``).

Key frames go out on the first frame of a stream, every ``key_interval`` frames (split) or ``gop`` frames
(video), when the split's values leave the key's range (``max_clamped``), and after anything that may
have cost the server its reference:

* a failed frame (any status): the stream ended or the server reset its state -> the next frame is a key;
* a reconnect (the runner resends a frame after UNAVAILABLE on a new stream) -> that frame is re-coded
  as a key frame;
* the server refusing a frame for want of a reference (``InferResponse.refusal``) -> the frame is re-coded
  (as a key frame, if it belongs to the current chain; otherwise as the next frame of the chain that
  already replaced it) and resent once;
* the server answering a key frame it could not keep (``key_frame_required`` without ``refusal``: no
  stream session free, the client's share taken, the session budget spent) -> key frames only
  (``SessionFallback``), each of them asking the server again to keep it; temporal coding resumes once
  the server keeps one (after 1, then 2, 4 ... 64 kept key frames in a row when it fell back again soon after
  resuming: a backoff against sessions that come and go).

numpy only (no torch): ONNX split modes use ``BottleneckCoder`` too.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from hnd.common import codec, wire
from hnd.common.stream_codec import StreamEncoder
from hnd.common.timing import ms_since, now_ns
from hnd.common.video import VideoEncoder, VideoSettings
from hnd.edge.capture import Frame
from hnd.edge.client import EdgeError
from hnd.edge.modes import EdgeMode, EdgeOptions, Prepared
from hnd.edge.records import Timings
from hnd.proto.v1 import split_inference_pb2 as pb

log = logging.getLogger("hnd.edge")

VIDEO_IMAGE_FORMATS = {"h264": pb.EncodedImage.FORMAT_H264, "hevc": pb.EncodedImage.FORMAT_HEVC}


class SessionFallback:
    """Whether a stream sends key frames only because the server keeps no session for it, and when to stop.

    Every key frame asks the server to keep it (it costs nothing more than the intra frame it is): once one
    comes back kept, the stream goes back to temporal coding. A stream that falls back again within
    ``STABLE_FRAMES`` answers of resuming waits for twice as many kept key frames in a row the next time (up to
    ``MAX_WAIT``), so sessions that come and go do not cost a refused delta and its resend every few frames.
    """

    STABLE_FRAMES = 100
    MAX_WAIT = 64

    def __init__(self, what: str) -> None:
        self.what = what
        self.intra_only = False
        self.wait = 1  # kept key frames in a row before temporal coding resumes
        self.kept = 0
        self.since_resume = self.STABLE_FRAMES
        self.fallbacks = 0

    def observe(self, request: pb.InferRequest | None, response: pb.InferResponse) -> None:
        """One answer, in frame order (refusals are the resend's business, not this one's)."""
        if response.refusal or request is None or not request.HasField("stream_frame"):
            return
        if response.key_frame_required:  # answered, not kept
            if not self.intra_only:
                self.wait = 1 if self.since_resume >= self.STABLE_FRAMES else min(self.wait * 2, self.MAX_WAIT)
                self.intra_only = True
                self.fallbacks += 1
                log.warning(
                    "the server keeps no stream session for this %s now: key frames only until it keeps %d in a row",
                    self.what,
                    self.wait,
                )
            self.kept = 0
        elif self.intra_only and request.stream_frame.type == pb.StreamFrame.TYPE_KEY:
            self.kept += 1
            if self.kept >= self.wait:
                self.intra_only = False
                self.since_resume = 0
                log.warning("the server keeps a stream session for this %s again: temporal coding resumes", self.what)
        elif not self.intra_only:
            self.since_resume += 1


class BottleneckCoder:
    """Bottleneck [B, C, h, w] -> the request's ``bottleneck`` (and ``stream_frame``), per frame or temporal.

    With ``prior`` (an Entropic Student) the bottleneck is its float latent (torch head) or the int32
    symbols an ONNX head's graph already rounded; both are range-coded against the prior.

    ``key_interval`` 1 (the default) is per-frame intra coding (``codec.encode``) on unary or stream calls;
    above 1 it is a stream session (``hnd.common.stream_codec``), which needs InferStream.
    """

    def __init__(self, options: EdgeOptions, prior: Any = None) -> None:
        self.options = options
        self.prior = prior  # an Entropic Student's PriorTables (learned coding), else None
        self.temporal = options.key_interval > 1
        if self.temporal and prior is not None:
            raise ValueError("temporal coding is for affine bottlenecks; an Entropic Student codes every frame")
        if self.temporal and not options.stream:
            raise ValueError("temporal coding (key_interval > 1) needs InferStream (stream=True, --stream)")
        self.encoder = (
            StreamEncoder(*options.codec.as_tuple(), key_interval=options.key_interval, max_clamped=options.max_clamped)
            if self.temporal
            else None
        )
        self.sessions = SessionFallback("bottleneck stream")  # key frames only while the server keeps none
        self._pending: dict[int, tuple[Any, Any]] = {}  # frame index -> (z, meta) until its record is final
        self.keys = 0
        self.deltas = 0

    def check_server(self, info: pb.ModelInfo) -> None:
        if self.temporal and info.stream_sessions.max_sessions == 0:
            raise EdgeError("the server keeps no stream sessions: temporal coding is off there (use --key-interval 1)")

    def encode(self, z, meta, request: pb.InferRequest, frame_index: int) -> tuple[int, dict[str, Any]]:
        """Fill ``request`` with frame ``frame_index``'s bottleneck; returns (payload bytes, record extras)."""
        if not self.temporal:
            if self.prior is not None and getattr(z, "dtype", None) == np.int32:  # an ONNX head's rounded symbols
                encoded = codec.encode_symbols(z, self.prior)
            else:
                encoded = self.options.codec.encode(z, prior=self.prior)
            request.bottleneck.CopyFrom(wire.bottleneck_to_proto(encoded, meta))
            return len(encoded.payload), {}
        self._pending[frame_index] = (z, meta)
        return self._encode_temporal(z, meta, request)

    def _encode_temporal(self, z, meta, request: pb.InferRequest) -> tuple[int, dict[str, Any]]:
        if self.sessions.intra_only:
            self.encoder.force_key_frame()
        frame = self.encoder.encode(z)
        if frame.kind == "key":
            self.keys += 1
        else:
            self.deltas += 1
        request.bottleneck.CopyFrom(wire.bottleneck_to_proto(frame.tensor, meta))
        request.stream_frame.CopyFrom(wire.stream_frame_to_proto(frame.kind, frame.key_sequence, frame.sequence))
        extra = {"frame_type": frame.kind}
        if frame.clamped:
            extra["clamped"] = frame.clamped
        return len(frame.tensor.payload), extra

    def reencode(self, p: Prepared, reason: str) -> bool:
        """Re-code p's frame for a resend (reason "reconnect" or "refused"); False when there is nothing to redo."""
        if not self.temporal or p.frame.index not in self._pending or p.request is None:
            return False
        if reason == "reconnect" or p.request.stream_frame.key_sequence == self.encoder.key_sequence:
            self.encoder.force_key_frame()  # its chain is gone on the server: start a new one
        z, meta = self._pending[p.frame.index]
        p.request.ClearField("stream_frame")
        p.payload_bytes, extra = self._encode_temporal(z, meta, p.request)
        p.message_bytes = p.request.ByteSize()
        p.extra.update(extra)
        return True

    def observe(self, p: Prepared, response: pb.InferResponse) -> None:
        """An answer from the server: a key frame it answered but could not keep means key frames only, until
        it keeps one again (``SessionFallback``)."""
        if self.temporal:
            self.sessions.observe(p.request, response)

    def after(self, p: Prepared, record: Any) -> None:
        """The frame's final record: forget its bottleneck; after a failure, the next frame is a key frame."""
        self._pending.pop(p.frame.index, None)
        if self.temporal and record.status != "OK":
            self.encoder.force_key_frame()


class CodedSplitMode(EdgeMode):
    """A split mode whose bottleneck goes through ``self.coder`` (a BottleneckCoder, set by the subclass):
    answers, resends and final records reach the coder, so a stream's key / delta state follows them.
    The torch head (hnd.edge.torch_modes) and the ONNX head (hnd.edge.onnx_mode) share it."""

    coder: BottleneckCoder

    def coded(
        self,
        frame: Frame,
        ms: Timings,
        request: pb.InferRequest,
        bottleneck: Any,
        meta: Any,
        filtered: bool | None,
        probability: float | None,
    ) -> Prepared:
        """Code ``bottleneck`` (the head's output, torch or numpy) into ``request`` and time it as ``encode``."""
        t = now_ns()
        payload, extra = self.coder.encode(bottleneck, meta, request, frame.index)
        ms.encode = ms_since(t)
        return Prepared(
            frame,
            ms,
            request=request,
            payload_bytes=payload,
            message_bytes=request.ByteSize(),
            filtered=filtered,
            filter_probability=probability,
            extra=extra,
        )

    def detections(self, prepared: Prepared, response: pb.InferResponse | None):
        if response is not None:
            self.coder.observe(prepared, response)
        return super().detections(prepared, response)

    def reencode(self, prepared: Prepared, reason: str) -> bool:
        return self.coder.reencode(prepared, reason)

    def after(self, prepared: Prepared, record) -> None:
        self.coder.after(prepared, record)


class VideoOffloadMode(EdgeMode):
    """The frame as one H.264 / HEVC access unit (PyAV, tune zerolatency, no B-frames) on InferStream;
    the server decodes it in this stream's session and runs the whole model."""

    name = "offload"

    def __init__(self, options: EdgeOptions, fingerprint: str = "") -> None:
        super().__init__(options, fingerprint)
        if options.filter_threshold is not None:
            raise ValueError("the neural filter runs on the edge's head: split or local mode, not offload")
        if not options.stream:
            raise ValueError(f"{options.image_format} offload needs InferStream (stream=True, --stream)")
        self.format = options.image_format
        self.settings = VideoSettings(
            format=self.format,
            crf=options.crf,
            bitrate=options.bitrate,
            gop=options.gop,
            fps=options.video_fps,
            preset=options.preset,
        )
        self.encoder = VideoEncoder(self.settings)
        self.sequence = 0
        self.key_sequence = 0
        self.sessions = SessionFallback(f"{self.format} stream")  # key frames only while the server keeps none

    def check_server(self, info: pb.ModelInfo) -> None:
        if VIDEO_IMAGE_FORMATS[self.format] not in info.stream_sessions.video_formats:
            offered = [pb.EncodedImage.Format.Name(f) for f in info.stream_sessions.video_formats] or "none"
            raise EdgeError(f"the server does not decode {self.format} streams (offers {offered})")

    def _encode(self, image: np.ndarray, request: pb.InferRequest) -> tuple[int, dict[str, Any]]:
        if self.sessions.intra_only:
            self.encoder.force_key_frame()
        data, key = self.encoder.encode(image)
        if key:
            self.key_sequence = self.sequence
        request.image.format = VIDEO_IMAGE_FORMATS[self.format]
        request.image.data = data
        request.stream_frame.CopyFrom(
            wire.stream_frame_to_proto("key" if key else "delta", self.key_sequence, self.sequence)
        )
        self.sequence += 1
        return len(data), {"frame_type": "key" if key else "delta"}

    def prepare(self, frame: Frame) -> Prepared:
        ms = Timings(capture=frame.capture_ms, preprocess=0.0, head=0.0)
        request = self.new_request(frame)
        t = now_ns()
        payload, extra = self._encode(frame.image, request)
        ms.encode = ms_since(t)
        return Prepared(
            frame, ms, request=request, payload_bytes=payload, message_bytes=request.ByteSize(), extra=extra
        )

    def reencode(self, p: Prepared, reason: str) -> bool:
        if p.request is None:
            return False
        if reason == "reconnect" or p.request.stream_frame.key_sequence == self.key_sequence:
            self.encoder.force_key_frame()
        p.payload_bytes, extra = self._encode(p.frame.image, p.request)
        p.message_bytes = p.request.ByteSize()
        p.extra.update(extra)
        return True

    def detections(self, prepared: Prepared, response: pb.InferResponse | None):
        if response is not None:  # a key frame answered but not kept: key frames only, for now
            self.sessions.observe(prepared.request, response)
        return super().detections(prepared, response)

    def after(self, prepared: Prepared, record: Any) -> None:
        if record.status != "OK":
            self.encoder.force_key_frame()

    def close(self) -> None:
        self.encoder.close()
