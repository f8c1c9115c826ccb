"""The head on ONNX Runtime: numpy preprocessing, export + metadata, exactness against torch, int8, bad files.

Bounds (fp32 ONNX head on the edge's own numpy/OpenCV preprocessing vs the torch head):
max |z_onnx - z_torch| <= 1e-4 * max |z_torch| + 1e-6, >= 99.9 % of 8-bit symbols equal, and the
same tail gives the same detections (or IoU-matched F1 >= 0.99). int8 is measured, not exact.
A uint8-pixel graph (the normalization folded into conv1) is held to the fp32 bound against the torch head
on the same mean-padded input, and to PIXELS_REL_BOUND against the torch head's zero padding (the border's
mean pixel rounded to uint8 is the only difference).
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from hnd.bench.agreement import match_f1
from hnd.common import codec
from hnd.common.checkpoint import fingerprint, save_checkpoint
from hnd.common.preprocess import IMAGENET_MEAN, IMAGENET_STD, preprocess
from hnd.common.sizes import resized_size
from hnd.common.split import split_model
from hnd.edge import export_head as export_cli
from hnd.edge.capture import sample_images
from hnd.edge.onnx_head import OnnxHead, OnnxHeadError
from hnd.edge.pipeline import to_tensor

FP32_REL_BOUND = 1e-4
SYMBOLS_EQUAL = 0.999
PIXELS_REL_BOUND = 1e-2  # measured 5.0e-3 on the test heads; 1e-3 on hnd/faster_rcnn-b3ch at 640x480


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    imgs, _ = sample_images()
    return imgs[:4]  # astronaut 512x512, coffee 400x600, chelsea 300x451, rocket 427x640


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """``exported(kind)``: (model, path of its fp32 ONNX head) via the CLI, from a saved checkpoint; made on first use."""
    folder = tmp_path_factory.mktemp("onnx")
    cache: dict[str, tuple] = {}

    def get(kind: str) -> tuple:
        if kind not in cache:
            model = tiny_model(kind)
            ckpt = folder / f"{kind}.pt"
            save_checkpoint(ckpt, model)
            path = folder / f"{kind}.onnx"
            assert export_cli.main([str(ckpt), str(path), "--config", f"test/{kind}-b3ch"]) == 0
            cache[kind] = (model, path)
        return cache[kind]

    return get


# ---------------------------------------------------------------------------------------------------
# numpy preprocessing = torchvision's GeneralizedRCNNTransform


@pytest.mark.parametrize("min_size,max_size", [(800, 1333), (480, 640), (160, 256), (300, 300)])
def test_preprocess_geometry_is_torchvisions(min_size, max_size):
    t = GeneralizedRCNNTransform(min_size, max_size, list(IMAGENET_MEAN), list(IMAGENET_STD)).eval()
    rng = np.random.default_rng(min_size)
    for h, w in [(480, 640), (640, 480), (512, 512), (427, 640), (300, 451), (37, 1000), (1, 7), (1080, 1920)]:
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        with torch.no_grad():
            il, _ = t([to_tensor(img)])
        batch, meta = preprocess([img], min_size, max_size)
        assert meta.image_sizes[0] == tuple(il.image_sizes[0]) == resized_size((h, w), min_size, max_size)
        assert meta.padded_size == tuple(il.tensors.shape[-2:]) and meta.original_sizes == ((h, w),)
        ref = il.tensors.numpy()
        if meta.image_sizes[0] == (h, w):  # no resampling: bit for bit
            assert ref.tobytes() == batch.tobytes()
        else:  # sample positions round differently in float32; values stay within a few 1e-4
            assert np.abs(ref - batch).max() < 2e-3


def test_preprocess_batches_pad_to_the_largest(photos):
    batch, meta = preprocess(photos[:2], 160, 256)
    assert batch.shape == (2, 3, *meta.padded_size) and len(meta) == 2
    h, w = meta.image_sizes[1]
    assert not batch[1, :, h:, :].any() and not batch[1, :, :, w:].any()


def test_uint8_preprocess_is_the_same_geometry_without_the_normalization(photos):
    """preprocess_uint8: the frame's pixels where preprocess has them (normalizing them gives preprocess's values
    bit for bit at the split size, within half a uint8 level when resized), the mean pixel everywhere else."""
    from hnd.common.preprocess import mean_pixel, preprocess_uint8

    m = np.asarray(IMAGENET_MEAN, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(IMAGENET_STD, np.float32).reshape(1, 3, 1, 1)
    for (mn, mx), border in (((300, 451), (3, 3)), ((160, 256), (4, 2))):
        img = photos[2]  # chelsea 300x451: native at 300/451, resized at 160/256; padded to 320x480 / 160x256
        want, want_meta = preprocess([img], mn, mx)
        b0, b1 = border
        got, meta = preprocess_uint8([img], mn, mx, IMAGENET_MEAN, border=border)
        assert meta == want_meta and got.dtype == np.uint8
        assert got.shape == (1, 3, want.shape[2] + b0 + b1, want.shape[3] + b0 + b1)
        inner = got[:, :, b0 : b0 + want.shape[2], b0 : b0 + want.shape[3]]
        x = np.divide(inner, np.float32(255), dtype=np.float32)
        x -= m
        x /= s
        h, w = meta.image_sizes[0]
        if (h, w) == img.shape[:2]:
            assert x[..., :h, :w].tobytes() == want[..., :h, :w].tobytes()
        else:
            assert np.abs(x - want)[..., :h, :w].max() <= 0.5 / 255 / min(IMAGENET_STD) + 2e-3
        pad = np.ones(got.shape[2:], bool)
        pad[b0 : b0 + h, b0 : b0 + w] = False
        assert (got[0][:, pad] == mean_pixel(IMAGENET_MEAN)[:, None]).all()
        # The mean pixel is the uint8 value nearest a normalized 0: under half a uint8 level off.
        assert np.abs((mean_pixel(IMAGENET_MEAN) / 255 - m.ravel()) / s.ravel()).max() <= 0.5 / 255 / min(IMAGENET_STD)


@pytest.mark.parametrize("stem", ["direct", "s2d"])
def test_uint8_pixels_fold_the_normalization_into_conv1(exported, photos, tmp_path, stem):
    """The uint8 graph is the torch head on the same input (its border the mean pixel, conv1 unpadded) within
    the fp32 bound, so the fold is exact; against the torch head's zero padding, within PIXELS_REL_BOUND."""
    import copy

    from hnd.edge.onnx_export import export_onnx, head_metadata

    model, _ = exported("faster_rcnn")
    head, _ = split_model(model)
    path = tmp_path / "u8.onnx"
    export_onnx(head, head_metadata(head, fingerprint(model)), path, stem=stem, pixels="uint8")
    u8 = OnnxHead(path)
    assert u8.metadata.input_type == "uint8" and u8.metadata.input_border == {"direct": (3, 3), "s2d": (4, 2)}[stem]
    unpadded = copy.deepcopy(head)
    unpadded.conv1.padding = (0, 0)
    m = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    s = torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    b0 = u8.metadata.input_border[0]
    for img in photos[:2]:
        batch, meta = u8.preprocess([img])
        assert batch.dtype == np.uint8
        z = u8.run(batch).bottleneck
        x = (torch.from_numpy(batch).float() / 255 - m) / s
        if b0 != 3:  # the s2d stem's border (4, 2) is conv1's (3, 3) shifted by one (its 8x8 kernel's zero row)
            x = x[:, :, 1:, 1:]
        with torch.inference_mode():
            same_input = unpadded.encode(x).numpy()
            ref, ref_meta = head([to_tensor(img)])
        assert meta == ref_meta
        assert np.abs(z - same_input).max() <= FP32_REL_BOUND * np.abs(same_input).max() + 1e-6
        ref = ref.numpy()
        diff = np.abs(z - ref).max()
        assert 0 < diff <= PIXELS_REL_BOUND * np.abs(ref).max()


