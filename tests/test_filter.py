"""Neural filter (GHND Ext4ResNet): layout and keys as the original, checkpoints, config, head API,
training to a useful ROC-AUC, the edge sending only the frames above threshold, empty results."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from hnd.common.build import build_architecture, build_model_from_config
from hnd.common.checkpoint import (
    CheckpointError,
    export_head,
    fingerprint,
    load_filter,
    load_head,
    save_checkpoint,
    save_filter,
)
from hnd.common.config import ConfigError, FilterConfig, config_from_dict, load_config
from hnd.common.neural_filter import FILTER_PREFIX, Ext4ResNet, attach_filter, empty_detections, get_filter
from hnd.common.split import head_state_dict, split_model

from conftest import FAST_PARAMS

KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")

# docs/ORIGINAL_MODELS.md section 4: Ext4ResNet(64) state-dict keys and shapes (BN ".*" = weight, bias, running stats).
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
ORIGINAL_KEYS = {
    "extractor.1.weight": (64, 64, 4, 4),
    "extractor.1.bias": (64,),
    **{f"extractor.2.{b}": (() if b == "num_batches_tracked" else (64,)) for b in _BN},
    "extractor.4.weight": (32, 64, 3, 3),
    "extractor.4.bias": (32,),
    **{f"extractor.5.{b}": (() if b == "num_batches_tracked" else (32,)) for b in _BN},
    "extractor.7.weight": (16, 32, 2, 2),
    "extractor.7.bias": (16,),
    **{f"extractor.8.{b}": (() if b == "num_batches_tracked" else (16,)) for b in _BN},
    "linear.weight": (2, 1024),
    "linear.bias": (2,),
}


def filtered_cfg(kind: str = "keypoint_rcnn", **filter_section):
    """The test config of ``kind`` (FAST_PARAMS) with a model.filter section."""
    cfg = load_config(f"test/{kind}-b3ch")
    return dataclasses.replace(
        cfg.model, params={**FAST_PARAMS, **cfg.model.params}, filter=FilterConfig(**filter_section)
    )


@pytest.fixture(scope="module")
def filtered_model():
    """``filtered_model(kind)``: the test student of ``kind`` with a seeded filter (threshold 0.01); read-only."""
    cache: dict[str, nn.Module] = {}

    def get(kind: str) -> nn.Module:
        if kind not in cache:
            cache[kind] = build_model_from_config(filtered_cfg(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def saved(tmp_path_factory, filtered_model, tiny_model):
    """Full checkpoints (saved once: they are large) of the keypoint student with and without its filter."""
    folder = tmp_path_factory.mktemp("filterckpt")
    out = {"filtered": folder / "filtered.pt", "plain": folder / "plain.pt"}
    out["filtered_fp"] = save_checkpoint(out["filtered"], filtered_model("keypoint_rcnn"))
    save_checkpoint(out["plain"], tiny_model("keypoint_rcnn"))
    return out


# ---------------------------------------------------------------------------------------------
# The module


def test_ext4resnet_layout_keys_and_params_match_the_original():
    ext = Ext4ResNet(64)
    sd = ext.state_dict()
    assert list(sd) == list(ORIGINAL_KEYS) and len(sd) == 23
    assert {k: tuple(v.shape) for k, v in sd.items()} == ORIGINAL_KEYS
    assert sum(p.numel() for p in ext.parameters()) == 88_402
    ex = ext.extractor
    assert [type(m).__name__ for m in ex] == [
        "AdaptiveAvgPool2d",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
        "AdaptiveAvgPool2d",
    ]
    assert ex[0].output_size == (64, 64) and ex[10].output_size == (8, 8)
    assert [(c.kernel_size, c.stride, c.bias is not None) for c in (ex[1], ex[4], ex[7])] == [
        ((4, 4), (2, 2), True),
        ((3, 3), (2, 2), True),
        ((2, 2), (1, 1), True),
    ]
    assert (ext.linear.in_features, ext.linear.out_features) == (1024, 2)

    x = torch.randn(3, 64, 37, 51)  # any stem size
    ext.train()
    logits = ext(x)
    ext.eval()
    probs = ext(x)
    assert logits.shape == probs.shape == (3, 2)
    assert torch.allclose(probs.sum(1), torch.ones(3)) and not torch.allclose(logits.sum(1), torch.ones(3))
    assert torch.allclose(ext.probability(x), probs[:, 1]) and ext.probability(x).shape == (3,)


def test_model_without_filter_keeps_its_keys_and_fingerprint_attached_adds_23(tiny_model):
    plain = tiny_model("keypoint_rcnn")  # built from the same config without a filter section
    assert get_filter(plain) is None and not any("ext_classifier" in k for k in plain.state_dict())
    with_filter = build_model_from_config(filtered_cfg(threshold=0.2))
    sd, sd0 = with_filter.state_dict(), plain.state_dict()
    extra = [k for k in sd if k not in sd0]
    assert sorted(extra) == sorted(FILTER_PREFIX + k for k in ORIGINAL_KEYS)
    assert extra[0] == "backbone.body.layer1.encoder.ext_classifier.extractor.1.weight"
    assert all(torch.equal(sd[k], sd0[k]) for k in sd0)  # the detector's seeded weights are unchanged
    assert fingerprint(with_filter) != fingerprint(plain)
    assert get_filter(with_filter).threshold == 0.2 and not get_filter(with_filter).training
    teacher_like = SimpleNamespace(backbone=SimpleNamespace(body=SimpleNamespace(layer1=nn.Identity())))
    with pytest.raises(TypeError, match="student"):
        attach_filter(teacher_like)


def test_head_holds_the_filter_export_and_fingerprint(tiny_model, filtered_model, saved, tmp_path):
    model = filtered_model("keypoint_rcnn")
    head, tail = split_model(model)
    assert head.filter is get_filter(model) and head.filter_threshold == 0.01
    assert not any("ext_classifier" in n for n, _ in tail.named_parameters())
    hsd = head_state_dict(head)
    assert sum(k.startswith(FILTER_PREFIX) for k in hsd) == 23
    full, fp = saved["filtered"], saved["filtered_fp"]
    assert fp == fingerprint(model) != fingerprint(tiny_model("keypoint_rcnn"))
    export = tmp_path / "head.pt"
    assert export_head(full, export) == fp
    exported = torch.load(export, weights_only=True)["model"]
    assert sum(k.startswith(FILTER_PREFIX) for k in exported) == 23
    # The edge's head from the export: filter included, the full model's fingerprint.
    fresh, _ = split_model(build_architecture(filtered_cfg()))
    assert load_head(export, fresh) == fp
    assert torch.equal(fresh.filter.linear.weight, head.filter.linear.weight)
    # A full checkpoint with its filter loads into a filter config without a filter file.
    again = build_model_from_config(dataclasses.replace(filtered_cfg(), random_weights=None, checkpoint=str(full)))
    assert fingerprint(again) == fp


def _original_filter_file(path: Path, ext: Ext4ResNet) -> None:
    """The original's ext checkpoint: Ext4ResNet keys without prefix plus its training extras."""
    opt = torch.optim.SGD(ext.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [15, 25], 0.1)
    assert isinstance(sched.state_dict()["milestones"], Counter)
    torch.save(
        {
            "model": ext.state_dict(),
            "optimizer": opt.state_dict(),
            "best_value": np.float64(0.93),
            "lr_scheduler": sched.state_dict(),
            "config": {"student_model": {"ext_config": {"threshold": 0.01}}},
            "args": argparse.Namespace(
                config="config/ext/keypoint_rcnn-backbone_ext_resnet50-b3ch.yaml", min_recall=0.9, world_size=1
            ),
        },
        path,
    )


