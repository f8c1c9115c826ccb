"""torchvision's GeneralizedRCNNTransform (eval mode) in numpy + OpenCV, for the torch-free edge.

Same geometry exactly: the sizes of ``hnd.common.sizes`` (the resize scale in Python floats, each side
floored, as ``torch.nn.functional.interpolate`` computes it with ``recompute_scale_factor=True``),
bilinear sampling with half-pixel centres (``align_corners=False``, no antialiasing; OpenCV's
INTER_LINEAR on float32), and zero padding of the normalized image to a multiple of 32 at the bottom
and right. Same order too: normalize at the original size, then resize, then pad.

The normalized image equals torch's bit for bit, so a frame already at its split size (``min_size``
equal to its short side, e.g. 480 for 640x480) gives torch's input exactly. A resized one differs
only where float32 rounds the sample positions differently (at most ~2e-4 in normalized units on the
sample photos; tests/test_onnx_head.py bounds it).

:func:`preprocess_uint8` is the same geometry for a head whose graph takes raw pixels (the normalization
folded into its first convolution, ``hnd.edge.onnx_export.PixelStem``): the frame stays uint8, and the
padding, the batch's and the convolution's own border, holds the mean pixel rounded to uint8 (what zero
padding of the normalized image is, up to that rounding: at most 0.47 / 255 / std, 0.0082 normalized units).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from hnd.common.meta import SplitMeta
from hnd.common.sizes import SIZE_DIVISIBLE, padded_size, resized_size

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "mean_pixel", "preprocess", "preprocess_uint8"]

# torchvision's GeneralizedRCNNTransform defaults for the R-CNN family.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def batch_geometry(
    images: Sequence[np.ndarray], min_size: int, max_size: int, size_divisible: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], tuple[int, int]]:
    """RGB frames [H_i, W_i, 3] uint8 -> (their sizes, their resized sizes, the batch's padded (Hp, Wp));
    ValueError for no frame, or a frame of another shape or type."""
    if not images:
        raise ValueError("preprocess needs at least one image")
    originals: list[tuple[int, int]] = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB frame [H, W, 3] of uint8, got {image.dtype} {image.shape}")
        originals.append((int(image.shape[0]), int(image.shape[1])))
    sizes = [resized_size(hw, min_size, max_size) for hw in originals]
    return originals, sizes, padded_size(sizes, size_divisible)


def preprocess(
    images: Sequence[np.ndarray],
    min_size: int,
    max_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size_divisible: int = SIZE_DIVISIBLE,
) -> tuple[np.ndarray, SplitMeta]:
    """RGB frames [H_i, W_i, 3] uint8 -> (padded batch [B, 3, Hp, Wp] float32, SplitMeta).

    What ``hnd.common.split.Head.preprocess`` does with torch, for frames read as uint8 and scaled to
    0..1 the way ``torchvision.transforms.functional.to_tensor`` does.
    """
    originals, sizes, (hp, wp) = batch_geometry(images, min_size, max_size, size_divisible)
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    batch = np.zeros((len(images), 3, hp, wp), dtype=np.float32)
    for i, (image, (h, w), (rh, rw)) in enumerate(zip(images, originals, sizes)):
        dst = batch[i, :, :rh, :rw]
        if (rh, rw) == (h, w):
            # Channels first while still uint8 (a cheap copy), then the float math in place in the batch.
            np.divide(np.ascontiguousarray(image.transpose(2, 0, 1)), np.float32(255), out=dst, dtype=np.float32)
            dst -= m
            dst /= s
        else:
            x = image.astype(np.float32)
            x /= np.float32(255)  # as to_tensor: a float32 division, not a multiplication by 1/255
            x -= m.reshape(3)
            x /= s.reshape(3)
            dst[...] = cv2.resize(x, (rw, rh), interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1)
    meta = SplitMeta(original_sizes=tuple(originals), image_sizes=tuple(sizes), padded_size=(hp, wp))
    return batch, meta


def mean_pixel(mean: Sequence[float]) -> np.ndarray:
    """The mean pixel as uint8 [3]: the raw value nearest to a normalized 0 (round(255 * mean))."""
    return np.clip(np.rint(255.0 * np.asarray(mean, dtype=np.float64)), 0, 255).astype(np.uint8)


def preprocess_uint8(
    images: Sequence[np.ndarray],
    min_size: int,
    max_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    size_divisible: int = SIZE_DIVISIBLE,
    border: tuple[int, int] = (0, 0),
) -> tuple[np.ndarray, SplitMeta]:
    """RGB frames [H_i, W_i, 3] uint8 -> (batch [B, 3, b0 + Hp + b1, b0 + Wp + b1] uint8, SplitMeta).

    :func:`preprocess`'s geometry without the normalization: the frame's pixels at (b0, b0), the rest the
    mean pixel (:func:`mean_pixel`). border (b0, b1): the first convolution's padding, supplied here because
    the graph's convolution cannot pad with a per-channel value. A frame at its split size is copied as it
    is (no float at all); a resized one is resized in float32 and rounded to the nearest uint8 (at most 0.5
    raw levels from torch's resize of the normalized image, plus the float rounding :func:`preprocess` has).
    SplitMeta's padded_size is the batch's without the border, as :func:`preprocess` gives it.
    """
    originals, sizes, (hp, wp) = batch_geometry(images, min_size, max_size, size_divisible)
    b0, b1 = border
    batch = np.empty((len(images), 3, b0 + hp + b1, b0 + wp + b1), dtype=np.uint8)
    batch[...] = mean_pixel(mean).reshape(1, 3, 1, 1)
    for i, (image, (h, w), (rh, rw)) in enumerate(zip(images, originals, sizes)):
        if (rh, rw) != (h, w):
            x = cv2.resize(image.astype(np.float32), (rw, rh), interpolation=cv2.INTER_LINEAR)
            image = np.clip(np.rint(x), 0, 255).astype(np.uint8)
        batch[i, :, b0 : b0 + rh, b0 : b0 + rw] = image.transpose(2, 0, 1)
    meta = SplitMeta(original_sizes=tuple(originals), image_sizes=tuple(sizes), padded_size=(hp, wp))
    return batch, meta