# ---------------------------------------------------------------------------------------------------
# Export and metadata


def test_export_writes_metadata(exported):
    model, path = exported("faster_rcnn")
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["hnd.fingerprint"] == fingerprint(model)
    assert props["hnd.model_kind"] == "faster_rcnn" and props["hnd.bottleneck_channels"] == "3"
    assert (props["hnd.min_size"], props["hnd.max_size"]) == ("160", "256")
    assert json.loads(props["hnd.image_mean"]) == list(IMAGENET_MEAN) and props["hnd.precision"] == "fp32"
    head = OnnxHead(path)
    assert head.fingerprint == fingerprint(model) and head.metadata.filter_threshold is None
    # intra-op threads sleep rather than spin (the edge's other threads share the cores)
    assert head.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_export_min_max_size_override(tmp_path):
    path = tmp_path / "native.onnx"
    assert (
        export_cli.main(
            [
                str(path),
                "--config",
                "test/faster_rcnn-b3ch",
                "--random-weights",
                "0",
                "--min-size",
                "96",
                "--max-size",
                "128",
            ]
        )
        == 0
    )
    head = OnnxHead(path)
    assert (head.min_size, head.max_size) == (96, 128)
    assert OnnxHead(path, min_size=120, max_size=200).preprocess([np.zeros((240, 320, 3), np.uint8)])[
        1
    ].image_sizes == ((120, 160),)


