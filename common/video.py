"""Low-latency H.264 / HEVC coding of camera frames with PyAV (FFmpeg): the video-offload rival of the split.

A camera streams video, not JPEGs. ``VideoEncoder`` encodes one RGB frame into one access unit (the bytes
of one frame on the wire) the way a live camera does: libx264 / libx265 with ``tune=zerolatency`` (no
B-frames, no look-ahead, so every frame comes out as soon as it goes in), a key frame every ``gop`` frames
or on request, rate control by CRF or by a target bitrate. ``VideoDecoder`` turns those access units back
into frames on the server, one decoder per stream, and trusts nothing:

* ``max_pixels`` is handed to FFmpeg (``AVCodecContext.max_pixels``), so a stream that declares a huge
  picture is refused before its buffers are allocated; a stream that switches resolution is decoded
  (FFmpeg re-initialises on the new parameter sets) and bounded the same way.
* ``err_detect=crccheck+explode`` turns a damaged bitstream (garbage NAL units, a truncated packet, a
  picture whose checksum does not match) into an error instead of a concealed, silently wrong picture; a
  frame FFmpeg flags as corrupt is refused too. H.264's decoder finds truncated and damaged slices itself;
  HEVC's decodes many of them without complaint (an IDR cut to 90 % came out with 7 % of its pixels
  wrong), so an HEVC access unit must carry the MD5 decoded picture hash SEI (x265 ``hash=1``, which the
  encoder here sets), which FFmpeg then checks against the decoded picture: a truncated access unit loses
  its suffix SEI, a damaged one fails the MD5.
* The first frame of a stream, and the first after any error, must be a key frame: the decoder then
  holds no reference it could mis-predict from. A packet that yields no frame or more than one is refused
  (the encoder side sends exactly one frame per packet).
* One decoding thread per stream: memory and CPU per stream stay bounded and predictable.

Every refusal is a ``VideoError``; after one, the decoder is reset and waits for a key frame.
numpy only (no torch): the edge's ONNX path uses it too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from hnd.common.errors import HndError

if TYPE_CHECKING:  # PyAV is imported on first use (_av)
    from av.video.codeccontext import VideoCodecContext

__all__ = [
    "ENCODERS",
    "VIDEO_FORMATS",
    "VideoDecoder",
    "VideoEncoder",
    "VideoError",
    "VideoSettings",
    "available_formats",
]

VIDEO_FORMATS = ("h264", "hevc")
# FFmpeg encoder per format; decoders are FFmpeg's own "h264" / "hevc".
ENCODERS = {"h264": "libx264", "hevc": "libx265"}
_DEFAULT_MAX_PIXELS = 4096 * 4096


class VideoError(HndError, ValueError):
    """A frame the codec refuses: bad settings, or a damaged / hostile / out-of-bounds bitstream."""


def _av():
    try:
        import av
    except ImportError:  # pragma: no cover - av is a declared dependency
        raise VideoError("H.264 / HEVC need PyAV: pip install av") from None
    logging.getLogger("libav").setLevel(logging.CRITICAL)  # FFmpeg's own log lines for refused input
    return av


def available_formats() -> tuple[str, ...]:
    """The video formats this installation can both encode and decode (PyAV wheels bundle libx264 / libx265)."""
    try:
        av = _av()
    except VideoError:
        return ()
    out = []
    for fmt in VIDEO_FORMATS:
        try:
            av.codec.Codec(ENCODERS[fmt], "w")
            av.codec.Codec(fmt, "r")
        except Exception:  # noqa: BLE001 - PyAV raises UnknownCodecError or others per build
            continue
        out.append(fmt)
    return tuple(out)


@dataclass(frozen=True)
class VideoSettings:
    """Encoder settings of a live camera stream.

    format: "h264" (libx264) or "hevc" (libx265).
    crf: constant rate factor (0..51; libx264's default 23), used when bitrate is None.
    bitrate: target bits per second (ABR with a VBV buffer of one second) instead of CRF.
    gop: key frame interval in frames (also the longest a new decoder waits for a key frame).
    fps: frame rate the rate control assumes.
    preset: x264 / x265 speed preset ("ultrafast" .. "veryslow"); "medium" is libx264's default.
    """

    format: str = "h264"
    crf: float = 23.0
    bitrate: int | None = None
    gop: int = 30
    fps: float = 10.0
    preset: str = "medium"

    def __post_init__(self) -> None:
        if self.format not in VIDEO_FORMATS:
            raise VideoError(f"unknown video format {self.format!r}; expected one of {VIDEO_FORMATS}")
        if not 0 <= self.crf <= 51:
            raise VideoError(f"crf must be in [0, 51], got {self.crf}")
        if self.bitrate is not None and self.bitrate < 1000:
            raise VideoError(f"bitrate must be at least 1000 bit/s, got {self.bitrate}")
        if self.gop < 1:
            raise VideoError(f"gop must be >= 1, got {self.gop}")
        if not self.fps > 0:
            raise VideoError(f"fps must be > 0, got {self.fps}")


class VideoEncoder:
    """RGB frames [H, W, 3] uint8 -> one access unit (bytes) per frame, in order.

    The frame size is fixed by the first frame; a frame of another size starts a new encoder whose first
    frame is a key frame (the decoder follows the new parameter sets). Odd sizes are padded by one pixel
    (4:2:0 needs even dimensions) by repeating the last row / column; the decoder crops nothing, so
    callers that care use even sizes.
    """

    def __init__(self, settings: VideoSettings | None = None) -> None:
        self.settings = settings or VideoSettings()
        self._ctx: VideoCodecContext | None = None
        self._size: tuple[int, int] | None = None
        self._pts = 0
        self._force_key = False
        self.frames = 0

    def _open(self, width: int, height: int) -> VideoCodecContext:
        av = _av()
        s = self.settings
        ctx = av.CodecContext.create(ENCODERS[s.format], "w")
        ctx.width, ctx.height = width, height
        ctx.pix_fmt = "yuv420p"
        rate = Fraction(s.fps).limit_denominator(1001)
        ctx.time_base = 1 / rate
        ctx.framerate = rate
        ctx.gop_size = s.gop
        ctx.max_b_frames = 0
        opts = {"tune": "zerolatency", "preset": s.preset, "forced-idr": "1"}
        if s.bitrate is None:
            opts["crf"] = f"{s.crf:g}"
        else:
            ctx.bit_rate = s.bitrate
            # maxrate + a one-second buffer: VBV, as a live stream needs
            opts.update(maxrate=str(s.bitrate), bufsize=str(s.bitrate))
        if s.format == "h264":
            opts["x264-params"] = f"keyint={s.gop}:min-keyint={s.gop}:scenecut=0:bframes=0"
        else:
            # hash=1: an MD5 of each decoded picture (suffix SEI, ~55 bytes) that the server's decoder checks
            opts["x265-params"] = f"keyint={s.gop}:min-keyint={s.gop}:scenecut=0:bframes=0:log-level=error:hash=1"
        ctx.options = opts
        ctx.open()
        self._size = (height, width)
        self._pts = 0
        return ctx

    def force_key_frame(self) -> None:
        """Make the next frame a key frame (after an error, a reconnect or on a new stream)."""
        self._force_key = True

    def encode(self, image: np.ndarray) -> tuple[bytes, bool]:
        """Encode one frame; returns (access unit bytes, is_key_frame)."""
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise VideoError(f"expected an [H, W, 3] uint8 RGB frame, got {getattr(image, 'shape', type(image))}")
        av = _av()
        h, w = image.shape[:2]
        if h % 2 or w % 2:
            image = np.pad(image, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            h, w = image.shape[:2]
        if self._ctx is None or self._size != (h, w):  # (close() clears both together)
            self.close()
            self._ctx = self._open(w, h)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24").reformat(format="yuv420p")
        frame.pts = self._pts
        self._pts += 1
        if self._force_key:
            frame.pict_type = av.video.frame.PictureType.I
            self._force_key = False
        packets = self._ctx.encode(frame)
        if len(packets) != 1:  # zerolatency emits each frame at once; anything else is a setup error
            raise VideoError(f"the encoder returned {len(packets)} packets for one frame; expected 1")
        self.frames += 1
        return bytes(packets[0]), bool(packets[0].is_keyframe)

    def close(self) -> None:
        self._ctx = None
        self._size = None


class VideoDecoder:
    """Access units of one stream -> RGB frames [H, W, 3] uint8; bounded and hostile-input-safe.

    max_pixels: largest picture (width x height) accepted, enforced by FFmpeg before it allocates.
    """

    def __init__(self, format: str = "h264", max_pixels: int = _DEFAULT_MAX_PIXELS) -> None:
        if format not in VIDEO_FORMATS:
            raise VideoError(f"unknown video format {format!r}; expected one of {VIDEO_FORMATS}")
        if max_pixels < 64:
            raise VideoError(f"max_pixels must be >= 64, got {max_pixels}")
        self.format = format
        self.max_pixels = int(max_pixels)
        self._ctx: VideoCodecContext | None = None
        self.frames = 0
        self.picture_bytes = 0  # bytes of the last decoded picture in the stream's own pixel format

    def _open(self) -> VideoCodecContext:
        av = _av()
        ctx = av.CodecContext.create(self.format, "r")
        ctx.thread_count = 1
        ctx.options = {"max_pixels": str(self.max_pixels), "err_detect": "crccheck+explode"}
        return ctx

    @property
    def needs_key_frame(self) -> bool:
        """True until a key frame has been decoded (new stream, or after any error)."""
        return self._ctx is None

    def reset(self) -> None:
        """Drop all decoder state; the next frame must be a key frame."""
        self._ctx = None

    def decode(self, data: bytes, key_frame: bool | None = None) -> np.ndarray:
        """One access unit -> one RGB frame [H, W, 3] uint8. Raises VideoError (and resets) on any problem.

        key_frame: what the sender says the packet is; when given it must match the decoded frame.
        """
        if not isinstance(data, (bytes, bytearray)) or not data:
            self.reset()
            raise VideoError("empty video packet")
        if self.format == "hevc" and not has_picture_md5(data):
            self.reset()
            raise VideoError(
                "hevc access unit without an MD5 decoded picture hash SEI (x265 hash=1): refused, since a "
                "truncated or damaged picture could not be told from a good one"
            )
        av = _av()
        ctx = self._ctx
        starting = ctx is None
        if ctx is None:
            ctx = self._ctx = self._open()
        try:
            frames = ctx.decode(av.Packet(bytes(data)))
        except Exception as exc:  # noqa: BLE001 - FFmpeg errors come as several av.error types
            self.reset()
            raise VideoError(
                f"cannot decode {self.format} packet (damaged, or a picture over {self.max_pixels} "
                f"pixels): {_short(exc)}"
            ) from None
        if len(frames) != 1:
            self.reset()
            raise VideoError(
                f"{self.format} packet held {len(frames)} frames; expected exactly 1 "
                "(one access unit per request, no B-frames)"
            )
        frame = frames[0]
        if frame.is_corrupt:
            self.reset()
            raise VideoError(f"{self.format} frame is corrupt (missing or damaged data)")
        if starting and not frame.key_frame:
            self.reset()
            raise VideoError(f"{self.format} stream must start with a key frame")
        if key_frame is not None and bool(frame.key_frame) != key_frame:
            self.reset()
            raise VideoError(f"packet declared key_frame={key_frame} but decodes as key_frame={bool(frame.key_frame)}")
        if frame.width * frame.height > self.max_pixels:  # FFmpeg checks first; this is the belt to its braces
            self.reset()
            raise VideoError(f"{self.format} frame {frame.width}x{frame.height} exceeds {self.max_pixels} pixels")
        self.frames += 1
        self.picture_bytes = sum(plane.buffer_size for plane in frame.planes)
        return frame.to_ndarray(format="rgb24")


HEVC_SUFFIX_SEI = 40  # nal_unit_type of a suffix SEI (H.265 Table 7-1)
SEI_DECODED_PICTURE_HASH = 132  # payloadType (H.265 D.2.1); hash_type 0 is MD5, the one FFmpeg checks


def _nal_units(data: bytes) -> list[bytes]:
    """The NAL units of an Annex B byte stream (split at 00 00 01 start codes)."""
    return [unit.rstrip(b"\x00") for unit in data.split(b"\x00\x00\x01")[1:]]


def has_picture_md5(data: bytes) -> bool:
    """Whether an HEVC access unit carries a decoded picture hash SEI of type MD5 (read from the suffix SEI
    NAL units' message headers; FFmpeg then checks the hash with ``err_detect=crccheck``)."""
    for unit in _nal_units(data):
        if len(unit) < 3 or (unit[0] >> 1) & 0x3F != HEVC_SUFFIX_SEI:
            continue
        rbsp = unit[2:].replace(b"\x00\x00\x03", b"\x00\x00")  # emulation prevention bytes
        i = 0
        while i < len(rbsp) and rbsp[i] != 0x80:  # up to the RBSP trailing bits
            values = []
            for _ in range(2):  # payloadType, payloadSize: runs of 0xFF plus a last byte
                value = 0
                while i < len(rbsp) and rbsp[i] == 0xFF:
                    value, i = value + 255, i + 1
                if i >= len(rbsp):
                    return False
                values.append(value + rbsp[i])
                i += 1
            kind, size = values
            if kind == SEI_DECODED_PICTURE_HASH and size > 0 and i < len(rbsp) and rbsp[i] == 0:
                return True
            i += size
    return False


def _short(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 160 else text[:157] + "..."


def write_video_file(path: str, frames, fps: float = 10.0, crf: float = 12.0, preset: str = "medium") -> None:
    """Write RGB frames [H, W, 3] uint8 (even sizes) as an H.264 file (container from the extension: .mp4,
    .mkv); crf 12 keeps it close to the frames, like a camera's own recording. For sample and test videos.
    """
    av = _av()
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = None
        for image in frames:
            if stream is None:
                h, w = image.shape[:2]
                if h % 2 or w % 2:
                    raise VideoError(f"{path}: frame size {w}x{h} must be even for H.264 4:2:0")
                stream = container.add_stream("libx264", rate=rate)
                stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
                stream.options = {"crf": f"{crf:g}", "preset": preset}
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            container.mux(stream.encode(frame))
        if stream is not None:
            container.mux(stream.encode(None))
