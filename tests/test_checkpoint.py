"""Checkpoints: our format, the original repository's files, fingerprints, head-only exports, refusals."""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch

from hnd.common.checkpoint import (
    CheckpointError,
    export_head,
    fingerprint,
    load_checkpoint,
    load_head,
    save_checkpoint,
)
from hnd.common.errors import HndError
from hnd.common.meta import FingerprintMismatch, check_fingerprint
from hnd.common.models import build_model
from hnd.common.split import is_head_key, split_model


# ---------------------------------------------------------------------------------------------
# Building files the way other code wrote them.


def to_original_names(sd, torchdistill: bool = False) -> OrderedDict[str, torch.Tensor]:
    """Our (current torchvision) key names -> torchvision 0.4.2's, as the original repository saved them."""
    out = OrderedDict()
    for k, v in sd.items():
        k = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.(weight|bias)$", r"\1.\2", k)
        k = re.sub(r"^rpn\.head\.conv\.0\.0\.(weight|bias)$", r"rpn.head.conv.\1", k)
        m = re.match(r"^roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)$", k)
        if m:
            k = f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"
        if torchdistill:  # torchdistill / kdkit ports flatten the bottleneck encoder one level
            k = k.replace("backbone.body.layer1.encoder.encoder.", "backbone.body.layer1.encoder.")
        out[k] = v
    return out


def original_checkpoint(model, torchdistill: bool = False) -> dict:
    """What the original's save_ckpt wrote: model, optimizer, best_value, lr_scheduler, config, args."""
    # Adam over copies of the trainable tensors (conv1 + bottleneck), one step so it has state.
    params = [
        p.detach().clone().requires_grad_()
        for n, p in model.named_parameters()
        if n.startswith(("backbone.body.conv1.", "backbone.body.layer1."))
    ]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for p in params:
        p.grad = torch.full_like(p, 0.01)
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[5, 15], gamma=0.1)
    assert isinstance(scheduler.state_dict()["milestones"], Counter)
    config = {
        "student_model": {
            "name": "faster_rcnn",
            "backbone": {
                "name": "custom_resnet50",
                "params": {
                    "pretrained": False,
                    "freeze_layers": False,
                    "layer1": {"name": "Bottleneck4LargeResNet", "bottleneck_channel": 3},
                },
            },
            "params": {"num_classes": 91, "pretrained": True},
            "ckpt": "./resource/ckpt/hnd/some-b3ch.pt",
        },
        "train": {"num_epochs": 20, "batch_size": 4, "optimizer": {"type": "Adam", "params": {"lr": 0.001}}},
    }
    args = argparse.Namespace(
        config="config/hnd/faster_rcnn-backbone_resnet50-b3ch.yaml",
        device="cuda",
        json=None,
        distill=True,
        world_size=1,
        dist_url="env://",
        transform_bottleneck=False,
    )
    return {
        "model": to_original_names(model.state_dict(), torchdistill),
        "optimizer": optimizer.state_dict(),
        "best_value": np.float64(0.3512),
        "lr_scheduler": scheduler.state_dict(),
        "config": config,
        "args": args,
    }


