"""What one request may cost the server, and the checks that enforce it before any work.

The tail's compute grows with the padded batch (B x Hp x Wp), and Mask R-CNN's postprocess pastes
``detections_per_img`` float32 masks at every image's *original* size, so both are bounded here from the
sizes a request declares, before its tensor is even decompressed:

* each image size is torchvision's resize of its original size at some scale (aspect ratio within
  one pixel of rounding), with short side <= ``max_short_side`` and long side <= ``max_long_side``:
  any edge transform with ``min_size <= max_short_side`` and ``max_size <= max_long_side`` fits (the tail
  is resolution-agnostic), so an edge may run at native resolution;
* the padded size is a multiple of ``size_divisible`` covering the images (torchvision gives their
  largest height and width rounded up), at most ``max_padded_side`` per side and ``max_padded_pixels``
  in all;
* original sides are at most ``max_original_side``, and the original pixels of a request at most
  ``max_original_pixels`` (for Mask R-CNN: ``max_mask_bytes / (4 * detections_per_img)``).

The same numbers go to clients in ``GetModelInfo.limits`` (hnd.v1.ServerLimits).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hnd.common.sizes import bottleneck_hw, is_resize_of, padded_size, resized_size, round_up
from hnd.common.split import SplitMeta

Hw = tuple[int, int]


class BudgetError(ValueError):
    """A request beyond the advertised limits; ``reason`` is a short metrics label."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RequestBudget:
    """Resolved per-request bounds (pixels are per request, summed over its images)."""

    max_images: int
    max_short_side: int
    max_long_side: int
    size_divisible: int
    max_padded_side: int
    max_padded_pixels: int
    max_original_side: int
    max_original_pixels: int
    mask_bytes_per_pixel: int  # 4 * detections_per_img for Mask R-CNN, else 0
    model_min_size: int  # the served model's own transform, for "expected" hints
    model_max_size: int

    @property
    def max_mask_bytes(self) -> int:
        """Worst case of the float32 masks one request's postprocess holds (0 without masks)."""
        return self.max_original_pixels * self.mask_bytes_per_pixel


