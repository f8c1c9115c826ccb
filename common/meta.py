"""Plain data and rules both sides share, without torch (the edge's ONNX path and config loading use
them): the model kinds, SplitMeta (the image sizes that travel with a bottleneck) and the one-checkpoint
rule (:func:`check_fingerprint`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hnd.common.errors import HndError

__all__ = ["BOTTLENECK_TYPES", "MODEL_KINDS", "FingerprintMismatch", "SplitMeta", "check_fingerprint", "concat_meta"]

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


class FingerprintMismatch(HndError):
    """Two sides hold different weights. The server answers it with FAILED_PRECONDITION; the edge stops
    with its one line. ``expected`` / ``given``: the two fingerprints (``given`` "" when none came)."""

    def __init__(self, message: str, expected: str, given: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.given = given


def check_fingerprint(
    expected: str,
    given: str | None,
    *,
    expected_is: str = "server",
    given_is: str = "edge",
    required: bool = True,
    shown: Callable[[str], str] = str,
) -> None:
    """The one-checkpoint rule: edge and server load the same weights, so their fingerprints
    (``hnd.common.checkpoint.fingerprint``, a hash of the state dict) are equal.

    A missing ``given`` (None or "") is a mismatch when ``required``: a bottleneck is only meaningful
    to the tail of the weights whose head made it. Where it is optional (an offloaded image, a reply
    without a weights tag) a missing one passes. ``expected_is`` / ``given_is`` name the sides in the
    message; ``shown`` renders ``given`` (the server bounds client text).
    """
    given = given or ""
    if given == expected or (not given and not required):
        return
    raise FingerprintMismatch(
        f"weights fingerprint mismatch: {given_is} {shown(given) if given else '(none)'}, {expected_is} {expected} "
        "(both sides must load the same checkpoint or seed)",
        expected,
        given,
    )