def test_torch_format_is_kept(tmp_path, tiny_model):
    model = tiny_model("faster_rcnn")
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, model)
    assert export_cli.main([str(ckpt), str(tmp_path / "head.pt")]) == 0
    assert export_cli.main([str(ckpt), str(tmp_path / "head.bin"), "--format", "onnx"]) == 0
    assert OnnxHead(tmp_path / "head.bin").fingerprint == fingerprint(model)


def test_exports_get_the_umasks_mode_like_any_written_file(tmp_path, tiny_model):
    """A container user other than the exporter reads the head: 0666 less the umask, not mkstemp's 0600."""
    ckpt = tmp_path / "s.pt"
    old = os.umask(0o002)
    try:
        save_checkpoint(ckpt, tiny_model("faster_rcnn"))
        assert export_cli.main([str(ckpt), str(tmp_path / "head.pt")]) == 0
        assert export_cli.main([str(ckpt), str(tmp_path / "head.onnx")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"s.pt": 0o664, "head.pt": 0o664, "head.onnx": 0o664}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


def test_one_architecture_naming_for_both_formats_and_the_checkpoints_own_transform(tmp_path, tiny_model, capsys):
    model = tiny_model("faster_rcnn")  # configs/test: min_size 160, max_size 256
    ckpt = tmp_path / "student.pt"
    save_checkpoint(ckpt, model)
    assert export_cli.main([str(ckpt), str(tmp_path / "head.onnx")]) == 0
    onnx_head = OnnxHead(tmp_path / "head.onnx")
    assert (onnx_head.min_size, onnx_head.max_size) == (160, 256)  # the checkpoint's, not torchvision's 800/1333
    # --config names the architecture for a torch export as for an ONNX one, and checks the file against it
    assert export_cli.main([str(ckpt), str(tmp_path / "a.pt"), "--config", "test/faster_rcnn-b3ch"]) == 0
    assert export_cli.main([str(ckpt), str(tmp_path / "b.pt")]) == 0
    a, b = (torch.load(tmp_path / n, weights_only=True) for n in ("a.pt", "b.pt"))
    assert a["fingerprint"] == b["fingerprint"] == fingerprint(model) and a["model_info"] == b["model_info"]
    assert a["model_info"]["transform"]["min_size"] == 160 and a["model"].keys() == b["model"].keys()
    capsys.readouterr()
    assert export_cli.main([str(ckpt), str(tmp_path / "c.pt"), "--config", "test/mask_rcnn-b3ch"]) == 2
    assert capsys.readouterr().err.startswith("hnd-export-head: error:")
    # a file that records no transform (an original release, a bare state dict): the line says what it took
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    assert export_cli.main([str(bare), str(tmp_path / "bare.onnx")]) == 0
    assert "resize 800/1333 (torchvision's default: the checkpoint names no transform" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# Exactness: ONNX fp32 head vs the torch head, on the sample photos, through the same tail


@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn"])
def test_fp32_head_matches_torch(exported, photos, kind):
    model, path = exported(kind)
    head, tail = split_model(model)
    ort_head = OnnxHead(path, threads=2)
    for img in photos:
        with torch.inference_mode():
            z_torch, meta_torch = head([to_tensor(img)])
        out, meta = ort_head([img])
        assert meta == meta_torch
        z = out.bottleneck
        ref = z_torch.numpy()
        assert z.shape == ref.shape and z.dtype == np.float32
        assert np.abs(z - ref).max() <= FP32_REL_BOUND * np.abs(ref).max() + 1e-6
        equal = (codec.quantize(z, 8).symbols == codec.quantize(ref, 8).symbols).mean()
        assert equal >= SYMBOLS_EQUAL
        with torch.inference_mode():
            got = tail(torch.from_numpy(codec.roundtrip(z, 8)), meta)
            want = tail(torch.from_numpy(codec.roundtrip(ref, 8)), meta_torch)
        assert want[0]["scores"].numel() > 0
        same = all(torch.equal(got[0][k], want[0][k]) for k in want[0])
        assert same or match_f1(want[0], got[0], 0.5, 0.0) >= 0.99


def test_filter_probability_is_a_second_output(tmp_path, tiny_model, photos):
    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config

    cfg = load_config("test/keypoint_rcnn-b3ch-filter")
    model = build_model_from_config(cfg.model, cfg.path)
    path = tmp_path / "kp.onnx"
    assert export_cli.main([str(path), "--config", "test/keypoint_rcnn-b3ch-filter", "--random-weights", "0"]) == 0
    ort_head = OnnxHead(path)
    assert ort_head.filter_threshold == pytest.approx(0.01) and ort_head.num_keypoints == 17
    head, _ = split_model(model)
    for img in photos[:2]:
        with torch.inference_mode():
            batch, _ = head.preprocess([to_tensor(img)])
            p = head.filter_probability(head.stem(batch)).numpy()
        out = ort_head.run(ort_head.preprocess([img])[0])
        assert out.filter_probability.shape == (1,)
        assert np.abs(out.filter_probability - p).max() < 1e-5


def test_int8_is_measured_not_exact(tmp_path, photos, tiny_model):
    """Static int8 calibrated on real photos: loads, says so in its metadata; error measured against fp32."""
    calib = tmp_path / "calib"
    calib.mkdir()
    import cv2

    for i, img in enumerate(photos):
        cv2.imwrite(str(calib / f"{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    model = tiny_model("faster_rcnn")
    ckpt = tmp_path / "s.pt"
    save_checkpoint(ckpt, model)
    path = tmp_path / "int8.onnx"
    assert (
        export_cli.main(
            [
                str(ckpt),
                str(path),
                "--config",
                "test/faster_rcnn-b3ch",
                "--int8",
                "--calibration",
                str(calib),
                "--calibration-frames",
                "3",
            ]
        )
        == 0
    )
    q = OnnxHead(path)
    assert q.metadata.precision == "int8" and "3 frames" in q.metadata.calibration
    assert q.fingerprint == fingerprint(model)
    graph_ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" in graph_ops and "DequantizeLinear" in graph_ops
    head, _ = split_model(model)
    with torch.inference_mode():
        ref = head([to_tensor(photos[0])])[0].numpy()
    z = q([photos[0]])[0].bottleneck
    # Not exact; bounded well below the bottleneck's range (the figures: docs/benchmarks/edge-speed.md).
    assert 0 < np.abs(z - ref).max() < 0.25 * np.abs(ref).max()
    # Exported with the space-to-depth stem on uint8 pixels: the rearrangement moves the frame's own bytes and
    # the first convolution reads them exactly (scale 1, zero point 0), no calibrated input grid.
    model_proto = onnx.load(str(path))
    nodes = list(model_proto.graph.node)
    assert (
        q.metadata.input_type == "uint8"
        and model_proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    )
    s2d = next(n for n in nodes if n.op_type == "SpaceToDepth")
    assert list(s2d.input) == ["images"] and not any("images" in n.input for n in nodes if n is not s2d)
    dq = next(n for n in nodes if s2d.output[0] in n.input)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model_proto.graph.initializer}
    assert dq.op_type == "DequantizeLinear" and inits[dq.input[1]] == 1.0 and inits[dq.input[2]] == 0
    # The convolution writing the bottleneck stays float32: no 256-level grid on the output.
    assert next(n for n in nodes if "bottleneck" in n.output).op_type == "Conv"


def test_space_to_depth_stem_is_conv1(exported, photos, tmp_path):
    """conv1 as space-to-depth + a 4x4 conv gives conv1's output (float32 summation order aside), and the
    fp32 graph exported with it keeps the fp32 bound against the torch head."""
    from hnd.edge.onnx_export import HeadGraph, SpaceToDepthStem, export_onnx, head_metadata

    model, _ = exported("faster_rcnn")
    head, _ = split_model(model)
    stem = SpaceToDepthStem(head.conv1)
    x = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = head.conv1(x)
        assert torch.allclose(stem(x), want, rtol=0, atol=1e-5 * want.abs().max().item())
    with pytest.raises(ValueError, match="conv1"):
        SpaceToDepthStem(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False))
    with pytest.raises(ValueError, match="stem"):
        HeadGraph(head, "fast")
    path = tmp_path / "s2d.onnx"
    export_onnx(head, head_metadata(head, fingerprint(model)), path, stem="s2d")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("SpaceToDepth") == 1 and "Pad" not in ops and "Transpose" not in ops
    ort_head = OnnxHead(path)
    for img in photos[:2]:
        with torch.inference_mode():
            ref = head([to_tensor(img)])[0].numpy()
        z = ort_head([img])[0].bottleneck
        assert np.abs(z - ref).max() <= FP32_REL_BOUND * np.abs(ref).max() + 1e-6


def test_quantizing_before_space_to_depth_changes_no_value(exported, photos, tmp_path, monkeypatch):
    """The int8 graph's input quantization moved before SpaceToDepth gives the same outputs bit for bit."""
    from hnd.edge import onnx_export
    from hnd.edge.onnx_export import export_onnx, head_metadata, quantize_int8

    model, _ = exported("faster_rcnn")
    head, _ = split_model(model)
    meta = head_metadata(head, fingerprint(model))
    fp32, moved = tmp_path / "fp32.onnx", tmp_path / "moved.onnx"
    export_onnx(head, meta, fp32, stem="s2d")
    quantize_int8(fp32, moved, photos[2:4], meta, "2 photos")
    as_quantized = tmp_path / "as-quantized.onnx"
    monkeypatch.setattr(onnx_export, "_quantize_before_space_to_depth", lambda model: None)
    quantize_int8(fp32, as_quantized, photos[2:4], meta, "2 photos")
    ops = [n.op_type for n in onnx.load(str(as_quantized)).graph.node]
    assert ops.index("SpaceToDepth") < ops.index("QuantizeLinear")  # the quantizer leaves it in float32
    a, b = OnnxHead(moved), OnnxHead(as_quantized)
    for img in photos[:2]:
        batch = a.preprocess([img])[0]
        assert np.array_equal(a.run(batch).bottleneck, b.run(batch).bottleneck)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming the file


def _one_line(exc: Exception, path) -> str:
    msg = str(exc)
    assert "\n" not in msg and str(path) in msg
    return msg


def test_corrupt_and_truncated_files(tmp_path, exported):
    _, good = exported("faster_rcnn")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all \x00\xff" * 10)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for path in (garbage, truncated):
        with pytest.raises(OnnxHeadError) as e:
            OnnxHead(path)
        assert "not a loadable ONNX model" in _one_line(e.value, path)
    with pytest.raises(OnnxHeadError, match="no such file"):
        OnnxHead(tmp_path / "missing.onnx")


def test_onnx_without_hnd_metadata(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("bottleneck", TensorProto.FLOAT, [1, 3, 4, 4])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["images"], ["bottleneck"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(model, str(path))
    with pytest.raises(OnnxHeadError) as e:
        OnnxHead(path)
    assert "without hnd metadata" in _one_line(e.value, path)


def test_metadata_of_another_graph_is_refused(tmp_path, exported):
    """Metadata copied onto a graph with other inputs / outputs is not taken at its word."""
    from onnx import TensorProto, helper

    _, good = exported("faster_rcnn")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 18)],
    )
    model.metadata_props.extend(onnx.load(str(good)).metadata_props)
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    with pytest.raises(OnnxHeadError) as e:
        OnnxHead(path)
    assert "an hnd head has" in _one_line(e.value, path)
    # A float32 graph whose metadata says uint8 pixels (or a border without them) is refused too.
    bad = onnx.load(str(good))
    for value, match in (("uint8", r"graph input is tensor\(float\), its hnd metadata says uint8"), ("float32", "")):
        for p in bad.metadata_props:
            if p.key == "hnd.input_type":
                p.value = value
            if p.key == "hnd.input_border":
                p.value = "[0, 0]" if value == "uint8" else "[3, 3]"
        onnx.save(bad, str(path))
        with pytest.raises(OnnxHeadError, match=match or r"input_border \[3, 3\] for float32") as e:
            OnnxHead(path)
        _one_line(e.value, path)


