"""Temporal coding of the bottleneck over a stream: key frames and delta frames, lossless on the symbols.

A static camera's consecutive bottlenecks differ in few places: at 4 bits a few percent of the symbols
change from one frame to the next. Per-frame coding (``hnd.common.codec``) pays for all of them every
frame; a stream session pays for the changes. It is a layer over the per-frame codec, not a second
codec: the same quantization (``codec.quantize_with``), packing and zstd.

* A **key frame** is an ordinary intra encoding (``codec.encode``'s format): it fixes the quantization
  parameters (scale, zero point) of the frames that follow and starts a reference chain.
* A **delta frame** quantizes the new bottleneck with the key's parameters (values beyond the key's
  range clamp) and sends ``(q_t - q_{t-1}) mod 2^bits`` packed and zstd-compressed like any symbols: zero
  where nothing changed, so mostly zeros. The decoder adds it to its previous symbols modulo 2^bits and
  gets back exactly the symbols the encoder chose.
* **Hysteresis** (conditional replenishment): in a delta frame a symbol keeps its previous value while
  the new value stays within ``0.5 + hysteresis`` steps of it, and takes the new value's rounding once it
  moves further. Sensor noise and an int8 head's output noise flip values that sit near a rounding
  boundary from frame to frame; each flip costs bytes and carries nothing. The error bound of a delta
  frame's symbols becomes ``0.5 + hysteresis`` steps (an intra frame's is 0.5), and it holds on every
  frame, so no symbol drifts: no counter of frames is needed. 0 turns it off (every symbol is the new
  value's rounding, as in the per-frame codec). Measured side by side by ``python -m hnd.bench.speed_temporal``.

Exactness: what ``StreamDecoder`` reconstructs is, bit for bit, ``codec.dequantize`` of the encoder's
own symbols (``StreamEncoder.reconstruction``, the reference the next delta is taken against), i.e. the
in-process result of quantizing each frame with the key's parameters and the hysteresis, without the
delta step (``StreamEncoder.quantize`` gives it without packing, for ``hnd-eval``).

The encoder sends a key frame on its first frame, every ``key_interval`` frames, when the shape changes,
when more than ``max_clamped`` (a fraction) of the values would clamp to the key's range, and when told
(``force_key_frame``: after an error, a reconnect, a refusal). 16 / 32-bit modes have no symbols to
difference: every frame is a key frame. The decoder accepts a delta only directly after its reference
(same key, next sequence number, same shape and parameters); anything else raises ``KeyFrameRequired``
and drops the reference, so a wrong reference never produces a wrong answer. Malformed frames raise
``CodecError`` as in the per-frame codec, checked before anything is decompressed or allocated.

numpy only (no torch).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import cast

import numpy as np

from hnd.common import codec
from hnd.common.codec import DEFAULT_LIMITS, CodecError, EncodedTensor, Limits, Quantized

__all__ = [
    "FRAME_KINDS",
    "HYSTERESIS",
    "KeyFrameRequired",
    "StreamDecoder",
    "StreamEncoder",
    "StreamFrame",
    "StreamQuantized",
]

FRAME_KINDS = ("key", "delta")
# A quarter step beyond the rounding's half step: chosen on the figures of
# hnd.bench.speed_temporal (docs/benchmarks/edge-speed.md).
HYSTERESIS = 0.25


class KeyFrameRequired(Exception):
    """The decoder holds no valid reference for a delta frame; the sender must send a key frame."""


@dataclass
class StreamFrame:
    """One frame of a temporal stream, as it travels (hnd.v1.StreamFrame + Bottleneck.tensor).

    kind: "key" (intra) or "delta" (symbols relative to the previous frame's).
    key_sequence: sequence number of the key frame of this chain (a key frame: its own).
    sequence: this frame's number in the stream; a delta's is its reference's + 1.
    tensor: the encoding; a delta carries the key's bits, granularity, scale and zero point, and its
        payload holds the packed symbol differences.
    clamped: values clamped to the key's range (an encoder statistic; not sent).
    """

    kind: str
    key_sequence: int
    sequence: int
    tensor: EncodedTensor
    clamped: int = 0


@dataclass
class StreamQuantized:
    """The encoder's decision for one frame, before packing: kind, sequence numbers and symbols."""

    kind: str
    key_sequence: int
    sequence: int
    quantized: Quantized
    clamped: int
    reason: str  # why a key frame ("first", "interval", "shape", "clamp", "forced", "float"), "" for a delta

    def dequantize(self) -> np.ndarray:
        """The float32 bottleneck the decoder reconstructs (``codec.dequantize`` of these symbols)."""
        return codec.dequantize(self.quantized)


class StreamEncoder:
    """Bottlenecks of one stream, in order -> key / delta frames. One encoder per stream (not thread-safe).

    key_interval: frames per key frame (1: every frame is a key frame, i.e. per-frame intra coding).
    max_clamped: largest share of values a delta frame may clamp to the key's range; above it, a key frame.
    hysteresis: steps beyond half a step a value may move before its symbol changes in a delta frame (see
        the module's docstring); 0 for none.
    """

    def __init__(
        self,
        bits: int = 8,
        granularity: str = "tensor",
        compression: str = "zstd",
        level: int = 3,
        key_interval: int = 30,
        max_clamped: float = 0.0,
        hysteresis: float = HYSTERESIS,
    ) -> None:
        self.settings = codec.CodecSettings(bits, granularity, compression, level)
        if self.settings.learned:
            raise CodecError("temporal coding is for affine bottlenecks; learned entropy coding codes every frame")
        if key_interval < 1:
            raise CodecError(f"key_interval must be >= 1, got {key_interval}")
        if not 0.0 <= max_clamped <= 1.0:
            raise CodecError(f"max_clamped must be in [0, 1], got {max_clamped}")
        if not 0.0 <= hysteresis <= 0.5:
            raise CodecError(f"hysteresis must be in [0, 0.5] steps, got {hysteresis}")
        self.hysteresis = hysteresis
        self.bits, self.granularity = bits, granularity
        self.compression, self.level = compression, level
        self.key_interval = key_interval
        self.max_clamped = max_clamped
        self._ref: Quantized | None = None
        self._key_sequence = 0
        self._since_key = 0
        self._force = False
        self.sequence = 0  # the next frame's sequence number
        self.keys = 0
        self.deltas = 0
        self.clamp_keys = 0  # key frames sent because too many values would clamp

    def force_key_frame(self) -> None:
        """The next frame is a key frame (new stream, after an error or reconnect, or when the server asks)."""
        self._force = True

    @property
    def key_sequence(self) -> int:
        """Sequence number of the current chain's key frame."""
        return self._key_sequence

    def reconstruction(self) -> np.ndarray:
        """The last frame as the decoder reconstructs it (``codec.dequantize`` of its symbols)."""
        if self._ref is None:
            raise CodecError("no frame encoded yet")
        return codec.dequantize(self._ref)

    def quantize(self, tensor) -> StreamQuantized:
        """Decide key or delta for the next frame and quantize it; advances the stream. No packing."""
        x = codec.as_float32(tensor) if hasattr(codec, "as_float32") else _as_float32(tensor)
        reason = ""
        ref = self._ref
        if ref is None:
            reason = "first"
        elif self._force:
            reason = "forced"
        elif self.bits not in codec.AFFINE_BITS:
            reason = "float"
        elif tuple(x.shape) != ref.shape:
            reason = "shape"
        elif self._since_key >= self.key_interval:
            reason = "interval"
        clamped = 0
        if not reason:
            _check_finite(x)
            q, clamped = codec.quantize_with(
                x, ref.bits, ref.granularity, ref.scale, ref.zero_point, count_clamped=True
            )
            if clamped > self.max_clamped * x.size:
                reason = "clamp"
                self.clamp_keys += 1
            elif self.hysteresis > 0:
                q = _hold(x, q, ref, self.hysteresis)
        sequence = self.sequence
        if reason:
            q = codec.quantize(tensor, self.bits, self.granularity)
            self._key_sequence = sequence
            self._since_key = 0
            self._force = False
            self.keys += 1
        else:
            self.deltas += 1
        out = StreamQuantized("key" if reason else "delta", self._key_sequence, sequence, q, clamped, reason)
        self._delta_from = None if reason else ref
        self._ref = q
        self._since_key += 1
        self.sequence += 1
        return out

    def encode(self, tensor) -> StreamFrame:
        """Quantize (``quantize``), then pack and compress: the frame to send."""
        sq = self.quantize(tensor)
        q = sq.quantized
        symbols = q.symbols if sq.kind == "key" else _difference(q.symbols, self._delta_from.symbols, q.bits)
        raw = codec._pack(symbols, q.bits)
        payload, compression = codec.compress(raw, self.compression, self.level)
        tensor_out = EncodedTensor(
            shape=q.shape,
            dtype="float32",
            bits=q.bits,
            granularity=q.granularity,
            scale=q.scale,
            zero_point=q.zero_point,
            compression=compression,
            raw_size=len(raw),
            payload=payload,
        )
        return StreamFrame(sq.kind, sq.key_sequence, sq.sequence, tensor_out, sq.clamped)


@dataclass
class _Reference:
    key_sequence: int
    sequence: int
    quantized: Quantized  # with ``packed``, its symbols are the packed bytes (codec.dequantize_packed's input)
    packed: bool = False


class StreamDecoder:
    """Key / delta frames of one stream -> float32 bottlenecks; holds one reference, bounded.

    max_reference_bytes: largest reference kept, counted at one byte per symbol (2- and 4-bit references of one
    scale are held packed, in a half or a quarter of that). A key frame above it is still
    decoded, but not kept: the next delta raises KeyFrameRequired.
    """

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_reference_bytes: int = 4 << 20) -> None:
        self.limits = limits
        self.max_reference_bytes = max_reference_bytes
        self._ref: _Reference | None = None

    @property
    def reference_bytes(self) -> int:
        """Bytes the reference holds now (0 without one)."""
        return 0 if self._ref is None else int(self._ref.quantized.symbols.nbytes)

    @property
    def has_reference(self) -> bool:
        return self._ref is not None

    def reset(self) -> None:
        self._ref = None

    def decode(self, frame: StreamFrame) -> np.ndarray:
        """One frame -> float32 array of ``frame.tensor.shape``.

        Raises KeyFrameRequired (no valid reference for a delta; the reference is dropped) or CodecError
        (malformed; the reference is dropped too: the sender's state is past it).
        """
        try:
            return self._decode(frame)
        except (KeyFrameRequired, CodecError):
            self._ref = None
            raise

    def _decode(self, frame: StreamFrame) -> np.ndarray:
        if frame.kind not in FRAME_KINDS:
            raise CodecError(f"unknown stream frame kind {frame.kind!r}; expected one of {FRAME_KINDS}")
        t = frame.tensor
        codec.validate(t, self.limits)
        if frame.kind == "key":
            if frame.key_sequence != frame.sequence:
                raise CodecError(f"key frame {frame.sequence} names key {frame.key_sequence}; a key frame names itself")
            raw = codec._decompress(t)
            keep = t.bits in codec.AFFINE_BITS and t.numel <= self.max_reference_bytes
            out = codec.dequantize_packed(raw, t)
            if out is not None:  # 2 / 4 bits of one scale: the reference stays packed, as the deltas come
                packed = Quantized(t.shape, t.bits, t.granularity, tuple(t.scale), tuple(t.zero_point), _bytes(raw))
                self._ref = _Reference(frame.sequence, frame.sequence, packed, packed=True) if keep else None
                return out
            symbols = codec._unpack(raw, t.bits, t.numel)
            if t.bits not in codec.AFFINE_BITS and not np.isfinite(symbols).all():
                raise CodecError("payload holds NaN or Inf values")
            q = Quantized(t.shape, t.bits, t.granularity, tuple(t.scale), tuple(t.zero_point), symbols)
            self._ref = _Reference(frame.sequence, frame.sequence, q) if keep else None
            return codec.dequantize(q)
        ref = self._ref
        if ref is None:
            raise KeyFrameRequired(f"delta frame {frame.sequence} has no reference on this stream")
        rq = ref.quantized
        if frame.key_sequence != ref.key_sequence or frame.sequence != ref.sequence + 1:
            raise KeyFrameRequired(
                f"delta frame {frame.sequence} of key {frame.key_sequence} does not follow frame {ref.sequence} "
                f"of key {ref.key_sequence}"
            )
        if (
            (t.shape, t.bits, t.granularity) != (rq.shape, rq.bits, rq.granularity)
            or tuple(t.scale) != rq.scale
            or tuple(t.zero_point) != rq.zero_point
        ):
            raise KeyFrameRequired(f"delta frame {frame.sequence} has another shape or quantization than its key")
        raw = codec._decompress(t)
        if ref.packed:  # code by code modulo 2^bits, inside each byte: the unpacked sum, packed
            packed = _add_packed(rq.symbols, _bytes(raw), t.bits)
            self._ref = _Reference(ref.key_sequence, frame.sequence, dataclasses.replace(rq, symbols=packed), True)
            return cast(np.ndarray, codec.dequantize_packed(packed, t))
        symbols = _add(rq.symbols, codec._unpack(raw, t.bits, t.numel), t.bits)
        q = Quantized(rq.shape, rq.bits, rq.granularity, rq.scale, rq.zero_point, symbols)
        self._ref = _Reference(ref.key_sequence, frame.sequence, q)
        return codec.dequantize(q)


