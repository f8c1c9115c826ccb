"""The bottleneck codec: quantize, bit-pack, entropy-code; and a decoder that trusts nothing it is sent.

Every path uses this one module: the edge runtime (``encode``), the server (``decode``), evaluation
(``roundtrip``, which gives bit for bit what ``decode(encode(x))`` gives) and the benchmark.

It works on numpy arrays and never imports torch, so the edge's ONNX path runs without PyTorch.
``encode`` / ``quantize`` / ``roundtrip`` also take a torch tensor (converted with ``.numpy()``, so
the same values give the same bytes); ``decode``, ``dequantize`` and ``roundtrip`` return numpy
arrays. ``hnd.common.torch_codec`` is the thin wrapper that returns torch tensors instead.

Modes (``bits`` x ``granularity``):

* ``bits`` in {2, 4, 6, 8} with ``granularity="tensor"`` or ``"channel"``: affine min/max quantization,
  one (scale, zero point) per tensor, or per channel (dim 1 of a [B, C, H, W] tensor, statistics over
  batch and space). The range is widened to include 0 (so 0 is exact and the zero point is an integer
  in [0, 2^bits - 1]), the zero point is rounded and values are rounded, then clamped. A constant
  tensor (or channel) gets one level placed on its value, so it comes back exactly.
  Error bound: ``|decode(encode(x)) - x| <= scale / 2`` per element, up to float32 rounding
  (about ``1e-4 * scale + 2**-23 * |x|``).
* ``bits=8, granularity="original"``: the original HND repository's per-tensor 8-bit scheme, reproduced
  exactly (truncated zero point, clamp before round; docs/ORIGINAL_MODELS.md section 3), except that a constant
  tensor no longer divides by zero. Its error is below ``scale`` (not ``scale / 2``) when the range
  includes 0, and unbounded when it does not (it clamps the zero point to [0, 255]).
* ``bits=16``: float16 (granularity ignored); ``bits=32``: lossless float32, bit for bit.
* ``compression="learned"`` (bits 0, granularity "channel"): learned entropy coding of an Entropic
  Student latent [B, C, h, w] against the model's factorized prior (``prior``, a
  ``hnd.common.entropy_coder.PriorTables``): symbols ``round(x - median_c)``, range-coded with the
  prior's integer CDF tables (docs/ENTROPIC.md). ``decode`` gives ``float32(symbol) + median_c``;
  the model's own forward rounds the same way, so this mode adds no error beyond the model's.

Sub-byte symbols are packed densely, first value in the high bits: 2-bit packs 4 values per byte,
4-bit 2 per byte, 6-bit 4 values in 3 bytes. Multi-byte values are little-endian. The packed bytes are
then optionally compressed with zstd.

``decode`` checks every declared field (shape, bits, enum strings, parameter arrays, sizes) against
``Limits`` before it decompresses or allocates anything, and decompresses with a bounded output, so a
lying header or a zstd bomb costs nothing. Every refusal is a ``CodecError``.
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from hnd.common import entropy_coder
from hnd.common.entropy_coder import PriorTables
from hnd.common.errors import HndError

__all__ = [
    "AFFINE_BITS",
    "BITS",
    "COMPRESSIONS",
    "DEFAULT_LIMITS",
    "DTYPES",
    "GRANULARITIES",
    "CodecError",
    "CodecSettings",
    "EncodedTensor",
    "Limits",
    "Quantized",
    "as_float32",
    "compress",
    "decode",
    "dequantize",
    "encode",
    "encode_symbols",
    "packed_size",
    "positions",
    "quantize",
    "quantize_with",
    "roundtrip",
    "validate",
]

AFFINE_BITS = (2, 4, 6, 8)
BITS = AFFINE_BITS + (16, 32)
GRANULARITIES = ("tensor", "channel", "original")
COMPRESSIONS = ("zstd", "none")  # of the affine modes
LEARNED = "learned"  # learned entropy coding against an Entropic Student's prior (bits 0)
ALL_COMPRESSIONS = COMPRESSIONS + (LEARNED,)
LEARNED_BITS = 0
DTYPES = ("float32",)

# Values per packing group and bytes per group: each group fills whole bytes.
_GROUP = {2: (4, 1), 4: (2, 1), 6: (4, 3)}
_FLOAT_DTYPE: dict[int, np.dtype[Any]] = {16: np.dtype("<f2"), 32: np.dtype("<f4")}
_FLOAT16_OVERFLOW = 65520.0  # float16 rounds |x| >= this to inf
# Affine modes refuse |x| above this, and decode refuses larger scales, so scale * (q - zp) stays finite.
_MAX_AFFINE_ABS = float(np.finfo(np.float32).max) / 256
_ZSTD_MIN_LEVEL = -(1 << 17)


class CodecError(HndError, ValueError):
    """Input the codec refuses: bad arguments, non-finite values, or a malformed / hostile encoding."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds ``decode`` enforces before it decompresses or allocates."""

    max_elements: int = 1 << 24  # 16M values
    max_decompressed_bytes: int = 64 << 20  # 64 MiB of packed symbols
    max_dims: int = 8


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class CodecSettings:
    """How a bottleneck is coded, validated once: built here, or not at all (CodecError).

    The rules, stated only here: ``compression`` one of ``ALL_COMPRESSIONS`` and a zstd ``level`` in
    zstd's range; the affine modes take ``bits`` in ``BITS`` and ``granularity`` in ``GRANULARITIES``,
    with ``original`` only at ``ORIGINAL_BITS`` (8); ``learned`` (an Entropic Student's entropy coding)
    takes bits 0 and granularity "channel". Config (``RuntimeConfig.codec``), the CLIs, the benchmarks and
    the edge's modes (``EdgeOptions.codec``) carry one of these instead of loose arguments.
    """

    bits: int = 8
    granularity: str = "tensor"
    compression: str = "zstd"
    level: int = 3

    def __post_init__(self) -> None:
        _check_compression(self.compression, self.level)
        if self.compression == LEARNED:
            _check_learned_mode(self.bits, self.granularity)
        else:
            _check_mode(self.bits, self.granularity)

    @classmethod
    def learned_coding(cls) -> CodecSettings:
        """An Entropic Student's one setting: learned entropy coding against its prior."""
        return cls(LEARNED_BITS, "channel", LEARNED)

    @property
    def learned(self) -> bool:
        return self.compression == LEARNED

    def encode(self, tensor: Any, prior: PriorTables | None = None) -> EncodedTensor:
        """``encode`` at these settings (``prior``: an Entropic Student's PriorTables, learned coding only)."""
        return encode(tensor, self.bits, self.granularity, self.compression, self.level, prior)

    def roundtrip(self, tensor: Any, prior: PriorTables | None = None) -> np.ndarray:
        """``roundtrip`` at these settings: bit for bit what ``decode(self.encode(tensor))`` gives."""
        return roundtrip(tensor, self.bits, self.granularity, self.compression, self.level, prior)

    def as_tuple(self) -> tuple[int, str, str, int]:
        """(bits, granularity, compression, level): the positional arguments of ``encode`` and ``StreamEncoder``."""
        return (self.bits, self.granularity, self.compression, self.level)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "granularity": self.granularity,
            "compression": self.compression,
            "level": self.level,
        }


