"""Cut one R-CNN into the edge's Head and the server's Tail.

Filled in below; SplitMeta is defined first because the wire protocol carries it.
"""
from __future__ import annotations

from dataclasses import dataclass


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