def test_original_and_our_filter_checkpoints_load(tmp_path, filtered_model, saved):
    torch.manual_seed(7)
    trained = Ext4ResNet()
    for m in trained.modules():  # make running statistics differ from a fresh module
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(123)
    original = tmp_path / "coco2017-keypoint_rcnn-backbone_ext_custom_resnet50-b3ch.pt"
    _original_filter_file(original, trained)
    model = build_model_from_config(filtered_cfg(checkpoint=str(original)))
    assert fingerprint(get_filter(model)) == fingerprint(trained)
    # Our format: the same layout plus a fingerprint; a head export or full checkpoint works as a filter file too.
    ours = tmp_path / "ours.pt"
    fp = save_filter(ours, trained, best_value=0.93)
    raw = torch.load(ours, weights_only=True)
    assert raw["format"] == "hnd-filter" and set(raw["model"]) == set(ORIGINAL_KEYS) and raw["fingerprint"] == fp
    ext = Ext4ResNet()
    load_filter(ours, ext)
    assert fingerprint(ext) == fp
    seeded = get_filter(filtered_model("keypoint_rcnn"))
    ext = Ext4ResNet()
    load_filter(saved["filtered"], ext)  # a full checkpoint holding a filter
    assert fingerprint(ext) == fingerprint(seeded)
    # A filter file overrides the filter weights of a full checkpoint (loaded last).
    m2 = build_model_from_config(
        dataclasses.replace(filtered_cfg(checkpoint=str(ours)), random_weights=None, checkpoint=str(saved["filtered"]))
    )
    assert fingerprint(get_filter(m2)) == fp != fingerprint(get_filter(filtered_model("keypoint_rcnn")))


