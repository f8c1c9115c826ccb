"""Image-size rules of torchvision's GeneralizedRCNNTransform, torch-free (the edge's ONNX path and the
server's request validation both use them).

* resize: ``scale = min(min_size / short_side, max_size / long_side)``, then each side becomes
  ``floor(side * scale)`` (torchvision computes the scale in double precision; an ONNX-traced head computes
  it in float32, which can differ by one pixel).
* pad: the batch is zero-padded at the bottom / right to the largest height and width of its images,
  each rounded up to a multiple of ``size_divisible`` (32).
* bottleneck: the stem halves twice (Hp/4, Wp/4) and the HND encoder adds 4 (h = Hp/4 + 4).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "RESIZE_TOLERANCE",
    "SIZE_DIVISIBLE",
    "bottleneck_hw",
    "is_resize_of",
    "padded_size",
    "resized_size",
    "round_up",
]

SIZE_DIVISIBLE = 32
# Pixels a resized side may differ from the exact rule: float32 (ONNX) vs float64 (torchvision) scales.
RESIZE_TOLERANCE = 1

Hw = tuple[int, int]


def resized_size(original: Hw, min_size: int, max_size: int) -> Hw:
    """(H, W) of a frame -> (h, w) after torchvision's resize to ``min_size`` / ``max_size``."""
    h, w = original
    scale = min(min_size / min(h, w), max_size / max(h, w))
    return int(h * scale), int(w * scale)


def round_up(value: int, multiple: int = SIZE_DIVISIBLE) -> int:
    return -(-value // multiple) * multiple


def padded_size(image_sizes: Sequence[Hw], size_divisible: int = SIZE_DIVISIBLE) -> Hw:
    """Padded batch (Hp, Wp) of resized images: the largest height and width, rounded up."""
    return (
        round_up(max(h for h, _ in image_sizes), size_divisible),
        round_up(max(w for _, w in image_sizes), size_divisible),
    )


def bottleneck_hw(padded: Hw, bottleneck_type: str = "hnd") -> Hw:
    """Spatial size (h, w) of the bottleneck of a padded batch (Hp, Wp): (Hp/4 + 4, Wp/4 + 4) for HND,
    (Hp/4 - 1, Wp/4 - 1) for an Entropic Student's latent."""
    grow = -1 if bottleneck_type == "entropic" else 4
    return padded[0] // 4 + grow, padded[1] // 4 + grow


def is_resize_of(image: Hw, original: Hw, tolerance: int = RESIZE_TOLERANCE) -> bool:
    """True when (h, w) is (H, W) scaled by one factor, each side floored, within ``tolerance`` pixels.

    This is the aspect-ratio part of the resize rule: some scale s has |floor(H s) - h| <= tolerance and
    |floor(W s) - w| <= tolerance. (floor(X s) = n for s in [n / X, (n + 1) / X).)
    """
    (h, w), (big_h, big_w) = image, original
    low = max((h - tolerance) / big_h, (w - tolerance) / big_w)
    high = min((h + tolerance + 1) / big_h, (w + tolerance + 1) / big_w)
    return low < high
