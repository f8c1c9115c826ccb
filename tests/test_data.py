"""COCO-format data: targets, flips, filtering, held-out split, grouped batches, bad files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from hnd.train.data import (
    COCO_KEYPOINT_FLIP,
    CocoDetection,
    GroupedBatchSampler,
    aspect_ratio_groups,
    build_dataset,
    collate_detection,
    flip_target,
    holdout_split,
    load_coco,
    make_loader,
    set_loader_epoch,
)
from hnd.common.errors import HndError
from hnd.train.synthetic import make_synthetic_coco


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    return root, make_synthetic_coco(root, images=8, val_images=4, size=(96, 64), empty_fraction=0.25, seed=5)


@pytest.fixture(scope="module")
def kp(tmp_path_factory):
    root = tmp_path_factory.mktemp("kp")
    return root, make_synthetic_coco(root, images=4, kind="keypoints", size=(96, 96), seed=5)


def _cfg(root, kind="instances"):
    splits = {
        s: SimpleNamespace(
            images=f"{s}2017", annotations=f"annotations/{kind}_{s}2017.json", remove_non_annotated_imgs=s == "train"
        )
        for s in ("train", "val")
    }
    return SimpleNamespace(root=str(root), splits=splits)


def test_targets(det):
    _, paths = det
    ds = CocoDetection(paths["train"]["images"], paths["train"]["annotations"], masks=True)
    coco = ds.coco
    for i in range(len(ds)):
        image, target = ds[i]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[target["image_id"]]))
        assert image.shape == (3, 64, 96) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
        n = len(anns)
        assert target["boxes"].shape == (n, 4) and target["labels"].dtype == torch.int64
        assert target["masks"].shape == (n, 64, 96) and target["masks"].dtype == torch.uint8
        for box, ann, mask in zip(target["boxes"], anns, target["masks"]):
            x, y, w, h = ann["bbox"]
            assert box.tolist() == pytest.approx([x, y, x + w, y + h])
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(int(v) for v in box)


def test_keypoint_targets_and_flip(kp):
    _, paths = kp
    ds = CocoDetection(paths["train"]["images"], paths["train"]["annotations"], keypoints=True, masks=True)
    image, target = ds[0]
    k = target["keypoints"]
    assert k.shape == (len(target["boxes"]), 17, 3) and (k[..., 2] == 2).all()
    flipped_img, flipped = flip_target(image, target)
    assert torch.equal(flipped_img, image.flip(-1))
    # Mirroring swaps left and right: the flipped left shoulder sits where the right one was, mirrored.
    assert torch.allclose(flipped["keypoints"][:, 5, 0], 96 - k[:, 6, 0])
    assert torch.allclose(flipped["keypoints"][:, 0, 1], k[:, 0, 1])
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    assert (flipped["boxes"][:, 2] > flipped["boxes"][:, 0]).all()
    back_img, back = flip_target(flipped_img, flipped)
    assert torch.equal(back_img, image)
    for key in ("boxes", "keypoints", "masks"):
        assert torch.allclose(back[key].float(), target[key].float())
    assert sorted(COCO_KEYPOINT_FLIP) == list(range(17))


def test_flip_is_seeded_per_epoch(det):
    _, paths = det
    ds = CocoDetection(paths["train"]["images"], paths["train"]["annotations"], flip_prob=0.5, seed=1)
    ds.set_epoch(3)
    a = [ds[i][0] for i in range(len(ds))]
    b = [ds[i][0] for i in range(len(ds))]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    ds.set_epoch(4)
    assert any(not torch.equal(x, ds[i][0]) for i, x in enumerate(a))


def test_remove_non_annotated_images(det):
    root, paths = det
    train = build_dataset(_cfg(root), "train", "faster_rcnn", train=True)
    val = build_dataset(_cfg(root), "val", "faster_rcnn")
    assert len(train) == 6 and len(val) == 4  # 2 of 8 train images are empty; val keeps its empty one
    assert train.flip_prob == 0.5 and val.flip_prob == 0.0
    assert not train.masks and build_dataset(_cfg(root), "val", "mask_rcnn").masks


def test_only_tiny_boxes_count_as_empty(tmp_path):
    # The original tested xyxy coordinates as if they were w/h; a box at x=50 of width 1 is degenerate.
    doc = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 64, "height": 64},
            {"id": 2, "file_name": "b.jpg", "width": 64, "height": 64},
        ],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 50, 1, 1], "area": 1, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "x"}],
    }
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(doc))
    from hnd.train.data import annotated_image_ids

    assert annotated_image_ids(load_coco(ann), [1, 2], keypoints=False) == [2]


def test_holdout_split():
    ids = list(range(100, 140))
    train, hold = holdout_split(ids, 0.25, seed=0)
    assert len(hold) == 10 and len(train) == 30 and not set(train) & set(hold)
    assert sorted(train + hold) == ids
    assert holdout_split(list(reversed(ids)), 0.25, seed=0) == (train, hold)
    assert holdout_split(ids, 0.25, seed=1)[1] != hold
    assert holdout_split(ids, 0.0, seed=0) == (ids, [])
    assert len(holdout_split([1, 2], 0.01, seed=0)[1]) == 1


def test_grouped_batch_sampler():
    ratios = [0.5, 2.0, 0.5, 2.0, 1.0, 0.5, 2.0, 0.5, 2.0, 0.5, 1.0]
    groups = aspect_ratio_groups(ratios, k=3)
    assert groups[0] == groups[2] != groups[1] == groups[3]
    sampler = GroupedBatchSampler(groups, batch_size=2, seed=7)
    sampler.set_epoch(0)
    first = list(sampler)
    assert first == list(sampler)
    assert len(first) == len(sampler) == 6
    full = [b for b in first if len(b) == 2]
    assert all(groups[b[0]] == groups[b[1]] for b in full)
    sampler.set_epoch(1)
    assert list(sampler) != first
    assert aspect_ratio_groups(ratios, k=0) == [0 if r < 1 else 1 for r in ratios]


def test_loader_batches(det):
    root, _ = det
    ds = build_dataset(_cfg(root), "train", "faster_rcnn", train=True, seed=2)
    loader = make_loader(ds, batch_size=4, train=True, aspect_ratio_group_factor=3, seed=2)
    set_loader_epoch(loader, 0)
    batches = list(loader)
    assert len(batches) == 2
    images, targets = batches[0]
    assert isinstance(images, tuple) and len(images) == len(targets) == 4
    eval_loader = make_loader(build_dataset(_cfg(root), "val", "faster_rcnn"), batch_size=3)
    ids = [t["image_id"] for _, ts in eval_loader for t in ts]
    assert ids == sorted(ids) and len(ids) == len(set(ids)) == 4
    assert collate_detection([(1, "a"), (2, "b")]) == ((1, 2), ("a", "b"))


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "malformed COCO annotation file"),
        ('{"images": 3, "annotations": [], "categories": []}', "needs 'images'"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "KeyError"),
        (
            '{"images": [], "annotations": [{"id": 1, "image_id": 9, "bbox": [0,0,1,1], "category_id": 1}],'
            ' "categories": []}',
            "unknown image 9",
        ),
    ],
)
def test_malformed_annotations(tmp_path, content, needle):
    ann = tmp_path / "bad.json"
    ann.write_text(content)
    with pytest.raises(HndError) as err:
        load_coco(ann)
    assert str(err.value).startswith(str(ann)) and needle in str(err.value)


def test_missing_paths(tmp_path, det):
    root, paths = det
    with pytest.raises(HndError, match="dataset root not found"):
        build_dataset(_cfg(tmp_path / "nowhere"), "train", "faster_rcnn")
    with pytest.raises(HndError, match="annotation file not found"):
        build_dataset(_cfg(root, kind="person_keypoints"), "train", "keypoint_rcnn")
    with pytest.raises(HndError, match="image folder not found"):
        CocoDetection(tmp_path / "nope", paths["train"]["annotations"])
    with pytest.raises(HndError, match="no split 'test'"):
        build_dataset(_cfg(root), "test", "faster_rcnn")