def assert_same_weights(model, source) -> None:
    got, want = model.state_dict(), source.state_dict()
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def seeded(kind: str, channels: int | None, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(kind, channels)


class EvilStateDict(OrderedDict):
    """A dict subclass the loader has never heard of: unpickling it would run this module's code."""


class RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# Fixtures: sources, reset-able targets and files, each made once per module.


@pytest.fixture(scope="module")
def faster(tiny_model):
    return tiny_model("faster_rcnn")


@pytest.fixture(scope="module")
def mask(tiny_model):
    return tiny_model("mask_rcnn")


class Targets:
    """``target(kind)``: a student with seed-99 weights (not the sources'), reset on every call;
    ``target.fingerprint(kind)``: the fingerprint of those weights, computed once (a full model's
    fingerprint hashes ~170 MB)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[torch.nn.Module, dict[str, torch.Tensor], str]] = {}

    def _entry(self, kind: str) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
        if kind not in self._cache:
            m = seeded(kind, 3, 99)
            self._cache[kind] = (m, {k: v.clone() for k, v in m.state_dict().items()}, fingerprint(m))
        return self._cache[kind]

    def __call__(self, kind: str) -> torch.nn.Module:
        m, initial, _ = self._entry(kind)
        m.load_state_dict(initial)
        return m

    def fingerprint(self, kind: str) -> str:
        return self._entry(kind)[2]


@pytest.fixture(scope="module")
def target() -> Targets:
    return Targets()


@pytest.fixture(scope="module")
def source_fp(faster, mask) -> dict[str, str]:
    """The read-only sources' fingerprints, computed once."""
    return {"faster_rcnn": fingerprint(faster), "mask_rcnn": fingerprint(mask)}


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    yield d
    shutil.rmtree(d, ignore_errors=True)  # these files are ~180 MB each


@pytest.fixture(scope="module")
def ours(ckpt_dir, faster):
    path = ckpt_dir / "ours.pt"
    fp = save_checkpoint(path, faster, epoch=3, best_value=0.25, config={"model": {"kind": "faster_rcnn"}})
    return path, fp


@pytest.fixture(scope="module")
def original_file(ckpt_dir, faster, mask):
    """``original_file(kind, legacy, torchdistill)``: the original's layout, legacy = torch 1.3's non-zip format."""
    cache = {}

    def get(kind: str, legacy: bool = False, torchdistill: bool = False):
        key = (kind, legacy, torchdistill)
        if key not in cache:
            path = ckpt_dir / f"original-{kind}-{'legacy' if legacy else 'zip'}-{'td' if torchdistill else 'orig'}.pt"
            model = {"faster_rcnn": faster, "mask_rcnn": mask}[kind]
            torch.save(original_checkpoint(model, torchdistill), path, _use_new_zipfile_serialization=not legacy)
            cache[key] = path
        return cache[key]

    return get


@pytest.fixture(scope="module")
def teacher():
    return seeded("faster_rcnn", None, 5)


@pytest.fixture(scope="module")
def teacher_file(ckpt_dir, teacher):
    path = ckpt_dir / "teacher.pt"
    save_checkpoint(path, teacher)
    return path


# ---------------------------------------------------------------------------------------------
# Loading.


def test_save_and_load_our_format(ours, faster, target):
    path, fp = ours
    assert fp == fingerprint(faster)
    model = target("faster_rcnn")
    assert fingerprint(model) != fp
    ckpt = load_checkpoint(path, model)
    assert_same_weights(model, faster)
    assert fingerprint(model) == fp
    assert ckpt["format"] == "hnd-checkpoint" and ckpt["fingerprint"] == fp
    transform = {"min_size": 160, "max_size": 256, "size_divisible": 32}  # the test config's, as built
    assert ckpt["model_info"] == {
        "kind": "faster_rcnn",
        "bottleneck_channels": 3,
        "transform": {**transform, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
    }
    assert ckpt["epoch"] == 3 and ckpt["best_value"] == 0.25 and ckpt["config"] == {"model": {"kind": "faster_rcnn"}}


@pytest.mark.parametrize(
    ("kind", "legacy", "torchdistill"),
    [("mask_rcnn", True, False), ("faster_rcnn", False, False), ("faster_rcnn", False, True)],
    ids=["mask-torch1.3-format", "faster-zip-format", "faster-torchdistill-names"],
)
def test_original_checkpoint_loads(original_file, faster, mask, source_fp, target, kind, legacy, torchdistill):
    source = {"faster_rcnn": faster, "mask_rcnn": mask}[kind]
    path = original_file(kind, legacy, torchdistill)
    # The file really uses the old names (otherwise this test proves nothing).
    old_keys = set(to_original_names(source.state_dict(), torchdistill))
    assert {
        "backbone.fpn.inner_blocks.0.weight",
        "backbone.fpn.layer_blocks.3.bias",
        "rpn.head.conv.weight",
        "rpn.head.conv.bias",
    } <= old_keys
    assert not old_keys & {"backbone.fpn.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight"}
    if kind == "mask_rcnn":
        assert {f"roi_heads.mask_head.mask_fcn{i}.weight" for i in range(1, 5)} <= old_keys
    if torchdistill:
        assert "backbone.body.layer1.encoder.7.weight" in old_keys
        assert not any(k.startswith("backbone.body.layer1.encoder.encoder.") for k in old_keys)
    else:
        assert "backbone.body.layer1.encoder.encoder.7.weight" in old_keys

    model = target(kind)
    assert target.fingerprint(kind) != source_fp[kind]
    ckpt = load_checkpoint(path, model, strict=True)
    assert_same_weights(model, source)
    assert fingerprint(model) == source_fp[kind]
    # The training state comes back as the original wrote it.
    assert ckpt["format"] == "original"
    assert type(ckpt["best_value"]) is np.float64 and ckpt["best_value"] == np.float64(0.3512)
    assert isinstance(ckpt["lr_scheduler"]["milestones"], Counter)
    assert ckpt["lr_scheduler"]["milestones"] == Counter({5: 1, 15: 1})
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].world_size == 1
    assert ckpt["config"]["student_model"]["backbone"]["params"]["layer1"]["bottleneck_channel"] == 3
    adam = ckpt["optimizer"]
    assert adam["param_groups"][0]["lr"] == 1e-3 and len(adam["state"]) == len(adam["param_groups"][0]["params"])
    assert all(torch.is_tensor(s["exp_avg"]) for s in adam["state"].values())


def test_fingerprint_is_file_format_independent(ours, original_file, ckpt_dir, faster, target):
    """The same weights from our file, the original's layout and a bare state dict: one fingerprint.

    (test_save_and_load_our_format and test_original_checkpoint_loads load the first two; this adds the
    bare state dict and checks all three against the fingerprint our file stores.)
    """
    path_ours, fp = ours
    assert torch.load(path_ours, weights_only=True, mmap=True)["fingerprint"] == fp
    bare = ckpt_dir / "bare.pt"
    torch.save(faster.state_dict(), bare)
    for path in (original_file("faster_rcnn"), bare):
        model = target("faster_rcnn")
        assert target.fingerprint("faster_rcnn") != fp
        ckpt = load_checkpoint(path, model)
        assert ckpt["format"] == {"bare.pt": "state_dict"}.get(path.name, "original")
        assert fingerprint(model) == fp, path.name


def test_fingerprint_follows_every_byte_name_and_dtype(faster):
    sd = dict(faster.state_dict())
    fp = fingerprint(sd)
    assert fingerprint(faster) == fp and len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint(dict(reversed(list(sd.items())))) == fp  # key order does not matter

    nudged = dict(sd)
    w = sd["roi_heads.box_head.fc7.weight"].clone()
    w.view(-1)[12345] = torch.nextafter(w.view(-1)[12345], torch.tensor(float("inf")))  # one ulp of one weight
    nudged["roi_heads.box_head.fc7.weight"] = w
    assert fingerprint(nudged) != fp

    renamed = {("x." + k if k == "rpn.head.cls_logits.bias" else k): v for k, v in sd.items()}
    assert fingerprint(renamed) != fp
    retyped = dict(sd, **{"rpn.head.cls_logits.bias": sd["rpn.head.cls_logits.bias"].double()})
    assert fingerprint(retyped) != fp
    reshaped = dict(sd, **{"rpn.head.cls_logits.bias": sd["rpn.head.cls_logits.bias"].reshape(1, -1)})
    assert fingerprint(reshaped) != fp


def test_fingerprint_equal_for_builds_from_one_seed(faster, target):
    # The tiny config's student is seeded with 0; a plain build from seed 0 has the same weights.
    assert fingerprint(seeded("faster_rcnn", 3, 0)) == fingerprint(faster)
    assert fingerprint(target("faster_rcnn")) != fingerprint(faster)


def test_one_fingerprint_rule_for_every_side():
    """hnd.common.meta.check_fingerprint: equal passes; a missing one fails only where it is required."""
    check_fingerprint("abc", "abc")
    check_fingerprint("abc", "", required=False)
    check_fingerprint("abc", None, required=False)
    with pytest.raises(FingerprintMismatch, match=r"^weights fingerprint mismatch: request \(none\), server abc "):
        check_fingerprint("abc", "", given_is="request")
    with pytest.raises(FingerprintMismatch, match="edge <X>, server abc") as info:
        check_fingerprint("abc", "x", shown=lambda s: f"<{s.upper()}>")
    assert (info.value.expected, info.value.given) == ("abc", "x")
    assert isinstance(info.value, HndError)  # each CLI reports it as one line


def test_strict_false_starts_a_student_from_a_teacher(teacher_file, teacher, target):
    student = target("faster_rcnn")
    bottleneck_before = {k: v.clone() for k, v in student.backbone.body.layer1.state_dict().items()}
    load_checkpoint(teacher_file, student, strict=False)
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    shared = [k for k in s_sd if not k.startswith("backbone.body.layer1.")]
    assert shared == [k for k in t_sd if not k.startswith("backbone.body.layer1.")] and len(shared) > 200
    for k in shared:
        assert torch.equal(s_sd[k], t_sd[k]), k
    for k, v in student.backbone.body.layer1.state_dict().items():
        assert torch.equal(v, bottleneck_before[k]), k


# ---------------------------------------------------------------------------------------------
# Head-only export.


def test_export_head_and_load_head(ours, ckpt_dir, faster, target, images):
    path, fp = ours
    out = ckpt_dir / "head.pt"
    assert export_head(path, out) == fp
    raw = torch.load(out, weights_only=True)
    assert raw["format"] == "hnd-head" and raw["fingerprint"] == fp
    full = faster.state_dict()
    assert sorted(raw["model"]) == sorted(k for k in full if is_head_key(k))
    assert len(raw["model"]) == 24
    assert not any(
        k.startswith(("backbone.body.layer1.decoder.", "backbone.body.layer2.", "backbone.fpn.", "rpn.", "roi_heads."))
        for k in raw["model"]
    )
    assert os.path.getsize(out) < os.path.getsize(path) / 50

    head, _ = split_model(target("faster_rcnn"))
    src_head, _ = split_model(faster)
    with torch.no_grad():
        batch, _ = src_head.preprocess(images)  # the tiny config's transform, for both heads
        z_src = src_head.encode(batch)
        assert not torch.equal(head.encode(batch), z_src)
        assert load_head(out, head) == fp
        assert torch.equal(head.encode(batch), z_src)
    for k, v in src_head.state_dict().items():
        assert torch.equal(head.state_dict()[k], v), k

    with pytest.raises(CheckpointError, match="head-only export") as e:
        load_checkpoint(out, target("faster_rcnn"))
    assert str(out) in str(e.value)
    with pytest.raises(CheckpointError, match="already a head-only export"):
        export_head(out, ckpt_dir / "head2.pt")


def test_export_head_from_original_file_carries_the_same_fingerprint(original_file, ckpt_dir, faster):
    out = ckpt_dir / "head-from-original.pt"
    assert export_head(original_file("faster_rcnn", False, True), out) == fingerprint(faster)
    assert torch.load(out, weights_only=True)["fingerprint"] == fingerprint(faster)


def test_head_refusals(teacher_file, original_file, ckpt_dir, target):
    with pytest.raises(CheckpointError, match="teacher") as e:
        export_head(teacher_file, ckpt_dir / "teacher-head.pt")
    assert str(teacher_file) in str(e.value)
    head, _ = split_model(target("faster_rcnn"))
    mask_path = original_file("mask_rcnn", True)
    with pytest.raises(CheckpointError, match="mask_rcnn") as e:
        load_head(mask_path, head)
    assert str(mask_path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# Refusals: each a CheckpointError naming the file and the problem; the model is left untouched.


def _bare_sd_file(ckpt_dir, name, sd):
    path = ckpt_dir / name
    torch.save(sd, path)
    return path


def _half(path, name):
    data = path.read_bytes()
    out = path.with_name(name)
    out.write_bytes(data[: len(data) // 2])
    return out


@pytest.fixture
def bad_file(request, ckpt_dir, faster, ours, original_file, teacher_file):
    """A file the loader must refuse, and the words the message must hold."""
    case = request.param
    sd = faster.state_dict()
    if case == "six_channels":
        path = ckpt_dir / "six.pt"
        save_checkpoint(path, seeded("faster_rcnn", 6, 1))
        return path, ["6-channel", "3-channel"]
    if case == "teacher_into_student":
        return teacher_file, ["faster_rcnn teacher", "3-channel"]
    if case == "wrong_kind":
        return original_file("mask_rcnn", True), ["mask_rcnn", "faster_rcnn"]
    if case == "missing_keys":
        drop = {"rpn.head.cls_logits.weight", "roi_heads.box_head.fc7.bias"}
        path = _bare_sd_file(ckpt_dir, "missing.pt", {k: v for k, v in sd.items() if k not in drop})
        return path, ["2 missing keys", "roi_heads.box_head.fc7.bias"]
    if case == "wrong_shape":
        bad = dict(sd, **{"roi_heads.box_predictor.cls_score.weight": torch.zeros(5, 1024)})
        return _bare_sd_file(ckpt_dir, "shape.pt", bad), ["cls_score.weight", "(5, 1024)", "(91, 1024)"]
    if case == "truncated_zip":
        return _half(ours[0], "ours-half.pt"), ["truncated"]
    if case == "truncated_legacy":
        return _half(original_file("faster_rcnn", True), "legacy-half.pt"), ["truncated"]
    if case == "text":
        path = ckpt_dir / "notes.pt"
        path.write_text("This is not a checkpoint.\nJust some notes about one.\n")
        return path, ["not a PyTorch checkpoint"]
    if case == "empty":
        path = ckpt_dir / "empty.pt"
        path.write_bytes(b"")
        return path, ["not a PyTorch checkpoint"]
    if case == "tensor":
        path = ckpt_dir / "tensor.pt"
        torch.save(torch.zeros(3), path)
        return path, ["not a checkpoint", "Tensor"]
    if case == "dict_subclass":
        path = ckpt_dir / "evil-dict.pt"
        torch.save({"model": EvilStateDict((k, sd[k]) for k in list(sd)[:3])}, path)
        return path, ["refused", "allowlist", "EvilStateDict"]
    if case == "tampered":
        raw = torch.load(ours[0], weights_only=True)
        raw["model"]["roi_heads.box_head.fc6.bias"] = raw["model"]["roi_heads.box_head.fc6.bias"] + 1
        path = ckpt_dir / "tampered.pt"
        torch.save(raw, path)  # the stored fingerprint is the untouched model's
        return path, ["fingerprint"]
    if case == "missing_file":
        return ckpt_dir / "nowhere.pt", ["no such checkpoint file"]
    raise AssertionError(case)


REFUSALS = [
    "six_channels",
    "teacher_into_student",
    "wrong_kind",
    "missing_keys",
    "wrong_shape",
    "truncated_zip",
    "truncated_legacy",
    "text",
    "empty",
    "tensor",
    "dict_subclass",
    "tampered",
    "missing_file",
]


@pytest.mark.parametrize("bad_file", REFUSALS, indirect=True)
def test_refused(bad_file, target):
    path, words = bad_file
    model = target("faster_rcnn")
    before = target.fingerprint("faster_rcnn")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model)
    message = str(e.value)
    assert str(path) in message
    for word in words:
        assert word in message
    assert fingerprint(model) == before


@pytest.mark.parametrize("container", ["torch.save", "torch.save-legacy", "raw-pickle"])
def test_pickled_code_is_refused_not_run(ckpt_dir, target, container):
    marker = ckpt_dir / f"pwned-{container}"
    path = ckpt_dir / f"shell-{container}.pt"
    payload = {"model": {"x": torch.zeros(1)}, "args": RunsShell(marker)}
    if container == "raw-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=container == "torch.save")
    model = target("faster_rcnn")
    with pytest.raises(CheckpointError, match="refused") as e:
        load_checkpoint(path, model)
    assert str(path) in str(e.value)
    assert not marker.exists()
    # The same bytes really do run the command when unpickled without the allowlist.
    if container == "torch.save":
        assert "system" in str(e.value)
        torch.load(path, weights_only=False)
        assert marker.exists()
