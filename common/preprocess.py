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
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from hnd.common.meta import SplitMeta
from hnd.common.sizes import SIZE_DIVISIBLE, padded_size, resized_size

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "preprocess"]

# torchvision's GeneralizedRCNNTransform defaults for the R-CNN family.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    if not images:
        raise ValueError("preprocess needs at least one image")
    m = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    originals: list[tuple[int, int]] = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an RGB frame [H, W, 3] of uint8, got {image.dtype} {image.shape}")
        originals.append((int(image.shape[0]), int(image.shape[1])))
    sizes = [resized_size(hw, min_size, max_size) for hw in originals]
    hp, wp = padded_size(sizes, size_divisible)
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
