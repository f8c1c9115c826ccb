"""Learned entropy coding of an Entropic Student latent against its factorized prior (numpy only, no torch).

The edge (torch or ONNX head), the server, ``hnd-eval`` and ``hnd-bench`` all code through this module,
from the integer tables stored in the checkpoint (:class:`PriorTables`), never from floats recomputed on
one side. docs/ENTROPIC.md has the rationale and the format; in short:

* symbols: ``s = rint(y - median_c)`` per channel c (round half to even, as torch.round), int32;
  the decoder gives back ``y_hat = float32(s) + median_c``: :func:`quantize` / :func:`dequantize`,
  one function each for every path, so the runtime equals the in-process round trip bit for bit;
* coder: ``constriction``'s range coder (``stream.queue.RangeEncoder``, 32-bit words), one
  ``Categorical`` model per channel whose probabilities are the table's integer frequencies / 2^16
  (exact dyadic floats, so both sides build the same model on any IEEE-754 machine);
* order: for each image b, for each channel c, the h*w symbols of (b, c) in raster order, each as
  ``v = s - offset_c`` when ``0 <= v < max_c`` (``max_c = cdf_length_c - 2``), else as the table's
  overflow bin ``max_c``; then CompressAI's bypass value of every overflow in that order (``-2v - 1``
  below the table, ``2(v - max_c)`` above): first all their nibble counts (uniform over 1..8), then all
  their nibbles, least significant first (uniform over 16), so both sides code them in two vector calls;
* payload: the coder's uint32 words, little-endian, then the CRC-32 of the decoded symbols
  (int32 little-endian), so a truncated or corrupted stream is refused instead of decoded into wrong
  detections.

Decoding is bounded before it starts: the symbol count comes from the validated shape (at most
``max_elements``), the payload size is capped, every overflow costs at most 9 more symbols (so decode
work is at most 10 x numel symbol decodes), values beyond +-2^24 are refused, and any inconsistency,
exhaustion or trailing data (beyond the coder's one-word read-ahead) is an :class:`EntropyCodingError`.
A payload is also refused before decoding when it is smaller than its declared symbols can be: every
symbol of channel c costs at least ``-log2 p_max(c)`` bits (its table's most likely bin), so the coded
words hold at least that information (:func:`min_payload_bytes`); decode work is then proportional to
the bytes sent, and a few bytes declaring millions of symbols cost nothing.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MAX_ABS_SYMBOL",
    "EntropyCodingError",
    "PriorTables",
    "decode",
    "dequantize",
    "encode",
    "min_payload_bytes",
    "quantize",
]

CDF_PRECISION = 16
MAX_ABS_SYMBOL = 1 << 24  # float32 holds every integer up to here exactly
_MAX_NIBBLES = 8  # a bypass value is below 2^32
_CRC_BYTES = 4


class EntropyCodingError(ValueError):
    """A latent that cannot be coded, tables that are inconsistent, or a payload the decoder refuses."""


@dataclass(frozen=True, eq=False)
class PriorTables:
    """A factorized prior's integer coding tables and medians (CompressAI's EntropyBottleneck buffers).

    quantized_cdf: [C, W] int32, row c holds cdf_length[c] entries from 0 to 2^16 (then zero padding).
    cdf_length: [C] int32, entries used per row (symbol bins + overflow bin + 1).
    offset: [C] int32, the smallest symbol of each table (v = s - offset).
    medians: [C] float32, the prior's medians (``quantiles[:, 0, 1]``).
    min_bits: [C] float64 (derived), ``-log2`` of each table's largest bin probability: no symbol of
    channel c codes in fewer bits.
    """

    quantized_cdf: np.ndarray
    cdf_length: np.ndarray
    offset: np.ndarray
    medians: np.ndarray
    _models: list[Any] = field(default_factory=list, repr=False, compare=False)
    min_bits: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False, compare=False)

    def __post_init__(self) -> None:
        cdf = np.ascontiguousarray(self.quantized_cdf, dtype=np.int64)
        length = np.asarray(self.cdf_length, dtype=np.int64).reshape(-1)
        offset = np.asarray(self.offset, dtype=np.int64).reshape(-1)
        medians = np.asarray(self.medians, dtype=np.float32).reshape(-1)
        if cdf.ndim != 2 or cdf.shape[0] == 0:
            raise EntropyCodingError(
                f"quantized_cdf must be [C, W] with C >= 1, got {cdf.shape} "
                "(an entropy bottleneck that was never update()d?)"
            )
        c, w = cdf.shape
        if not (len(length) == len(offset) == len(medians) == c):
            raise EntropyCodingError(
                f"table sizes disagree: cdf {cdf.shape}, cdf_length {len(length)}, "
                f"offset {len(offset)}, medians {len(medians)}"
            )
        if not np.isfinite(medians).all():
            raise EntropyCodingError("medians must be finite")
        if (length < 3).any() or (length > w).any():
            raise EntropyCodingError(f"cdf_length must be in [3, {w}]")
        if (np.abs(offset) > MAX_ABS_SYMBOL).any():
            raise EntropyCodingError("offsets beyond +-2^24")
        total = 1 << CDF_PRECISION
        models = []
        min_bits = np.empty(c)
        import constriction

        for ch in range(c):
            row = cdf[ch, : length[ch]]
            freq = np.diff(row)
            if row[0] != 0 or row[-1] != total or (freq <= 0).any():
                raise EntropyCodingError(f"CDF row {ch} is not strictly increasing from 0 to 2^{CDF_PRECISION}")
            models.append(constriction.stream.model.Categorical(freq.astype(np.float64) / total, perfect=False))
            min_bits[ch] = -math.log2(int(freq.max()) / total)
        object.__setattr__(self, "min_bits", min_bits)
        object.__setattr__(self, "quantized_cdf", cdf.astype(np.int32))
        object.__setattr__(self, "cdf_length", length.astype(np.int32))
        object.__setattr__(self, "offset", offset.astype(np.int32))
        object.__setattr__(self, "medians", medians)
        object.__setattr__(self, "_models", models)

    @property
    def channels(self) -> int:
        return int(self.quantized_cdf.shape[0])

    def digest(self) -> str:
        """sha256 (hex, first 16) of the tables: names the prior in logs and benchmark records."""
        h = hashlib.sha256()
        for a in (self.quantized_cdf, self.cdf_length, self.offset, self.medians):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PriorTables:
        """From ``{"quantized_cdf", "cdf_length", "offset", "medians"}`` numpy arrays (e.g. an edge export)."""
        try:
            return cls(arrays["quantized_cdf"], arrays["cdf_length"], arrays["offset"], arrays["medians"])
        except KeyError as exc:
            raise EntropyCodingError(f"prior tables lack {exc.args[0]!r}") from None

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "quantized_cdf": self.quantized_cdf,
            "cdf_length": self.cdf_length,
            "offset": self.offset,
            "medians": self.medians,
        }


# ---------------------------------------------------------------------------------------------------
# Quantization (the one rounding every path uses)


def _median_view(tables: PriorTables, ndim: int) -> np.ndarray:
    return tables.medians.reshape((1, -1) + (1,) * (ndim - 2))


def quantize(y: np.ndarray, tables: PriorTables) -> np.ndarray:
    """Latent y [B, C, h, w] float32 -> int32 symbols ``rint(y - median_c)`` (half to even, as torch.round)."""
    y = np.asarray(y)
    if y.dtype != np.float32:
        raise EntropyCodingError(f"latent must be float32, got {y.dtype}")
    if y.ndim != 4 or min(y.shape) < 1:
        raise EntropyCodingError(f"latent must be [B, C, h, w] with positive dims, got {y.shape}")
    if y.shape[1] != tables.channels:
        raise EntropyCodingError(f"latent has {y.shape[1]} channels; the prior has {tables.channels}")
    s = np.rint(y - _median_view(tables, 4))
    lo, hi = float(s.min()), float(s.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise EntropyCodingError("latent holds NaN or Inf values")
    if max(-lo, hi) > MAX_ABS_SYMBOL:
        raise EntropyCodingError(f"latent symbols reach {max(-lo, hi):.3g}, beyond the codable +-2^24")
    return s.astype(np.int32)


def dequantize(symbols: np.ndarray, tables: PriorTables) -> np.ndarray:
    """int32 symbols [B, C, h, w] -> y_hat float32 ``float32(s) + median_c``."""
    return symbols.astype(np.float32) + _median_view(tables, symbols.ndim)


# ---------------------------------------------------------------------------------------------------
# Coding


def encode(symbols: np.ndarray, tables: PriorTables) -> bytes:
    """int32 symbols [B, C, h, w] (from :func:`quantize`) -> payload bytes (coder words + CRC-32)."""
    import constriction

    s = np.ascontiguousarray(symbols, dtype=np.int32)
    if s.ndim != 4 or s.shape[1] != tables.channels:
        raise EntropyCodingError(f"symbols must be [B, {tables.channels}, h, w], got {s.shape}")
    if s.size and max(-int(s.min()), int(s.max())) > MAX_ABS_SYMBOL:
        raise EntropyCodingError("symbols beyond +-2^24")
    b, c, h, w = s.shape
    enc = constriction.stream.queue.RangeEncoder()
    v = s.reshape(b, c, h * w) - tables.offset[None, :, None]  # int32: |s|, |offset| <= 2^24
    vmax = (tables.cdf_length - 2)[None, :, None]
    overflow = (v < 0) | (v >= vmax)
    any_overflow = bool(overflow.any())
    coded = np.where(overflow, vmax, v) if any_overflow else v
    for i in range(b):
        for ch in range(c):
            enc.encode(coded[i, ch], tables._models[ch])
    if any_overflow:
        v64 = v[overflow].astype(np.int64)
        vmax64 = np.broadcast_to(vmax, v.shape)[overflow].astype(np.int64)
        raw = np.where(v64 < 0, -2 * v64 - 1, 2 * (v64 - vmax64))
        counts = _nibble_counts(raw)
        enc.encode((counts - 1).astype(np.int32), constriction.stream.model.Uniform(_MAX_NIBBLES))
        which = np.repeat(np.arange(len(raw)), counts)
        k = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
        nibbles = (raw[which] >> (4 * k)) & 0xF
        enc.encode(nibbles.astype(np.int32), constriction.stream.model.Uniform(16))
    words = enc.get_compressed().astype("<u4").tobytes()
    return words + zlib.crc32(s.astype("<i4", copy=False).tobytes()).to_bytes(_CRC_BYTES, "little")


def _nibble_counts(raw: np.ndarray) -> np.ndarray:
    """Nibbles needed for each non-negative value (at least one)."""
    counts = np.ones(len(raw), dtype=np.int64)
    for k in range(1, _MAX_NIBBLES):
        counts += raw >= (1 << (4 * k))
    return counts


def max_payload_bytes(numel: int) -> int:
    """A bound on a legitimate payload for ``numel`` symbols: every symbol an overflow with 8 nibbles."""
    return 4 * (-(-numel * (24 + 3 + 4 * _MAX_NIBBLES) // 32) + 2) + _CRC_BYTES


# min_payload_bytes' allowance: the coder's quantized probabilities (constriction's fixed point) may round a
# bin up a little, and its final state flushes up to two words it did not fill.
_MIN_BITS_MARGIN = 0.98
_MIN_BITS_SLACK = 96


def min_payload_bytes(shape: tuple[int, int, int, int], tables: PriorTables) -> int:
    """A lower bound on any payload coding ``shape`` [B, C, h, w]: each symbol of channel c costs at least
    ``tables.min_bits[c]`` bits (its most likely bin), less a margin for the coder's rounding, plus the CRC."""
    b, _, h, w = shape
    bits = float(tables.min_bits.sum()) * b * h * w * _MIN_BITS_MARGIN - _MIN_BITS_SLACK
    return 4 * max(0, math.floor(bits / 32)) + _CRC_BYTES


