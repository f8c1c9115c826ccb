"""hnd.common.stream_codec: key / delta frames, exact on the symbols, and a decoder that refuses any doubt."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zstandard

from hnd.common import codec
from hnd.common.codec import CodecError
from hnd.common.stream_codec import KeyFrameRequired, StreamDecoder, StreamEncoder, _add, _add_packed


def _walk(n: int = 8, shape=(1, 3, 10, 12), seed: int = 0, step: float = 0.02) -> list[torch.Tensor]:
    """A slowly changing bottleneck: a fixed pattern plus small per-frame changes in a few places."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(shape, generator=g) * 4 - 1
    out = []
    for _ in range(n):
        change = (torch.rand(shape, generator=g) < 0.1) * torch.randn(shape, generator=g) * step
        base = (base + change).clamp(-1.2, 3.2)
        out.append(base.clone())
    return out


def _equal(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "bits,granularity", [(8, "tensor"), (4, "tensor"), (4, "channel"), (2, "tensor"), (6, "channel"), (8, "original")]
)
def test_stream_is_exact_and_equals_quantizing_with_the_key_parameters(bits, granularity):
    frames = _walk(9)
    enc = StreamEncoder(bits, granularity, key_interval=4, max_clamped=1.0, hysteresis=0.0)
    mirror = StreamEncoder(bits, granularity, key_interval=4, max_clamped=1.0, hysteresis=0.0)  # in process
    dec = StreamDecoder()
    kinds = []
    for i, z in enumerate(frames):
        frame = enc.encode(z)
        kinds.append(frame.kind)
        out = dec.decode(frame)
        sq = mirror.quantize(z)
        assert (sq.kind, sq.sequence, sq.key_sequence) == (frame.kind, frame.sequence, frame.key_sequence)
        assert _equal(out, sq.dequantize())  # bit for bit
        # ...which is the per-frame codec's quantization with the key frame's parameters, no delta step.
        key = codec.quantize(frames[i - i % 4], bits, granularity)
        q, _ = codec.quantize_with(np.asarray(z, dtype=np.float32), bits, key.granularity, key.scale, key.zero_point)
        assert _equal(out, codec.dequantize(q))
        if frame.kind == "key":  # a key frame is an ordinary intra encoding
            assert _equal(codec.decode(frame.tensor), codec.roundtrip(z, bits, granularity))
    assert kinds == ["key", "delta", "delta", "delta"] * 2 + ["key"]


@pytest.mark.parametrize("bits,granularity", [(4, "tensor"), (8, "channel"), (2, "tensor")])
def test_hysteresis_keeps_edge_and_server_in_lockstep_within_its_bound(bits, granularity):
    """With hysteresis the decoder's output is still, bit for bit, the encoder's reference (and the in-process
    path's); every value in the key's range stays within 0.5 + hysteresis steps of it; noise inside the band
    changes no symbol, a larger move does."""
    h = 0.25
    rng = np.random.default_rng(bits)
    base = rng.uniform(-1, 3, (1, 3, 12, 16)).astype(np.float32)
    enc = StreamEncoder(bits, granularity, key_interval=100, max_clamped=1.0, hysteresis=h)
    mirror = StreamEncoder(bits, granularity, key_interval=100, max_clamped=1.0, hysteresis=h)
    plain = StreamEncoder(bits, granularity, key_interval=100, max_clamped=1.0, hysteresis=0.0)
    dec = StreamDecoder()
    key = codec.quantize(base, bits, granularity)
    step = codec.dequantize(dataclasses.replace(key, symbols=np.ones_like(key.symbols))) - codec.dequantize(
        dataclasses.replace(key, symbols=np.zeros_like(key.symbols))
    )
    flips = 0
    for t in range(6):
        # noise of +-0.2 step: inside the band around the key's symbols (|v - q| <= 0.5 + 0.2 < 0.75)
        z = base + (rng.uniform(-0.2, 0.2, base.shape).astype(np.float32) * step if t else 0)
        if t == 5:
            z[0, 0, :2] += 3 * step[0, 0, :2]  # a real change: three steps
        frame = enc.encode(z)
        out = dec.decode(frame)
        assert _equal(out, enc.reconstruction()) and _equal(out, mirror.quantize(z).dequantize())
        v = codec.positions(z, key.granularity, key.scale, key.zero_point)
        inside = (v >= 0) & (v <= (1 << bits) - 1)
        assert (np.abs(out - z)[inside] <= ((0.5 + h) * step)[inside] * (1 + 1e-5)).all()
        if 0 < t < 5:
            assert frame.kind == "delta" and _equal(out, codec.dequantize(key))  # nothing moved
            flips += int(np.count_nonzero(plain.quantize(z).quantized.symbols != key.symbols))
        elif t == 5:
            moved = out != codec.dequantize(key)
            assert moved[0, 0, :2][inside[0, 0, :2]].all() and not moved[0, 1:].any()
        else:
            plain.quantize(z)
    assert flips > 0  # the same noise without hysteresis changes symbols near rounding boundaries
    with pytest.raises(CodecError, match="hysteresis"):
        StreamEncoder(4, hysteresis=0.6)


