"""COCO-format detection data: dataset, training transforms, batching, held-out split.

Follows torchvision's references/detection (ConvertCocoPolysToMask, GroupedBatchSampler,
_coco_remove_images_without_annotations) with two fixes of the original HND code:
an image counts as "only empty boxes" when its boxes have width or height <= 1
(the original tested xyxy coordinates as if they were w/h), and every random choice
(sampler order, flips) comes from generators seeded by (seed, epoch), so a resumed
run sees exactly the batches an uninterrupted run would, whatever the worker count.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Sampler

from hnd.common.config import DatasetConfig, TrainConfig
from hnd.common.errors import HndError

# COCO keypoint order mirrored left <-> right (torchvision references' flip_inds).
COCO_KEYPOINT_FLIP = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
MIN_KEYPOINTS_PER_IMAGE = 10  # torchvision references / the original drop images below this for training


def load_coco(ann_file: str | Path) -> COCO:
    """Read a COCO annotation file with pycocotools, quietly; raise HndError on any problem."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise HndError(ann_file, "annotation file not found")
    try:
        doc = json.loads(ann_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HndError(ann_file, f"malformed COCO annotation file ({exc})") from None
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("images"), list)
        or not isinstance(doc.get("categories"), list)
        or not isinstance(doc.get("annotations", []), list)
    ):
        raise HndError(
            ann_file, "malformed COCO annotation file (needs 'images', 'annotations' and 'categories' lists)"
        )
    try:
        for img in doc["images"]:
            int(img["id"]), int(img["width"]), int(img["height"]), str(img["file_name"])
        ids = {img["id"] for img in doc["images"]}
        for ann in doc.get("annotations", []):
            if ann["image_id"] not in ids:
                raise ValueError(f"annotation {ann.get('id')} refers to unknown image {ann['image_id']}")
            if len(ann["bbox"]) != 4:
                raise ValueError(f"annotation {ann.get('id')} bbox is not [x, y, w, h]")
            int(ann["category_id"]), int(ann["id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HndError(ann_file, f"malformed COCO annotation file ({type(exc).__name__}: {exc})") from None
    coco = COCO()
    coco.dataset = doc
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def has_valid_annotation(anns: list[dict], keypoints: bool) -> bool:
    """torchvision references' test, with boxes checked as [x, y, w, h] (w and h > 1)."""
    anns = [a for a in anns if not a.get("iscrowd", 0)]
    if not anns:
        return False
    if all(min(a["bbox"][2:]) <= 1 for a in anns):
        return False
    if not keypoints:
        return True
    visible = sum(sum(1 for v in a.get("keypoints", [])[2::3] if v > 0) for a in anns)
    return visible >= MIN_KEYPOINTS_PER_IMAGE


def annotated_image_ids(coco: COCO, ids: Sequence[int], keypoints: bool) -> list[int]:
    """The ids with at least one usable (non-crowd, non-degenerate) annotation, order kept."""
    return [i for i in ids if has_valid_annotation(coco.loadAnns(coco.getAnnIds(imgIds=[i])), keypoints)]


def holdout_split(ids: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train_ids, holdout_ids): a seeded permutation of the sorted ids.

    The held-out part is round(fraction * n) images (at least 1 when fraction > 0 and n > 1);
    both returned lists are sorted.
    """
    ids = sorted(ids)
    n_hold = int(round(fraction * len(ids)))
    if fraction > 0 and len(ids) > 1:
        n_hold = min(max(n_hold, 1), len(ids) - 1)
    perm = np.random.default_rng([seed, 0x401D]).permutation(len(ids))
    hold = set(perm[:n_hold].tolist())
    return ([i for k, i in enumerate(ids) if k not in hold], [i for k, i in enumerate(ids) if k in hold])


def flip_target(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Mirror an image [3, H, W] and its target left-right (boxes, masks, keypoints with COCO flip indices)."""
    width = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    if "boxes" in target:
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
    if "masks" in target:
        target["masks"] = target["masks"].flip(-1)
    if "keypoints" in target:
        kps = target["keypoints"][:, COCO_KEYPOINT_FLIP].clone()
        kps[..., 0] = width - kps[..., 0]
        kps[kps[..., 2] == 0] = 0  # invisible points stay all-zero, as in torchvision references
        target["keypoints"] = kps
    return image, target


class CocoDetection(Dataset):
    """COCO images as ``(image [3, H, W] float in [0, 1], target)`` for torchvision's R-CNNs.

    target: ``boxes`` [N, 4] float xyxy in pixels, ``labels`` [N] int64 (COCO category ids),
    ``image_id`` int, ``area`` [N], ``iscrowd`` [N]; plus ``masks`` [N, H, W] uint8 when
    ``masks`` and ``keypoints`` [N, K, 3] float (x, y, visibility) when ``keypoints``.
    Crowd annotations and boxes without area are dropped (torchvision references).

    ``flip_prob`` > 0 mirrors images for training; the decision for sample i in epoch e is
    drawn from a generator seeded by (seed, e, i), set the epoch with :meth:`set_epoch`.
    """

    def __init__(
        self,
        images_dir: str | Path,
        ann_file: str | Path | COCO,
        ids: Sequence[int] | None = None,
        masks: bool = False,
        keypoints: bool = False,
        flip_prob: float = 0.0,
        seed: int = 0,
        ann_path: str | Path | None = None,
    ) -> None:
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise HndError(self.images_dir, "image folder not found")
        self.coco = ann_file if isinstance(ann_file, COCO) else load_coco(ann_file)
        self.ann_path = Path(
            ann_path if ann_path is not None else (ann_file if not isinstance(ann_file, COCO) else "annotations")
        )
        self.ids = sorted(self.coco.imgs) if ids is None else list(ids)
        self.masks = masks
        self.keypoints = keypoints
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def image_info(self, index: int) -> dict:
        return self.coco.imgs[self.ids[index]]

    def aspect_ratios(self) -> list[float]:
        """width / height per sample, from the annotation file (no image decoding)."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def load_image(self, image_id: int) -> Image.Image:
        path = self.images_dir / self.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as exc:
            raise HndError(path, f"cannot read image ({exc})") from None

    def make_target(self, image_id: int, height: int, width: int) -> dict[str, Any]:
        anns = [a for a in self.coco.loadAnns(self.coco.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(min=0, max=width)
        boxes[:, 1::2].clamp_(min=0, max=height)
        keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
        target: dict[str, Any] = {
            "boxes": boxes[keep],
            "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
            "image_id": image_id,
            "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32)[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        }
        if self.masks:
            masks = [self._ann_to_mask(a, height, width) for a in anns]
            target["masks"] = (
                torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, height, width), dtype=torch.uint8)
            )[keep]
        if self.keypoints:
            kps = [a.get("keypoints", []) for a in anns]
            k = max((len(p) // 3 for p in kps), default=17)
            arr = torch.zeros((len(anns), k, 3), dtype=torch.float32)
            for j, p in enumerate(kps):
                if p:
                    arr[j, : len(p) // 3] = torch.tensor(p, dtype=torch.float32).view(-1, 3)
            target["keypoints"] = arr[keep]
        return target

    def _ann_to_mask(self, ann: dict, height: int, width: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:  # no mask in the file: fill the box, like a detector trained on boxes only would
            m = np.zeros((height, width), dtype=np.uint8)
            x, y, w, h = (int(round(v)) for v in ann["bbox"])
            m[y : y + h, x : x + w] = 1
            return m
        if isinstance(seg, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
        elif isinstance(seg.get("counts"), list):
            rle = mask_utils.frPyObjects(seg, height, width)
        else:
            rle = seg
        return mask_utils.decode(rle).astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        img = self.load_image(image_id)
        image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
        target = self.make_target(image_id, image.shape[1], image.shape[2])
        if self.flip_prob > 0:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < self.flip_prob:
                image, target = flip_target(image, target)
        return image, target


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> tuple[tuple[torch.Tensor, ...], tuple[dict, ...]]:
    """Keep images of different sizes apart: ((img, ...), (target, ...)); R-CNN's transform batches them."""
    return tuple(zip(*batch))  # type: ignore[return-value]


def _quantize(values: Sequence[float], bins: Sequence[float]) -> list[int]:
    bins = sorted(bins)
    return [bisect.bisect_right(bins, v) for v in values]


def aspect_ratio_groups(aspect_ratios: Sequence[float], k: int = 0) -> list[int]:
    """Group id per sample: aspect ratio quantised into 2k+1 log-spaced bins around 1 (k=0: one group)."""
    bins = (2 ** np.linspace(-1, 1, 2 * k + 1)).tolist() if k > 0 else [1.0]
    return _quantize(aspect_ratios, bins)


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose images share an aspect-ratio group (torchvision references), deterministic per epoch.

    Each epoch walks a permutation from a generator seeded by (seed, epoch) and emits a batch
    as soon as a group holds ``batch_size`` indices; leftovers are topped up from the same
    group's earlier indices, so there are exactly ceil(n / batch_size) batches, as in
    torchvision. Call :meth:`set_epoch` before iterating.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.group_ids = list(group_ids)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.group_ids) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        n = len(self.group_ids)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        buffers: dict[int, list[int]] = defaultdict(list)
        seen: dict[int, list[int]] = defaultdict(list)
        emitted = 0
        for idx in order:
            gid = self.group_ids[idx]
            buffers[gid].append(idx)
            seen[gid].append(idx)
            if len(buffers[gid]) == self.batch_size:
                yield buffers[gid]
                emitted += 1
                buffers[gid] = []
        # Leftovers: largest groups first, each topped up with its own already-used indices.
        for gid in sorted(buffers, key=lambda g: -len(buffers[g])):
            if emitted >= len(self):
                break
            batch = buffers[gid]
            if not batch:
                continue
            fill = [i for i in seen[gid] if i not in batch]
            batch = batch + fill[: self.batch_size - len(batch)]
            yield batch
            emitted += 1


def split_paths(dataset_cfg: DatasetConfig, split: str) -> tuple[Path, Path, bool]:
    """(images dir, annotation file, remove_non_annotated_imgs) of a configured split, resolved under root."""
    splits = getattr(dataset_cfg, "splits", None) or {}
    if split not in splits:
        raise HndError("config", f"dataset has no split {split!r} (configured: {', '.join(sorted(splits)) or 'none'})")
    s = splits[split]
    get = (lambda k, d=None: s.get(k, d)) if isinstance(s, dict) else (lambda k, d=None: getattr(s, k, d))
    root = Path(getattr(dataset_cfg, "root", None) or ".")
    images = Path(get("images"))
    ann = Path(get("annotations"))
    images = images if images.is_absolute() else root / images
    ann = ann if ann.is_absolute() else root / ann
    if not root.exists():
        raise HndError(root, "dataset root not found")
    return images, ann, bool(get("remove_non_annotated_imgs", False))


def build_dataset(
    dataset_cfg: DatasetConfig,
    split: str,
    kind: str,
    train: bool = False,
    seed: int = 0,
    ids: Sequence[int] | None = None,
    remove_empty: bool | None = None,
    masks: bool | None = None,
) -> CocoDetection:
    """The dataset of one configured split for a model kind (masks for mask_rcnn, keypoints for keypoint_rcnn).

    With ``train`` images are flipped with probability 0.5 and, when the split says
    remove_non_annotated_imgs, images without usable annotations are dropped.
    ``ids`` restricts the images (e.g. one side of :func:`holdout_split`); ``remove_empty``
    overrides the split's remove_non_annotated_imgs; ``masks`` overrides whether masks are decoded.
    """
    images, ann_file, configured = split_paths(dataset_cfg, split)
    remove_empty = configured if remove_empty is None else remove_empty
    coco = load_coco(ann_file)
    keypoints = kind == "keypoint_rcnn"
    chosen = sorted(coco.imgs) if ids is None else list(ids)
    if remove_empty:
        chosen = annotated_image_ids(coco, chosen, keypoints)
    if not chosen:
        raise HndError(ann_file, "no usable images in this split")
    masks = kind == "mask_rcnn" if masks is None else masks
    return CocoDetection(
        images,
        coco,
        ids=chosen,
        masks=masks,
        keypoints=keypoints,
        flip_prob=0.5 if train else 0.0,
        seed=seed,
        ann_path=ann_file,
    )


def make_loader(
    dataset: CocoDetection,
    batch_size: int,
    workers: int = 0,
    train: bool = False,
    aspect_ratio_group_factor: int = -1,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """DataLoader over ``dataset``: grouped, seeded batches for training, sequential for evaluation."""
    if train:
        k = aspect_ratio_group_factor if aspect_ratio_group_factor >= 0 else 0
        groups = aspect_ratio_groups(dataset.aspect_ratios(), k)
        sampler: GroupedBatchSampler | torch.utils.data.BatchSampler = GroupedBatchSampler(
            groups, batch_size, seed=seed
        )
    else:  # every image exactly once, in order
        sampler = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(dataset), batch_size, False)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_detection
    )


def make_train_loader(
    dataset: CocoDetection, cfg: DatasetConfig, tcfg: TrainConfig, workers: int = 0
) -> torch.utils.data.DataLoader:
    """The training loader of a recipe: ``tcfg``'s batch size and seed, ``cfg``'s aspect-ratio grouping."""
    return make_loader(
        dataset,
        tcfg.batch_size,
        workers,
        train=True,
        aspect_ratio_group_factor=cfg.aspect_ratio_group_factor,
        seed=tcfg.seed,
    )


def set_loader_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    """Seed the sampler order and the flips of ``epoch``."""
    if isinstance(loader.batch_sampler, GroupedBatchSampler):
        loader.batch_sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
