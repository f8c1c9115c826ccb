"""hnd.common.wire: proto conversions round-trip exactly and refuse malformed messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from hnd.common import codec, wire
from hnd.common.codec import CodecError, Limits
from hnd.common.split import SplitMeta
from hnd.proto.v1 import split_inference_pb2 as pb

MODES = [(b, g) for b in codec.AFFINE_BITS for g in ("tensor", "channel")] + [
    (8, "original"),
    (16, "tensor"),
    (32, "tensor"),
]


def reparse(msg):
    """Through real bytes, as the network sees it."""
    return type(msg).FromString(msg.SerializeToString())


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---------------------------------------------------------------------------------------------------
# Tensor


@pytest.mark.parametrize("compression", codec.COMPRESSIONS)
@pytest.mark.parametrize("bits,granularity", MODES)
def test_tensor_roundtrip_through_proto(bits, granularity, compression):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 5, 7) * 4 - 1
    e = codec.encode(x, bits, granularity, compression)
    back = wire.tensor_from_proto(reparse(wire.tensor_to_proto(e)))
    assert back == e
    assert bits_equal(codec.decode(back), codec.roundtrip(x, bits, granularity))


@pytest.mark.parametrize("field", ["dtype", "granularity", "compression"])
@pytest.mark.parametrize("value", [0, 99])
def test_unknown_or_unspecified_enums_are_refused(field, value):
    msg = wire.tensor_to_proto(codec.encode(torch.randn(1, 3, 4, 4)))
    setattr(msg, field, value)
    with pytest.raises(CodecError, match=field):
        wire.tensor_from_proto(reparse(msg))


@pytest.mark.parametrize("name", ["dtype", "granularity", "compression"])
def test_unknown_strings_cannot_be_sent(name):
    e = codec.encode(torch.randn(1, 3, 4, 4))
    setattr(e, name, "bogus")
    with pytest.raises(CodecError, match=name):
        wire.tensor_to_proto(e)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.shape.extend([1] * 20), "dims"),
        (lambda m: m.shape.__setitem__(1, -3), "non-positive"),
        (lambda m: m.shape.__setitem__(2, 1 << 40), "elements"),
        (lambda m: setattr(m, "raw_size", 1 << 60), "raw_size"),
        (lambda m: setattr(m, "bits", 5), "bits"),
        (lambda m: m.scale.append(1.0), "scale"),
        (lambda m: m.zero_point.pop(), "zero point"),
        (lambda m: m.scale.__setitem__(0, float("nan")), "scale"),
        (lambda m: setattr(m, "data", m.data + b"x"), "payload"),
    ],
)
def test_malformed_tensor_messages(edit, match):
    msg = wire.tensor_to_proto(codec.encode(torch.randn(1, 3, 4, 4), 8, "channel", "none"))
    edit(msg)
    with pytest.raises(CodecError, match=match):
        wire.tensor_from_proto(reparse(msg))


def test_tensor_from_proto_applies_limits():
    msg = wire.tensor_to_proto(codec.encode(torch.randn(1, 3, 4, 4)))
    with pytest.raises(CodecError, match="elements"):
        wire.tensor_from_proto(msg, Limits(max_elements=10))


# ---------------------------------------------------------------------------------------------------
# Split meta and bottleneck

META = SplitMeta(
    original_sizes=((480, 640), (512, 512)), image_sizes=((800, 1066), (800, 800)), padded_size=(800, 1088)
)


def test_meta_roundtrip():
    assert wire.meta_from_proto(reparse(wire.meta_to_proto(META))) == META


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.ClearField("padded_size"), "padded_size"),
        (lambda m: setattr(m.padded_size, "width", 0), "positive"),
        (lambda m: setattr(m.original_sizes[0], "height", 0), "positive"),
        (lambda m: setattr(m.image_sizes[1], "width", 0), "positive"),
        (lambda m: m.original_sizes.pop(), "one original"),
        (lambda m: (m.ClearField("original_sizes"), m.ClearField("image_sizes")), "one original"),
        (lambda m: setattr(m.image_sizes[0], "width", 1089), "exceeds"),
        (lambda m: setattr(m.image_sizes[1], "height", 801), "exceeds"),
    ],
)
def test_malformed_meta(edit, match):
    msg = wire.meta_to_proto(META)
    edit(msg)
    with pytest.raises(CodecError, match=match):
        wire.meta_from_proto(reparse(msg))


def test_bottleneck_roundtrip_and_batch_check():
    z = torch.randn(2, 3, 204, 276)
    e = codec.encode(z)
    t, meta = wire.bottleneck_from_proto(reparse(wire.bottleneck_to_proto(e, META)))
    assert t == e and meta == META
    one = codec.encode(z[:1])
    with pytest.raises(CodecError, match="B = 2"):
        wire.bottleneck_from_proto(wire.bottleneck_to_proto(one, META))
    with pytest.raises(CodecError, match="both"):
        wire.bottleneck_from_proto(pb.Bottleneck(tensor=wire.tensor_to_proto(e)))


def test_request_carries_a_oneof_payload():
    req = pb.InferRequest(request_id="r1", weights_fingerprint="ab" * 32, score_threshold=0.0)
    assert req.WhichOneof("payload") is None and req.HasField("score_threshold")
    req.image.CopyFrom(pb.EncodedImage(format=pb.EncodedImage.FORMAT_JPEG, data=b"\xff\xd8"))
    req.bottleneck.CopyFrom(wire.bottleneck_to_proto(codec.encode(torch.randn(2, 3, 4, 4)), META))
    req = reparse(req)
    assert req.WhichOneof("payload") == "bottleneck" and not req.HasField("max_detections")


# ---------------------------------------------------------------------------------------------------
# Detections


def faster(n: int) -> dict[str, torch.Tensor]:
    boxes = torch.rand(n, 4) * 500
    boxes[:, 2:] += boxes[:, :2]
    return {"boxes": boxes, "labels": torch.randint(1, 91, (n,)), "scores": torch.rand(n)}


def mask(n: int, h: int = 37, w: int = 53) -> dict[str, torch.Tensor]:
    det = faster(n)
    masks = torch.rand(n, 1, h, w)
    masks[:, :, :5] = 0.5  # exactly 0.5 is background, as in torchvision's COCO evaluation
    det["masks"] = masks
    return det


def keypoint(n: int, k: int = 17) -> dict[str, torch.Tensor]:
    det = faster(n)
    det["keypoints"] = torch.rand(n, k, 3) * 300
    det["keypoints_scores"] = torch.randn(n, k) * 3
    return det


@pytest.mark.parametrize("make", [faster, mask, keypoint])
@pytest.mark.parametrize("n", [0, 1, 7])
def test_detections_roundtrip(make, n):
    torch.manual_seed(n)
    det = make(n)
    back = wire.detections_from_proto(reparse(wire.detections_to_proto(det)))
    assert set(back) == set(det)
    for key, value in det.items():
        expected = (value > 0.5).to(torch.uint8) if key == "masks" else value
        assert bits_equal(back[key], expected.numpy()), key
    assert back["labels"].dtype == np.int64


def test_special_floats_roundtrip_bit_for_bit():
    det = faster(3)
    det["scores"] = torch.tensor([-0.0, 1e-45, 3.4028235e38])
    det["boxes"][0] = torch.tensor([0.1, 1 / 3, 2.0**-20, 1e-40])
    back = wire.detections_from_proto(wire.detections_to_proto(det))
    assert bits_equal(back["scores"], det["scores"].numpy()) and bits_equal(back["boxes"], det["boxes"].numpy())


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools.decode
def test_masks_match_pycocotools():
    torch.manual_seed(0)
    det = mask(6, 64, 48)
    msg = wire.detections_to_proto(det)
    rles = wire.detections_from_proto(msg, decode_masks=False)["masks_rle"]
    assert all(r["size"] == [64, 48] for r in rles)
    dense = wire.detections_from_proto(msg)["masks"]
    assert np.array_equal(coco_mask.decode(rles).transpose(2, 0, 1), dense[:, 0])


def test_large_mask_rle_runs_parse():
    """Long runs need multi-character counts, and deltas reach back two places."""
    m = np.zeros((300, 400), dtype=np.uint8)
    m[10:290, 5:395] = 1
    m[100:120, :] = 0
    m[0, 0] = 1
    rle = coco_mask.encode(np.asfortranarray(m[:, :, None]))[0]
    runs = wire._rle_runs(rle["counts"], m.size)
    flat = np.repeat(np.arange(len(runs)) % 2, runs)
    assert np.array_equal(flat.reshape(400, 300).T, m)


def test_detection_response_through_the_wire():
    resp = pb.InferResponse(
        request_id="r9",
        detections=[wire.detections_to_proto(mask(2)), wire.detections_to_proto(mask(0))],
        timings=pb.ServerTimings(decode_us=120, queue_us=5, compute_us=90000, encode_us=300, batch_size=2),
    )
    resp = reparse(resp)
    dets = [wire.detections_from_proto(d) for d in resp.detections]
    assert [len(d["labels"]) for d in dets] == [2, 0] and dets[1]["masks"].shape == (0, 1, 37, 53)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.boxes.append(1.0), "box values"),
        (lambda m: m.scores.pop(), "scores"),
        (lambda m: m.labels.append(3), "labels"),
        (lambda m: m.masks.counts.pop(), "RLEs"),
        (lambda m: setattr(m.masks, "height", 0), "size"),
        (lambda m: setattr(m.masks, "height", 38), "cover"),
        (lambda m: m.masks.counts.__setitem__(0, b""), "non-empty"),
        (lambda m: m.masks.counts.__setitem__(0, b"a\x00b"), "'0'..'o'"),
        (lambda m: m.masks.counts.__setitem__(0, b"\xff"), "'0'..'o'"),
        (lambda m: m.masks.counts.__setitem__(0, b"0P"), "middle"),
        (lambda m: m.masks.counts.__setitem__(0, b"g" * 20 + b"0"), "too long"),
        (lambda m: m.masks.counts.__setitem__(0, b"1O"), "non-negative"),  # runs 1, -1
        (lambda m: m.masks.counts.__setitem__(0, b"ooooooooo0" + b"0"), "cover"),  # one enormous run
        (lambda m: setattr(m.masks, "width", 1 << 20), "exceed"),
    ],
)
def test_malformed_mask_detections(edit, match):
    msg = wire.detections_to_proto(mask(3))
    edit(msg)
    with pytest.raises(CodecError, match=match):
        wire.detections_from_proto(reparse(msg), max_mask_bytes=1 << 24)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.keypoints.points.pop(), "keypoints"),
        (lambda m: m.keypoints.scores.append(0.0), "keypoints"),
        (lambda m: setattr(m.keypoints, "num_keypoints", 16), "keypoints"),
        (lambda m: setattr(m.keypoints, "num_keypoints", 0), "keypoints"),
    ],
)
def test_malformed_keypoint_detections(edit, match):
    msg = wire.detections_to_proto(keypoint(2))
    edit(msg)
    with pytest.raises(CodecError, match=match):
        wire.detections_from_proto(reparse(msg))


@pytest.mark.parametrize(
    "det",
    [
        {"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.int64), "scores": torch.zeros(2)},
        {**faster(2), "masks": torch.zeros(2, 37, 53)},
        {**faster(2), "keypoints": torch.zeros(2, 17, 2), "keypoints_scores": torch.zeros(2, 17)},
        {**faster(2), "keypoints": torch.zeros(2, 17, 3), "keypoints_scores": torch.zeros(2, 16)},
    ],
)
def test_inconsistent_detections_are_not_sent(det):
    with pytest.raises(CodecError):
        wire.detections_to_proto(det)