def test_deltas_are_smaller_than_intra_frames():
    frames = _walk(6, shape=(1, 3, 40, 50))
    enc = StreamEncoder(4, "tensor", key_interval=100, max_clamped=1.0)
    sizes = [len(enc.encode(z).tensor.payload) for z in frames]
    intra = [len(codec.encode(z, 4).payload) for z in frames]
    assert max(sizes[1:]) < min(intra) / 2


def test_key_frame_reasons_interval_one_shape_force_clamp_float():
    frames = _walk(4)
    enc = StreamEncoder(8, key_interval=1)
    assert [enc.quantize(z).kind for z in frames] == ["key"] * 4  # key_interval 1: today's intra coding
    enc = StreamEncoder(8, key_interval=50, max_clamped=0.0)
    assert enc.quantize(frames[0]).reason == "first"
    assert enc.quantize(frames[1]).kind == "delta"
    assert enc.quantize(torch.zeros(1, 3, 6, 6)).reason == "shape"
    enc.force_key_frame()
    assert enc.quantize(torch.zeros(1, 3, 6, 6)).reason == "forced"
    beyond = torch.zeros(1, 3, 6, 6)
    beyond[0, 0, 0, 0] = 5.0  # outside the key's range [0, 0]: would clamp
    assert enc.quantize(beyond).reason == "clamp" and enc.clamp_keys == 1
    tolerant = StreamEncoder(8, key_interval=50, max_clamped=0.5)
    tolerant.quantize(torch.zeros(1, 3, 6, 6))
    sq = tolerant.quantize(beyond)
    assert sq.kind == "delta" and sq.clamped == 1
    floats = StreamEncoder(16)
    assert [floats.quantize(z).reason for z in frames[:2]] == ["first", "float"]


def test_decoder_refuses_deltas_without_a_valid_reference():
    frames = _walk(5)
    enc = StreamEncoder(4, key_interval=100, max_clamped=1.0)
    f = [enc.encode(z) for z in frames]
    assert [x.kind for x in f] == ["key"] + ["delta"] * 4
    dec = StreamDecoder()
    with pytest.raises(KeyFrameRequired, match="no reference"):
        dec.decode(f[1])
    dec.decode(f[0])
    with pytest.raises(KeyFrameRequired, match="does not follow"):
        dec.decode(f[2])  # f[1] was skipped
    assert not dec.has_reference  # any doubt drops the reference...
    with pytest.raises(KeyFrameRequired):
        dec.decode(f[3])  # ...so later deltas are refused too, never decoded against a stale one
    dec.decode(f[0])
    dec.decode(f[1])
    with pytest.raises(KeyFrameRequired):
        dec.decode(f[1])  # a replay
    dec.decode(f[0])
    other_key = dataclasses.replace(f[1], key_sequence=7)
    with pytest.raises(KeyFrameRequired):
        dec.decode(other_key)
    dec.decode(f[0])
    t = f[1].tensor
    for bad in (dataclasses.replace(t, scale=(t.scale[0] * 2,)), dataclasses.replace(t, bits=8, raw_size=t.numel)):
        with pytest.raises((KeyFrameRequired, CodecError)):
            dec.decode(dataclasses.replace(f[1], tensor=bad))
        dec.decode(f[0])
    # After all that, the chain decodes exactly as on a fresh decoder.
    fresh = StreamDecoder()
    fresh.decode(f[0])
    assert _equal(dec.decode(f[1]), fresh.decode(f[1]))
    assert _equal(dec.decode(f[2]), fresh.decode(f[2]))


