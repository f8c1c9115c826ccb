"""Annotated synthetic camera video: shapes moving over a static background, with sensor noise.

A static camera watching a few objects move is what the temporal codecs are for (H.264 P-frames, the
split's delta frames), and what a benchmark of them needs ground truth for. Each sequence has one
background (a scikit-image photo, resized, or the textured gradient of the still-image generator),
rectangles / ellipses / triangles (the still generator's categories) that move at constant speed and
bounce off the borders, and fresh Gaussian noise in every frame, as a camera sensor gives. Objects may
pass in front of each other: every annotation is the *visible* part (mask as COCO RLE, bbox and area
from it), so partly hidden objects are annotated as a COCO annotator would.

Layout (COCO 2017, so hnd-eval and the data code read it like any split)::

    OUT/val2017/000000100001.png ...              every frame, lossless, in order
    OUT/annotations/instances_val2017.json         images in frame order, with video_id / frame_index
    OUT/val2017.mp4                                the same frames as an H.264 recording (crf 12)

The annotation file also lists its sequences under "videos" (id, name, fps, size, frames, file_name), as
TAO / COCO-VID style files do. Output depends only on the arguments.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from hnd.common.files import atomic_write_text
from hnd.train.synthetic import SHAPE_CATEGORIES, SPLITS, gradient_background, rle_from_mask

PHOTOS = ("rocket", "coffee", "chelsea", "astronaut")
BACKGROUNDS = ("photo", "texture") + PHOTOS


@dataclass
class _Mover:
    category_id: int
    w: float
    h: float
    x: float
    y: float
    vx: float
    vy: float
    colour: tuple[int, int, int]
    apex: float  # triangles: apex x as a fraction of the width

    def step(self, width: int, height: int) -> None:
        self.x += self.vx
        self.y += self.vy
        if self.x < 1 or self.x + self.w > width - 1:
            self.vx = -self.vx
            self.x = min(max(self.x, 1.0), width - 1 - self.w)
        if self.y < 1 or self.y + self.h > height - 1:
            self.vy = -self.vy
            self.y = min(max(self.y, 1.0), height - 1 - self.h)

    def draw(self, target: Image.Image, fill) -> None:
        x0, y0, x1, y1 = self.x, self.y, self.x + self.w, self.y + self.h
        d = ImageDraw.Draw(target)
        if self.category_id == 1:
            d.rectangle([x0, y0, x1, y1], fill=fill)
        elif self.category_id == 2:
            d.ellipse([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([(x0 + self.apex * self.w, y0), (x1, y1), (x0, y1)], fill=fill)


def photo_background(name: str, width: int, height: int) -> np.ndarray:
    """A scikit-image sample photo (shipped with the package, no download), cropped to the aspect and resized."""
    from skimage import data

    img = getattr(data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    img = np.ascontiguousarray(img[..., :3])
    ih, iw = img.shape[:2]
    scale = min(iw / width, ih / height)
    cw, ch = int(width * scale), int(height * scale)
    x0, y0 = (iw - cw) // 2, (ih - ch) // 2
    crop = img[y0 : y0 + ch, x0 : x0 + cw]
    return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


def _sequence_background(rng: np.random.Generator, kind: str, index: int, width: int, height: int) -> np.ndarray:
    if kind == "texture":
        return gradient_background(rng, width, height)
    name = PHOTOS[index % len(PHOTOS)] if kind == "photo" else kind
    return photo_background(name, width, height)


def _movers(
    rng: np.random.Generator,
    bg: np.ndarray,
    count: int,
    width: int,
    height: int,
    speed: tuple[float, float],
    object_size: tuple[float, float],
) -> list[_Mover]:
    out = []
    for _ in range(count):
        h = rng.uniform(*object_size) * height
        w = rng.uniform(*object_size) * height * rng.uniform(0.7, 1.6)
        w = min(w, width - 4)
        x, y = rng.uniform(1, width - w - 1), rng.uniform(1, height - h - 1)
        angle = rng.uniform(0, 2 * np.pi)
        v = rng.uniform(*speed) * height / 240  # pixels per frame, scaled with the frame size
        patch = bg[int(y) : int(y + h) + 1, int(x) : int(x + w) + 1].reshape(-1, 3).mean(0)
        r, g, b = (int(c) for c in np.where(patch > 127, rng.integers(0, 60, 3), rng.integers(195, 256, 3)))
        out.append(
            _Mover(
                int(rng.integers(1, 4)),
                w,
                h,
                x,
                y,
                v * np.cos(angle),
                v * np.sin(angle),
                (r, g, b),
                float(rng.uniform(0.2, 0.8)),
            )
        )
    return out


def render_frame(
    bg: np.ndarray, movers: list[_Mover], noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[dict]]:
    """Draw one frame ([H, W, 3] uint8) and its annotations (visible masks; later objects in front)."""
    height, width = bg.shape[:2]
    canvas = Image.fromarray(bg)
    masks = []
    for m in movers:
        m.draw(canvas, m.colour)
        mask_img = Image.new("L", (width, height), 0)
        m.draw(mask_img, 1)
        masks.append(np.asarray(mask_img, dtype=bool))
    anns = []
    covered = np.zeros((height, width), dtype=bool)
    for m, mask in reversed(list(zip(movers, masks))):  # front to back: hide what the front covers
        visible = mask & ~covered
        covered |= mask
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        area = float(mask_utils.area(rle))
        if area < 16:
            continue
        x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
        anns.append(
            {
                "category_id": m.category_id,
                "segmentation": rle_from_mask(visible),
                "area": area,
                "bbox": [x, y, w, h],
                "iscrowd": 0,
            }
        )
    img = np.asarray(canvas, dtype=np.float32)
    if noise > 0:
        img = img + rng.normal(0.0, noise, size=img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), anns[::-1]


def make_synthetic_video(
    out: str | os.PathLike,
    frames: int = 40,
    size: tuple[int, int] = (320, 240),
    fps: float = 10.0,
    sequences: int = 1,
    objects: int = 3,
    background: str = "photo",
    noise: float = 3.0,
    speed: tuple[float, float] = (2.0, 6.0),
    seed: int = 0,
    split: str = "val",
    video: bool = True,
    object_size: tuple[float, float] = (0.12, 0.3),
) -> dict[str, Path]:
    """Write ``sequences`` annotated sequences of ``frames`` frames into split ``split`` under ``out``.

    size: (width, height), both even (H.264 4:2:0). background: "photo" (a different scikit-image photo
    per sequence), "texture" or a photo name (``PHOTOS``). noise: standard deviation of the per-frame
    Gaussian sensor noise, in 8-bit levels. speed: object speed range in pixels per frame at 240 rows.
    object_size: range of object heights (and base widths) as a fraction of the frame height.
    Returns {"images": folder, "annotations": json, "video": mp4 (when ``video``)}.
    """
    width, height = size
    check_video_args(size, frames, sequences, objects, noise, fps, background, object_size, split)
    folder, first_id = SPLITS[split]
    out = Path(out)
    (out / folder).mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    recording = Recording(out / folder, first_id)
    for s in range(sequences):
        rng = np.random.default_rng([seed, s, 11])
        bg = _sequence_background(rng, background, s, width, height)
        movers = _movers(rng, bg, objects, width, height, speed, object_size)
        for f in range(frames):
            img, anns = render_frame(bg, movers, noise, rng)
            for m in movers:
                m.step(width, height)
            recording.add_frame(img, anns, video_id=s + 1, frame_index=f)
        recording.add_video(s + 1, fps, size, frames, f"{folder}.mp4")
    ann_file = out / "annotations" / f"instances_{folder}.json"
    description = (
        f"hnd synthetic video seed {seed}: {sequences} x {frames} frames at {fps:g} fps, "
        f"{background} background, noise {noise:g}"
    )
    atomic_write_text(ann_file, json.dumps(recording.coco(description)))
    written = {"images": out / folder, "annotations": ann_file}
    if video:
        from hnd.common.video import write_video_file

        write_video_file(out / f"{folder}.mp4", recording.frames, fps=fps)
        written["video"] = out / f"{folder}.mp4"
    return written


def check_video_args(
    size: tuple[int, int],
    frames: int,
    sequences: int,
    objects: int,
    noise: float,
    fps: float,
    background: str,
    object_size: tuple[float, float],
    split: str,
) -> None:
    """ValueError for arguments ``make_synthetic_video`` cannot honour (an odd or tiny size, an unknown
    background or split, no frames, a negative count, an object size range out of (0, 0.9))."""
    width, height = size
    if width < 32 or height < 32 or width % 2 or height % 2:
        raise ValueError(f"size must be even and at least 32x32, got {width}x{height}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, not {background!r}")
    if frames < 1 or sequences < 1 or objects < 0 or noise < 0 or fps <= 0:
        raise ValueError("frames and sequences must be >= 1, objects and noise >= 0, fps > 0")
    if not 0 < object_size[0] <= object_size[1] < 0.9:
        raise ValueError(f"object_size must be 0 < min <= max < 0.9, got {object_size}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, not {split!r}")


@dataclass
class Recording:
    """A split being written: each frame saved as a PNG under ``folder`` (ids from ``first_id``, in order)
    and kept for the mp4, with its COCO image and annotation entries, and one entry per sequence."""

    folder: Path
    first_id: int
    images: list[dict[str, Any]] = field(default_factory=list)
    annotations: list[dict[str, Any]] = field(default_factory=list)
    videos: list[dict[str, Any]] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)

    def add_frame(self, img: np.ndarray, anns: list[dict], video_id: int, frame_index: int) -> None:
        """Saves ``img`` ([H, W, 3] uint8) and records it with ``anns`` (``render_frame``'s, given ids here)."""
        image_id = self.first_id + len(self.images)
        height, width = img.shape[:2]
        file_name = f"{image_id:012d}.png"
        Image.fromarray(img).save(self.folder / file_name)
        self.frames.append(img)
        self.images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": width,
                "height": height,
                "video_id": video_id,
                "frame_index": frame_index,
            }
        )
        for ann in anns:
            ann.update(id=len(self.annotations) + 1, image_id=image_id)
            self.annotations.append(ann)

    def add_video(self, video_id: int, fps: float, size: tuple[int, int], frames: int, file_name: str) -> None:
        """A sequence's "videos" entry (TAO / COCO-VID style); size: (width, height)."""
        width, height = size
        self.videos.append(
            {
                "id": video_id,
                "name": f"sequence{video_id}",
                "fps": fps,
                "width": width,
                "height": height,
                "frames": frames,
                "file_name": file_name,
            }
        )

    def coco(self, description: str) -> dict[str, Any]:
        """The COCO annotation document of everything recorded."""
        return {
            "info": {"description": description},
            "licenses": [],
            "videos": self.videos,
            "images": self.images,
            "annotations": self.annotations,
            "categories": SHAPE_CATEGORIES,
        }
