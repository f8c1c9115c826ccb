"""A small COCO-format dataset of drawn shapes or stick figures, for tests and demos.

Layout follows COCO 2017, so the same configs and data code read it::

    OUT/train2017/000000000001.jpg ...
    OUT/val2017/000000100001.jpg ...
    OUT/annotations/instances_{train,val}2017.json          (--kind detection)
    OUT/annotations/person_keypoints_{train,val}2017.json   (--kind keypoints)

Detection images hold non-overlapping rectangles (category 1), ellipses (2) and
triangles (3) on a textured background; keypoint images hold 17-keypoint stick
"person" figures (category 1, COCO keypoint names and skeleton). Every object has
a bbox [x, y, w, h], an instance mask (polygons for rectangles and triangles, RLE
for ellipses and persons), its area and iscrowd 0. Masks are rasterised from the
same geometry that is drawn, so they match the pixels. Output depends only on
the arguments (each image has its own seeded generator).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from hnd.common.files import atomic_write_text

SHAPE_CATEGORIES = [
    {"id": 1, "name": "rectangle", "supercategory": "shape"},
    {"id": 2, "name": "ellipse", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
]
COCO_KEYPOINT_NAMES = [
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
]
# 1-based pairs, as in COCO's person category.
COCO_SKELETON = [
    [16, 14],
    [14, 12],
    [17, 15],
    [15, 13],
    [12, 13],
    [6, 12],
    [7, 13],
    [6, 7],
    [6, 8],
    [7, 9],
    [8, 10],
    [9, 11],
    [2, 3],
    [1, 2],
    [1, 3],
    [2, 4],
    [3, 5],
    [4, 6],
    [5, 7],
]
PERSON_CATEGORY = {
    "id": 1,
    "name": "person",
    "supercategory": "person",
    "keypoints": COCO_KEYPOINT_NAMES,
    "skeleton": COCO_SKELETON,
}
# Joint positions of a figure facing the viewer, in a unit box (x right, y down);
# the person's left side is on the image's right, as in COCO.
_FIGURE = np.array(
    [
        [0.50, 0.09],
        [0.56, 0.06],
        [0.44, 0.06],
        [0.62, 0.08],
        [0.38, 0.08],
        [0.75, 0.25],
        [0.25, 0.25],
        [0.85, 0.42],
        [0.15, 0.42],
        [0.90, 0.58],
        [0.10, 0.58],
        [0.66, 0.58],
        [0.34, 0.58],
        [0.70, 0.78],
        [0.30, 0.78],
        [0.72, 0.97],
        [0.28, 0.97],
    ]
)
_LIMBS = [(5, 7), (7, 9), (6, 8), (8, 10), (11, 13), (13, 15), (12, 14), (14, 16)]
SPLITS = {"train": ("train2017", 1), "val": ("val2017", 100001)}


def gradient_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Smooth colour gradient plus noise, HxWx3 uint8."""
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    t = (
        np.linspace(0.0, 1.0, width)[None, :, None]
        if rng.random() < 0.5
        else np.linspace(0.0, 1.0, height)[:, None, None]
    )
    img = c0 + (c1 - c0) * t + rng.normal(0.0, 8.0, size=(height, width, 3))
    return np.clip(np.broadcast_to(img, (height, width, 3)), 0, 255).astype(np.uint8)


def _contrasting_colour(rng: np.random.Generator, bg: np.ndarray, box: Sequence[float]) -> tuple:
    x0, y0, x1, y1 = (int(v) for v in box)
    mean = bg[max(y0, 0) : max(y1, y0 + 1), max(x0, 0) : max(x1, x0 + 1)].reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.integers(0, 256, size=3)
        if np.abs(colour - mean).sum() > 180:
            break
    return tuple(int(c) for c in colour)


def _overlaps(box: Sequence[float], boxes: list, margin: float = 2.0) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] + margin and b[0] < x1 + margin and y0 < b[3] + margin and b[1] < y1 + margin for b in boxes)