def decode(
    payload: bytes,
    shape: tuple[int, int, int, int],
    tables: PriorTables,
    max_elements: int = 1 << 24,
    max_payload: int | None = None,
) -> np.ndarray:
    """Payload bytes -> int32 symbols of ``shape`` [B, C, h, w]; bounded and checked (see the module doc).

    Raises EntropyCodingError on a bad shape, an oversized or malformed payload, a CRC mismatch,
    out-of-range values or trailing data.
    """
    import constriction

    _check_decode_bounds(payload, shape, tables, max_elements, max_payload)
    b, c, h, w = shape
    n = len(payload)
    words = np.frombuffer(bytes(payload[: n - _CRC_BYTES]), dtype="<u4").astype(np.uint32)
    crc = int.from_bytes(bytes(payload[n - _CRC_BYTES :]), "little")
    out = np.empty((b, c, h * w), dtype=np.int64)
    vmax = tables.cdf_length.astype(np.int64) - 2
    try:
        dec = constriction.stream.queue.RangeDecoder(words)
        _decode_values(dec, tables, out, vmax)
        exhausted = dec.maybe_exhausted()
    except EntropyCodingError:
        raise
    except Exception as exc:  # noqa: BLE001 - constriction raises AssertionError / ValueError on streams it cannot decode
        raise EntropyCodingError(
            f"payload is not a valid stream for this shape and prior ({type(exc).__name__})"
        ) from None
    if not exhausted:
        raise EntropyCodingError("payload has data after the coded symbols")
    s = out + tables.offset.astype(np.int64)[None, :, None]
    if s.size and int(np.abs(s).max()) > MAX_ABS_SYMBOL:
        raise EntropyCodingError("payload decodes to symbols beyond +-2^24")
    symbols = s.astype(np.int32).reshape(shape)
    if zlib.crc32(symbols.astype("<i4").tobytes()) != crc:
        raise EntropyCodingError("payload fails its CRC-32: truncated, corrupted, or coded for another shape or prior")
    return symbols


