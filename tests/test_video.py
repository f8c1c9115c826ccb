"""Synthetic annotated video and the PyAV H.264 / HEVC codec (hnd.common.video): round trips and hostile input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from hnd.common.video import VideoDecoder, VideoEncoder, VideoError, VideoSettings, available_formats
from hnd.edge.capture import VideoFile
from hnd.train import synthetic_cli
from hnd.train.synthetic_video import make_synthetic_video

FORMATS = available_formats()


def _frames(n: int = 6, size: tuple[int, int] = (96, 128), seed: int = 0) -> list[np.ndarray]:
    """A static textured scene with one square moving right, plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    bg = np.stack([(xx * 2) % 256, (yy * 3) % 256, (xx + yy) % 256], -1).astype(np.float32)
    out = []
    for i in range(n):
        img = bg.copy()
        img[20:44, 10 + 4 * i : 34 + 4 * i] = (250, 30, 30)
        img += rng.normal(0, 2, img.shape)
        out.append(np.clip(img, 0, 255).astype(np.uint8))
    return out


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return 10 * np.log10(255**2 / mse)


# --- synthetic video --------------------------------------------------------------------------------


def test_synthetic_video_layout_annotations_and_file(tmp_path):
    written = make_synthetic_video(tmp_path / "a", frames=8, size=(96, 64), objects=3, seed=3)
    doc = json.loads(written["annotations"].read_text())
    assert [im["frame_index"] for im in doc["images"]] == list(range(8))
    assert doc["videos"][0]["frames"] == 8 and {im["video_id"] for im in doc["images"]} == {1}
    for im in doc["images"]:
        assert (written["images"] / im["file_name"]).is_file()
    anns = doc["annotations"]
    assert anns and len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        m = mask_utils.decode(a["segmentation"])
        assert m.shape == (64, 96) and m.sum() == a["area"]
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 64
    # Visible masks of one frame never overlap (occlusion is resolved front to back).
    for im in doc["images"]:
        masks = [mask_utils.decode(a["segmentation"]) for a in anns if a["image_id"] == im["id"]]
        if masks:
            assert np.stack(masks).sum(0).max() == 1
    # Objects move: the first object's box is not where it started some frames later.
    first = [a["bbox"] for a in anns if a["image_id"] == doc["images"][0]["id"]]
    last = [a["bbox"] for a in anns if a["image_id"] == doc["images"][-1]["id"]]
    assert first != last
    # The recording holds the same frames, close to the lossless PNGs.
    frames = [f.image for f in VideoFile(str(written["video"]))]
    assert len(frames) == 8
    png = np.asarray(Image.open(written["images"] / doc["images"][0]["file_name"]))
    assert _psnr(frames[0], png) > 30


def test_synthetic_video_is_deterministic_and_noisy(tmp_path):
    a = make_synthetic_video(tmp_path / "a", frames=3, size=(64, 48), seed=5, video=False, background="texture")
    b = make_synthetic_video(tmp_path / "b", frames=3, size=(64, 48), seed=5, video=False, background="texture")
    assert a["annotations"].read_text().replace(str(tmp_path / "a"), "") == b["annotations"].read_text().replace(
        str(tmp_path / "b"), ""
    )
    names = sorted(p.name for p in a["images"].iterdir())
    f0, f1 = (np.asarray(Image.open(a["images"] / n), dtype=np.int16) for n in names[:2])
    assert np.array_equal(f0, np.asarray(Image.open(b["images"] / names[0]), dtype=np.int16))
    assert np.abs(f0 - f1).mean() > 0.5  # fresh sensor noise every frame


def test_synthetic_cli_video(tmp_path, capsys):
    assert synthetic_cli.main([str(tmp_path), "--video", "--frames", "4", "--size", "64x48", "--noise", "0"]) == 0
    assert (tmp_path / "val2017.mp4").is_file()
    assert len(json.loads((tmp_path / "annotations" / "instances_val2017.json").read_text())["images"]) == 4
    with pytest.raises(SystemExit):
        synthetic_cli.main([str(tmp_path), "--video", "--size", "65x48"])
    assert "even" in capsys.readouterr().err


# --- the codec --------------------------------------------------------------------------------------


def test_formats_offered():
    assert "h264" in FORMATS  # PyAV's wheels bundle libx264


@pytest.mark.parametrize("fmt", FORMATS)
def test_roundtrip_one_packet_per_frame_and_key_frames(fmt):
    frames = _frames(10)
    enc = VideoEncoder(VideoSettings(format=fmt, crf=23, gop=5, preset="ultrafast"))
    dec = VideoDecoder(fmt, max_pixels=96 * 128)
    sizes, keys = [], []
    for i, img in enumerate(frames):
        if i == 3:
            enc.force_key_frame()
        data, key = enc.encode(img)
        out = dec.decode(data, key_frame=key)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert _psnr(out, img) > 28
        sizes.append(len(data))
        keys.append(key)
    assert [i for i, k in enumerate(keys) if k] == [0, 3, 8]  # forced at 3; the gop of 5 counts from there
    assert max(sizes[1:3]) < sizes[0] / 2  # P-frames of a mostly static scene are much smaller


