"""Conversions between hnd's Python objects and the hnd.v1 protobuf messages; the only place that does them.

Everything coming from the wire is validated here or in ``hnd.common.codec`` and refused with
``CodecError`` (a ValueError; the server answers it with INVALID_ARGUMENT). Floats travel as float32
and come back bit for bit.

numpy only, no torch (the edge's ONNX path imports this): detections go out from numpy arrays or
torch tensors (read with ``.numpy()``) and come back as numpy arrays.
"""

from __future__ import annotations

import sys
from typing import Any
from collections.abc import Mapping

import numpy as np

from hnd.common.codec import DEFAULT_LIMITS, CodecError, EncodedTensor, Limits, validate
from hnd.common.meta import SplitMeta
from hnd.proto.v1 import split_inference_pb2 as pb
from hnd.proto.v1 import tensor_pb2

__all__ = [
    "COMPRESSION_TO_PROTO",
    "GRANULARITY_TO_PROTO",
    "MAX_MASK_BYTES",
    "bottleneck_from_proto",
    "bottleneck_to_proto",
    "detections_as_numpy",
    "detections_from_proto",
    "detections_to_proto",
    "meta_from_proto",
    "meta_to_proto",
    "tensor_from_proto",
    "tensor_to_proto",
]

GRANULARITY_TO_PROTO = {
    "tensor": tensor_pb2.GRANULARITY_TENSOR,
    "channel": tensor_pb2.GRANULARITY_CHANNEL,
    "original": tensor_pb2.GRANULARITY_ORIGINAL,
}
COMPRESSION_TO_PROTO = {
    "none": tensor_pb2.COMPRESSION_NONE,
    "zstd": tensor_pb2.COMPRESSION_ZSTD,
    "learned": tensor_pb2.COMPRESSION_LEARNED,
}
_DTYPE_TO_PROTO = {"float32": tensor_pb2.DTYPE_FLOAT32}
_GRANULARITY_FROM_PROTO = {v: k for k, v in GRANULARITY_TO_PROTO.items()}
_COMPRESSION_FROM_PROTO = {v: k for k, v in COMPRESSION_TO_PROTO.items()}
_DTYPE_FROM_PROTO = {v: k for k, v in _DTYPE_TO_PROTO.items()}

# Decoded masks of one image may take at most this many bytes (N * H * W uint8).
MAX_MASK_BYTES = 1 << 30
# A COCO RLE count takes at most 12 characters of 5 bits: 60 bits, safe in int64.
_RLE_MAX_CHARS = 12


# ---------------------------------------------------------------------------------------------------
# Tensor and split meta


def tensor_to_proto(t: EncodedTensor) -> tensor_pb2.Tensor:
    """EncodedTensor -> hnd.v1.Tensor."""
    return tensor_pb2.Tensor(
        shape=t.shape,
        dtype=_lookup(_DTYPE_TO_PROTO, t.dtype, "dtype"),
        bits=t.bits,
        granularity=_lookup(GRANULARITY_TO_PROTO, t.granularity, "granularity"),
        scale=t.scale,
        zero_point=t.zero_point,
        compression=_lookup(COMPRESSION_TO_PROTO, t.compression, "compression"),
        raw_size=t.raw_size,
        data=t.payload,
    )


def tensor_from_proto(msg: tensor_pb2.Tensor, limits: Limits = DEFAULT_LIMITS) -> EncodedTensor:
    """hnd.v1.Tensor -> EncodedTensor, validated against ``limits`` (``codec.validate``), not yet decoded.

    Raises CodecError on unknown or unspecified enums, bad shapes, sizes or parameters.
    """
    if len(msg.shape) > limits.max_dims:
        raise CodecError(f"shape has {len(msg.shape)} dims; the limit is {limits.max_dims}")
    t = EncodedTensor(
        shape=tuple(msg.shape),
        dtype=_lookup(_DTYPE_FROM_PROTO, msg.dtype, "dtype"),
        bits=msg.bits,
        granularity=_granularity_from_proto(msg),
        scale=tuple(msg.scale),
        zero_point=tuple(msg.zero_point),
        compression=_lookup(_COMPRESSION_FROM_PROTO, msg.compression, "compression"),
        raw_size=msg.raw_size,
        payload=msg.data,
    )
    validate(t, limits)
    return t