def _check_decode_bounds(
    payload: bytes, shape: tuple[int, int, int, int], tables: PriorTables, max_elements: int, max_payload: int | None
) -> None:
    """Before any decoding: a shape of 4 positive ints with the prior's channels and at most ``max_elements``
    symbols, and a payload of bytes, no longer than that shape can need, of whole words plus the CRC."""
    if not (isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(d, int) and d >= 1 for d in shape)):
        raise EntropyCodingError(f"shape must be 4 positive ints [B, C, h, w], got {shape!r}"[:200])
    b, c, h, w = shape
    if c != tables.channels:
        raise EntropyCodingError(f"shape {shape} has {c} channels; the model's prior has {tables.channels}")
    numel = b * c * h * w
    if numel > max_elements:
        raise EntropyCodingError(f"shape {shape} has {numel} elements; the limit is {max_elements}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise EntropyCodingError(f"payload must be bytes, got {type(payload).__name__}")
    cap = max_payload_bytes(numel) if max_payload is None else min(max_payload, max_payload_bytes(numel))
    n = len(payload)
    if n > cap:
        raise EntropyCodingError(f"payload of {n} bytes exceeds the {cap} bytes {shape} can need")
    if n < _CRC_BYTES or (n - _CRC_BYTES) % 4:
        raise EntropyCodingError(f"payload of {n} bytes is not whole 32-bit words plus a 4-byte CRC")
    least = min_payload_bytes(shape, tables)
    if n < least:
        raise EntropyCodingError(
            f"payload of {n} bytes is too small for the {numel} symbols of {shape}: "
            f"this prior codes them in at least {least} bytes"
        )


def _decode_values(dec: Any, tables: PriorTables, out: np.ndarray, vmax: np.ndarray) -> None:
    """Range-decode into ``out`` (int64 [B, C, h*w]) the values ``v = s - offset_c``: each channel's table
    symbols, then the bypass value of every overflow bin (``vmax``: each channel's). constriction's own
    errors propagate."""
    import constriction

    b, c, hw = out.shape
    for i in range(b):
        for ch in range(c):
            out[i, ch] = dec.decode(tables._models[ch], hw)
    overflow = out == vmax[None, :, None]
    n_over = int(overflow.sum())
    if n_over:
        counts = dec.decode(constriction.stream.model.Uniform(_MAX_NIBBLES), n_over).astype(np.int64) + 1
        nibbles = dec.decode(constriction.stream.model.Uniform(16), int(counts.sum())).astype(np.int64)
        which = np.repeat(np.arange(n_over), counts)
        k = np.arange(len(which)) - np.repeat(np.cumsum(counts) - counts, counts)
        raw = np.zeros(n_over, dtype=np.int64)
        np.add.at(raw, which, nibbles << (4 * k))
        channel_max = np.broadcast_to(vmax[None, :, None], out.shape)[overflow]
        # Even raw: above the table, 2(v - max); odd: below it, -2v - 1.
        out[overflow] = np.where(raw % 2 == 0, raw // 2 + channel_max, -(raw + 1) // 2)
