"""Per-InferStream sessions: the reference of a temporally coded bottleneck, or a video decoder for offload.

One ``StreamSession`` per InferStream call. It holds nothing until the stream's first key frame; then it
takes one of ``max_sessions`` slots and keeps either a ``StreamDecoder`` (bottleneck key / delta frames,
one reference of at most ``max_reference_bytes`` symbols) or ``VideoDecoder``s (H.264 / HEVC access units,
pictures of at most ``max_video_pixels``; at most ``max_video_sessions`` streams decode video at once,
since an H.264 decoder may hold up to 16 reference pictures). The slot is freed when the stream ends,
whatever the reason (client cancel, error, drain), by ``close``.

Frames are decoded in the order the stream delivered them (the service decodes before its first await,
and tasks start in creation order), so a delta always meets the state its predecessor left.

Refusals:

* a delta frame with no valid reference (none yet, out of order, another key, another shape or
  quantization, or the reference was dropped after an error) -> ``KeyFrameRequired``: the service answers
  with ``key_frame_required`` and ``refusal``, and computes nothing;
* a key frame when every slot is taken, or one too large to keep, is decoded and answered, but not kept:
  ``Decoded.kept`` is False and the response says ``key_frame_required`` (send key frames only);
* malformed data -> ``CodecError`` / ``VideoError`` (INVALID_ARGUMENT), and the reference is dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from hnd.common import codec, wire
from hnd.common.codec import CodecError, EncodedTensor
from hnd.common.stream_codec import KeyFrameRequired, StreamDecoder, StreamFrame
from hnd.common.video import VIDEO_FORMATS, VideoDecoder, VideoError, available_formats
from hnd.proto.v1 import split_inference_pb2 as pb

__all__ = ["Decoded", "KeyFrameRequired", "StreamLimits", "StreamSession", "StreamSessions", "video_request"]

_VIDEO_ENUMS = {"h264": pb.EncodedImage.FORMAT_H264, "hevc": pb.EncodedImage.FORMAT_HEVC}
_VIDEO_FROM_ENUM = {v: k for k, v in _VIDEO_ENUMS.items()}


@dataclass(frozen=True)
class StreamLimits:
    """Bounds of the per-stream state, advertised in GetModelInfo (ModelInfo.stream_sessions)."""

    max_sessions: int = 64
    max_reference_bytes: int = 4 << 20  # symbols of one bottleneck reference: 4 MiB (an 800 px 3-ch one is 0.2)
    max_video_sessions: int = 16
    max_video_pixels: int = 1920 * 1088


@dataclass
class Decoded:
    """A decoded stream frame: the float32 bottleneck [B, C, h, w] or the RGB frame [H, W, 3] uint8.

    kept: False when the server could not keep this key frame as a reference (no free slot, too large):
    the answer is right, but the next frame must be a key frame too.
    """

    value: np.ndarray
    kept: bool = True
    note: str = ""


class StreamSessions:
    """The server's bounded table of stream sessions (thread-safe counters; sessions live on the event loop)."""

    def __init__(
        self,
        limits: StreamLimits | None = None,
        codec_limits: codec.Limits = codec.DEFAULT_LIMITS,
        video_formats: tuple[str, ...] | None = None,
        on_change=None,
    ) -> None:
        """on_change(bottleneck_sessions, video_sessions): called whenever a slot is taken or given back."""
        self.limits = limits or StreamLimits()
        self.codec_limits = codec_limits
        self.video_formats = available_formats() if video_formats is None else video_formats
        self._lock = threading.Lock()
        self.active = 0  # sessions holding a slot
        self.video_active = 0
        self.opened = 0
        self.on_change = on_change

    def open(self) -> StreamSession:
        """A session for one InferStream call (takes a slot only at its first key frame)."""
        self.opened += 1
        return StreamSession(self)

    def video_format_enums(self) -> list[int]:
        """EncodedImage.Format values of the video formats decoded here."""
        return [_VIDEO_ENUMS[f] for f in self.video_formats if f in _VIDEO_ENUMS]

    def info(self, offload: bool = True) -> pb.StreamSessions:
        """What GetModelInfo advertises (ModelInfo.stream_sessions); no video without offload."""
        lim = self.limits
        return pb.StreamSessions(
            max_sessions=lim.max_sessions,
            max_reference_bytes=lim.max_reference_bytes,
            video_formats=self.video_format_enums() if offload else [],
            max_video_pixels=lim.max_video_pixels if offload else 0,
            max_video_sessions=lim.max_video_sessions if offload else 0,
        )

    def _take(self, video: bool) -> bool:
        with self._lock:
            if self.active >= self.limits.max_sessions:
                return False
            if video and self.video_active >= self.limits.max_video_sessions:
                return False
            self.active += 1
            self.video_active += int(video)
            self._changed()
            return True

    def _give(self, video: bool) -> None:
        with self._lock:
            self.active -= 1
            self.video_active -= int(video)
            self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.active - self.video_active, self.video_active)


