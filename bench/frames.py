"""hnd-bench's frames: a folder, a video, scikit-image's photos or ``--mixed`` synthetic scenes, in memory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hnd.edge.capture import ImageFiles, SourceError, VideoFile, sample_images
from hnd.edge.pipeline import to_tensor
from hnd.train.filter import filter_label
from hnd.train.synthetic import make_synthetic_coco

MIXED_SIZE = (320, 240)  # (width, height) of --mixed frames
MIXED_SEED = 0


def load_frames(images: str | None, video: str | None, count: int) -> tuple[list[np.ndarray], list[str]]:
    """The first ``count`` frames of a folder, a video or scikit-image's sample photos, in memory."""
    if images is not None:
        source = ImageFiles(images, max_frames=count)
    elif video is not None:
        source = VideoFile(video, max_frames=count)
    else:
        photos, names = sample_images()
        return photos[:count], names[:count]
    frames, names = [], []
    for f in source:
        if f.error is not None:
            raise SourceError(f.error)
        frames.append(f.image)
        names.append(Path(f.source).name if images is not None else f"{Path(f.source).name}#{f.index}")
    if not frames:
        raise SourceError(f"{images or video}: no frames")
    return frames, names


def mixed_frames(
    count: int,
    kind: str,
    folder: Path,
    empty_fraction: float = 0.5,
    size: tuple[int, int] = MIXED_SIZE,
    seed: int = MIXED_SEED,
) -> tuple[list[np.ndarray], list[str], list[bool]]:
    """``count`` synthetic frames, ``round(empty_fraction * count)`` of them empty scenes, in a seeded order.

    Written by ``hnd.train.synthetic.make_synthetic_coco`` (the val split) into ``folder`` and read back, so
    they are the JPEGs a filter trained on that generator sees. Frames with objects hold shapes, or stick
    figures for a keypoint model; an empty scene is the same kind of textured background without them.
    Returns (frames, names, labels): label True when the frame holds something to detect by the filter's
    training rule (``hnd.train.filter.filter_label``).
    """
    keypoints = kind == "keypoint_rcnn"
    written = make_synthetic_coco(
        folder,
        images=0,
        val_images=count,
        size=size,
        kind="keypoints" if keypoints else "detection",
        seed=seed,
        empty_fraction=empty_fraction,
    )["val"]
    doc = json.loads(Path(written["annotations"]).read_text())
    anns: dict[int, list[dict]] = {}
    for a in doc["annotations"]:
        anns.setdefault(a["image_id"], []).append(a)
    frames, names, labels = [], [], []
    for info in doc["images"]:
        with Image.open(Path(written["images"]) / info["file_name"]) as img:
            frames.append(np.array(img.convert("RGB")))  # a writable copy (torch.from_numpy warns otherwise)
        names.append(info["file_name"])
        labels.append(bool(filter_label(anns.get(info["id"], []), keypoints)))
    return frames, names, labels


@torch.inference_mode()
def resize_like_model(image: np.ndarray, transform: torch.nn.Module) -> np.ndarray:
    """The frame resized exactly as the model's GeneralizedRCNNTransform would (bilinear), as uint8 RGB."""
    resized, _ = transform.resize(to_tensor(image))
    return resized.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def scale_boxes(
    dets: dict[str, torch.Tensor], from_hw: tuple[int, int], to_hw: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """Detections on a resized frame mapped back onto the original frame."""
    sy, sx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
    out = dict(dets)
    boxes = torch.as_tensor(dets["boxes"])  # numpy as the edge reports it, or a tensor
    out["boxes"] = boxes * torch.tensor([sx, sy, sx, sy], dtype=boxes.dtype)
    return out
