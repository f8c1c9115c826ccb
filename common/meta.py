"""Plain data both sides share, without torch (the edge's ONNX path and config loading use it):
the model kinds, and SplitMeta, the image sizes that travel with a bottleneck."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BOTTLENECK_TYPES", "MODEL_KINDS", "SplitMeta", "concat_meta"]

MODEL_KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")
BOTTLENECK_TYPES = ("hnd", "entropic")


@dataclass(frozen=True)
class SplitMeta:
    """What the tail needs besides the bottleneck tensor; small plain data that travels on the wire.

    original_sizes: per image (height, width) of the frame the edge captured.
    image_sizes: per image (height, width) after the transform's resize, before batch padding.
    padded_size: (height, width) of the padded batch tensor the stem saw (a multiple of 32).
    """

    original_sizes: tuple[tuple[int, int], ...]
    image_sizes: tuple[tuple[int, int], ...]
    padded_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.image_sizes)

    def select(self, indices: list[int]) -> SplitMeta:
        """Meta of the images at ``indices`` (e.g. the frames a neural filter kept); same padded size."""
        return SplitMeta(
            original_sizes=tuple(self.original_sizes[i] for i in indices),
            image_sizes=tuple(self.image_sizes[i] for i in indices),
            padded_size=self.padded_size,
        )


def concat_meta(metas: list[SplitMeta]) -> SplitMeta:
    """Meta of a batch made by concatenating bottlenecks of the same padded size along dim 0."""
    padded = {m.padded_size for m in metas}
    if len(padded) != 1:
        raise ValueError(f"cannot batch bottlenecks of different padded sizes: {sorted(padded)}")
    return SplitMeta(
        original_sizes=tuple(s for m in metas for s in m.original_sizes),
        image_sizes=tuple(s for m in metas for s in m.image_sizes),
        padded_size=metas[0].padded_size,
    )
