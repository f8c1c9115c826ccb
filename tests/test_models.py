"""Teacher and student R-CNNs: the HND bottleneck matches the original (docs/ORIGINAL_MODELS.md section 1)."""

from __future__ import annotations

import socket
from unittest import mock

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from hnd.common.models import (
    Bottleneck,
    bottleneck_channels_of,
    build_model,
    is_student,
    model_kind,
)

KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")
CHANNELS = (3, 6, 9, 12, 15)
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_layer1_state(c: int) -> list[tuple[str, tuple[int, ...]]]:
    """The original Bottleneck4LargeResNet's state-dict keys under backbone.body.layer1, in order, with shapes."""
    layers = [
        ("encoder.encoder.0", "conv", (64, 64, 2, 2)),
        ("encoder.encoder.1", "bn", 64),
        ("encoder.encoder.2", "conv", (256, 64, 2, 2)),
        ("encoder.encoder.3", "bn", 256),
        ("encoder.encoder.5", "conv", (64, 256, 2, 2)),
        ("encoder.encoder.6", "bn", 64),
        ("encoder.encoder.7", "conv", (c, 64, 2, 2)),
        ("decoder.0", "bn", c),
        ("decoder.2", "conv", (64, c, 2, 2)),
        ("decoder.3", "bn", 64),
        ("decoder.4", "conv", (128, 64, 2, 2)),
        ("decoder.5", "bn", 128),
        ("decoder.7", "conv", (256, 128, 2, 2)),
        ("decoder.8", "bn", 256),
        ("decoder.9", "conv", (256, 256, 2, 2)),
        ("decoder.10", "bn", 256),
    ]
    out = []
    for name, what, shape in layers:
        if what == "conv":
            out.append((f"{name}.weight", shape))
        else:
            out += [(f"{name}.{k}", () if k == "num_batches_tracked" else (shape,)) for k in BN_KEYS]
    return out