def test_provider_not_installed(exported):
    _, good = exported("faster_rcnn")
    with pytest.raises(OnnxHeadError) as e:
        OnnxHead(good, providers=["TensorrtExecutionProvider"])
    assert "TensorrtExecutionProvider is not available" in _one_line(e.value, good)


@pytest.mark.parametrize(
    "argv,match",
    [
        (["x.pt", "h.onnx", "--int8"], "--int8 needs --calibration"),
        (["x.pt", "h.pt", "--min-size", "400"], "only for an ONNX export"),
        (["h.onnx", "--random-weights", "0"], "needs --config"),
        (["missing.pt", "h.onnx"], "missing.pt"),
    ],
)
def test_export_cli_errors_are_one_line(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export_cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hnd-export-head: error:") and match in err and "\n" not in err


# ---------------------------------------------------------------------------------------------------
# hnd-eval through the edge's path: ONNX head -> codec -> torch tail


def test_hnd_eval_with_onnx_head(tmp_path, capsys):
    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config
    from hnd.train.eval_cli import main as eval_main
    from hnd.train.evaluate import make_onnx_predictor, make_predictor
    from hnd.train.synthetic import make_synthetic_coco, write_config

    make_synthetic_coco(tmp_path / "det", images=1, val_images=2, size=(128, 160), seed=3)
    cfg = write_config(
        "test/faster_rcnn-b3ch",
        tmp_path / "det",
        tmp_path / "c.yaml",
        model={"num_classes": 4, "params": {"min_size": 128, "max_size": 160}},
    )
    head = tmp_path / "h.onnx"
    assert export_cli.main([str(head), "--config", str(cfg), "--random-weights", "0"]) == 0
    out = tmp_path / "m.json"
    assert (
        eval_main(
            ["--config", str(cfg), "--head", str(head), "--min-size", "96", "--max-size", "120", "--output", str(out)]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert f"ONNX fp32 head {head} -> 8-bit tensor codec -> tail, resize 96/120" in printed
    metrics = json.loads(out.read_text())
    assert (
        metrics["head"] == str(head)
        and metrics["bits"] == 8
        and (metrics["min_size"], metrics["max_size"]) == (96, 120)
    )
    # The predictor is the edge's path exactly, and agrees with the torch head at the same resize.
    model = build_model_from_config(load_config(cfg).model, str(cfg))
    img = torch.from_numpy(sample_images()[0][1][:120, :160]).permute(2, 0, 1).float().div(255)
    with torch.inference_mode():
        got = make_onnx_predictor(model, OnnxHead(head), 8)([img])[0]
        want = make_predictor(model, bits=8)([img])[0]
    assert want["scores"].numel() > 0
    assert all(torch.equal(got[k], want[k]) for k in want) or match_f1(want, got, 0.5, 0.0) >= 0.99
    # A head of other weights is refused with one line.
    other = tmp_path / "o.onnx"
    assert export_cli.main([str(other), "--config", str(cfg), "--random-weights", "5"]) == 0
    assert eval_main(["--config", str(cfg), "--head", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hnd-eval: error:") and "export the head from the same checkpoint" in err[-1]


def test_head_metadata_parsing_is_bounded():
    """A head file's metadata cannot make the edge recurse or allocate what its size does not justify: a deeply
    nested hnd.prior (was an uncaught RecursionError) and a ragged 4000-row table whose dense form is 4000 x
    4000 (was allocated, over 0.25 GB at its peak, before the refusal) each end as one OnnxHeadError naming the file."""
    import tracemalloc

    from hnd.edge.onnx_head import HeadMetadata, prior_from_json

    deep = "[" * 200_000 + "]" * 200_000
    for bad in (deep, json.dumps({"format": "hnd-prior/1", "quantized_cdf": json.loads("[" * 50 + "]" * 50)})):
        with pytest.raises(OnnxHeadError, match=r"^head.onnx: malformed hnd.prior") as e:
            prior_from_json(bad, "head.onnx")
        assert "\n" not in str(e.value)
    good = HeadMetadata("f" * 64, "faster_rcnn", 3, 800, 1333, (0.5,) * 3, (0.2,) * 3, 32, 0, "fp32", "0")
    props = {**good.to_props(), "hnd.image_mean": deep}
    with pytest.raises(OnnxHeadError, match=r"^head.onnx: malformed hnd metadata"):
        HeadMetadata.from_props(props, "head.onnx")
    ragged = {
        "format": "hnd-prior/1",
        "quantized_cdf": [[0, 65536]] * 3999 + [list(range(4000))],
        "offset": [0] * 4000,
        "medians": [0.0] * 4000,
    }
    text = json.dumps(ragged)
    tracemalloc.start()
    try:
        with pytest.raises(OnnxHeadError, match=r"^head.onnx: malformed hnd.prior \(a 4000x4000 table is over"):
            prior_from_json(text, "head.onnx")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 << 20, peak  # the JSON's own objects, never the 128 MB dense table
    with pytest.raises(OnnxHeadError, match=r"6000 table rows for a 24-channel head"):
        prior_from_json(json.dumps({**ragged, "quantized_cdf": [[0, 65536]] * 6000}), "head.onnx", channels=24)


@pytest.mark.parametrize("stem", ["SpaceToDepthStem", "PixelStem"])
def test_the_stems_take_only_a_resnet_conv1(stem):
    from torch import nn

    from hnd.edge import onnx_export

    extra = ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)) if stem == "PixelStem" else ()
    with pytest.raises(ValueError, match=f"{stem} needs torchvision's ResNet conv1"):
        getattr(onnx_export, stem)(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), *extra)