@dataclass
class EncodedTensor:
    """A tensor as it travels: what ``encode`` returns and ``decode`` takes (mirrors hnd.v1.Tensor).

    shape: shape of the decoded tensor, e.g. (B, C, H, W).
    dtype: dtype of the decoded tensor; always "float32".
    bits: 2, 4, 6, 8 (affine), 16 (float16) or 32 (float32).
    granularity: "tensor", "channel" or "original" ("tensor" for 16 / 32 bits).
    scale, zero_point: quantization parameters; length 1 per tensor, C per channel, 0 for 16 / 32 bits.
    compression: "zstd" or "none".
    raw_size: bytes of the packed symbols before compression (``packed_size(numel, bits)``).
    payload: the (compressed) packed symbols.
    """

    shape: tuple[int, ...]
    dtype: str
    bits: int
    granularity: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    compression: str
    raw_size: int
    payload: bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def wire_size(self) -> int:
        """Bytes of payload plus quantization parameters (float32 scale, int32 zero point each).

        The protobuf envelope adds a few dozen bytes on top; ``hnd.common.wire.tensor_to_proto(t).ByteSize()``
        gives the exact message size.
        """
        return len(self.payload) + 4 * (len(self.scale) + len(self.zero_point))


@dataclass
class Quantized:
    """Symbols before packing: what the entropy coder sees.

    symbols: flat array of ``numel`` values in C order; uint8 codes for affine modes,
        float16 / float32 values for 16 / 32 bits.
    """

    shape: tuple[int, ...]
    bits: int
    granularity: str
    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    symbols: np.ndarray


# ---------------------------------------------------------------------------------------------------
# Public API