def _granularity_from_proto(msg: tensor_pb2.Tensor) -> str:
    # 16 / 32 bits carry no scale or zero point: the proto says granularity is ignored there, so unset is fine.
    if msg.bits in (16, 32) and msg.granularity == tensor_pb2.GRANULARITY_UNSPECIFIED:
        return "tensor"
    return _lookup(_GRANULARITY_FROM_PROTO, msg.granularity, "granularity")


def meta_to_proto(meta: SplitMeta) -> pb.SplitMeta:
    """SplitMeta -> hnd.v1.SplitMeta."""
    return pb.SplitMeta(
        original_sizes=[_size(hw) for hw in meta.original_sizes],
        image_sizes=[_size(hw) for hw in meta.image_sizes],
        padded_size=_size(meta.padded_size),
    )


def meta_from_proto(msg: pb.SplitMeta) -> SplitMeta:
    """hnd.v1.SplitMeta -> SplitMeta; sizes positive, one original and one resized size per image,
    every resized size within the padded size. Raises CodecError otherwise."""
    if not msg.HasField("padded_size"):
        raise CodecError("split meta has no padded_size")
    padded = _hw(msg.padded_size, "padded_size")
    n = len(msg.image_sizes)
    if n == 0 or len(msg.original_sizes) != n:
        raise CodecError(
            f"split meta needs one original and one resized size per image; got {len(msg.original_sizes)} and {n}"
        )
    originals = tuple(_hw(s, "original_sizes") for s in msg.original_sizes)
    resized = tuple(_hw(s, "image_sizes") for s in msg.image_sizes)
    for h, w in resized:
        if h > padded[0] or w > padded[1]:
            raise CodecError(f"resized size {(h, w)} exceeds the padded size {padded}")
    return SplitMeta(original_sizes=originals, image_sizes=resized, padded_size=padded)


def bottleneck_to_proto(t: EncodedTensor, meta: SplitMeta) -> pb.Bottleneck:
    """Encoded bottleneck [B, C, h, w] and the sizes of its B images -> hnd.v1.Bottleneck."""
    return pb.Bottleneck(tensor=tensor_to_proto(t), meta=meta_to_proto(meta))


def bottleneck_from_proto(msg: pb.Bottleneck, limits: Limits = DEFAULT_LIMITS) -> tuple[EncodedTensor, SplitMeta]:
    """hnd.v1.Bottleneck -> (EncodedTensor, SplitMeta), both validated, with one meta entry per batch item."""
    if not msg.HasField("tensor") or not msg.HasField("meta"):
        raise CodecError("bottleneck needs both a tensor and split meta")
    t = tensor_from_proto(msg.tensor, limits)
    meta = meta_from_proto(msg.meta)
    if len(t.shape) != 4 or t.shape[0] != len(meta):
        raise CodecError(f"bottleneck shape {t.shape} is not [B, C, h, w] with B = {len(meta)} images")
    return t, meta


# ---------------------------------------------------------------------------------------------------
# Detections


def detections_to_proto(det: Mapping[str, Any]) -> pb.Detections:
    """One image's torchvision output (torch tensors or numpy arrays) -> hnd.v1.Detections.

    det: boxes [N, 4] float, labels [N] int, scores [N] float; optionally masks [N, 1, H, W] in 0..1
    (sent as COCO RLE of ``masks > 0.5``), keypoints [N, K, 3] and keypoints_scores [N, K].
    """
    boxes, labels, scores = (_numpy(det[k]) for k in ("boxes", "labels", "scores"))
    n = len(labels)
    if tuple(boxes.shape) != (n, 4) or tuple(scores.shape) != (n,) or labels.ndim != 1:
        raise CodecError(
            f"detections need boxes [N, 4], labels [N], scores [N]; got {tuple(boxes.shape)}, "
            f"{tuple(labels.shape)}, {tuple(scores.shape)}"
        )
    msg = pb.Detections(boxes=_floats(boxes), labels=labels.tolist(), scores=_floats(scores))
    if "masks" in det:
        msg.masks.CopyFrom(_masks_to_proto(_numpy(det["masks"]), n))
    if "keypoints" in det:
        msg.keypoints.CopyFrom(_keypoints_to_proto(_numpy(det["keypoints"]), _numpy(det["keypoints_scores"]), n))
    return msg


