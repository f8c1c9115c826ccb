"""Exact split (DESIGN invariant 1): tail(*head(x)) == model(x) bit for bit, and each half holds only its own weights.

Run as a script to print the bottleneck size of a 640x480 frame per channel count:
``.venv/bin/python tests/test_split.py``.
"""

from __future__ import annotations

import pytest
import torch

from hnd.common.models import build_model
from hnd.common.split import HEAD_PREFIXES, SplitMeta, head_state_dict, is_head_key, split_model

KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")
OUTPUT_KEYS = {
    "faster_rcnn": {"boxes", "labels", "scores"},
    "mask_rcnn": {"boxes", "labels", "scores", "masks"},
    "keypoint_rcnn": {"boxes", "labels", "scores", "keypoints", "keypoints_scores"},
}
# Tail module names -> the full model's names.
TAIL_PREFIXES = {
    "decoder.": "backbone.body.layer1.decoder.",
    "layers.": "backbone.body.",
    "fpn.": "backbone.fpn.",
    "rpn.": "rpn.",
    "roi_heads.": "roi_heads.",
}


def full_names(names, prefixes: dict[str, str]) -> dict[str, str]:
    """Map each split-side name to the full model's name; fails on a name outside ``prefixes``."""
    out = {}
    for name in names:
        matches = [full + name[len(short) :] for short, full in prefixes.items() if name.startswith(short)]
        assert len(matches) == 1, f"{name} is not a name this side should hold"
        out[name] = matches[0]
    return out


@pytest.fixture(scope="module", params=KINDS)
def split(request, tiny_model):
    model = tiny_model(request.param)
    head, tail = split_model(model)
    return request.param, model, head, tail


@pytest.mark.parametrize("batch", [1, 3])
def test_split_is_bit_exact(split, images, batch):
    kind, model, head, tail = split
    x = images[:batch]
    with torch.no_grad():
        expected = model(x)
        z, meta = head(x)
        got = tail(z, meta)
    assert len(expected) == len(got) == batch
    for e, g in zip(expected, got):
        assert set(e) == set(g) == OUTPUT_KEYS[kind]
        assert len(e["boxes"]) > 0, "random weights with score threshold 0 must give detections"
        for key in e:
            assert e[key].shape == g[key].shape and e[key].dtype == g[key].dtype, key
            assert torch.equal(e[key], g[key]), key


def test_head_output_and_meta(split, images):
    kind, model, head, tail = split
    with torch.no_grad():
        z, meta = head(images)
    assert isinstance(meta, SplitMeta) and len(meta) == 3
    assert meta.original_sizes == ((120, 150), (200, 100), (90, 90))
    # min_size 160 / max_size 256 of the tiny configs: the short side goes to 160 unless the long side passes 256.
    assert meta.image_sizes == ((160, 200), (256, 128), (160, 160))
    assert meta.padded_size == (256, 224)  # the largest of each dimension, rounded up to 32
    assert z.shape == (3, 3, 256 // 4 + 4, 224 // 4 + 4) and z.dtype == torch.float32
    batch, meta2 = head.preprocess(images)
    assert meta2 == meta and batch.shape == (3, 3, 256, 224)
    with torch.no_grad():
        assert torch.equal(head.encode(batch), z)


def test_head_and_tail_hold_only_their_own_weights(split):
    kind, model, head, tail = split
    model_sd = model.state_dict()
    head_sd, tail_sd = head.state_dict(), tail.state_dict()
    head_full = full_names(head_sd, HEAD_PREFIXES)
    tail_full = full_names(tail_sd, TAIL_PREFIXES)
    assert {n.split(".")[0] for n in head_sd} == {"conv1", "bn1", "encoder"}
    assert {n.split(".")[0] for n in tail_sd} == {"decoder", "layers", "fpn", "rpn", "roi_heads"}
    assert {n.split(".")[1] for n in tail_sd if n.startswith("layers.")} == {"layer2", "layer3", "layer4"}
    # No overlap, and together exactly the model's weights, under the right names and the very same tensors.
    assert set(head_full.values()).isdisjoint(tail_full.values())
    assert set(head_full.values()) | set(tail_full.values()) == set(model_sd)
    for side, mapping in ((head_sd, head_full), (tail_sd, tail_full)):
        for name, full in mapping.items():
            assert side[name].data_ptr() == model_sd[full].data_ptr(), name
    # Parameters (what trains and what the halves must ship) split the same way.
    head_params = {id(p) for p in head.parameters()}
    tail_params = {id(p) for p in tail.parameters()}
    assert head_params and tail_params and head_params.isdisjoint(tail_params)
    assert head_params | tail_params == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.backbone.body.layer1.decoder.parameters()} <= tail_params
    assert {id(p) for p in model.backbone.body.layer1.encoder.parameters()} <= head_params