def encode(
    tensor: Any,
    bits: int = 8,
    granularity: str = "tensor",
    compression: str = "zstd",
    level: int = 3,
    prior: PriorTables | None = None,
) -> EncodedTensor:
    """Quantize, pack and compress a float array or tensor (any shape; [B, C, H, W] for "channel").

    ``compression="learned"`` codes an Entropic Student latent against ``prior`` (PriorTables);
    bits must then be 0 and granularity "channel".
    """
    _check_compression(compression, level)
    if compression == LEARNED:
        return _encode_learned(tensor, bits, granularity, prior)
    q = quantize(tensor, bits, granularity)
    raw = _pack(q.symbols, bits)
    payload, compression = compress(raw, compression, level)
    return EncodedTensor(
        shape=q.shape,
        dtype="float32",
        bits=bits,
        granularity=q.granularity,
        scale=q.scale,
        zero_point=q.zero_point,
        compression=compression,
        raw_size=len(raw),
        payload=payload,
    )


# zstd is kept only where it saves at least this share of the packed bytes. Decompressing costs the server
# about 1 us per packed kB (python -m hnd.bench.overhead --profile), sending a kB ~80 us at 100 Mbit/s, ~8 us
# at 1 Gbit/s: saving a share f pays on links slower than ~f x 7 Gbit/s. Below 1/32 (an incompressible
# payload, e.g. 8-bit symbols of a flat histogram) it pays on none a camera uses for long; above, the edge
# cannot tell its link from here, so it keeps zstd (on loopback or a LAN, ``compression: none`` in the
# config's runtime section saves the decode outright).
MIN_ZSTD_SAVING = 1 / 32


def compress(raw: bytes, compression: str = "zstd", level: int = 3) -> tuple[bytes, str]:
    """Packed symbols -> (payload, compression actually used): "zstd" sends zstd's frame only when it is at
    least ``MIN_ZSTD_SAVING`` smaller than ``raw``, else ``raw`` as "none" (the decoder reads either)."""
    if compression != "zstd":
        return raw, compression
    payload = zstandard.ZstdCompressor(level=level).compress(raw)
    if len(payload) > len(raw) * (1 - MIN_ZSTD_SAVING):
        return raw, "none"
    return payload, "zstd"


def decode(encoded: EncodedTensor, limits: Limits = DEFAULT_LIMITS, prior: PriorTables | None = None) -> np.ndarray:
    """Validate, decompress, unpack and dequantize; returns a float32 array of ``encoded.shape``.

    Raises CodecError on anything malformed or over ``limits``, before any large allocation.
    ``prior``: the served model's PriorTables, needed (only) for ``compression="learned"``.
    """
    validate(encoded, limits)
    if encoded.compression == LEARNED:
        return _decode_learned(encoded, limits, prior)
    raw = _decompress(encoded)
    value = dequantize_packed(raw, encoded)
    if value is not None:
        return value
    symbols = _unpack(raw, encoded.bits, encoded.numel)
    if encoded.bits in _FLOAT_DTYPE and not (np.isfinite(symbols.min()) and np.isfinite(symbols.max())):
        raise CodecError("payload holds NaN or Inf values")
    q = Quantized(encoded.shape, encoded.bits, encoded.granularity, encoded.scale, encoded.zero_point, symbols)
    return dequantize(q)


def roundtrip(
    tensor: Any,
    bits: int = 8,
    granularity: str = "tensor",
    compression: str = "zstd",
    level: int = 3,
    prior: PriorTables | None = None,
) -> np.ndarray:
    """Exactly (bit for bit) ``decode(encode(tensor, ...))``, without packing or compressing.

    compression and level do not change the result; they are checked so that the same arguments fail
    here as in ``encode``. With ``compression="learned"``: round against ``prior``'s medians, no coding.
    """
    _check_compression(compression, level)
    if compression == LEARNED:
        tables = _check_learned(bits, granularity, prior)
        return entropy_coder.dequantize(_learned_symbols(tensor, tables), tables)
    return dequantize(quantize(tensor, bits, granularity))


def quantize(tensor: Any, bits: int = 8, granularity: str = "tensor") -> Quantized:
    """Map a finite float array (or torch tensor) to symbols and quantization parameters.

    tensor: any shape with positive dims, typically a bottleneck [B, C, H, W]; "channel" quantizes
    each index of dim 1 over all other dims. Returns ``numel`` symbols in C order. No packing, no
    compression.
    """
    _check_mode(bits, granularity)
    x = as_float32(tensor)
    shape = tuple(int(d) for d in x.shape)
    if not shape or min(shape) < 1:
        raise CodecError(f"cannot encode a tensor of shape {shape}: need at least one dim, all positive")
    if granularity == "channel" and len(shape) < 2:
        raise CodecError(f"per-channel quantization needs a channel dim 1, got shape {shape}")

    if bits in _FLOAT_DTYPE:
        lo, hi = float(x.min()), float(x.max())
        _check_finite(lo, hi)
        if bits == 16 and max(-lo, hi) >= _FLOAT16_OVERFLOW:
            raise CodecError(f"values in [{lo}, {hi}] overflow float16")
        return Quantized(shape, bits, "tensor", (), (), x.reshape(-1).astype(_FLOAT_DTYPE[bits]))

    if granularity == "channel":
        axes = (0,) + tuple(range(2, x.ndim))
        lo, hi = x.min(axis=axes), x.max(axis=axes)
    else:
        lo, hi = x.min(keepdims=True).reshape(1), x.max(keepdims=True).reshape(1)
    _check_finite(lo, hi)
    if max(-float(lo.min()), float(hi.max())) > _MAX_AFFINE_ABS:
        raise CodecError(f"values beyond +-{_MAX_AFFINE_ABS:.3g} are too large to quantize; use bits=32")

    if granularity == "original":
        scale, zero_point = _original_params(lo, hi)
    else:
        scale, zero_point = _affine_params(lo, hi, bits)
    return quantize_with(x, bits, granularity, scale, zero_point)[0]