def detections_from_proto(
    msg: pb.Detections, decode_masks: bool = True, max_mask_bytes: int = MAX_MASK_BYTES
) -> dict[str, np.ndarray | list]:
    """hnd.v1.Detections -> dict of numpy arrays, keys as torchvision gives them (masks binary, uint8).

    Returns boxes [N, 4] float32, labels [N] int64, scores [N] float32; with masks: masks [N, 1, H, W]
    uint8 (or, with ``decode_masks=False``, masks_rle: N COCO RLE dicts {"size": [H, W], "counts": bytes});
    with keypoints: keypoints [N, K, 3] float32 and keypoints_scores [N, K] float32.
    Raises CodecError when counts or sizes disagree.
    """
    n = len(msg.labels)
    if len(msg.boxes) != 4 * n or len(msg.scores) != n:
        raise CodecError(f"{n} labels but {len(msg.boxes)} box values and {len(msg.scores)} scores")
    det: dict[str, np.ndarray | list] = {
        "boxes": _tensor(msg.boxes, np.float32, (n, 4)),
        "labels": _tensor(msg.labels, np.int64, (n,)),
        "scores": _tensor(msg.scores, np.float32, (n,)),
    }
    if msg.HasField("masks"):
        if decode_masks:
            det["masks"] = _masks_from_proto(msg.masks, n, max_mask_bytes)
        else:
            det["masks_rle"] = _rles_from_proto(msg.masks, n)
    if msg.HasField("keypoints"):
        kp = msg.keypoints
        k = kp.num_keypoints
        if k < 1 or len(kp.points) != n * k * 3 or len(kp.scores) != n * k:
            raise CodecError(
                f"{n} detections of {k} keypoints need {n * k * 3} values and {n * k} scores; "
                f"got {len(kp.points)} and {len(kp.scores)}"
            )
        det["keypoints"] = _tensor(kp.points, np.float32, (n, k, 3))
        det["keypoints_scores"] = _tensor(kp.scores, np.float32, (n, k))
    return det


