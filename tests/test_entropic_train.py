"""Entropic Student training: stage 1 (distillation + beta * rate), tables, stage 2 (tail fine-tuning with the
encoder and prior frozen), exact resume, and hnd-eval's coded bytes per image."""

from __future__ import annotations

import json

import pytest
import torch
from hnd.common.build import build_model_from_config
from hnd.common.config import ConfigError, config_from_dict, load_config, with_weights
from hnd.train.engine import TrainOptions
from hnd.train.entropic import BOTTLENECK, build_entropic_models, rate_bits, stage1_loss, stage1_param_groups
from hnd.train.eval_cli import main as eval_main
from hnd.train.synthetic import make_synthetic_coco, write_config
from hnd.train.cli import train
from hnd.train.train import set_distillation_modes

SMALL = {
    "min_size": 64,
    "max_size": 64,
    "box_score_thresh": 0.0,
    "box_detections_per_img": 10,
    "rpn_pre_nms_top_n_train": 100,
    "rpn_post_nms_top_n_train": 50,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("entropic-data")
    make_synthetic_coco(root, images=3, val_images=1, size=(64, 64), seed=3, empty_fraction=0.0)
    return root


def _config(data_root, path, stage2_epochs=2, **train):
    return write_config(
        "test/faster_rcnn-entropic-b24ch",
        data_root,
        path,
        model={"num_classes": 4, "params": SMALL},
        teacher={"num_classes": 4, "params": SMALL},
        train={"epochs": 1, "stage2": {"epochs": stage2_epochs}, **train},
    )


def _sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_stage1_loss_distils_four_layers_plus_rate_and_falls(data_root, tmp_path):
    cfg = load_config(_config(data_root, tmp_path / "c.yaml"))
    teacher, student = build_entropic_models(cfg)
    assert not student.backbone.body.bottleneck_layer.updated  # noisy latent + likelihoods while training
    t_sd = teacher.state_dict()
    assert all(torch.equal(v, t_sd[k]) for k, v in student.state_dict().items() if not k.startswith(BOTTLENECK))
    teacher.requires_grad_(False)
    set_distillation_modes(student, [BOTTLENECK])
    params = [p for n, p in student.named_parameters() if n.startswith(BOTTLENECK)]
    opt = torch.optim.Adam(params, lr=1e-3)
    from hnd.train.data import CocoDetection

    ds = CocoDetection(data_root / "train2017", data_root / "annotations/instances_train2017.json")
    images = [ds[0][0], ds[1][0]]
    losses = []
    for _ in range(6):
        loss, terms = stage1_loss(student, teacher, images, beta=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert set(terms) == {"bottleneck_layer", "layer2", "layer3", "layer4", "bits", "aux", "bits_per_image"}
    assert terms["bits"] > 0 and terms["bits_per_image"] == pytest.approx(terms["bits"] / 2)
    assert losses[-1] < losses[0], losses
    lik = torch.tensor([0.5, 0.25])
    assert float(rate_bits(lik)) == pytest.approx(3.0)


@pytest.mark.timeout(1500)  # three short trainings: minutes on a loaded 2-core machine
def test_two_stages_resume_exactly_and_eval_reports_bytes(data_root, tmp_path, capsys):
    opts = dict(select_by="last", progress=False)
    full_cfg = _config(data_root, tmp_path / "full.yaml", stage2_epochs=2)
    full = train(full_cfg, TrainOptions(output_dir=str(tmp_path / "full"), **opts))
    # Interrupted in stage 2: a run with one stage-2 epoch, then --resume with the full schedule.
    train(
        _config(data_root, tmp_path / "cut1.yaml", stage2_epochs=1),
        TrainOptions(output_dir=str(tmp_path / "cut"), **opts),
    )
    resumed = train(full_cfg, TrainOptions(output_dir=str(tmp_path / "cut"), resume=True, **opts))
    assert resumed["stage1"].get("skipped") is True  # a finished stage 1 is not run again
    a, b = _sd(tmp_path / "full" / "best.pt"), _sd(tmp_path / "cut" / "best.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in full["history"]] == [r["train_loss"] for r in resumed["history"]]

    stage1 = _sd(tmp_path / "full" / "stage1" / "best.pt")
    assert stage1[f"{BOTTLENECK}.entropy_bottleneck._quantized_cdf"].numel() == 0  # tables come after stage 1
    # The tables come from quantiles solved at the densities' tails, not from where a few Adam steps left
    # them (about +-10, CompressAI's init, with an aux loss near 990 for 24 channels).
    final = build_model_from_config(with_weights(load_config(full_cfg).model, str(tmp_path / "full" / "best.pt")))
    prior = final.backbone.body.bottleneck_layer.entropy_bottleneck
    assert float(prior.loss().detach()) < 0.1
    assert not torch.equal(
        a[f"{BOTTLENECK}.entropy_bottleneck.quantiles"], stage1[f"{BOTTLENECK}.entropy_bottleneck.quantiles"]
    )
    cdf = a[f"{BOTTLENECK}.entropy_bottleneck._quantized_cdf"]
    assert cdf.dtype == torch.int32 and cdf.dim() == 2 and (cdf[:, 0] == 0).all()
    teacher, _ = build_entropic_models(load_config(full_cfg))
    t_sd = teacher.state_dict()
    for key in a:
        if (
            key.startswith((f"{BOTTLENECK}.encoder.", f"{BOTTLENECK}.entropy_bottleneck."))
            and "_cdf" not in key
            and "quantiles" not in key  # solved between the stages (finish_prior)
            and "_offset" not in key
            and "_quantized" not in key
        ):
            assert torch.equal(a[key], stage1[key]), f"{key} moved in stage 2"
    assert not torch.equal(a[f"{BOTTLENECK}.decoder.0.weight"], stage1[f"{BOTTLENECK}.decoder.0.weight"])
    key = "backbone.body.layer2.0.conv1.weight"
    assert torch.equal(stage1[key], t_sd[key]) and not torch.equal(a[key], t_sd[key])  # tail trains in stage 2 only

    capsys.readouterr()
    metrics_path = tmp_path / "m.json"
    assert (
        eval_main(
            [
                "--config",
                str(full_cfg),
                "--checkpoint",
                str(tmp_path / "full" / "best.pt"),
                "--compression",
                "learned",
                "--output",
                str(metrics_path),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "learned entropy coding" in printed and "coded bytes per image" in printed
    metrics = json.loads(metrics_path.read_text())
    assert metrics["coded_bytes_per_image"] > 0 and metrics["compression"] == "learned" and metrics["bits"] == 0
    # Asking an Entropic Student for affine bits is one line, exit 2.
    assert (
        eval_main(["--config", str(full_cfg), "--checkpoint", str(tmp_path / "full" / "best.pt"), "--bits", "8"]) == 2
    )
    assert "learned" in capsys.readouterr().err


def test_stage1_prior_learning_rate_is_its_own_group(data_root, tmp_path):
    cfg = load_config(_config(data_root, tmp_path / "c.yaml", prior_lr=0.01))
    assert cfg.train.prior_lr == 0.01 and cfg.train.optimizer.lr == 0.001
    _, student = build_entropic_models(cfg)
    params = [p for n, p in student.named_parameters() if n.startswith(BOTTLENECK)]
    rest, prior = stage1_param_groups(student, params, cfg.train)
    eb = student.backbone.body.bottleneck_layer.entropy_bottleneck
    assert {id(p) for p in prior["params"]} == {id(p) for p in eb.parameters()} and prior["lr"] == 0.01
    assert rest["lr"] == 0.001 and len(rest["params"]) + len(prior["params"]) == len(params)
    default = load_config(_config(data_root, tmp_path / "d.yaml"))
    assert default.train.prior_lr is None  # sc2bench: one learning rate
    assert stage1_param_groups(student, params, default.train)[1]["lr"] == 0.001
    with pytest.raises(ConfigError, match="prior_lr"):
        load_config(_config(data_root, tmp_path / "e.yaml", prior_lr=0.0))


def test_entropic_config_rules(tmp_path):
    cfg = load_config("test/faster_rcnn-entropic-b24ch")
    assert cfg.train.method == "entropic" and cfg.train.beta == 0.08 and cfg.train.stage2.epochs == 1
    import yaml
    from hnd.common.config import resolve_config_path

    data = yaml.safe_load(resolve_config_path("test/faster_rcnn-entropic-b24ch").read_text())
    bad = dict(data, runtime={"bits": 8, "granularity": "tensor", "compression": "zstd"})
    with pytest.raises(ConfigError, match="entropy-coded against its prior"):
        config_from_dict(bad, "x.yaml")
    bad = dict(data, train=dict(data["train"], stage2=None))
    with pytest.raises(ConfigError, match="stage2"):
        config_from_dict(bad, "x.yaml")
    bad = dict(data, model=dict(data["model"], filter={"threshold": 0.1}))
    with pytest.raises(ConfigError, match="stem"):
        config_from_dict(bad, "x.yaml")
    hnd = yaml.safe_load(resolve_config_path("test/faster_rcnn-b3ch").read_text())
    with pytest.raises(ConfigError, match="Entropic Student"):
        config_from_dict(dict(hnd, runtime={"bits": 0, "granularity": "channel", "compression": "learned"}), "y.yaml")