def test_decoder_refuses_malformed_frames_before_allocating():
    frames = _walk(2)
    enc = StreamEncoder(8, key_interval=100, max_clamped=1.0)
    key, delta = enc.encode(frames[0]), enc.encode(frames[1])
    dec = StreamDecoder()
    with pytest.raises(CodecError, match="kind"):
        dec.decode(dataclasses.replace(key, kind="intra"))
    with pytest.raises(CodecError, match="names itself"):
        dec.decode(dataclasses.replace(key, key_sequence=3))
    dec.decode(key)
    bomb = zstandard.ZstdCompressor().compress(bytes(50_000_000))
    with pytest.raises(CodecError):
        dec.decode(dataclasses.replace(delta, tensor=dataclasses.replace(delta.tensor, payload=bomb)))
    assert not dec.has_reference
    dec.decode(key)
    with pytest.raises(CodecError):
        dec.decode(dataclasses.replace(delta, tensor=dataclasses.replace(delta.tensor, payload=b"junk")))
    huge = dataclasses.replace(key.tensor, shape=(1, 3, 1 << 14, 1 << 14), raw_size=3 << 28)
    with pytest.raises(CodecError):
        dec.decode(dataclasses.replace(key, tensor=huge))


def test_reference_memory_is_bounded():
    frames = _walk(2)  # 360 symbols
    enc = StreamEncoder(8, key_interval=100, max_clamped=1.0)
    key, delta = enc.encode(frames[0]), enc.encode(frames[1])
    small = StreamDecoder(max_reference_bytes=100)
    assert _equal(small.decode(key), codec.roundtrip(frames[0], 8))  # still answered...
    assert small.reference_bytes == 0
    with pytest.raises(KeyFrameRequired):
        small.decode(delta)  # ...but not kept
    roomy = StreamDecoder(max_reference_bytes=360)
    roomy.decode(key)
    assert roomy.reference_bytes == 360


@pytest.mark.parametrize("bits", [2, 4])
def test_packed_references_add_every_code_modulo_its_bits(bits):
    """2- and 4-bit references of one scale stay packed (half / a quarter of a byte per symbol), and adding a
    delta to packed bytes gives, for every pair of byte values, the packed sum of their codes."""
    old, diff = (np.repeat(np.arange(256, dtype=np.uint8), 256), np.tile(np.arange(256, dtype=np.uint8), 256))
    n = old.size * (8 // bits)
    expected = _add(codec._unpack(old.tobytes(), bits, n), codec._unpack(diff.tobytes(), bits, n), bits)
    assert np.array_equal(codec._unpack(_add_packed(old, diff, bits).tobytes(), bits, n), expected)
    frames = _walk(2)  # 360 symbols
    dec = StreamDecoder()
    dec.decode(StreamEncoder(bits, key_interval=100, max_clamped=1.0).encode(frames[0]))
    assert dec.reference_bytes == codec.packed_size(360, bits)


def test_encoder_argument_checks():
    for kwargs in (
        {"bits": 5},
        {"granularity": "row"},
        {"key_interval": 0},
        {"max_clamped": 2.0},
        {"compression": "lz4"},
    ):
        with pytest.raises(CodecError):
            StreamEncoder(**kwargs)
    enc = StreamEncoder(8)
    enc.encode(torch.zeros(1, 1, 2, 2))
    with pytest.raises(CodecError):
        enc.encode(torch.full((1, 1, 2, 2), float("nan")))