class _NoNetwork:
    """Patches every way a build could fetch weights; records attempts instead."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def _refuse(self, what: str):
        def fail(*args, **kwargs):
            self.attempts.append(f"{what}{args[:2]}")
            raise RuntimeError(f"test forbids network access: {what}")

        return fail

    def __enter__(self):
        self._patches = [
            mock.patch.object(socket.socket, "connect", self._refuse("socket.connect")),
            mock.patch("torch.hub.load_state_dict_from_url", self._refuse("load_state_dict_from_url")),
            mock.patch("torch.hub.download_url_to_file", self._refuse("download_url_to_file")),
        ]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self._patches):
            p.stop()


@pytest.fixture(scope="module")
def built():
    """Teachers and 3-channel students of every kind, built with the network forbidden."""
    with _NoNetwork() as guard:
        models = {}
        for kind in KINDS:
            models[kind, None] = build_model(kind)
            models[kind, 3] = build_model(kind, 3)
    return models, guard.attempts


def test_build_never_downloads(built):
    models, attempts = built
    assert attempts == []
    assert len(models) == 6


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_and_student(built, kind):
    models, _ = built
    teacher, student = models[kind, None], models[kind, 3]
    assert model_kind(teacher) == model_kind(student) == kind
    assert not is_student(teacher) and bottleneck_channels_of(teacher) is None
    assert is_student(student) and bottleneck_channels_of(student) == 3
    assert isinstance(student.backbone.body.layer1, Bottleneck)
    assert not teacher.training and not student.training  # built in eval mode
    t_keys, s_keys = set(teacher.state_dict()), set(student.state_dict())
    # The teacher keeps torchvision's layer1 (layer1.0.*); the student has none of it.
    assert any(k.startswith("backbone.body.layer1.0.") for k in t_keys)
    assert not any(k.startswith("backbone.body.layer1.0.") for k in s_keys)
    # Everything outside layer1 is the same model.
    outside = lambda keys: {k for k in keys if not k.startswith("backbone.body.layer1.")}  # noqa: E731
    assert outside(t_keys) == outside(s_keys)


@pytest.mark.parametrize("kind", KINDS)
def test_layer1_state_dict_matches_original(built, kind):
    models, _ = built
    sd = models[kind, 3].state_dict()
    prefix = "backbone.body.layer1."
    got = [(k[len(prefix) :], tuple(v.shape)) for k, v in sd.items() if k.startswith(prefix)]
    assert len(got) == 48
    assert got == expected_layer1_state(3)
    assert sd[prefix + "decoder.0.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("c", CHANNELS)
def test_bottleneck_keys_and_parameter_count(c):
    layer1 = Bottleneck(c)
    got = [(k, tuple(v.shape)) for k, v in layer1.state_dict().items()]
    assert got == expected_layer1_state(c)
    assert sum(p.numel() for p in layer1.parameters()) == 575_616 + 514 * c


def test_parameter_count_in_the_model(built):
    models, _ = built
    layer1 = models["faster_rcnn", 3].backbone.body.layer1
    assert sum(p.numel() for p in layer1.parameters()) == 577_158


def test_bottleneck_layer_order():
    enc, dec = Bottleneck(5).encoder.encoder, Bottleneck(5).decoder

    def describe(m: nn.Module):
        if isinstance(m, nn.Conv2d):
            return ("conv", m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.bias is None)
        if isinstance(m, nn.BatchNorm2d):
            return ("bn", m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        if isinstance(m, nn.ReLU):
            return ("relu",)
        return (type(m).__name__,)

    def conv(i, o, p):
        return ("conv", i, o, (2, 2), (1, 1), (p, p), True)

    def bn(n):
        return ("bn", n, 1e-5, 0.1, True, True)

    assert [describe(m) for m in enc] == [
        conv(64, 64, 1),
        bn(64),
        conv(64, 256, 1),
        bn(256),
        ("relu",),
        conv(256, 64, 1),
        bn(64),
        conv(64, 5, 1),
    ]
    assert [describe(m) for m in dec] == [
        bn(5),
        ("relu",),
        conv(5, 64, 0),
        bn(64),
        conv(64, 128, 0),
        bn(128),
        ("relu",),
        conv(128, 256, 0),
        bn(256),
        conv(256, 256, 0),
        bn(256),
        ("relu",),
    ]


@pytest.mark.parametrize("c", CHANNELS)
def test_bottleneck_spatial_shapes(c):
    torch.manual_seed(c)
    layer1 = Bottleneck(c).eval()
    x = torch.randn(1, 64, 7, 9)
    with torch.no_grad():
        z = layer1.encoder(x)
        y = layer1.decoder(z)
        assert torch.equal(layer1(x), y)
    assert z.shape == (1, c, 11, 13)
    assert y.shape == (1, 256, 7, 9)
    assert (z < 0).any() and (z > 0).any()  # nothing after the last conv: z is signed


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_batch_norm_outside_the_bottleneck(built, kind):
    models, _ = built
    for key in (None, 3):
        model = models[kind, key]
        body = model.backbone.body
        assert isinstance(body.bn1, FrozenBatchNorm2d) and body.bn1.eps == 0.0
        for name, m in body.named_modules():
            in_bottleneck = key is not None and name.startswith("layer1")
            if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) and not in_bottleneck:
                assert isinstance(m, FrozenBatchNorm2d), name
        nbt = [k for k in model.state_dict() if k.endswith("num_batches_tracked")]
        if key is None:
            assert nbt == []
        else:  # only the bottleneck's 8 trainable BNs track batches
            assert len(nbt) == 8 and all(k.startswith("backbone.body.layer1.") for k in nbt)
        for layer in ("bn1", "layer2.0.bn1", "layer3.5.bn3", "layer4.0.downsample.1"):
            keys = {k for k in model.state_dict() if k.startswith(f"backbone.body.{layer}.")}
            assert {k.rsplit(".", 1)[1] for k in keys} == {"weight", "bias", "running_mean", "running_var"}


@pytest.mark.parametrize("kind", KINDS)
def test_torchvision_names_and_shapes(built, kind):
    sd = {k: tuple(v.shape) for k, v in built[0][kind, 3].state_dict().items()}
    assert sd["backbone.body.conv1.weight"] == (64, 3, 7, 7)
    assert sd["rpn.head.cls_logits.weight"] == (3, 256, 1, 1)
    assert sd["rpn.head.bbox_pred.weight"] == (12, 256, 1, 1)
    assert sd["roi_heads.box_head.fc6.weight"] == (1024, 12544)
    assert sd["roi_heads.box_head.fc7.weight"] == (1024, 1024)
    n = 2 if kind == "keypoint_rcnn" else 91
    assert sd["roi_heads.box_predictor.cls_score.weight"] == (n, 1024)
    assert sd["roi_heads.box_predictor.bbox_pred.weight"] == (4 * n, 1024)
    for i in range(4):
        assert sd[f"backbone.fpn.inner_blocks.{i}.0.weight"][0] == 256
        assert sd[f"backbone.fpn.layer_blocks.{i}.0.weight"] == (256, 256, 3, 3)
    if kind == "mask_rcnn":
        assert sd["roi_heads.mask_predictor.conv5_mask.weight"] == (256, 256, 2, 2)
        assert sd["roi_heads.mask_predictor.mask_fcn_logits.weight"] == (91, 256, 1, 1)
        assert [sd[f"roi_heads.mask_head.{i}.0.weight"] for i in range(4)] == [(256, 256, 3, 3)] * 4
    if kind == "keypoint_rcnn":
        head = [sd[f"roi_heads.keypoint_head.{i}.weight"] for i in range(0, 16, 2)]
        assert head == [(512, 256, 3, 3)] + [(512, 512, 3, 3)] * 7
        assert sd["roi_heads.keypoint_predictor.kps_score_lowres.weight"] == (512, 17, 4, 4)
    else:
        assert not any("keypoint" in k for k in sd)


@pytest.mark.parametrize("kind", KINDS)
def test_torchvision_defaults_are_the_originals(built, kind):
    model = built[0][kind, 3]
    t = model.transform
    if kind == "keypoint_rcnn":
        assert tuple(t.min_size) == (640, 672, 704, 736, 768, 800)
    else:
        assert tuple(t.min_size) == (800,)
    assert t.max_size == 1333
    assert t.image_mean == [0.485, 0.456, 0.406] and t.image_std == [0.229, 0.224, 0.225]
    assert model.rpn.nms_thresh == 0.7
    assert model.rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert model.roi_heads.score_thresh == 0.05
    assert model.roi_heads.nms_thresh == 0.5
    assert model.roi_heads.detections_per_img == 100


def test_kwargs_and_num_classes_pass_through():
    model = build_model(
        "faster_rcnn",
        3,
        num_classes=5,
        min_size=123,
        max_size=456,
        box_score_thresh=0.25,
        box_detections_per_img=7,
        rpn_post_nms_top_n_test=50,
    )
    assert tuple(model.transform.min_size) == (123,) and model.transform.max_size == 456
    assert model.roi_heads.score_thresh == 0.25 and model.roi_heads.detections_per_img == 7
    assert model.rpn._post_nms_top_n["testing"] == 50
    assert model.roi_heads.box_predictor.cls_score.out_features == 5
    assert model.roi_heads.box_predictor.bbox_pred.out_features == 20


def test_tiny_config_params_pass_through(tiny_model):
    model = tiny_model("keypoint_rcnn")
    assert tuple(model.transform.min_size) == (160,) and model.transform.max_size == 256
    assert model.roi_heads.score_thresh == 0.0 and model.roi_heads.detections_per_img == 4
    assert model.roi_heads.keypoint_predictor.kps_score_lowres.out_channels == 17


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown model kind 'yolo'"):
        build_model("yolo", 3)
    with pytest.raises(ValueError, match="bottleneck_channels must be >= 1"):
        Bottleneck(0)