def positions(x: np.ndarray, granularity: str, scale: tuple[float, ...], zero_point: tuple[int, ...]) -> np.ndarray:
    """``x / scale + zero_point``, float32 of x's shape: where each value falls on the symbol grid, before
    rounding and clamping (``quantize_with`` rounds it; a stream's hysteresis compares it with its reference)."""
    s, zp = _param_arrays(scale, zero_point, x.ndim, granularity)
    v = x / np.where(s == 0, np.float32(1), s)  # scale 0 only where the values are all 0
    v += zp
    return v


def quantize_with(
    x: np.ndarray,
    bits: int,
    granularity: str,
    scale: tuple[float, ...],
    zero_point: tuple[int, ...],
    count_clamped: bool = False,
) -> tuple[Quantized, int]:
    """Symbols of a finite float32 array under given affine parameters; the arithmetic of ``quantize``.

    ``quantize`` derives the parameters from ``x`` and calls this; a temporal stream
    (``hnd.common.stream_codec``) reuses its key frame's parameters for the frames that follow, where
    values beyond the key's range clamp. Returns (Quantized, values clamped; 0 unless ``count_clamped``).
    """
    s, zp = _param_arrays(scale, zero_point, x.ndim, granularity)
    v = positions(x, granularity, scale, zero_point)
    qmax = (1 << bits) - 1
    # Round and clamp commute here (integer bounds); the original's order is clamp, then round.
    np.rint(v, out=v)
    clamped = 0
    if count_clamped:  # a group of scale 0 (all zeros in the key) cannot represent any other value
        clamped = int(np.count_nonzero((v < 0) | (v > qmax) | ((s == 0) & (x != 0))))
    np.clip(v, 0, qmax, out=v)
    symbols = v.astype(np.uint8).reshape(-1)
    return Quantized(
        tuple(int(d) for d in x.shape), bits, granularity, tuple(scale), tuple(zero_point), symbols
    ), clamped


def dequantize(q: Quantized) -> np.ndarray:
    """Symbols back to a float32 array of ``q.shape``: ``scale * (q - zero_point)`` for affine modes.

    The one dequantization both ``decode`` and ``roundtrip`` run, so they cannot drift apart.
    """
    if q.bits in _FLOAT_DTYPE:
        out = q.symbols.astype(np.float32)  # always a copy: never alias the caller's tensor or buffer
    else:
        x = q.symbols.reshape(q.shape).astype(np.float32)
        s, zp = _param_arrays(q.scale, q.zero_point, len(q.shape), q.granularity)
        x -= zp
        x *= s
        out = x
    return out.reshape(q.shape)


def as_float32(tensor: Any) -> np.ndarray:
    """A C-contiguous float32 numpy array of a floating-point numpy array or torch tensor (CPU copy).

    float64 / float16 / bfloat16 are rounded to float32 the same way on both paths, so a torch
    tensor and its ``.numpy()`` encode to the same bytes. Integer and other inputs are refused.
    """
    torch = sys.modules.get("torch")  # only a caller that has torch can pass a tensor: never import it
    if torch is not None and isinstance(tensor, torch.Tensor):
        if not tensor.is_floating_point():
            raise CodecError(f"expected a floating-point tensor, got a torch tensor of {tensor.dtype}")
        return tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if not isinstance(tensor, np.ndarray) or not np.issubdtype(tensor.dtype, np.floating):
        what = f"an array of {tensor.dtype}" if isinstance(tensor, np.ndarray) else _describe(tensor)
        raise CodecError(f"expected a floating-point numpy array or torch tensor, got {what}")
    return np.ascontiguousarray(tensor, dtype=np.float32)


