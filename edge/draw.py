"""Draw detections on frames (boxes, masks, keypoints) so a person can see what the server found."""
from __future__ import annotations

import cv2
import numpy as np
import torch

# COCO person skeleton (1-based keypoint indices, as in the COCO annotations).
COCO_SKELETON = [(16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
                 (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7)]


def _color(label: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(label)
    return tuple(int(c) for c in rng.integers(64, 256, size=3))


def draw_detections(image: np.ndarray, dets: dict[str, torch.Tensor], min_score: float = 0.5) -> np.ndarray:
    """A copy of ``image`` ([H, W, 3] uint8 RGB) with detections scoring >= min_score drawn on it."""
    out = image.copy()
    keep = (dets["scores"] >= min_score).nonzero().flatten().tolist()
    for i in keep:
        color = _color(int(dets["labels"][i]))
        if "masks" in dets:
            m = dets["masks"][i, 0].numpy() > 0.5
            out[m] = (0.5 * out[m] + 0.5 * np.array(color)).astype(np.uint8)
        x1, y1, x2, y2 = (int(round(v)) for v in dets["boxes"][i].tolist())
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2)
        cv2.putText(out, f"{int(dets['labels'][i])} {float(dets['scores'][i]):.2f}", (x1, max(y1 - 4, 10)),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
        if "keypoints" in dets:
            kp = dets["keypoints"][i].numpy()
            for a, b in COCO_SKELETON:
                if a <= len(kp) and b <= len(kp) and kp[a - 1, 2] > 0 and kp[b - 1, 2] > 0:
                    cv2.line(out, tuple(int(v) for v in kp[a - 1, :2]), tuple(int(v) for v in kp[b - 1, :2]), color, 2)
            for x, y, v in kp:
                if v > 0:
                    cv2.circle(out, (int(x), int(y)), 3, color, -1)
    return out


class VideoSink:
    """Writes annotated frames to a video (mp4v); opened on the first frame's size."""

    def __init__(self, path: str, fps: float = 10.0) -> None:
        self.path = path
        self.fps = fps
        self.writer: cv2.VideoWriter | None = None
        self.size: tuple[int, int] | None = None

    def write(self, image: np.ndarray) -> None:
        if self.writer is None:
            h, w = image.shape[:2]
            self.size = (w, h)
            self.writer = cv2.VideoWriter(self.path, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                raise OSError(f"{self.path}: cannot open for writing")
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size)
        self.writer.write(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