def detections_as_numpy(det: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One image's detections with every torch tensor as a numpy array (what the edge keeps and reports)."""
    return {k: _numpy(v) for k, v in det.items()}


def _masks_to_proto(masks: np.ndarray, n: int) -> pb.Masks:
    if masks.ndim != 4 or masks.shape[0] != n or masks.shape[1] != 1:
        raise CodecError(f"masks must be [N={n}, 1, H, W], got {tuple(masks.shape)}")
    h, w = int(masks.shape[2]), int(masks.shape[3])
    msg = pb.Masks(height=h, width=w)
    if n:
        from pycocotools import mask as coco_mask  # only whoever sends masks (the server) needs it

        binary = masks[:, 0] > 0.5  # [N, H, W], as torchvision's COCO evaluation does
        rles = coco_mask.encode(np.asfortranarray(binary.transpose(1, 2, 0), dtype=np.uint8))
        msg.counts.extend(r["counts"] for r in rles)
    return msg


def _rles_from_proto(msg: pb.Masks, n: int) -> list[dict]:
    if msg.height < 1 or msg.width < 1 or len(msg.counts) != n:
        raise CodecError(f"masks need size > 0 and {n} RLEs; got {msg.height}x{msg.width}, {len(msg.counts)}")
    return [{"size": [msg.height, msg.width], "counts": c} for c in msg.counts]


def _masks_from_proto(msg: pb.Masks, n: int, max_bytes: int) -> np.ndarray:
    rles = _rles_from_proto(msg, n)
    h, w = msg.height, msg.width
    if n * h * w > max_bytes:
        raise CodecError(f"{n} masks of {h}x{w} exceed {max_bytes} bytes")
    out = np.empty((n, 1, h, w), dtype=np.uint8)
    for i, rle in enumerate(rles):
        runs = _rle_runs(rle["counts"], h * w)
        # Runs alternate 0, 1, 0, ... over the mask in column-major (Fortran) order.
        flat = np.repeat((np.arange(len(runs)) % 2).astype(np.uint8), runs)
        out[i, 0] = flat.reshape(w, h).T
    return out


def _rle_runs(counts: bytes, numel: int) -> np.ndarray:
    """Parse a compressed COCO RLE string (pycocotools' rleFrString) into run lengths summing to ``numel``.

    Done here, vectorised and checked, rather than in pycocotools: its C decoder writes past the mask
    when the runs of a hostile string add up to more than H * W.
    """
    c = np.frombuffer(counts, dtype=np.uint8).astype(np.int64) - 48
    if c.size == 0 or c.min() < 0 or c.max() > 63:
        raise CodecError("mask RLE counts must be a non-empty string of characters '0'..'o'")
    ends = (c & 0x20) == 0  # a character without the continuation bit ends a value
    if not ends[-1]:
        raise CodecError("mask RLE counts end in the middle of a value")
    starts = np.flatnonzero(np.concatenate(([True], ends[:-1])))
    group = np.cumsum(np.concatenate(([0], ends[:-1].astype(np.int64))))
    k = np.arange(c.size) - starts[group]
    if k.max() >= _RLE_MAX_CHARS:
        raise CodecError("mask RLE count too long")
    x = np.add.reduceat((c & 0x1F) << (5 * k), starts)
    nchars = k[ends] + 1
    x = np.where(c[ends] & 0x10, x - (np.int64(1) << (5 * nchars)), x)  # sign bit of the last character
    # Counts from index 3 on are deltas to the count two places back.
    runs = x.copy()
    runs[1::2] = np.cumsum(x[1::2])
    runs[2::2] = np.cumsum(x[2::2])
    # Each run within [0, numel] first, so the sum cannot wrap around.
    if runs.min() < 0 or runs.max() > numel or runs.sum() != numel:
        raise CodecError(f"mask RLE runs must be non-negative and cover {numel} pixels")
    return runs


def _keypoints_to_proto(keypoints: np.ndarray, scores: np.ndarray, n: int) -> pb.Keypoints:
    if keypoints.ndim != 3 or keypoints.shape[0] != n or keypoints.shape[2] != 3:
        raise CodecError(f"keypoints must be [N={n}, K, 3], got {tuple(keypoints.shape)}")
    k = int(keypoints.shape[1])
    if tuple(scores.shape) != (n, k):
        raise CodecError(f"keypoints_scores must be [N={n}, K={k}], got {tuple(scores.shape)}")
    return pb.Keypoints(num_keypoints=k, points=_floats(keypoints), scores=_floats(scores))


# ---------------------------------------------------------------------------------------------------
# Helpers


def _lookup(mapping: Mapping, key: object, what: str):
    try:
        return mapping[key]
    except (KeyError, TypeError):
        raise CodecError(f"unknown or unspecified {what} {key!r}") from None


def _size(hw: tuple[int, int]) -> pb.Size:
    return pb.Size(height=hw[0], width=hw[1])


def _hw(size: pb.Size, what: str) -> tuple[int, int]:
    if size.height < 1 or size.width < 1:
        raise CodecError(f"{what} must be positive, got {size.height}x{size.width}")
    return size.height, size.width


def _numpy(x: Any) -> np.ndarray:
    """A numpy view of a numpy array or a (CPU or not) torch tensor; torch is never imported here."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()  # numpy has no bfloat16
    return np.asarray(x)


def _floats(t: np.ndarray) -> list[float]:
    # float32 values are exact as Python floats and exact again as the wire's float32.
    return t.astype(np.float32, copy=False).reshape(-1).tolist()


def _tensor(values, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
    """A repeated field as an array of ``shape``; the callers have checked its length."""
    return np.array(values, dtype=dtype).reshape(shape)


# ---------------------------------------------------------------------------------------------------
# Stream frames (temporal coding on InferStream: hnd.common.stream_codec, hnd.common.video)

STREAM_FRAME_TO_PROTO = {"key": pb.StreamFrame.TYPE_KEY, "delta": pb.StreamFrame.TYPE_DELTA}
_STREAM_FRAME_FROM_PROTO = {v: k for k, v in STREAM_FRAME_TO_PROTO.items()}


def stream_frame_to_proto(kind: str, key_sequence: int, sequence: int) -> pb.StreamFrame:
    """("key" | "delta", key sequence, sequence) -> hnd.v1.StreamFrame."""
    return pb.StreamFrame(
        type=_lookup(STREAM_FRAME_TO_PROTO, kind, "stream frame type"), key_sequence=key_sequence, sequence=sequence
    )


def stream_frame_from_proto(msg: pb.StreamFrame) -> tuple[str, int, int]:
    """hnd.v1.StreamFrame -> (kind, key_sequence, sequence); a key frame must name itself as its key."""
    kind = _lookup(_STREAM_FRAME_FROM_PROTO, msg.type, "stream frame type")
    if kind == "key" and msg.key_sequence != msg.sequence:
        raise CodecError(f"key frame {msg.sequence} names key {msg.key_sequence}; a key frame names itself")
    if kind == "delta" and msg.key_sequence >= msg.sequence:
        raise CodecError(f"delta frame {msg.sequence} names key {msg.key_sequence}, which does not precede it")
    return kind, int(msg.key_sequence), int(msg.sequence)
