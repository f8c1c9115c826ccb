"""Per-InferStream sessions: the reference of a temporally coded bottleneck, or a video decoder for offload.

One ``StreamSession`` per InferStream call. It holds nothing until the stream's first key frame; then it
takes one of ``max_sessions`` slots and keeps either a ``StreamDecoder`` (bottleneck key / delta frames,
one reference of at most ``max_reference_bytes`` symbols) or ``VideoDecoder``s (H.264 / HEVC access units,
pictures of at most ``max_video_pixels``; at most ``max_video_sessions`` streams decode video at once,
since an H.264 decoder may hold up to 16 reference pictures). The slot is freed when the stream ends,
whatever the reason (client cancel, error, drain), by ``close``; when the stream sends nothing for
``idle_timeout_s`` (the next slot taken anywhere frees it: a stream that holds a session and goes quiet
holds it no longer than that); or when a client with fewer sessions needs it (below).

Slots are shared per client (a connection, as the batcher's round robin counts them): one client holds at most
``max_client_sessions`` (``max_client_video_sessions`` decoding video), and when the table is full, a key frame
from a client holding fewer sessions than another client's count minus one takes that client's least recently
used session (max-min fair share: 16 idle streams of one client cannot keep a second client out). What the
sessions hold (bottleneck references' symbols; video decoders' picture pools, counted as
``VIDEO_PICTURES`` pictures of the stream's decoded size and format) stays within ``max_session_bytes``.
A session that lost its slot answers its next delta frame with ``KeyFrameRequired`` naming why.

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
import time
from collections.abc import Callable, Hashable
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
    idle_timeout_s: float = 30.0  # a session with no frame for this long gives its slot back
    max_client_sessions: int = 32  # sessions one client (connection) may hold
    max_client_video_sessions: int = 8  # of them decoding video
    # What all sessions together may hold: 16 1080p 4:2:0 video sessions (~119 MB each) and 64 references.
    max_session_bytes: int = 2 << 30


# FFmpeg's H.264 decoder keeps up to 36 pictures (H264_MAX_PICTURE_COUNT; HEVC fewer): a video session is
# counted as that many pictures of its decoded size and pixel format, plus the RGB frame it hands over.
VIDEO_PICTURES = 36


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
    """The server's bounded table of stream sessions: slots, per-client shares, idle expiry, bytes.

    Thread-safe (one lock for the table; a session is changed by another only when its own lock is free).
    """

    def __init__(
        self,
        limits: StreamLimits | None = None,
        codec_limits: codec.Limits = codec.DEFAULT_LIMITS,
        video_formats: tuple[str, ...] | None = None,
        on_change=None,
        clock: Callable[[], float] = time.monotonic,
        on_reclaim: Callable[[str], None] | None = None,
    ) -> None:
        """on_change(bottleneck_sessions, video_sessions): called whenever a slot is taken or given back;
        on_reclaim(reason): whenever a slot is taken back before its stream ended ("idle", "fair_share")."""
        self.limits = limits or StreamLimits()
        self.codec_limits = codec_limits
        self.video_formats = available_formats() if video_formats is None else video_formats
        self._lock = threading.RLock()
        self._holders: dict[StreamSession, None] = {}  # sessions holding a slot
        self.active = 0  # sessions holding a slot
        self.video_active = 0
        self.held_bytes = 0
        self.opened = 0
        self.expired = 0  # slots taken back after idle_timeout_s
        self.evicted = 0  # slots handed to a client with fewer
        self.on_change = on_change
        self.on_reclaim = on_reclaim
        self.clock = clock

    def open(self, client: Hashable = None) -> StreamSession:
        """A session for one InferStream call of ``client`` (takes a slot only at its first key frame)."""
        self.opened += 1
        self.expire_idle()
        return StreamSession(self, client)

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
            idle_timeout_ms=round(lim.idle_timeout_s * 1000),
            max_client_sessions=lim.max_client_sessions,
            max_client_video_sessions=lim.max_client_video_sessions if offload else 0,
            max_session_bytes=lim.max_session_bytes,
        )

    def expire_idle(self) -> None:
        """Take back the slots of sessions that have sent nothing for ``idle_timeout_s``."""
        with self._lock:
            oldest = self.clock() - self.limits.idle_timeout_s
            for session in [s for s in self._holders if s.last_used < oldest]:
                if session._lose(f"its session expired after {self.limits.idle_timeout_s:g} s idle (idle_timeout)"):
                    self.expired += 1
                    self._reclaimed("idle")

    def _take(self, session: StreamSession, video: bool) -> str | None:
        """A slot for ``session``; None when taken, else why not (the key frame is answered but not kept)."""
        lim = self.limits
        with self._lock:
            self.expire_idle()
            mine = [s for s in self._holders if s.client == session.client]
            if len(mine) >= lim.max_client_sessions:
                return f"this client holds {len(mine)} sessions (max_client_sessions {lim.max_client_sessions})"
            if video and sum(s.video for s in mine) >= lim.max_client_video_sessions:
                return (
                    f"this client holds its {lim.max_client_video_sessions} video sessions (max_client_video_sessions)"
                )
            while self.active >= lim.max_sessions or (video and self.video_active >= lim.max_video_sessions):
                kind_full = self.active < lim.max_sessions  # only the video slots are full: free one of those
                if not self._evict_for(session.client, video_only=kind_full):
                    return (
                        f"no stream session free ({lim.max_sessions} sessions, {lim.max_video_sessions} for video, "
                        "shared fairly per client)"
                    )
            self._holders[session] = None
            self.active += 1
            self.video_active += int(video)
            self._changed()
            return None

    def _evict_for(self, client: Hashable, video_only: bool) -> bool:
        """Max-min fair share: take the least recently used slot of the client holding most, if it holds more
        than ``client``'s count plus one. False when no client does."""
        counts: dict[Hashable, list[StreamSession]] = {}
        for s in self._holders:
            if s.video or not video_only:
                counts.setdefault(s.client, []).append(s)
        mine = len(counts.get(client, ()))
        for _, sessions in sorted(counts.items(), key=lambda kv: -len(kv[1])):
            if len(sessions) <= mine + 1:
                return False
            for victim in sorted(sessions, key=lambda s: s.last_used):
                if victim._lose("its session was given to a client holding fewer (fair share per client)"):
                    self.evicted += 1
                    self._reclaimed("fair_share")
                    return True
        return False

    def _charge(self, session: StreamSession, nbytes: int) -> bool:
        """Count ``nbytes`` as what ``session`` holds now; False (nothing changed) when over max_session_bytes."""
        with self._lock:
            if session not in self._holders:
                return False
            total = self.held_bytes - session.held_bytes + nbytes
            if total > self.limits.max_session_bytes and nbytes > session.held_bytes:
                return False
            self.held_bytes = total
            session.held_bytes = nbytes
            return True

    def _give(self, session: StreamSession) -> None:
        with self._lock:
            if session in self._holders:
                del self._holders[session]
                self.active -= 1
                self.video_active -= int(session.video)
                self.held_bytes -= session.held_bytes
                session.held_bytes = 0
                self._changed()

    def _reclaimed(self, reason: str) -> None:
        if self.on_reclaim is not None:
            self.on_reclaim(reason)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.active - self.video_active, self.video_active)


