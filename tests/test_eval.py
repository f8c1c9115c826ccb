"""COCO evaluation: perfect predictions score 1.0, empty ones 0 without crashing, hnd-eval end to end."""

from __future__ import annotations

import json

import pytest
import torch

from hnd.train.data import CocoDetection
from hnd.train.eval_cli import main
from hnd.train.evaluate import STAT_NAMES, coco_evaluate, evaluate_model, make_predictor, to_coco_results
from hnd.train.synthetic import make_synthetic_coco, write_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    det = make_synthetic_coco(root / "det", images=2, val_images=3, size=(128, 128), seed=11)
    kp = make_synthetic_coco(root / "kp", images=2, val_images=3, size=(128, 128), kind="keypoints", seed=11)
    return root, det, kp


def _ground_truth_as_predictions(ds, keypoints):
    outputs, ids = [], []
    for _, t in ds:
        n = len(t["labels"])
        out = {
            "boxes": t["boxes"],
            "labels": t["labels"],
            "scores": torch.linspace(1.0, 0.5, n),
            "masks": t["masks"][:, None].float(),
        }
        if keypoints:
            out["keypoints"] = t["keypoints"]
        outputs.append(out)
        ids.append(t["image_id"])
    return outputs, ids


@pytest.mark.parametrize("which", ["det", "kp"])
def test_perfect_predictions_score_one(data, which):
    _, det, kp = data
    paths = det if which == "det" else kp
    keypoints = which == "kp"
    ds = CocoDetection(paths["val"]["images"], paths["val"]["annotations"], masks=True, keypoints=keypoints)
    outputs, ids = _ground_truth_as_predictions(ds, keypoints)
    types = ["bbox", "segm"] + (["keypoints"] if keypoints else [])
    results = to_coco_results(outputs, ids, types)
    assert all(len(results[t]) == sum(len(o["scores"]) for o in outputs) for t in types)
    metrics, summaries = coco_evaluate(ds.coco, results, ids)
    for t in types:
        assert metrics[t]["AP"] == pytest.approx(1.0), t
        assert metrics[t]["AP50"] == pytest.approx(1.0) and metrics[t]["AP75"] == pytest.approx(1.0)
        assert len(summaries[t].splitlines()) == len(STAT_NAMES[t]) == (10 if t == "keypoints" else 12)


def test_empty_predictions_do_not_break_evaluation(data):
    _, det, _ = data
    ds = CocoDetection(det["val"]["images"], det["val"]["annotations"], masks=True)
    ids = list(ds.ids)
    # The original's filtered placeholder: 100 masks but no scores (IndexError in its segm evaluation).
    empty = {
        "boxes": torch.zeros(0, 4),
        "labels": torch.zeros(0, dtype=torch.int64),
        "scores": torch.zeros(0),
        "masks": torch.zeros(100, 1, 128, 128),
    }
    outputs = [empty] * len(ids)
    results = to_coco_results(outputs, ids, ["bbox", "segm"])
    assert results == {"bbox": [], "segm": []}
    metrics, _ = coco_evaluate(ds.coco, results, ids)
    assert metrics["bbox"]["AP"] == 0.0 and metrics["segm"]["AP"] == 0.0
    # One image with perfect detections, the others empty: recall is partial, precision perfect.
    perfect, _ = _ground_truth_as_predictions(ds, False)
    metrics, _ = coco_evaluate(ds.coco, to_coco_results([perfect[0]] + outputs[1:], ids, ["segm"]), ids)
    n0 = len(perfect[0]["labels"])
    assert 0.0 < metrics["segm"]["AR100"] <= n0 / sum(len(p["labels"]) for p in perfect) + 1e-6