def _hold(x: np.ndarray, q: Quantized, ref: Quantized, hysteresis: float) -> Quantized:
    """q with each symbol put back to ref's where x lies within 0.5 + hysteresis steps of ref's symbol."""
    v = codec.positions(x, ref.granularity, ref.scale, ref.zero_point).reshape(-1)
    keep = np.abs(v - ref.symbols) <= np.float32(0.5 + hysteresis)
    return dataclasses.replace(q, symbols=np.where(keep, ref.symbols, q.symbols))


def _difference(new: np.ndarray, old: np.ndarray, bits: int) -> np.ndarray:
    """(new - old) mod 2^bits as uint8 codes (uint8 arithmetic wraps modulo 256)."""
    return (new - old) & np.uint8((1 << bits) - 1)


def _add(old: np.ndarray, diff: np.ndarray, bits: int) -> np.ndarray:
    return (old + diff) & np.uint8((1 << bits) - 1)


# 2 and 4 bits: every other code of a byte, so that a code's carry falls into the gap (or out of the byte).
_FIELDS = {2: (np.uint8(0x33), np.uint8(0xCC)), 4: (np.uint8(0x0F), np.uint8(0xF0))}


def _add_packed(old: np.ndarray, diff: np.ndarray, bits: int) -> np.ndarray:
    """``_add`` on packed bytes of 2- or 4-bit codes: each code (old + diff) mod 2^bits (uint8 arithmetic wraps)."""
    even, odd = _FIELDS[bits]
    return (((old & even) + (diff & even)) & even) | (((old & odd) + (diff & odd)) & odd)


def _bytes(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8)


def _as_float32(tensor) -> np.ndarray:
    """Fallback for a per-frame codec without ``as_float32`` (torch tensors and numpy arrays)."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().to("cpu").float().contiguous().numpy()
    return np.ascontiguousarray(tensor, dtype=np.float32)


def _check_finite(x: np.ndarray) -> None:
    if not (np.isfinite(x.min()) and np.isfinite(x.max())):
        raise CodecError("tensor holds NaN or Inf values; the codec needs finite input")