def test_filter_errors_are_one_clear_line(tmp_path, saved):
    student, with_filter = saved["plain"], saved["filtered"]
    flt = tmp_path / "filter.pt"
    save_filter(flt, Ext4ResNet())
    plain_cfg = dataclasses.replace(filtered_cfg(), filter=None, random_weights=None)

    with pytest.raises(CheckpointError, match="holds no neural filter weights.*model.filter.checkpoint"):
        build_model_from_config(dataclasses.replace(filtered_cfg(), random_weights=None, checkpoint=str(student)))
    with pytest.raises(CheckpointError, match="holds a neural filter.*add a model.filter section"):
        build_model_from_config(dataclasses.replace(plain_cfg, checkpoint=str(with_filter)))
    with pytest.raises(CheckpointError, match="only neural filter weights; name it in model.filter.checkpoint"):
        build_model_from_config(dataclasses.replace(plain_cfg, checkpoint=str(flt)))
    with pytest.raises(ConfigError, match="filter.checkpoint .* does not exist"):
        build_model_from_config(filtered_cfg(checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(CheckpointError, match="holds no neural filter weights"):
        load_filter(student, Ext4ResNet())
    bad = tmp_path / "bad.pt"
    sd = Ext4ResNet().state_dict()
    sd["linear.weight"] = torch.zeros(3, 1024)
    torch.save({"model": sd}, bad)
    with pytest.raises(CheckpointError, match=r"linear.weight has shape \(3, 1024\)"):
        load_filter(bad, Ext4ResNet())
    tampered = torch.load(flt, weights_only=True)
    tampered["model"]["linear.bias"] += 1
    torch.save(tampered, bad)
    ext = Ext4ResNet()
    before = fingerprint(ext)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_filter(bad, ext)
    assert fingerprint(ext) == before

    base = {"kind": "keypoint_rcnn", "bottleneck_channels": 3, "random_weights": 0}
    with pytest.raises(ConfigError, match="model.filter needs a student"):
        config_from_dict({"model": {"kind": "keypoint_rcnn", "random_weights": 0, "filter": {}}})
    with pytest.raises(ConfigError, match=r"threshold must be a probability in \[0, 1\]"):
        config_from_dict({"model": {**base, "filter": {"threshold": 1.5}}})
    with pytest.raises(ConfigError, match="unknown key model.filter.treshold"):
        config_from_dict({"model": {**base, "filter": {"treshold": 0.1}}})
    with pytest.raises(ConfigError, match="train.method filter needs a model.filter section"):
        config_from_dict({"model": base, "train": {"method": "filter"}})
    with pytest.raises(ConfigError, match="teacher.filter"):
        config_from_dict({"model": base, "teacher": {"kind": "keypoint_rcnn", "random_weights": 1, "filter": {}}})
    assert load_config("ext/keypoint_rcnn-b3ch").model.filter == FilterConfig(
        0.01, "./resource/ckpt/ext/coco2017-keypoint_rcnn-backbone_ext_custom_resnet50-b3ch.pt"
    )


# ---------------------------------------------------------------------------------------------
# Head API


@torch.inference_mode()
def test_encode_filtered_runs_the_stem_once_and_the_encoder_on_kept_frames(images, filtered_model, tiny_model):
    head, _ = split_model(filtered_model("faster_rcnn"))
    batch, meta = head.preprocess(images)
    features = head.stem(batch)
    p = head.filter_probability(features)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    everything = head.encode_filtered(batch, 0.0)
    assert everything.keep.all() and torch.equal(everything.z, head.encode(batch))  # same as without the filter
    assert torch.equal(everything.probability, p)
    middle = float(p.sort().values[1])  # keeps the two frames at or above the median probability
    some = head.encode_filtered(batch, middle)
    assert some.kept == (p >= middle).nonzero().flatten().tolist() and len(some.kept) == 2
    assert torch.allclose(some.z, head.encode(batch)[some.keep], atol=1e-5)
    sub = meta.select(some.kept)
    assert sub.padded_size == meta.padded_size and sub.image_sizes == tuple(meta.image_sizes[i] for i in some.kept)
    none = head.encode_filtered(batch, 1.0 + 1e-6)
    assert none.z is None and not none.keep.any()
    plain, _ = split_model(tiny_model("faster_rcnn"))
    assert plain.filter is None and plain.filter_threshold is None
    with pytest.raises(RuntimeError, match="no neural filter"):
        plain.filter_probability(features)


# ---------------------------------------------------------------------------------------------
# Labels and ROC


def test_label_rule():
    from hnd.train.filter import filter_label

    box = {"bbox": [10, 10, 30, 40], "iscrowd": 0}
    kps = [5, 5, 2] * 10 + [0, 0, 0] * 7
    assert filter_label([]) == 0
    assert filter_label([box]) == 1
    assert filter_label([{"bbox": [10, 10, 1, 40]}, {"bbox": [10, 10, 30, 0.5]}]) == 0  # no extent
    # The original's xyxy misreading would have called a 30x40 box at x2 = 0.5 "empty"; width and height decide.
    assert filter_label([{"bbox": [0, 0, 0.5, 0.8]}]) == 0 and filter_label([{"bbox": [0, 0, 2, 2]}]) == 1
    assert filter_label([dict(box, iscrowd=1)]) == 0
    assert filter_label([box], keypoints=True) == 0
    assert filter_label([dict(box, keypoints=kps)], keypoints=True) == 1  # exactly 10 visible
    assert filter_label([dict(box, keypoints=[5, 5, 2] * 9 + [0, 0, 0] * 8)], keypoints=True) == 0
    assert filter_label([dict(box, keypoints=[5, 5, 2] * 5 + [0, 0, 0] * 12)] * 2, keypoints=True) == 1  # in total


def test_roc_auc_threshold_table_and_operating_point():
    from hnd.train.filter import operating_point, rates_at, roc_auc, roc_curve, threshold_table

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.random(200) * 0.6 + 0.4 * y, 2)  # ties on purpose
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(y, s) == pytest.approx(pairs, abs=1e-12)  # Mann-Whitney
    fpr, tpr, th = roc_curve(y, s)
    assert th[0] == np.inf and (np.diff(th) < 0).all() and (np.diff(tpr) >= 0).all() and tpr[-1] == fpr[-1] == 1
    table = threshold_table(y, s)
    for row in table[::17]:
        assert row["tpr"] == pytest.approx((pos >= row["threshold"]).mean())
        assert row["fpr"] == pytest.approx((neg >= row["threshold"]).mean())
        assert row["dropped"] == pytest.approx((s < row["threshold"]).mean())
    op = operating_point(table, 0.9)
    assert op["tpr"] >= 0.9 and all(r["tpr"] < 0.9 for r in table if r["threshold"] > op["threshold"])
    assert operating_point(table, 1.0)["threshold"] == pos.min()
    assert rates_at(y, s, 0.0)["dropped"] == 0.0
    assert roc_auc([1, 1], [0.2, 0.3]) != roc_auc([1, 1], [0.2, 0.3])  # NaN with one class
    assert roc_auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0 and roc_auc([0, 1], [0.9, 0.1]) == 0.0


# ---------------------------------------------------------------------------------------------
# Empty results


def _no_detections(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    model.roi_heads.score_thresh = 1.01  # nothing passes: the model's own empty result
    return model


@pytest.mark.parametrize("kind", KINDS)
@torch.inference_mode()
def test_empty_result_has_the_shape_of_the_models_own_and_passes_coco_evaluation(tiny_model, kind, tmp_path):
    from hnd.train.evaluate import IOU_TYPES, coco_evaluate, to_coco_results
    from hnd.train.filter import make_filtered_predictor
    from hnd.train.data import CocoDetection
    from hnd.train.synthetic import make_synthetic_coco

    model = tiny_model(kind)
    img = torch.rand(3, 90, 120)
    own = _no_detections(model)([img])[0]
    empty = empty_detections(kind, (90, 120), 17)
    assert own.keys() == empty.keys()
    for k in own:
        assert own[k].shape == empty[k].shape and own[k].dtype == empty[k].dtype, k

    # A filter that drops everything: every image gets the empty result, and COCO evaluation runs.
    filtered = copy.deepcopy(model)
    attach_filter(filtered)
    data = make_synthetic_coco(
        tmp_path,
        images=0,
        val_images=2,
        size=(96, 96),
        kind="keypoints" if kind == "keypoint_rcnn" else "detection",
        seed=2,
    )
    ds = CocoDetection(data["val"]["images"], data["val"]["annotations"])
    predict = make_filtered_predictor(filtered, threshold=1.01)
    outputs = [predict([ds[i][0]])[0] for i in range(len(ds))]
    assert all(o["scores"].numel() == 0 for o in outputs)
    if kind == "mask_rcnn":
        assert outputs[0]["masks"].shape == (0, 1, 96, 96)
    metrics, _ = coco_evaluate(ds.coco, to_coco_results(outputs, ds.ids, IOU_TYPES[kind]), ds.ids)
    assert set(metrics) == set(IOU_TYPES[kind]) and all(m["AP"] <= 0 for m in metrics.values())


# ---------------------------------------------------------------------------------------------
# Edge runtime


@pytest.mark.parametrize("mode", ["split", "local"])
def test_edge_drops_frames_below_threshold_with_empty_results_shaped_as_the_servers(filtered_model, mode):
    from runtime_support import client_for, frames, run_edge, serving

    model = filtered_model("mask_rcnn")
    head, _ = split_model(model)
    imgs = frames(4, seed=3)
    from hnd.edge.pipeline import to_tensor

    with torch.inference_mode():
        probs = [float(head.filter_probability(head.stem(head.preprocess([to_tensor(f)])[0]))[0]) for f in imgs]
    threshold = float(np.median(probs))
    kept = [p >= threshold for p in probs]
    assert 0 < sum(kept) < len(kept)
    if mode == "local":
        summary, records, dets = run_edge(model, None, imgs, mode="local", filter_threshold=threshold)
        with torch.inference_mode():
            expected = [model([to_tensor(f)]) for f in imgs]
        mask_dtype = np.float32
    else:
        with serving(model) as server:
            client = client_for(server)
            before = server.runner.images_computed
            summary, records, dets = run_edge(model, client, imgs, filter_threshold=threshold)
            assert server.runner.images_computed - before == sum(kept)
            # The server's own empty result (every detection below the score threshold), through the wire.
            _, _, own = run_edge(model, client, imgs[:1], score_threshold=1.1)
            client.close()
        expected = None
        mask_dtype = own[0][0]["masks"].dtype
        assert own[0][0]["masks"].shape[:2] == (0, 1)
    assert [r["filtered"] for r in records] == [not k for k in kept]
    assert [r["filter_probability"] for r in records] == pytest.approx(probs, abs=1e-5)
    assert all(r["status"] == "OK" and r["ms"]["filter"] > 0 for r in records)
    for r, d, f, k in zip(records, dets, imgs, kept):
        if k:
            assert d[0]["scores"].size > 0
            if expected is not None:  # local mode through head + tail equals the full model
                exp = expected[records.index(r)][0]
                assert all(np.array_equal(d[0][key], exp[key].numpy()) for key in exp)
            continue
        assert r["bytes"] == {"payload": 0, "message": 0} and "network_server" not in r["ms"]
        assert r["detections"] == [{"count": 0, "boxes": [], "labels": [], "scores": []}]
        assert d[0]["masks"].shape == (0, 1, *f.shape[:2]) and d[0]["masks"].dtype == mask_dtype
        assert d[0]["boxes"].shape == (0, 4) and d[0]["labels"].dtype == np.int64
    stats = summary.as_dict()["filter"]
    assert (stats["sent"], stats["filtered"], summary.answered) == (sum(kept), len(kept) - sum(kept), len(kept))
    if mode == "split":
        sent_payload = [r["bytes"]["payload"] for r in records if not r["filtered"]]
        assert stats["payload_bytes_saved_est"] == pytest.approx(np.mean(sent_payload) * stats["filtered"])
        assert summary.payload_bytes.count == len(sent_payload)  # bounded memory: a sketch, not a list
        assert summary.payload_bytes.mean == pytest.approx(np.mean(sent_payload))
    assert "filtered" in summary.format()


# ---------------------------------------------------------------------------------------------
# Training (hnd-train), evaluation (hnd-eval) and hnd-edge on a synthetic dataset, half of it empty


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from hnd.train.synthetic import make_synthetic_coco, write_config
    from hnd.train.cli import main as train_main

    root = tmp_path_factory.mktemp("filterdata")
    make_synthetic_coco(
        root / "data", images=64, val_images=32, size=(128, 128), kind="keypoints", seed=5, empty_fraction=0.5
    )
    config = write_config(
        "test/keypoint_rcnn-b3ch-filter",
        root / "data",
        root / "filter.yaml",
        model={"filter": {"threshold": 0.01, "checkpoint": str(root / "filter.pt")}},
    )
    assert train_main(["--config", str(config), "--no-progress", "--output-dir", str(root / "run")]) == 0
    (root / "run" / "best.pt").rename(root / "filter.pt")
    return root, config


def test_hnd_train_and_hnd_eval_reach_a_useful_roc_auc(trained, capsys):
    from hnd.train.eval_cli import main as eval_main

    root, config = trained
    log = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["kind"] == "epoch"]
    assert len(epochs) == 5 and all("heldout_roc_auc" in r for r in epochs)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    ckpt = torch.load(root / "filter.pt", weights_only=True)
    assert set(ckpt["model"]) == set(ORIGINAL_KEYS) and ckpt["method"] == "filter"
    assert ckpt["best_value"] == max(r["heldout_roc_auc"] for r in epochs)
    # The whole student with its best filter, for hnd-export-head.
    full = build_model_from_config(
        dataclasses.replace(
            load_config(config).model,
            random_weights=None,
            checkpoint=str(root / "run" / "best-model.pt"),
            filter=FilterConfig(),
        )
    )
    assert fingerprint(full) == fingerprint(build_model_from_config(load_config(config).model))

    out = root / "eval.json"
    assert eval_main(["--config", str(config), "--min-recall", "0.9", "--batch-size", "4", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["images"], result["positives"], result["negatives"]) == (32, 16, 16)
    assert result["roc_auc"] > 0.75, text
    op = result["operating_point"]
    assert op["tpr"] >= 0.9 and op["dropped"] > 0.2
    assert f"ROC-AUC {result['roc_auc']:.4f}" in text and "<- operating point" in text and "dropped" in text
    trained_auc = result["roc_auc"]
    # An untrained filter of the same student is no better than chance here: training did the work.
    untrained = root / "untrained.pt"
    save_filter(untrained, Ext4ResNet())
    assert (
        eval_main(["--config", str(config), "--checkpoint", str(untrained), "--batch-size", "4", "--output", str(out)])
        == 0
    )
    assert json.loads(out.read_text())["roc_auc"] < trained_auc


def test_hnd_edge_sends_only_frames_above_the_threshold(trained, tmp_path):
    from hnd.edge.cli import main as edge_main
    from hnd.edge.pipeline import to_tensor
    from runtime_support import serving

    root, config = trained
    model = build_model_from_config(load_config(config).model)
    head, _ = split_model(model)
    frames_dir = root / "data" / "val2017"
    paths = sorted(frames_dir.iterdir())[:10]
    from PIL import Image

    threshold = 0.5
    with torch.inference_mode():
        probs = [
            float(
                head.filter_probability(
                    head.stem(head.preprocess([to_tensor(np.asarray(Image.open(p).convert("RGB")))])[0])
                )[0]
            )
            for p in paths
        ]
    expected_sent = sum(p >= threshold for p in probs)
    assert 0 < expected_sent < len(paths)
    out = tmp_path / "records.jsonl"
    with serving(model) as server:
        before = server.runner.images_computed
        metric = server.service.metrics.registry
        rc = edge_main(
            [
                "--server",
                f"127.0.0.1:{server.port}",
                "--images",
                str(frames_dir),
                "--max-frames",
                str(len(paths)),
                "--config",
                str(config),
                "--filter-threshold",
                str(threshold),
                "--output",
                str(out),
                "--no-progress",
                "--max-inflight",
                "2",
            ]
        )
        assert rc == 0
        assert server.runner.images_computed - before == expected_sent
        assert metric.get_sample_value("hnd_requests_total", {"method": "Infer", "code": "OK"}) == expected_sent
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["filtered"] for r in records] == [p < threshold for p in probs]
    assert [r["filter_probability"] for r in records] == pytest.approx(probs, abs=1e-5)
    # Empty frames are the ones dropped: the filter learned what "nothing to detect" looks like.
    from hnd.train.data import load_coco
    from hnd.train.filter import image_labels

    coco = load_coco(root / "data" / "annotations" / "person_keypoints_val2017.json")
    labels = image_labels(coco, sorted(coco.imgs)[:10], keypoints=True)
    dropped_empty = sum(r["filtered"] and labels[i] == 0 for r, i in zip(records, sorted(labels)))
    assert dropped_empty >= 0.5 * sum(1 for v in labels.values() if v == 0)


def test_edge_cli_filter_threshold_defaults_and_errors(trained):
    from hnd.edge.api import EdgeSettings, filter_threshold
    from hnd.edge.cli import build_parser

    _, config = trained
    cfg = load_config(config)
    parse = lambda *a: EdgeSettings.from_args(build_parser().parse_args(["--images", "x", *a]))  # noqa: E731
    assert filter_threshold(cfg, parse()) == 0.01  # the config's
    assert filter_threshold(cfg, parse("--filter-threshold", "0.3")) == 0.3
    assert filter_threshold(cfg, parse("--no-filter")) is None
    assert filter_threshold(cfg, parse("--mode", "offload")) is None
    with pytest.raises(ConfigError, match="offload"):
        filter_threshold(cfg, parse("--mode", "offload", "--filter-threshold", "0.3"))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        filter_threshold(cfg, parse("--filter-threshold", "2"))
    plain = load_config("test/keypoint_rcnn-b3ch")
    assert filter_threshold(plain, parse()) is None
    with pytest.raises(ConfigError, match="no neural filter"):
        filter_threshold(plain, parse("--filter-threshold", "0.3"))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--images", "x", "--filter-threshold", "0.3", "--no-filter"])


def test_filter_training_resumes_exactly(trained, tmp_path):
    from hnd.train.cli import main as train_main

    _, config = trained
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train_main(["--config", str(config), "--no-progress", "--epochs", "2", "--output-dir", str(whole)]) == 0
    assert train_main(["--config", str(config), "--no-progress", "--epochs", "1", "--output-dir", str(split)]) == 0
    assert (
        train_main(["--config", str(config), "--no-progress", "--epochs", "2", "--output-dir", str(split), "--resume"])
        == 0
    )
    for name in ("last.pt", "best.pt"):
        a, b = (torch.load(d / name, weights_only=True) for d in (whole, split))
        assert (a["fingerprint"], a["epoch"]) == (b["fingerprint"], b["epoch"]), name
    assert torch.load(split / "last.pt", weights_only=True)["epoch"] == 1
    assert (
        train_main(
            ["--config", str(config), "--no-progress", "--output-dir", str(split), "--resume", "--select-by", "last"]
        )
        == 2
    )  # another selection: refused, one line
