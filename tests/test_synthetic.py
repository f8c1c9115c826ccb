"""The synthetic COCO-format generator: layout, determinism, annotations that agree with the pixels."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from hnd.train.synthetic import COCO_KEYPOINT_NAMES, make_synthetic_coco
from hnd.train.synthetic_cli import main


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _decode(ann, h, w):
    seg = ann["segmentation"]
    rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
    return mask_utils.decode(rle)


def test_layout_and_determinism(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", images=6, val_images=3, size=(96, 80), seed=3)
    make_synthetic_coco(tmp_path / "b", images=6, val_images=3, size=(96, 80), seed=3)
    make_synthetic_coco(tmp_path / "c", images=6, val_images=3, size=(96, 80), seed=4)
    assert a["train"]["annotations"] == tmp_path / "a/annotations/instances_train2017.json"
    assert a["val"]["images"] == tmp_path / "a/val2017"
    assert len(list((tmp_path / "a/train2017").glob("*.jpg"))) == 6
    assert len(list((tmp_path / "a/val2017").glob("*.jpg"))) == 3
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_detection_annotations_match_masks(tmp_path):
    paths = make_synthetic_coco(tmp_path, images=8, size=(128, 128), seed=1)
    coco = COCO(str(paths["train"]["annotations"]))
    assert {c["name"] for c in coco.dataset["categories"]} == {"rectangle", "ellipse", "triangle"}
    kinds = set()
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        mask = _decode(ann, img["height"], img["width"])
        ys, xs = np.nonzero(mask)
        assert ann["iscrowd"] == 0 and ann["area"] == mask.sum() > 0
        x, y, w, h = ann["bbox"]
        assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        kinds.add("polygon" if isinstance(ann["segmentation"], list) else "rle")
    assert kinds == {"polygon", "rle"}


def test_keypoint_persons(tmp_path):
    paths = make_synthetic_coco(tmp_path, images=4, kind="keypoints", size=(128, 128))
    assert paths["train"]["annotations"].name == "person_keypoints_train2017.json"
    doc = json.loads(paths["train"]["annotations"].read_text())
    (cat,) = doc["categories"]
    assert cat["id"] == 1 and cat["name"] == "person" and cat["keypoints"] == COCO_KEYPOINT_NAMES
    assert len(cat["skeleton"]) == 19
    assert doc["annotations"]
    for ann in doc["annotations"]:
        kps = np.array(ann["keypoints"]).reshape(17, 3)
        assert ann["num_keypoints"] == (kps[:, 2] > 0).sum() == 17
        x, y, w, h = ann["bbox"]
        assert (kps[:, 0] >= x - 2).all() and (kps[:, 0] <= x + w + 2).all()
        # Facing the viewer: the person's left shoulder is on the image's right.
        assert kps[5, 0] > kps[6, 0]


def test_empty_fraction_is_exact(tmp_path):
    paths = make_synthetic_coco(tmp_path, images=8, val_images=4, empty_fraction=0.25)
    for split, n_empty in (("train", 2), ("val", 1)):
        doc = json.loads(paths[split]["annotations"].read_text())
        used = {a["image_id"] for a in doc["annotations"]}
        assert sum(img["id"] not in used for img in doc["images"]) == n_empty


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--images", "3", "--size", "64x48", "--format", "png", "--seed", "2"]) == 0
    assert "annotations" in capsys.readouterr().out
    doc = json.loads((tmp_path / "annotations/instances_val2017.json").read_text())
    assert len(doc["images"]) == 2 and doc["images"][0]["width"] == 64 and doc["images"][0]["height"] == 48
    assert (tmp_path / "train2017" / doc["images"][0]["file_name"].replace("100001", "000001")).exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--size", "big"])
