"""hnd-train: teacher weights copied and frozen, the loss falls, resume is exact, bad input is one line."""

from __future__ import annotations

import json

import pytest
import torch

from hnd.common.config import load_config
from hnd.train.synthetic import make_synthetic_coco, write_config
from hnd.train.engine import TrainOptions, warmup_scheduler
from hnd.train.cli import main, train
from hnd.train.train import (
    build_distillation_models,
    distill_batch,
    distill_layer_names,
    freeze_except,
    set_distillation_modes,
)

SMALL = {
    "min_size": 128,
    "max_size": 128,
    "box_score_thresh": 0.0,
    "box_detections_per_img": 10,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("traindata")
    make_synthetic_coco(root, images=6, val_images=2, size=(128, 128), seed=3, empty_fraction=0.2)
    return root


def _config(data_root, path, method="ghnd", **train):
    layers = ["backbone.body.layer1"] if method == "hnd" else [f"backbone.body.layer{i}" for i in range(1, 5)]
    return write_config(
        "test/faster_rcnn-b3ch",
        data_root,
        path,
        model={"num_classes": 4, "params": SMALL},
        teacher={"num_classes": 4, "params": SMALL},
        train={"method": method, "distill_layers": layers, **train},
    )


def test_student_copies_and_freezes_teacher_and_loss_falls(data_root, tmp_path):
    cfg = load_config(_config(data_root, tmp_path / "c.yaml", method="hnd"))
    teacher, student = build_distillation_models(cfg)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    outside = [k for k in s_sd if not k.startswith("backbone.body.layer1.")]
    assert outside and all(torch.equal(s_sd[k], t_sd[k]) for k in outside)
    before = {k: v.clone() for k, v in s_sd.items()}

    names = freeze_except(student, cfg.train.trainable)
    assert names[0] == "backbone.body.conv1.weight" and all(
        n.startswith(("backbone.body.conv1.", "backbone.body.layer1.")) for n in names
    )
    set_distillation_modes(student, cfg.train.trainable)
    assert student.backbone.body.layer1.training and not student.backbone.body.bn1.training
    assert not student.backbone.body.layer2.training and not student.roi_heads.training
    teacher.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    from hnd.train.data import CocoDetection

    ds = CocoDetection(data_root / "train2017", data_root / "annotations/instances_train2017.json")
    images = [ds[0][0], ds[1][0]]
    layers = distill_layer_names(cfg)
    losses = []
    for _ in range(8):
        loss, _terms = distill_batch(student, teacher, images, layers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses

    after, t_after = student.state_dict(), teacher.state_dict()
    trained = [k for k in after if not torch.equal(after[k], before[k])]
    assert "backbone.body.conv1.weight" in trained
    assert all(k.startswith(("backbone.body.conv1.", "backbone.body.layer1.")) for k in trained), trained
    # Frozen weights (bn1's statistics, layer2..4, FPN, RPN, ROI heads) are still the teacher's.
    frozen = [k for k in outside if k != "backbone.body.conv1.weight"]
    assert all(torch.equal(after[k], t_after[k]) for k in frozen)
    assert all(torch.equal(t_after[k], t_sd[k]) for k in t_sd)


def test_warmup_factor():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = warmup_scheduler(opt, iterations=5, warmup_iters=1000)  # min(1000, 5 - 1) = 4 steps
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(5):
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-3) and lrs[2] == pytest.approx(1e-3 * 0.5 + 0.5) and lrs[4:] == [1.0, 1.0]


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_reproduces_uninterrupted_run(data_root, tmp_path):
    cfg = _config(data_root, tmp_path / "c.yaml", epochs=2, scheduler={"milestones": [1], "gamma": 0.1})
    opts = dict(select_by="loss", progress=False)
    full = train(cfg, TrainOptions(output_dir=str(tmp_path / "full"), **opts))
    train(cfg, TrainOptions(output_dir=str(tmp_path / "cut"), epochs=1, **opts))
    resumed = train(cfg, TrainOptions(output_dir=str(tmp_path / "cut"), resume=True, **opts))
    a, b = _state(tmp_path / "full/last.pt"), _state(tmp_path / "cut/last.pt")
    assert a["epoch"] == b["epoch"] == 1
    assert a["fingerprint"] == b["fingerprint"]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["lr_scheduler"] == b["lr_scheduler"] and a["lr_scheduler"]["_last_lr"] == [pytest.approx(1e-4)]
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in full["history"]] == [
        {k: v for k, v in r.items() if k not in timing} for r in resumed["history"]
    ]
    assert full["best_epoch"] == resumed["best_epoch"]
    best = _state(tmp_path / "full/best.pt")
    assert best["select_by"] == "loss" and best["epoch"] == full["best_epoch"]
    records = [json.loads(line) for line in (tmp_path / "full/log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert all(r["loss"] > 0 and r["images_per_s"] > 0 for r in records if r["kind"] == "iter")
    # Only the bottleneck and conv1 changed: the checkpoint's frozen weights are the teacher's.
    teacher, _ = build_distillation_models(load_config(cfg))
    t_sd = teacher.state_dict()
    assert all(
        torch.equal(a["model"][k], t_sd[k])
        for k in t_sd
        if not k.startswith(("backbone.body.layer1.", "backbone.body.conv1."))
    )


def test_cli_bbox_selection_and_supervised(data_root, tmp_path, capsys):
    cfg = _config(data_root, tmp_path / "c.yaml", method="hnd")
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "d"), "--no-progress"]) == 0
    assert "best bbox" in capsys.readouterr().out
    best = _state(tmp_path / "d/best.pt")
    assert best["select_by"] == "bbox" and 0.0 <= best["best_value"] <= 1.0
    # Supervised (org-style) training of the teacher with the detection losses.
    sup = write_config(
        "test/faster_rcnn-b3ch",
        data_root,
        tmp_path / "s.yaml",
        model={"num_classes": 4, "params": SMALL, "bottleneck_channels": None},
        teacher=None,
        train={
            "method": "supervised",
            "optimizer": {"type": "sgd", "lr": 0.001},
            "trainable": ["backbone.body.layer4", "rpn", "roi_heads"],
        },
    )
    assert (
        main(["--config", str(sup), "--output-dir", str(tmp_path / "s"), "--select-by", "last", "--no-progress"]) == 0
    )
    state = _state(tmp_path / "s/last.pt")
    assert state["method"] == "supervised" and state["model_info"]["bottleneck_channels"] is None


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("hnd-train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_input(data_root, tmp_path, capsys):
    # Missing dataset.
    cfg = write_config("test/faster_rcnn-b3ch", tmp_path / "missing", tmp_path / "a.yaml")
    assert main(["--config", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert str(tmp_path / "missing") in line and "not found" in line
    # Malformed annotation file.
    bad = tmp_path / "bad"
    (bad / "annotations").mkdir(parents=True)
    (bad / "annotations/instances_train2017.json").write_text('{"images": [')
    cfg = write_config("test/faster_rcnn-b3ch", bad, tmp_path / "b.yaml")
    assert main(["--config", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "instances_train2017.json: malformed COCO annotation file" in line
    # Teacher and student kinds disagree.
    cfg = write_config("test/faster_rcnn-b3ch", data_root, tmp_path / "c.yaml", teacher={"kind": "mask_rcnn"})
    assert main(["--config", str(cfg)]) == 2
    assert "disagree" in _one_error_line(capsys)
    # Resuming from a checkpoint of another model kind.
    from hnd.common.checkpoint import save_checkpoint
    from hnd.common.models import build_model

    out = tmp_path / "o"
    torch.manual_seed(0)
    save_checkpoint(out / "last.pt", build_model("keypoint_rcnn", 3))
    cfg = _config(data_root, tmp_path / "d.yaml", method="hnd")
    assert main(["--config", str(cfg), "--output-dir", str(out), "--resume"]) == 2
    line = _one_error_line(capsys)
    assert str(out / "last.pt") in line and "keypoint_rcnn" in line
    # Nothing to resume.
    assert main(["--config", str(cfg), "--output-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "nothing to resume" in _one_error_line(capsys)
    # A config file that does not exist.
    assert main(["--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in _one_error_line(capsys)


def test_train_bn_swaps_and_folds_back():
    from hnd.common.checkpoint import load_checkpoint, save_checkpoint
    from hnd.common.models import build_model
    from hnd.train.train import SwappedBatchNorm2d, fold_batchnorm, unfreeze_batchnorm

    torch.manual_seed(0)
    model = build_model("faster_rcnn", num_classes=4, min_size=64, max_size=64)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model.backbone.body(x)["3"]
    assert unfreeze_batchnorm(model) == 53  # bn1 + 3 per bottleneck block x 16 + 4 downsample
    model.train()
    with torch.no_grad():  # batch statistics move the running ones, as in from-scratch training
        model.backbone.body(x)
    model.eval()
    with torch.no_grad():
        trained = model.backbone.body(x)["3"]
    assert not torch.allclose(trained, ref)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, SwappedBatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert torch.allclose(folded.backbone.body(x)["3"], trained, rtol=1e-4, atol=1e-4)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(f"{d}/m.pt", folded)
        fresh = build_model("faster_rcnn", num_classes=4, min_size=64, max_size=64)
        load_checkpoint(f"{d}/m.pt", fresh)  # strict: same keys as a model from build_model
    with torch.no_grad():
        assert torch.equal(fresh.backbone.body(x)["3"], folded.backbone.body(x)["3"])