def make_budget(
    *,
    max_images: int,
    model_min_size: int,
    model_max_size: int,
    size_divisible: int,
    mask_detections: int,
    max_short_side: int | None = None,
    max_long_side: int | None = None,
    max_original_side: int = 8192,
    max_mask_bytes: int = 1 << 30,
) -> RequestBudget:
    """Bounds from the server's limits and its model (``mask_detections``: detections_per_img of a Mask
    R-CNN, 0 for other kinds). Unset resize bounds default to the model's own min_size / max_size."""
    short = max_short_side or model_min_size
    long = max(max_long_side or model_max_size, short)
    side = round_up(long, size_divisible)
    per_pixel = 4 * mask_detections
    pixels = max_original_side * max_original_side
    if per_pixel:
        pixels = min(pixels, max_mask_bytes // per_pixel)
    if pixels < 1:
        raise ValueError(f"max_mask_bytes {max_mask_bytes} does not fit one pixel of {mask_detections} masks")
    return RequestBudget(
        max_images=max_images,
        max_short_side=short,
        max_long_side=long,
        size_divisible=size_divisible,
        max_padded_side=side,
        max_padded_pixels=side * side,
        max_original_side=max_original_side,
        max_original_pixels=pixels,
        mask_bytes_per_pixel=per_pixel,
        model_min_size=model_min_size,
        model_max_size=model_max_size,
    )


def _hw(size: Hw) -> str:
    return f"{size[0]}x{size[1]}"


def check_originals(originals: Sequence[Hw], budget: RequestBudget) -> None:
    """Original sizes (of a split request or a decoded offload image) within the budget."""
    for size in originals:
        if max(size) > budget.max_original_side:
            raise BudgetError(
                f"original size {_hw(size)} exceeds max_original_side {budget.max_original_side}", "original_size"
            )
    total = sum(h * w for h, w in originals)
    if total > budget.max_original_pixels:
        why = (
            f" (Mask R-CNN pastes {budget.mask_bytes_per_pixel // 4} float32 masks per image at its original "
            f"size: at most {budget.max_mask_bytes / 2**20:.0f} MiB)"
            if budget.mask_bytes_per_pixel
            else ""
        )
        raise BudgetError(
            f"original sizes total {total} pixels; max_original_pixels is {budget.max_original_pixels}{why}",
            "original_pixels",
        )


def check_split_meta(meta: SplitMeta, budget: RequestBudget) -> None:
    """A split request's sizes against the resize rule and the budget; raises BudgetError saying what fits."""
    if len(meta) > budget.max_images:
        raise BudgetError(f"{len(meta)} images in one request; max_batch is {budget.max_images}", "batch")
    check_originals(meta.original_sizes, budget)
    for original, image in zip(meta.original_sizes, meta.image_sizes):
        if not is_resize_of(image, original):
            example = resized_size(original, budget.model_min_size, budget.model_max_size)
            raise BudgetError(
                f"image size {_hw(image)} is not a resize of original {_hw(original)} (aspect ratio differs; "
                f"min_size {budget.model_min_size} / max_size {budget.model_max_size} gives {_hw(example)})",
                "resize_rule",
            )
        if min(image) > budget.max_short_side or max(image) > budget.max_long_side:
            example = resized_size(original, budget.max_short_side, budget.max_long_side)
            raise BudgetError(
                f"image size {_hw(image)} exceeds the accepted resize (short side <= {budget.max_short_side}, "
                f"long side <= {budget.max_long_side}; the largest for original {_hw(original)} is {_hw(example)})",
                "image_size",
            )
    # torchvision pads a batch to its largest image rounded up; a sub-batch (frames a neural filter kept)
    # keeps the padding of the whole batch, so more is fine as long as it stays a multiple and in budget.
    least = padded_size(meta.image_sizes, budget.size_divisible)
    ph, pw = meta.padded_size
    if ph % budget.size_divisible or pw % budget.size_divisible or ph < least[0] or pw < least[1]:
        raise BudgetError(
            f"padded size {_hw(meta.padded_size)} must be a multiple of {budget.size_divisible} covering every "
            f"image: expected {_hw(least)} (the largest image height and width rounded up)",
            "padded_size",
        )
    if max(ph, pw) > budget.max_padded_side or ph * pw > budget.max_padded_pixels:
        raise BudgetError(
            f"padded size {_hw(meta.padded_size)} exceeds max_padded_side {budget.max_padded_side} / "
            f"max_padded_pixels {budget.max_padded_pixels} (expected {_hw(least)})",
            "padded_size",
        )


def check_bottleneck_shape(shape: Sequence[int], meta: SplitMeta, channels: int, bottleneck_type: str = "hnd") -> None:
    """Tensor shape [B, C, h, w] against the meta and the model; says the shape it expected."""
    expected = (len(meta), channels, *bottleneck_hw(meta.padded_size, bottleneck_type))
    if tuple(shape) != expected:
        ph, pw = meta.padded_size
        rule = "Hp/4 - 1, Wp/4 - 1" if bottleneck_type == "entropic" else "Hp/4 + 4, Wp/4 + 4"
        raise BudgetError(
            f"bottleneck shape {list(shape)} does not fit {len(meta)} image(s) padded to {ph}x{pw} with a "
            f"{channels}-channel model: expected {list(expected)} ([B, C, {rule}])",
            "shape",
        )


class MessageBytes:
    """Serialized request bytes the server holds in flight (received, not yet answered or refused), at most
    ``limit`` in all (None: unbounded). Thread-safe.

    A refused message's buffers are freed at once, but glibc keeps the freed heap (30 MB garbage JPEGs refused
    one at a time left 1 GB resident with 60 MB in use); after a large message is let go, a thread of its own
    hands the free memory back to the OS (``malloc_trim``) half a second later, at most once a second and once
    after the last.
    """

    TRIM_AFTER_BYTES = 1 << 20
    TRIM_INTERVAL_S = 1.0
    TRIM_DELAY_S = 0.5

    def __init__(self, limit: int | None, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.held = 0
        self.on_change = on_change
        self._lock = threading.Lock()
        self._trim = threading.Event()
        self._trimmer: threading.Thread | None = None

    def take(self, n: int) -> bool:
        """Hold ``n`` more bytes; False (nothing held) when that would pass the limit."""
        with self._lock:
            if self.limit is not None and self.held + n > self.limit:
                return False
            self.held += n
            held = self.held
        if self.on_change is not None:
            self.on_change(held)
        return True

    def give(self, n: int) -> None:
        with self._lock:
            self.held -= n
            held = self.held
            if n >= self.TRIM_AFTER_BYTES and _MALLOC_TRIM is not None:
                if self._trimmer is None:
                    self._trimmer = threading.Thread(target=self._trim_loop, name="hnd-trim", daemon=True)
                    self._trimmer.start()
                self._trim.set()
        if self.on_change is not None:
            self.on_change(held)

    def _trim_loop(self) -> None:
        trim = _MALLOC_TRIM
        while trim is not None:
            self._trim.wait()
            self._trim.clear()
            time.sleep(self.TRIM_DELAY_S)  # the call ends meanwhile: gRPC lets go of its copies of the message
            trim(0)
            time.sleep(self.TRIM_INTERVAL_S)


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _malloc_trim()