def test_evaluate_random_student_and_split_paths(data):
    from hnd.common.models import build_model
    from hnd.train.data import make_loader

    _, det, _ = data
    ds = CocoDetection(det["val"]["images"], det["val"]["annotations"], masks=True)
    loader = make_loader(ds, batch_size=1)
    torch.manual_seed(0)
    model = build_model(
        "mask_rcnn", 3, num_classes=4, min_size=128, max_size=128, box_score_thresh=0.0, box_detections_per_img=10
    )
    full = evaluate_model(model, loader)
    assert set(full) >= {"bbox", "segm", "summary", "images", "seconds"} and full["images"] == 3
    for t in ("bbox", "segm"):
        assert all(v == -1.0 or 0.0 <= v <= 1.0 for v in full[t].values())
    split = evaluate_model(model, loader, split_mode=True)
    assert split["bbox"] == full["bbox"] and split["segm"] == full["segm"]  # exact split
    # 32-bit codec is lossless: the same detections through head -> codec -> tail.
    images = [ds[0][0]]
    with torch.no_grad():
        a = make_predictor(model)(images)[0]
        b = make_predictor(model, bits=32)(images)[0]
        c = make_predictor(model, bits=2)(images)[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert not (a["boxes"].shape == c["boxes"].shape and torch.equal(a["boxes"], c["boxes"]))


def _det_config(data, tmp_path):
    """The tiny Faster R-CNN config on the synthetic detection set (4 classes, 128 px)."""
    root, _, _ = data
    return write_config(
        "test/faster_rcnn-b3ch",
        root / "det",
        tmp_path / "c.yaml",
        model={"num_classes": 4, "params": {"min_size": 128, "max_size": 128}},
    )


def test_hnd_eval_cli(data, tmp_path, capsys):
    cfg = _det_config(data, tmp_path)
    out = tmp_path / "m.json"
    assert main(["--config", str(cfg), "--bits", "4", "--granularity", "channel", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "head -> 4-bit channel codec -> tail" in printed and printed.count("Average Precision") == 6
    metrics = json.loads(out.read_text())
    assert metrics["bits"] == 4 and metrics["images"] == 3 and set(metrics["bbox"]) == set(STAT_NAMES["bbox"])
    assert not list(tmp_path.glob(".m.json.*"))  # atomic write left no temp file


def test_hnd_eval_errors(data, tmp_path, capsys):
    from hnd.common.checkpoint import save_checkpoint
    from hnd.common.models import build_model

    root, det, _ = data
    cfg = write_config("test/faster_rcnn-b3ch", root / "det", tmp_path / "c.yaml")
    wrong = tmp_path / "kp.pt"
    torch.manual_seed(0)
    save_checkpoint(wrong, build_model("keypoint_rcnn", 3))
    cases = [
        (["--checkpoint", str(wrong)], "holds a keypoint_rcnn student"),
        (["--checkpoint", str(tmp_path / "none.pt")], "does not exist"),
        (["--split", "test"], "no split 'test'"),
    ]
    for extra, needle in cases:
        rc = main(["--config", str(cfg), *extra])
        err = capsys.readouterr().err
        assert rc == 2, extra
        lines = [ln for ln in err.splitlines() if ln.startswith("hnd-eval: error:")]
        assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err
    teacher_cfg = write_config(
        "test/faster_rcnn-b3ch", root / "det", tmp_path / "t.yaml", model={"bottleneck_channels": None}
    )
    assert main(["--config", str(teacher_cfg), "--bits", "8"]) == 2
    assert "need a student" in capsys.readouterr().err


def test_hnd_eval_precision(data, tmp_path, capsys):
    """--precision runs the tail as hnd-server --precision does: bf16 on CPU differs from fp32 (it ran) and
    is reported; fp16 needs CUDA and is refused in one line."""
    cfg = _det_config(data, tmp_path)
    out = tmp_path / "m.json"
    assert main(["--config", str(cfg), "--precision", "bf16", "--output", str(out)]) == 0
    assert "head -> tail (bf16 dense part)" in capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert metrics["precision"] == "bf16" and metrics["split_mode"] and metrics["images"] == 3
    assert main(["--config", str(cfg), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("hnd-eval: error:")]
    assert len(lines) == 1 and "needs a CUDA device" in lines[0] and "Traceback" not in err


def test_make_predictor_precision_changes_the_tail_only(tiny_model, images):
    model = tiny_model("faster_rcnn")
    with torch.no_grad():
        fp32 = make_predictor(model, split_mode=True)(images[:1])[0]
        bf16 = make_predictor(model, precision="bf16")(images[:1])[0]
    assert not torch.equal(fp32["boxes"], bf16["boxes"]) or not torch.equal(fp32["scores"], bf16["scores"])