def _place(
    rng: np.random.Generator,
    width: int,
    height: int,
    boxes: list,
    min_frac: float,
    max_frac: float,
    aspect: float | None = None,
) -> list | None:
    """Random box [x0, y0, x1, y1] inside the image not touching `boxes`, or None."""
    for _ in range(50):
        h = rng.uniform(min_frac, max_frac) * height
        w = h * aspect if aspect else rng.uniform(min_frac, max_frac) * width
        if w >= width - 2 or h >= height - 2:
            continue
        x0 = rng.uniform(1, width - w - 1)
        y0 = rng.uniform(1, height - h - 1)
        box = [x0, y0, x0 + w, y0 + h]
        if not _overlaps(box, boxes):
            return box
    return None


def rle_from_mask(mask: np.ndarray) -> dict:
    """A binary HxW mask as COCO compressed RLE with its counts as text (JSON-ready)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _annotation(segmentation, mask: np.ndarray, category_id: int) -> dict | None:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    area = float(mask_utils.area(rle))
    if area < 4:
        return None
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    return {"category_id": category_id, "segmentation": segmentation, "area": area, "bbox": [x, y, w, h], "iscrowd": 0}


def _draw_shape(
    rng: np.random.Generator, canvas: Image.Image, bg: np.ndarray, box: list, category_id: int
) -> dict | None:
    width, height = canvas.size
    colour = _contrasting_colour(rng, bg, box)
    x0, y0, x1, y1 = box
    mask_img = Image.new("L", (width, height), 0)
    if category_id == 2:  # ellipse: RLE of the rasterised mask
        for target, fill in ((canvas, colour), (mask_img, 1)):
            ImageDraw.Draw(target).ellipse([x0, y0, x1, y1], fill=fill)
        mask = np.asarray(mask_img, dtype=np.uint8)
        return _annotation(rle_from_mask(mask), mask, category_id)
    if category_id == 1:
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
    else:
        apex = rng.uniform(x0, x1)
        poly = [apex, y0, x1, y1, x0, y1]
    poly = [round(float(v), 2) for v in poly]
    ImageDraw.Draw(canvas).polygon(poly, fill=colour)
    # The mask is pycocotools' own rasterisation of the polygon, so bbox/area agree with COCO tools.
    mask = mask_utils.decode(mask_utils.frPyObjects([poly], height, width))[..., 0]
    return _annotation([poly], mask, category_id)


def _draw_person(rng: np.random.Generator, canvas: Image.Image, bg: np.ndarray, box: list) -> dict | None:
    width, height = canvas.size
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    joints = _FIGURE + rng.normal(0.0, 0.03, size=_FIGURE.shape)
    joints[[7, 9, 8, 10], 1] += rng.uniform(-0.25, 0.1, size=4)  # arms up or down
    joints = np.clip(joints, 0.02, 0.98)
    pts = np.stack([x0 + joints[:, 0] * bw, y0 + joints[:, 1] * bh], axis=1)
    colour = _contrasting_colour(rng, bg, box)
    lw = max(2, int(round(bh / 18)))
    head_r = max(2.0, 0.09 * bh)
    mask_img = Image.new("L", (width, height), 0)
    for target, fill in ((canvas, colour), (mask_img, 1)):
        d = ImageDraw.Draw(target)
        nx, ny = pts[0]
        d.ellipse([nx - head_r * 0.8, ny - head_r, nx + head_r * 0.8, ny + head_r], fill=fill)
        d.polygon([tuple(pts[i]) for i in (5, 6, 12, 11)], fill=fill)  # torso
        for a, b in _LIMBS + [(5, 6), (11, 12)]:
            d.line([tuple(pts[a]), tuple(pts[b])], fill=fill, width=lw)
        d.line([tuple(pts[0]), tuple((pts[5] + pts[6]) / 2)], fill=fill, width=lw)  # neck
    mask = np.asarray(mask_img, dtype=np.uint8)
    ann = _annotation(rle_from_mask(mask), mask, 1)
    if ann is None:
        return None
    kps: list[float] = []
    for x, y in pts:
        inside = 0 <= x < width and 0 <= y < height
        kps += [round(float(x), 2), round(float(y), 2), 2] if inside else [0, 0, 0]
    ann["keypoints"] = kps
    ann["num_keypoints"] = int(sum(1 for v in kps[2::3] if v > 0))
    return ann


def _make_image(
    rng: np.random.Generator, width: int, height: int, kind: str, empty: bool, max_objects: int
) -> tuple[Image.Image, list[dict]]:
    bg = gradient_background(rng, width, height)
    canvas = Image.fromarray(bg)
    anns: list[dict] = []
    if empty:
        return canvas, anns
    boxes: list = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        if kind == "keypoints":
            box = _place(rng, width, height, boxes, 0.45, 0.9, aspect=0.5)
            ann = None if box is None else _draw_person(rng, canvas, bg, box)
        else:
            box = _place(rng, width, height, boxes, 0.15, 0.45)
            ann = None if box is None else _draw_shape(rng, canvas, bg, box, int(rng.integers(1, 4)))
        if ann is not None:
            boxes.append(box)
            anns.append(ann)
    return canvas, anns


def make_synthetic_coco(
    out: str | os.PathLike,
    images: int = 16,
    size: tuple[int, int] = (128, 128),
    kind: str = "detection",
    seed: int = 0,
    empty_fraction: float = 0.0,
    val_images: int | None = None,
    max_objects: int = 3,
    image_format: str = "jpg",
) -> dict[str, dict[str, Path]]:
    """Write a COCO-2017-layout dataset under `out`; return {split: {"images": dir, "annotations": json}}.

    images: train images; val_images: val images (default max(2, images // 4)).
    size: (width, height) of every image. kind: "detection" (shapes) or "keypoints" (persons).
    empty_fraction: share of images (per split, exactly round(F*N)) drawn with no objects.
    """
    if kind not in ("detection", "keypoints"):
        raise ValueError(f"kind must be 'detection' or 'keypoints', not {kind!r}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], not {empty_fraction}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', not {image_format!r}")
    width, height = size
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    counts = {"train": images, "val": max(2, images // 4) if val_images is None else val_images}
    prefix = "person_keypoints" if kind == "keypoints" else "instances"
    categories = [PERSON_CATEGORY] if kind == "keypoints" else SHAPE_CATEGORIES
    written: dict[str, dict[str, Path]] = {}
    for split_index, (split, n) in enumerate(counts.items()):
        folder, first_id = SPLITS[split]
        (out / folder).mkdir(parents=True, exist_ok=True)
        order = np.random.default_rng([seed, split_index, 7]).permutation(n)
        empty = set(order[: int(round(empty_fraction * n))].tolist())
        info_images: list[dict[str, Any]] = []
        info_anns: list[dict[str, Any]] = []
        for i in range(n):
            rng = np.random.default_rng([seed, split_index, i])
            image_id = first_id + i
            img, anns = _make_image(rng, width, height, kind, i in empty, max_objects)
            file_name = f"{image_id:012d}.{image_format}"
            if image_format == "jpg":
                img.save(out / folder / file_name, quality=95)
            else:
                img.save(out / folder / file_name)
            info_images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
            for ann in anns:
                ann.update(id=len(info_anns) + 1 + 1_000_000 * split_index, image_id=image_id)
                info_anns.append(ann)
        ann_file = out / "annotations" / f"{prefix}_{folder}.json"
        doc = {
            "info": {"description": f"hnd synthetic {kind} seed {seed}"},
            "licenses": [],
            "images": info_images,
            "annotations": info_anns,
            "categories": categories,
        }
        atomic_write_text(ann_file, json.dumps(doc))
        written[split] = {"images": out / folder, "annotations": ann_file}
    return written


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(base: str | os.PathLike, root: str | os.PathLike, path: str | os.PathLike, **sections: Any) -> Path:
    """Copy config ``base`` (a file or bundled name such as ``test/faster_rcnn-b3ch``) to ``path``
    with ``dataset.root`` set to ``root`` and each keyword (a section) merged in, e.g.
    ``train={"epochs": 2}``. Returns ``path``. Used by tests and the synthetic experiment."""
    import yaml

    from hnd.common.config import resolve_config_path

    data = yaml.safe_load(resolve_config_path(base).read_text())
    data = _merge(_merge(data, sections), {"dataset": {"root": str(Path(root).resolve())}})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path
