"""Draw detections on frames (boxes, masks, keypoints) so a person can see what the server found."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# COCO person skeleton (1-based keypoint indices, as in the COCO annotations).
COCO_SKELETON = [
    (16, 14),
    (14, 12),
    (17, 15),
    (15, 13),
    (12, 13),
    (6, 12),
    (7, 13),
    (6, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (9, 11),
    (2, 3),
    (1, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
    (5, 7),
]


def _color(label: int) -> tuple[int, int, int]:
    r, g, b = (int(c) for c in np.random.default_rng(label).integers(64, 256, size=3))
    return r, g, b


def draw_detections(image: np.ndarray, dets: dict[str, Any], min_score: float = 0.5) -> np.ndarray:
    """A copy of ``image`` ([H, W, 3] uint8 RGB) with detections scoring >= min_score drawn on it.

    dets: numpy arrays as ``hnd.common.wire.detections_from_proto`` gives them (CPU torch tensors work too).
    """
    out = image.copy()
    dets = {k: np.asarray(v) for k, v in dets.items() if k != "masks_rle"}
    keep = np.flatnonzero(dets["scores"] >= min_score).tolist()
    for i in keep:
        color = _color(int(dets["labels"][i]))
        if "masks" in dets:
            m = dets["masks"][i, 0] > 0.5
            out[m] = (0.5 * out[m] + 0.5 * np.array(color)).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in dets["boxes"][i].tolist())
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        cv2.putText(
            out,
            f"{int(dets['labels'][i])} {float(dets['scores'][i]):.2f}",
            (x1, max(y1 - 4, 10)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45,
            color,
            1,
            cv2.LINE_AA,
        )
        if "keypoints" in dets:
            kp = dets["keypoints"][i]
            for a, b in COCO_SKELETON:
                if a <= len(kp) and b <= len(kp) and kp[a - 1, 2] > 0 and kp[b - 1, 2] > 0:
                    cv2.line(out, tuple(int(v) for v in kp[a - 1, :2]), tuple(int(v) for v in kp[b - 1, :2]), color, 2)
            for x, y, v in kp:
                if v > 0:
                    cv2.circle(out, (int(x), int(y)), 3, color, -1)
    return out


class VideoSink:
    """Writes annotated frames to a video (mp4v); opened on the first frame's size.

    An MP4 is readable only once closed (its index is written last), so a file is written under a hidden
    ``.partial.`` name and renamed when finished. ``segment_s`` cuts a long run into segments of that many
    seconds, ``STEM-YYYYmmddTHHMMSSZ.mp4`` each (a crash keeps every finished segment and loses at most the
    current one); ``keep`` bounds how many finished segments stay (the oldest are deleted).
    """

    def __init__(self, path: str, fps: float = 10.0, segment_s: float | None = None, keep: int | None = None) -> None:
        if segment_s is not None and segment_s <= 0:
            raise ValueError(f"--video-segment must be > 0 s, got {segment_s}")
        self.path = path
        self.fps = fps
        self.segment_s = segment_s
        self.keep = keep
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None
        self.current: Path | None = None  # the file being written (its final name)
        self.finished: list[str] = []
        self._opened_at = 0.0

    def _final_name(self) -> Path:
        p = Path(self.path)
        if self.segment_s is None:
            return p
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = p.with_name(f"{p.stem}-{stamp}{p.suffix}")
        n = 1
        while name.exists():  # two segments within one second: never overwrite
            name = p.with_name(f"{p.stem}-{stamp}-{n}{p.suffix}")
            n += 1
        return name

    def _partial(self) -> Path:
        return self.current.with_name(f".partial.{self.current.name}")

    def _open(self, size: tuple[int, int]) -> None:
        self.current = self._final_name()
        self.current.parent.mkdir(parents=True, exist_ok=True)
        self.writer = cv2.VideoWriter(str(self._partial()), cv2.VideoWriter.fourcc(*"mp4v"), self.fps, size)
        if not self.writer.isOpened():
            self.writer = None
            raise OSError(f"{self.current}: cannot open for writing")
        self._opened_at = time.monotonic()

    def write(self, image: np.ndarray) -> None:
        if self.size is None:
            h, w = image.shape[:2]
            self.size = (w, h)
        if (
            self.writer is not None
            and self.segment_s is not None
            and time.monotonic() - self._opened_at >= self.segment_s
        ):
            self._finish()
        if self.writer is None:
            self._open(self.size)
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size)
        self.writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def _finish(self) -> None:
        assert self.writer is not None and self.current is not None  # called only while a file is open
        self.writer.release()
        self.writer = None
        os.replace(self._partial(), self.current)
        self.finished.append(str(self.current))
        if self.keep is not None and self.segment_s is not None:
            p = Path(self.path)
            segments = sorted(p.parent.glob(f"{p.stem}-*{p.suffix}"), key=lambda f: f.stat().st_mtime)
            for old in segments[: -self.keep]:
                old.unlink(missing_ok=True)
            self.finished = [f for f in self.finished if Path(f).exists()]

    def close(self) -> None:
        if self.writer is not None:
            self._finish()