def test_head_state_dict_uses_full_model_names(split):
    kind, model, head, tail = split
    sd = head_state_dict(head)
    model_sd = model.state_dict()
    expected = [k for k in model_sd if is_head_key(k)]
    # conv1.weight, 4 FrozenBatchNorm buffers of bn1, 19 encoder keys (4 convs, 3 BNs x 5)
    assert len(expected) == 24
    assert sorted(sd) == sorted(expected)
    assert all(
        k.startswith(("backbone.body.conv1.", "backbone.body.bn1.", "backbone.body.layer1.encoder.")) for k in sd
    )
    for k, v in sd.items():
        assert torch.equal(v, model_sd[k]), k


def test_tail_rejects_meta_of_another_batch(split, images):
    kind, model, head, tail = split
    with torch.no_grad():
        z, meta = head(images[:1])
        _, meta3 = head(images)
        with pytest.raises(ValueError, match="bottleneck batch 1 != 3 images"):
            tail(z, meta3)


def test_copy_modules_detaches_halves_from_the_model(tiny_model, images):
    model = tiny_model("faster_rcnn")
    head, tail = split_model(model, copy_modules=True)
    model_ptrs = {t.data_ptr() for t in model.state_dict().values()}
    assert not any(t.data_ptr() in model_ptrs for t in head.state_dict().values())
    assert not any(t.data_ptr() in model_ptrs for t in tail.state_dict().values())
    with torch.no_grad():
        z_shared, _ = split_model(model)[0](images[:1])
        z_copy, _ = head(images[:1])
    assert torch.equal(z_shared, z_copy)


def test_teacher_cannot_be_split():
    with pytest.raises(TypeError, match="needs a student"):
        split_model(build_model("faster_rcnn"))


# ---------------------------------------------------------------------------------------------
# Bottleneck size of one 640x480 frame (torchvision defaults min_size 800 / max_size 1333).


def measure_bottleneck(channels: int, height: int = 480, width: int = 640) -> dict:
    """Run a zeros frame through a freshly built student's Head and report what it would send."""
    head, _ = split_model(build_model("faster_rcnn", channels))
    with torch.no_grad():
        batch, meta = head.preprocess([torch.zeros(3, height, width)])
        z = head.encode(batch)
    return {
        "channels": channels,
        "resized": meta.image_sizes[0],
        "padded": meta.padded_size,
        "z_shape": tuple(z.shape[1:]),
        "float32_bytes": z.numel() * z.element_size(),
        "uint8_bytes": z.numel(),  # one byte per value at 8 bits, before entropy coding
        "dtype": z.dtype,
    }


def bottleneck_size_table(channel_counts=(3, 6, 9, 12, 15)) -> str:
    rows = [measure_bottleneck(c) for c in channel_counts]
    frame = 480 * 640 * 3
    lines = [
        f"640x480 frame -> resized {rows[0]['resized'][0]}x{rows[0]['resized'][1]}, "
        f"padded {rows[0]['padded'][0]}x{rows[0]['padded'][1]} (min_size 800, max_size 1333)",
        "",
        "| C | z shape | float32 bytes | 8-bit bytes | 8-bit vs raw RGB 640x480 (921,600 B) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        shape = "x".join(map(str, r["z_shape"]))
        lines.append(
            f"| {r['channels']} | {shape} | {r['float32_bytes']:,} | {r['uint8_bytes']:,} | "
            f"{r['uint8_bytes'] / frame:.1%} |"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("channels", [3, 15])
def test_bottleneck_size_of_a_640x480_frame(channels):
    r = measure_bottleneck(channels)
    assert r["padded"] == (800, 1088)
    assert r["z_shape"] == (channels, 204, 276)
    assert r["dtype"] == torch.float32
    assert r["uint8_bytes"] == channels * 204 * 276
    assert r["float32_bytes"] == 4 * r["uint8_bytes"]
    if channels == 3:
        assert r["uint8_bytes"] == 168_912  # docs/ORIGINAL_MODELS.md sections 3 and 6


if __name__ == "__main__":
    print(bottleneck_size_table())