def test_bitrate_mode_and_bad_settings():
    enc = VideoEncoder(VideoSettings(bitrate=50_000, preset="ultrafast"))
    data, key = enc.encode(_frames(1)[0])
    assert key and len(data) > 0
    for bad in ({"format": "vp9"}, {"crf": 60}, {"gop": 0}, {"bitrate": 10}, {"fps": 0}):
        with pytest.raises(VideoError):
            VideoSettings(**bad)
    with pytest.raises(VideoError, match="uint8"):
        enc.encode(np.zeros((8, 8, 3), np.float32))


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_refuses_hostile_input_and_recovers(fmt):
    frames = _frames(4)
    enc = VideoEncoder(VideoSettings(format=fmt, preset="ultrafast"))
    packets = [enc.encode(f) for f in frames]
    rng = np.random.default_rng(1)
    dec = VideoDecoder(fmt, max_pixels=96 * 128)
    # A stream must start with a key frame.
    with pytest.raises(VideoError):
        dec.decode(packets[1][0])
    # Garbage, a fake start code, empty and truncated packets: refused, and the decoder waits for a key.
    for bad in (rng.bytes(2000), b"\x00\x00\x00\x01" + rng.bytes(500), b"", packets[0][0][: len(packets[0][0]) // 2]):
        with pytest.raises(VideoError):
            dec.decode(bad)
        assert dec.needs_key_frame
    # A lying key-frame flag.
    with pytest.raises(VideoError, match="key_frame"):
        dec.decode(packets[0][0], key_frame=False)
    # Recovers on the next key frame and decodes the P-frames that follow.
    assert dec.decode(packets[0][0]).shape == frames[0].shape
    assert dec.decode(packets[1][0]).shape == frames[0].shape
    # A P-frame after an error is refused (no reference), never decoded from a stale one.
    with pytest.raises(VideoError):
        dec.decode(b"junk" * 10)
    with pytest.raises(VideoError):
        dec.decode(packets[2][0])


def _slice_span(data: bytes, fmt: str) -> tuple[int, int]:
    """Start and end of the (one) coded slice NAL unit of an access unit."""
    starts = [i for i in range(len(data) - 3) if data[i : i + 3] == b"\x00\x00\x01"] + [len(data)]
    for start, end in zip(starts, starts[1:]):
        header = data[start + 3]
        if (fmt == "h264" and 1 <= header & 0x1F <= 5) or (fmt == "hevc" and (header >> 1) & 0x3F < 32):
            return start, end
    raise AssertionError("no slice")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_and_damaged_pictures_are_refused_not_concealed(fmt):
    """Key and P access units cut short (50..99 % of their bytes) or with a span of their slice overwritten
    (random or zero bytes): every one is refused. HEVC's decoder used to answer truncated IDRs (95 %, 99 %) and
    damaged slices with wrong pixels; it is now held to the MD5 picture hash SEI its encoder sends."""
    frames = _frames(2)
    enc = VideoEncoder(VideoSettings(format=fmt, preset="ultrafast"))
    packets = [enc.encode(f)[0] for f in frames]
    rng = np.random.default_rng(2)
    accepted = []
    for i, data in enumerate(packets):
        slice_start, slice_end = _slice_span(data, fmt)
        damaged = [data[: len(data) * pct // 100] for pct in range(50, 100, 7)] + [data[:-1]]
        for k in range(6):
            bad = bytearray(data)
            at = int(rng.integers(slice_start + 8, slice_end - 4))
            bad[at : at + 4] = rng.bytes(4) if k % 2 else bytes(4)  # random or zeroed spans
            damaged.append(bytes(bad))
        for bad in damaged:
            dec = VideoDecoder(fmt)
            if i:
                dec.decode(packets[0])  # a P-frame needs its reference
            try:
                dec.decode(bad)
                accepted.append((i, len(bad)))
            except VideoError:
                assert dec.needs_key_frame
    assert accepted == []
    good = VideoDecoder(fmt)
    assert [good.decode(p).shape for p in packets] == [frames[0].shape] * 2


@pytest.mark.skipif("hevc" not in FORMATS, reason="this PyAV build has no libx265")
def test_hevc_without_a_picture_hash_is_refused():
    from hnd.common.video import has_picture_md5

    data = VideoEncoder(VideoSettings(format="hevc", preset="ultrafast")).encode(_frames(1)[0])[0]
    assert has_picture_md5(data)
    end = data.rfind(b"\x00\x00\x01")  # the suffix SEI comes last: drop it, the picture stays whole
    with pytest.raises(VideoError, match="MD5 decoded picture hash"):
        VideoDecoder("hevc").decode(data[:end])


@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_bounds_resolution_and_follows_a_switch(fmt):
    enc = VideoEncoder(VideoSettings(format=fmt, preset="ultrafast"))
    small = _frames(2, size=(48, 64))
    large = _frames(1, size=(96, 128))
    dec = VideoDecoder(fmt, max_pixels=64 * 48)
    assert dec.decode(enc.encode(small[0])[0]).shape == (48, 64, 3)
    data, key = enc.encode(large[0])  # the encoder restarts with a key frame at the new size
    assert key
    with pytest.raises(VideoError):
        dec.decode(data)  # over max_pixels: FFmpeg refuses before allocating
    assert dec.needs_key_frame
    roomy = VideoDecoder(fmt, max_pixels=96 * 128)
    assert roomy.decode(enc.encode(small[1])[0]).shape == (48, 64, 3)
    assert roomy.decode(enc.encode(large[0])[0]).shape == (96, 128, 3)  # a resolution switch within bounds