class StreamSession:
    """The temporal state of one InferStream: a bottleneck reference or video decoders, never both."""

    def __init__(self, table: StreamSessions) -> None:
        self.table = table
        self._slot: str | None = None  # None, "bottleneck" or "video"
        self._bottleneck: StreamDecoder | None = None
        self._video: dict[str, VideoDecoder] = {}
        self._video_chain: dict[str, tuple[int, int]] = {}  # format -> (key sequence, last sequence)
        self.closed = False

    # --- slots ------------------------------------------------------------------------------------

    def _hold(self, kind: str) -> bool:
        if self._slot == kind:
            return True
        self._release()
        if self.closed or not self.table._take(kind == "video"):
            return False
        self._slot = kind
        return True

    def _release(self) -> None:
        if self._slot is not None:
            self.table._give(self._slot == "video")
            self._slot = None
        self._bottleneck = None
        self._video.clear()
        self._video_chain.clear()

    def close(self) -> None:
        """Free everything (stream ended: cancel, error, drain or normal end). Idempotent."""
        self._release()
        self.closed = True

    @property
    def reference_bytes(self) -> int:
        return self._bottleneck.reference_bytes if self._bottleneck is not None else 0

    # --- bottleneck ---------------------------------------------------------------------------------

    def decode_bottleneck(self, kind: str, key_sequence: int, sequence: int, encoded: EncodedTensor) -> Decoded:
        """A key / delta bottleneck frame -> Decoded(float32 array). Raises KeyFrameRequired or CodecError."""
        frame = StreamFrame(kind, key_sequence, sequence, encoded)
        if kind == "key":
            if not self._hold("bottleneck"):
                out = StreamDecoder(self.table.codec_limits, max_reference_bytes=0).decode(frame)
                return Decoded(out, kept=False, note=self._full_note())
            if self._bottleneck is None:
                self._bottleneck = StreamDecoder(self.table.codec_limits, self.table.limits.max_reference_bytes)
            out = self._bottleneck.decode(frame)
            if not self._bottleneck.has_reference:
                return Decoded(
                    out,
                    kept=False,
                    note=f"a reference of {encoded.numel} symbols exceeds "
                    f"max_reference_bytes {self.table.limits.max_reference_bytes}",
                )
            return Decoded(out)
        if kind != "delta":
            raise CodecError(f"unknown stream frame kind {kind!r}")
        if self._slot != "bottleneck" or self._bottleneck is None:
            codec.validate(encoded, self.table.codec_limits)  # malformed input is still INVALID_ARGUMENT
            raise KeyFrameRequired(f"delta frame {sequence} has no reference on this stream (send a key frame)")
        return Decoded(self._bottleneck.decode(frame))

    # --- video --------------------------------------------------------------------------------------

    def decode_video(self, fmt: str, kind: str, key_sequence: int, sequence: int, data: bytes) -> Decoded:
        """One H.264 / HEVC access unit -> Decoded(RGB [H, W, 3] uint8). Raises KeyFrameRequired or VideoError."""
        if fmt not in VIDEO_FORMATS or fmt not in self.table.video_formats:
            raise VideoError(f"video format {fmt!r} is not decoded here; offered: {self.table.video_formats}")
        limit = self.table.limits.max_video_pixels
        if kind == "key":
            if not self._hold("video"):
                out = VideoDecoder(fmt, max_pixels=limit).decode(data, key_frame=True)
                return Decoded(out, kept=False, note=self._full_note())
            decoder = self._video.setdefault(fmt, VideoDecoder(fmt, max_pixels=limit))
            decoder.reset()  # a key frame starts afresh: no state from before it can leak into it
            try:
                out = decoder.decode(data, key_frame=True)
            except VideoError:
                self._video_chain.pop(fmt, None)
                raise
            self._video_chain[fmt] = (sequence, sequence)
            return Decoded(out)
        if kind != "delta":
            raise VideoError(f"unknown stream frame kind {kind!r}")
        chain = self._video_chain.get(fmt)
        decoder = self._video.get(fmt)
        if self._slot != "video" or chain is None or decoder is None or decoder.needs_key_frame:
            raise KeyFrameRequired(f"{fmt} frame {sequence} has no reference on this stream (send a key frame)")
        if key_sequence != chain[0] or sequence != chain[1] + 1:
            self._video_chain.pop(fmt, None)
            decoder.reset()
            raise KeyFrameRequired(
                f"{fmt} frame {sequence} of key {key_sequence} does not follow frame {chain[1]} of key {chain[0]}"
            )
        try:
            out = decoder.decode(data, key_frame=False)
        except VideoError:
            self._video_chain.pop(fmt, None)
            raise
        self._video_chain[fmt] = (chain[0], sequence)
        return Decoded(out)

    def _full_note(self) -> str:
        lim = self.table.limits
        return (
            f"no stream session free ({lim.max_sessions} sessions, {lim.max_video_sessions} for video): "
            "this frame was answered but not kept; send key frames only"
        )


def video_request(session: StreamSession | None, request: pb.InferRequest, max_image_pixels: int) -> Decoded:
    """Decode the H.264 / HEVC access unit of an InferStream request in its session.

    Raises VideoError (malformed, no stream frame header, over the pixel bounds) or KeyFrameRequired.
    """
    fmt = _VIDEO_FROM_ENUM[request.image.format]
    if session is None or not request.HasField("stream_frame"):
        raise VideoError(f"{fmt} frames travel on InferStream with a stream_frame (key / delta and sequence)")
    try:
        kind, key_sequence, sequence = wire.stream_frame_from_proto(request.stream_frame)
    except CodecError as exc:
        raise VideoError(str(exc)) from None
    decoded = session.decode_video(fmt, kind, key_sequence, sequence, request.image.data)
    h, w = decoded.value.shape[:2]
    if h * w > max_image_pixels:
        raise VideoError(f"{fmt} frame {w}x{h} exceeds max_image_pixels {max_image_pixels}")
    return decoded