class StreamSession:
    """The temporal state of one InferStream: a bottleneck reference or video decoders, never both."""

    def __init__(self, table: StreamSessions, client: Hashable = None) -> None:
        self.table = table
        self.client = client
        self._slot: str | None = None  # None, "bottleneck" or "video"
        self._bottleneck: StreamDecoder | None = None
        self._video: dict[str, VideoDecoder] = {}
        self._video_chain: dict[str, tuple[int, int]] = {}  # format -> (key sequence, last sequence)
        self._lock = threading.Lock()  # held while this stream decodes; others change it only when free
        self.closed = False
        self.last_used = table.clock()
        self.held_bytes = 0  # what the table counts against max_session_bytes
        self.lost = ""  # why the slot was taken back (idle, fair share), for the next refusal

    @property
    def video(self) -> bool:
        return self._slot == "video"

    # --- slots ------------------------------------------------------------------------------------

    def _hold(self, kind: str) -> str | None:
        """Hold a ``kind`` slot; None when held, else why not."""
        if self._slot == kind:
            return None
        self._release()
        if self.closed:
            return "the stream has ended"
        self._slot = kind  # counted as video by the table's checks from here
        why = self.table._take(self, kind == "video")
        if why is not None:
            self._slot = None
        else:
            self.lost = ""
        return why

    def _release(self) -> None:
        if self._slot is not None:
            self.table._give(self)
            self._slot = None
        self._bottleneck = None
        self._video.clear()
        self._video_chain.clear()

    def _lose(self, why: str) -> bool:
        """The table takes this session's slot back (idle, fair share), unless it is decoding right now."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            self._release()
            self.lost = why
            return True
        finally:
            self._lock.release()

    def close(self) -> None:
        """Free everything (stream ended: cancel, error, drain or normal end). Idempotent."""
        with self._lock:
            self._release()
            self.closed = True

    def _no_reference(self, what: str) -> KeyFrameRequired:
        why = f" ({self.lost})" if self.lost else ""
        return KeyFrameRequired(f"{what} has no reference on this stream{why} (send a key frame)")

    @property
    def reference_bytes(self) -> int:
        return self._bottleneck.reference_bytes if self._bottleneck is not None else 0

    # --- bottleneck ---------------------------------------------------------------------------------

    def decode_bottleneck(self, kind: str, key_sequence: int, sequence: int, encoded: EncodedTensor) -> Decoded:
        """A key / delta bottleneck frame -> Decoded(float32 array). Raises KeyFrameRequired or CodecError."""
        with self._lock:
            self.last_used = self.table.clock()
            return self._decode_bottleneck(StreamFrame(kind, key_sequence, sequence, encoded))

    def _decode_bottleneck(self, frame: StreamFrame) -> Decoded:
        encoded, lim = frame.tensor, self.table.limits
        if frame.kind == "key":
            if (why := self._hold("bottleneck")) is not None:
                out = StreamDecoder(self.table.codec_limits, max_reference_bytes=0).decode(frame)
                return Decoded(out, kept=False, note=self._not_kept(why))
            if self._bottleneck is None:
                self._bottleneck = StreamDecoder(self.table.codec_limits, lim.max_reference_bytes)
            out = self._bottleneck.decode(frame)
            if not self._bottleneck.has_reference:
                return Decoded(
                    out,
                    kept=False,
                    note=f"a reference of {encoded.numel} symbols exceeds max_reference_bytes {lim.max_reference_bytes}",
                )
            if not self.table._charge(self, self._bottleneck.reference_bytes):
                self._release()
                return Decoded(out, kept=False, note=self._not_kept(self._over_bytes()))
            return Decoded(out)
        if frame.kind != "delta":
            raise CodecError(f"unknown stream frame kind {frame.kind!r}")
        if self._slot != "bottleneck" or self._bottleneck is None:
            codec.validate(encoded, self.table.codec_limits)  # malformed input is still INVALID_ARGUMENT
            raise self._no_reference(f"delta frame {frame.sequence}")
        return Decoded(self._bottleneck.decode(frame))

    # --- video --------------------------------------------------------------------------------------

    def decode_video(self, fmt: str, kind: str, key_sequence: int, sequence: int, data: bytes) -> Decoded:
        """One H.264 / HEVC access unit -> Decoded(RGB [H, W, 3] uint8). Raises KeyFrameRequired or VideoError."""
        if fmt not in VIDEO_FORMATS or fmt not in self.table.video_formats:
            raise VideoError(f"video format {fmt!r} is not decoded here; offered: {self.table.video_formats}")
        with self._lock:
            self.last_used = self.table.clock()
            return self._decode_video(fmt, kind, key_sequence, sequence, data)

    def _decode_video(self, fmt: str, kind: str, key_sequence: int, sequence: int, data: bytes) -> Decoded:
        limit = self.table.limits.max_video_pixels
        if kind == "key":
            if (why := self._hold("video")) is not None:
                out = VideoDecoder(fmt, max_pixels=limit).decode(data, key_frame=True)
                return Decoded(out, kept=False, note=self._not_kept(why))
            decoder = self._video.setdefault(fmt, VideoDecoder(fmt, max_pixels=limit))
            decoder.reset()  # a key frame starts afresh: no state from before it can leak into it
            try:
                out = decoder.decode(data, key_frame=True)
            except VideoError:
                self._video_chain.pop(fmt, None)
                raise
            held = sum(d.picture_bytes for d in self._video.values()) * VIDEO_PICTURES + out.nbytes
            if not self.table._charge(self, held):
                self._release()
                return Decoded(out, kept=False, note=self._not_kept(self._over_bytes()))
            self._video_chain[fmt] = (sequence, sequence)
            return Decoded(out)
        if kind != "delta":
            raise VideoError(f"unknown stream frame kind {kind!r}")
        chain = self._video_chain.get(fmt)
        decoder = self._video.get(fmt)
        if self._slot != "video" or chain is None or decoder is None or decoder.needs_key_frame:
            raise self._no_reference(f"{fmt} frame {sequence}")
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

    def _over_bytes(self) -> str:
        return f"the sessions would hold over max_session_bytes {self.table.limits.max_session_bytes}"

    @staticmethod
    def _not_kept(why: str) -> str:
        return f"{why}: this frame was answered but not kept; send key frames, try again later"


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