def packed_size(numel: int, bits: int) -> int:
    """Bytes that ``numel`` symbols of ``bits`` bits take once packed (whole packing groups)."""
    if bits in _GROUP:
        per_group, group_bytes = _GROUP[bits]
        return -(-numel // per_group) * group_bytes
    return numel * bits // 8


def validate(encoded: EncodedTensor, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check every declared field of ``encoded`` against the format and ``limits``; cheap, allocates nothing.

    ``decode`` calls it first; a server may call it on receipt, before queueing.
    """
    if not isinstance(encoded, EncodedTensor):
        raise CodecError(f"expected an EncodedTensor, got {_describe(encoded)}")
    if encoded.dtype not in DTYPES:
        raise CodecError(f"unknown dtype {encoded.dtype!r}; expected one of {DTYPES}")
    if encoded.compression == LEARNED:
        _validate_learned(encoded, limits)
        return
    _check_mode(encoded.bits, encoded.granularity)
    if encoded.compression not in ALL_COMPRESSIONS:
        raise CodecError(f"unknown compression {encoded.compression!r}; expected one of {ALL_COMPRESSIONS}")

    shape = encoded.shape
    if not isinstance(shape, tuple) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise CodecError(f"shape must be a tuple of ints, got {shape!r}"[:200])
    if not 1 <= len(shape) <= limits.max_dims:
        raise CodecError(f"shape has {len(shape)} dims; expected 1 to {limits.max_dims}")
    if min(shape) < 1:
        raise CodecError(f"shape {shape} has a non-positive dimension")
    numel = math.prod(shape)  # Python ints: no overflow, however large the dims
    if numel > limits.max_elements:
        raise CodecError(f"shape {shape} has {numel} elements; the limit is {limits.max_elements}")
    expected = packed_size(numel, encoded.bits)
    if expected > limits.max_decompressed_bytes:
        raise CodecError(f"{expected} packed bytes exceed the limit of {limits.max_decompressed_bytes}")
    if encoded.raw_size != expected:
        raise CodecError(
            f"raw_size {encoded.raw_size!r} does not match shape {shape} at {encoded.bits} bits ({expected} bytes)"
        )
    if not isinstance(encoded.payload, bytes):
        raise CodecError(f"payload must be bytes, got {_describe(encoded.payload)}")
    if encoded.compression == "none" and len(encoded.payload) != expected:
        raise CodecError(f"payload has {len(encoded.payload)} bytes; {expected} declared")
    _check_params(encoded)


# ---------------------------------------------------------------------------------------------------
# Learned entropy coding (Entropic Student)


def _check_learned(bits: object, granularity: object, prior: object) -> PriorTables:
    """The PriorTables to code with; refuses affine settings mixed into the learned mode."""
    _check_learned_mode(bits, granularity)
    if not isinstance(prior, PriorTables):
        raise CodecError(
            "learned entropy coding needs the Entropic Student's prior tables "
            "(the model is not an Entropic Student, or its tables were not given)"
        )
    return prior


def _learned_symbols(tensor: Any, tables: PriorTables) -> np.ndarray:
    try:
        return entropy_coder.quantize(as_float32(tensor), tables)
    except entropy_coder.EntropyCodingError as e:
        raise CodecError(str(e)) from None


def _encode_learned(tensor: Any, bits: int, granularity: str, prior: PriorTables | None) -> EncodedTensor:
    tables = _check_learned(bits, granularity, prior)
    return encode_symbols(_learned_symbols(tensor, tables), tables)


def encode_symbols(symbols: np.ndarray, prior: PriorTables | None) -> EncodedTensor:
    """Learned entropy coding of symbols already rounded against ``prior``'s medians (int32 [B, C, h, w]).

    What an Entropic Student's ONNX head gives (its graph rounds); ``encode(y, 0, "channel", "learned",
    prior=prior)`` is ``encode_symbols(rint(y - median), prior)``, so both give the same bytes.
    """
    tables = _check_learned(LEARNED_BITS, "channel", prior)
    symbols = np.asarray(symbols)
    if symbols.dtype != np.int32:
        raise CodecError(f"symbols must be int32, got {symbols.dtype}")
    try:
        payload = entropy_coder.encode(symbols, tables)
    except entropy_coder.EntropyCodingError as e:
        raise CodecError(str(e)) from None
    return EncodedTensor(
        shape=tuple(int(d) for d in symbols.shape),
        dtype="float32",
        bits=LEARNED_BITS,
        granularity="channel",
        scale=(),
        zero_point=(),
        compression=LEARNED,
        raw_size=4 * symbols.size,
        payload=payload,
    )


def _validate_learned(encoded: EncodedTensor, limits: Limits) -> None:
    shape = encoded.shape
    if encoded.bits != LEARNED_BITS or encoded.granularity != "channel":
        raise CodecError(
            f"learned entropy coding needs bits 0 and granularity 'channel'; got bits "
            f"{encoded.bits!r}, granularity {encoded.granularity!r}"
        )
    if (
        not isinstance(shape, tuple)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)
    ):
        raise CodecError(f"a learned-coded latent has shape [B, C, h, w] with positive dims, got {shape!r}"[:200])
    numel = math.prod(shape)
    if numel > limits.max_elements:
        raise CodecError(f"shape {shape} has {numel} elements; the limit is {limits.max_elements}")
    if encoded.raw_size != 4 * numel:
        raise CodecError(
            f"raw_size {encoded.raw_size!r} does not match shape {shape} as int32 symbols ({4 * numel} bytes)"
        )
    if encoded.scale or encoded.zero_point:
        raise CodecError("learned entropy coding takes no scale / zero point (the prior's medians are the model's)")
    if not isinstance(encoded.payload, bytes):
        raise CodecError(f"payload must be bytes, got {_describe(encoded.payload)}")
    if len(encoded.payload) > limits.max_decompressed_bytes:
        raise CodecError(
            f"payload of {len(encoded.payload)} bytes exceeds the limit of {limits.max_decompressed_bytes}"
        )


def _decode_learned(encoded: EncodedTensor, limits: Limits, prior: PriorTables | None) -> np.ndarray:
    if not isinstance(prior, PriorTables):
        raise CodecError("this model takes no learned entropy coding (it is not an Entropic Student)")
    try:
        symbols = entropy_coder.decode(
            encoded.payload,
            encoded.shape,
            prior,
            max_elements=limits.max_elements,
            max_payload=limits.max_decompressed_bytes,
        )
    except entropy_coder.EntropyCodingError as e:
        raise CodecError(str(e)) from None
    return entropy_coder.dequantize(symbols, prior)


# ---------------------------------------------------------------------------------------------------
# Quantization parameters


def _affine_params(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Per-group (scale, zero point) from float32 minima / maxima [G]."""
    qmax = (1 << bits) - 1
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    # A constant group gets one level on its value: scale = |value|, q - zp = +-1 (or scale 0 for zeros).
    levels = np.where(lo64 == hi64, 1, qmax)
    lo64, hi64 = np.minimum(lo64, 0.0), np.maximum(hi64, 0.0)  # include 0: integer zp in [0, qmax]
    exact = (hi64 - lo64) / levels
    scale = exact.astype(np.float32)
    # Round the float32 scale up, never down, so [lo, hi] stays inside the representable range.
    scale = np.where(scale < exact, np.nextafter(scale, np.float32(np.inf)), scale)
    safe = np.where(scale == 0, 1.0, scale.astype(np.float64))
    zero_point = np.clip(np.rint(-lo64 / safe), 0, qmax).astype(np.int64)
    return tuple(float(s) for s in scale), tuple(int(z) for z in zero_point)


def _original_params(lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The original repository's per-tensor 8-bit parameters, in the same float32 arithmetic as its torch code."""
    qmin, qmax = np.float32(0.0), np.float32(255.0)
    mn, mx = np.float32(lo[0]), np.float32(hi[0])
    if mn == mx:  # the original divides by zero here; place one level on the constant instead
        scale = np.float32(abs(mn))
    else:
        scale = (mx - mn) / (qmax - qmin)
    initial = qmin - mn / scale if scale != 0 else qmin
    zero_point = int(min(max(initial, qmin), qmax))  # int() truncates, as the original does
    return (float(scale),), (zero_point,)


# 2 and 4 bits: whole codes per byte; a byte's codes as float32 make one table entry of this many bytes.
_BYTE_CODES = {2: np.dtype("V16"), 4: np.dtype("<u8")}


def dequantize_packed(raw: bytes | np.ndarray, encoded: EncodedTensor) -> np.ndarray | None:
    """2- or 4-bit codes of one scale from their packed bytes straight to float32 [encoded.shape]: one look-up per
    byte in a table of each byte value's 4 or 2 dequantized codes. The table is ``dequantize``'s own output for
    every code, so the values are bit for bit those of unpack + ``dequantize``; the bytes are read once and the
    floats written once, where unpacking and dequantizing make five passes (a 4-bit 57,600-value bottleneck:
    85 -> 61 us; 2 bits: 110 -> 51 us). ``raw``: the packed bytes (or a uint8 array of them). None for other
    bits, and for per-channel scales (measured no faster: a table per channel).
    """
    if encoded.bits not in _BYTE_CODES or encoded.granularity != "tensor":
        return None
    bits = encoded.bits
    codes = _BYTE_VALUE_CODES[bits]
    q = Quantized((codes.size,), bits, "tensor", encoded.scale, encoded.zero_point, codes)
    table = dequantize(q).view(_BYTE_CODES[bits])  # [256]: byte value -> its codes' floats
    out = np.take(table, np.frombuffer(raw, dtype=np.uint8), mode="clip")  # uint8 indices: in range, unchecked
    return out.view(np.float32)[: encoded.numel].reshape(encoded.shape)


def _param_arrays(
    scale: tuple[float, ...], zero_point: tuple[int, ...], ndim: int, granularity: str
) -> tuple[np.ndarray, np.ndarray]:
    """float32 scale and zero point, shaped to broadcast against the tensor (channel = dim 1)."""
    shape = (1, len(scale)) + (1,) * (ndim - 2) if granularity == "channel" else (1,) * ndim
    return (
        np.asarray(scale, dtype=np.float32).reshape(shape),
        np.asarray(zero_point, dtype=np.float32).reshape(shape),
    )


# ---------------------------------------------------------------------------------------------------
# Packing and compression


def _pack(symbols: np.ndarray, bits: int) -> bytes:
    """Flat symbols -> packed bytes; sub-byte codes are grouped so each group fills whole bytes."""
    if bits not in _GROUP:  # 8-bit codes, float16, float32: already bytes
        return symbols.tobytes()
    per_group, group_bytes = _GROUP[bits]
    if group_bytes == 1:  # 2 and 4 bits: whole bytes of codes, shifted in uint8 (no widening)
        pad = -symbols.size % per_group
        cols8 = np.concatenate([symbols, np.zeros(pad, np.uint8)]) if pad else symbols
        cols8 = cols8.reshape(-1, per_group)
        byte = cols8[:, 0].copy()
        for i in range(1, per_group):
            byte <<= np.uint8(bits)
            byte |= cols8[:, i]
        return byte.tobytes()
    pad = -symbols.size % per_group
    if pad:
        symbols = np.concatenate([symbols, np.zeros(pad, dtype=symbols.dtype)])
    cols = symbols.reshape(-1, per_group).astype(np.uint32)
    word: np.ndarray = np.zeros(len(cols), dtype=np.uint32)
    for i in range(per_group):  # loops over columns (<= 4), not elements
        word = (word << bits) | cols[:, i]
    out = np.empty((len(cols), group_bytes), dtype=np.uint8)
    for j in range(group_bytes):
        out[:, j] = (word >> (8 * (group_bytes - 1 - j))) & 0xFF
    return out.tobytes()


def _unpack(raw: bytes, bits: int, numel: int) -> np.ndarray:
    """Packed bytes (length already checked) -> flat symbols of length ``numel``."""
    if bits in _FLOAT_DTYPE:
        return np.frombuffer(raw, dtype=_FLOAT_DTYPE[bits])
    if bits not in _GROUP:
        return np.frombuffer(raw, dtype=np.uint8)
    per_group, group_bytes = _GROUP[bits]
    if group_bytes == 1:  # 2 and 4 bits: shift the codes out of each byte in uint8
        byte = np.frombuffer(raw, dtype=np.uint8)
        m = np.uint8((1 << bits) - 1)
        codes = [(byte >> np.uint8(bits * (per_group - 1 - i))) & m for i in range(per_group)]
        return np.stack(codes, axis=1).reshape(-1)[:numel]
    packed = np.frombuffer(raw, dtype=np.uint8).reshape(-1, group_bytes).astype(np.uint32)
    word: np.ndarray = np.zeros(len(packed), dtype=np.uint32)
    for j in range(group_bytes):
        word = (word << 8) | packed[:, j]
    mask = (1 << bits) - 1
    cols = np.empty((len(packed), per_group), dtype=np.uint8)
    for i in range(per_group):
        cols[:, i] = (word >> (bits * (per_group - 1 - i))) & mask
    return cols.reshape(-1)[:numel]


# Each byte value's codes, in pack order (the tables of dequantize_packed are these, dequantized).
_BYTE_VALUE_CODES = {bits: _unpack(bytes(range(256)), bits, 256 * _GROUP[bits][0]) for bits in _BYTE_CODES}


_zstd = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompressor: a context is reused (each call starts a fresh frame) but not shared."""
    d = getattr(_zstd, "decompressor", None)
    if d is None:
        d = _zstd.decompressor = zstandard.ZstdDecompressor()
    return d


def _decompress(encoded: EncodedTensor) -> bytes:
    """The packed bytes, exactly ``raw_size`` of them; zstd output is bounded by the validated size."""
    data, expected = encoded.payload, encoded.raw_size
    if encoded.compression == "none":
        return data
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CodecError(f"payload is not a zstd frame: {e}") from None
    if declared != expected:
        what = "no content size" if declared < 0 else f"content size {declared}"
        raise CodecError(f"zstd frame declares {what}; {expected} bytes expected")
    # One frame, nothing after it, output bounded by the validated size: a lying frame fails early.
    try:
        raw = _decompressor().decompress(data, max_output_size=expected, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"corrupt zstd payload: {e}") from None
    if len(raw) != expected:
        raise CodecError(f"zstd payload decompressed to {len(raw)} bytes; {expected} expected")
    return raw


# ---------------------------------------------------------------------------------------------------
# Checks


ORIGINAL_BITS = 8  # granularity "original" is the original repository's 8-bit scheme, nothing else


def _check_mode(bits: object, granularity: object) -> None:
    """An affine (or float) mode: ``CodecSettings``' rule, also applied to what a decoder is sent."""
    if bits not in BITS or isinstance(bits, bool):
        raise CodecError(f"unsupported bits {bits!r}; expected one of {BITS}")
    if granularity not in GRANULARITIES:
        raise CodecError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
    if granularity == "original" and bits != ORIGINAL_BITS:
        raise CodecError(f"granularity 'original' is the original {ORIGINAL_BITS}-bit scheme; got bits={bits}")


def _check_learned_mode(bits: object, granularity: object) -> None:
    if bits != LEARNED_BITS or isinstance(bits, bool) or granularity != "channel":
        raise CodecError(
            f"learned entropy coding has no affine bits: use bits=0, granularity='channel' "
            f"(got bits={bits!r}, granularity={granularity!r})"
        )


def _check_compression(compression: object, level: object) -> None:
    if compression not in ALL_COMPRESSIONS:
        raise CodecError(f"unknown compression {compression!r}; expected one of {ALL_COMPRESSIONS}")
    if not isinstance(level, int) or not _ZSTD_MIN_LEVEL <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise CodecError(f"zstd level must be an int up to {zstandard.MAX_COMPRESSION_LEVEL}, got {level!r}")


def _check_finite(lo: float | np.ndarray, hi: float | np.ndarray) -> None:
    # min / max propagate NaN and expose Inf, so checking them covers every element.
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        raise CodecError("tensor holds NaN or Inf values; the codec needs finite input")


def _check_params(encoded: EncodedTensor) -> None:
    """Scale / zero point arrays: right length, scale finite in [0, max], zero point in [0, 2^bits - 1]."""
    scale, zero_point = encoded.scale, encoded.zero_point
    if encoded.bits in _FLOAT_DTYPE:
        expected = 0
    elif encoded.granularity == "channel":
        if len(encoded.shape) < 2:
            raise CodecError(f"per-channel tensor needs a channel dim 1, got shape {encoded.shape}")
        expected = encoded.shape[1]
    else:
        expected = 1
    if len(scale) != expected or len(zero_point) != expected:
        raise CodecError(
            f"{encoded.granularity} quantization at {encoded.bits} bits needs {expected} scale and zero point "
            f"values; got {len(scale)} and {len(zero_point)}"
        )
    if expected == 0:
        return
    qmax = (1 << encoded.bits) - 1
    if _plain_params(scale, zero_point, qmax):
        return
    try:
        s = np.asarray(scale, dtype=np.float64)
        zp = np.asarray(zero_point, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):
        raise CodecError("scale and zero point must be numbers") from None
    if s.ndim != 1 or zp.ndim != 1:
        raise CodecError("scale and zero point must be flat sequences of numbers")
    if not (np.isfinite(s).all() and (s >= 0).all() and (s <= _MAX_AFFINE_ABS).all()):
        raise CodecError(f"scale must be finite and in [0, {_MAX_AFFINE_ABS:.3g}]")
    if not ((zp == np.round(zp)).all() and (zp >= 0).all() and (zp <= qmax).all()):
        raise CodecError(f"zero point must be an integer in [0, {qmax}]")


_PLAIN_PARAMS = 64  # up to this many values, checked in Python: numpy's set-up costs more than the check


def _plain_params(scale: tuple, zero_point: tuple, qmax: int) -> bool:
    """True when every value is a plain float (scale) / int (zero point) in range, as the wire gives them.

    The quick accept of ``_check_params`` (no numpy for a handful of values); anything else, including
    every refusal, goes through the full check and its messages.
    """
    if len(scale) > _PLAIN_PARAMS:
        return False
    # NaN fails the comparison, inf exceeds the bound; bools are not plain ints here.
    return all(type(s) is float and 0.0 <= s <= _MAX_AFFINE_ABS for s in scale) and all(
        type(z) is int and 0 <= z <= qmax for z in zero_point
    )


def _describe(obj: object) -> str:
    return type(obj).__name__
