"""YAML configs: schema errors, the bundled files against the original's recipes, and where weights come from."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

from hnd.common.checkpoint import fingerprint, save_checkpoint, upgrade_legacy_keys
from hnd.common.config import Config, ConfigError, config_from_dict, load_config, with_weights
from hnd.common.build import build_model_from_config
from hnd.common.models import TORCHVISION_WEIGHT_URLS, build_model

KINDS = ("faster_rcnn", "mask_rcnn", "keypoint_rcnn")
FAMILY_CHANNELS = {"hnd": (3, 6, 9, 12, 15), "ghnd": (3, 6, 9, 12)}  # docs/ORIGINAL_MODELS.md section 2
CONFIG_ROOT = Path(str(resources.files("hnd.configs")))


def bundled() -> list[str]:
    return sorted(str(p.relative_to(CONFIG_ROOT).with_suffix("")) for p in CONFIG_ROOT.rglob("*.yaml"))


def raw(name: str) -> dict:
    return yaml.safe_load((CONFIG_ROOT / f"{name}.yaml").read_text())


# ---------------------------------------------------------------------------------------------
# The bundled configs.


def test_the_original_config_set_is_bundled():
    names = set(bundled())
    expected = {f"org/{k}" for k in KINDS}
    expected |= {f"{fam}/{k}-b{c}ch" for fam, cs in FAMILY_CHANNELS.items() for k in KINDS for c in cs}
    expected |= {f"test/{k}-b3ch" for k in KINDS}
    assert len(expected) == 33
    assert expected <= names
    # No stray channel counts in the families.
    for fam, cs in FAMILY_CHANNELS.items():
        got = {int(m.group(1)) for n in names if n.startswith(f"{fam}/") and (m := re.search(r"-b(\d+)ch$", n))}
        assert got == set(cs), fam


@pytest.mark.parametrize("name", bundled())
def test_every_bundled_config_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.path.endswith(f"{name}.yaml")
    family, stem = name.split("/")
    kind = stem.split("-")[0]
    assert cfg.model.kind == kind
    m = re.search(r"-b(\d+)ch(?:-|$)", stem)
    assert cfg.model.bottleneck_channels == (int(m.group(1)) if m else None)
    assert cfg.model.num_classes == (2 if kind == "keypoint_rcnn" else 91)
    if kind == "keypoint_rcnn":
        assert cfg.model.params.get("num_keypoints") == 17
    # Exactly one source of weights, never silently none.
    sources = [cfg.model.checkpoint, cfg.model.weights_url, cfg.model.random_weights]
    assert sum(s is not None for s in sources) == 1
    if family != "test":
        # The original sets no min_size / max_size: torchvision's defaults apply.
        assert not {"min_size", "max_size"} & set(cfg.model.params)
    assert load_config(CONFIG_ROOT / f"{name}.yaml") == cfg  # a path works as well as a bundled name


@pytest.mark.parametrize("family", sorted(FAMILY_CHANNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_family_files_differ_only_in_channels_and_checkpoint(family, kind):
    def without_channels(d: dict) -> dict:
        model = {k: v for k, v in d["model"].items() if k not in ("bottleneck_channels", "checkpoint")}
        return dict(d, model=model)

    ref = raw(f"{family}/{kind}-b3ch")
    for c in FAMILY_CHANNELS[family]:
        data = raw(f"{family}/{kind}-b{c}ch")
        assert data["model"]["bottleneck_channels"] == c
        assert data["model"]["checkpoint"] == ref["model"]["checkpoint"].replace("-b3ch.pt", f"-b{c}ch.pt")
        assert without_channels(data) == without_channels(ref), f"{family}/{kind}-b{c}ch"


@pytest.mark.parametrize("family", sorted(FAMILY_CHANNELS))
@pytest.mark.parametrize("kind", KINDS)
def test_distillation_recipes_match_the_original(family, kind):
    cfg = load_config(f"{family}/{kind}-b3ch")
    t = cfg.train
    epochs, milestones = (35, [9, 27]) if kind == "keypoint_rcnn" else (20, [5, 15])
    assert (t.method, t.epochs, t.batch_size, t.log_freq) == (family, epochs, 4, 1000)
    assert (t.optimizer.type, t.optimizer.lr) == ("adam", 1e-3)
    assert (t.scheduler.milestones, t.scheduler.gamma) == (milestones, 0.1)
    assert t.warmup_iters == 1000
    layers = ["backbone.body.layer1"] + (
        ["backbone.body.layer2", "backbone.body.layer3", "backbone.body.layer4"] if family == "ghnd" else []
    )
    assert t.distill_layers == layers
    assert t.trainable == ["backbone.body.conv1", "backbone.body.layer1"]
    # The student's checkpoint path is the original's, per family.
    assert cfg.model.checkpoint == (
        f"./resource/ckpt/{family}/coco2017-{kind}-backbone_custom_resnet50_from_{kind}-backbone_resnet50-b3ch.pt"
    )
    # The teacher: torchvision's COCO weights the original started from.
    assert cfg.teacher.kind == kind and cfg.teacher.bottleneck_channels is None
    assert cfg.teacher.num_classes == cfg.model.num_classes
    assert cfg.teacher.weights_url == TORCHVISION_WEIGHT_URLS[kind]
    _check_dataset(cfg, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_org_recipes_match_the_original(kind):
    cfg = load_config(f"org/{kind}")
    t = cfg.train
    epochs, milestones = (46, [36, 43]) if kind == "keypoint_rcnn" else (26, [16, 22])
    assert (t.method, t.epochs, t.batch_size) == ("supervised", epochs, 2)
    assert (t.optimizer.type, t.optimizer.lr, t.optimizer.momentum, t.optimizer.weight_decay) == (
        "sgd",
        0.0075,
        0.9,
        1e-4,
    )
    assert (t.scheduler.milestones, t.scheduler.gamma) == (milestones, 0.1)
    assert cfg.model.bottleneck_channels is None and cfg.teacher is None
    assert cfg.model.weights_url == TORCHVISION_WEIGHT_URLS[kind]
    _check_dataset(cfg, kind)


def _check_dataset(cfg: Config, kind: str) -> None:
    d = cfg.dataset
    assert (d.name, d.root, d.num_workers, d.aspect_ratio_group_factor) == (
        "coco2017",
        "./resource/dataset/coco2017",
        4,
        3,
    )
    prefix = "person_keypoints" if kind == "keypoint_rcnn" else "instances"
    assert d.splits["train"].images == "train2017"
    assert d.splits["train"].annotations == f"annotations/{prefix}_train2017.json"
    assert d.splits["train"].remove_non_annotated_imgs is True
    for split in ("val", "test"):  # the original evaluates both on val2017
        assert d.splits[split].images == "val2017"
        assert d.splits[split].annotations == f"annotations/{prefix}_val2017.json"
        assert d.splits[split].remove_non_annotated_imgs is False


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_test_configs_give_detections_from_random_weights(kind):
    cfg = load_config(f"test/{kind}-b3ch")
    assert cfg.model.params["box_score_thresh"] == 0.0
    assert cfg.model.random_weights is not None and cfg.model.bottleneck_channels == 3
    assert cfg.model.params["min_size"] <= 256 and cfg.model.params["max_size"] <= 512


# ---------------------------------------------------------------------------------------------
# Errors: ConfigError naming the file and the dotted key.

MINIMAL = {"model": {"kind": "faster_rcnn", "bottleneck_channels": 3, "random_weights": 0}}
FULL = {
    **MINIMAL,
    "dataset": {"root": "./data", "splits": {"train": {"images": "train2017", "annotations": "a.json"}}},
    "train": {"epochs": 2, "optimizer": {"type": "adam", "lr": 0.001}, "scheduler": {"milestones": [1]}},
    "runtime": {"bits": 8},
}


def edit(data: dict, dotted: str, value=None, delete: bool = False) -> dict:
    """A deep copy of ``data`` with ``dotted`` set to ``value`` (or deleted)."""
    out = yaml.safe_load(yaml.safe_dump(data))
    *parents, last = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    if delete:
        del node[last]
    else:
        node[last] = value
    return out


def write(tmp_path, data, name="cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_full_example_loads(tmp_path):
    cfg = load_config(write(tmp_path, FULL))
    assert cfg.model.bottleneck_channels == 3 and cfg.train.epochs == 2
    assert cfg.dataset.splits["train"].annotations == "a.json" and cfg.runtime.bits == 8
    assert cfg.train.optimizer.lr == 0.001 and isinstance(cfg.train.optimizer.lr, float)


def test_yaml_1_1_exponent_floats_are_numbers(tmp_path):
    # PyYAML reads 1e-3 (no dot) as a string; the loader takes it as the float the author meant.
    cfg = load_config(
        write(tmp_path, "model: {kind: faster_rcnn, random_weights: 0}\ntrain: {optimizer: {lr: 1e-3}, epochs: 3}\n")
    )
    assert cfg.train.optimizer.lr == 0.001 and cfg.train.epochs == 3


@pytest.mark.parametrize(
    ("data", "words"),
    [
        # unknown keys, at every depth (bottleneck_channel is the original's spelling)
        (edit(FULL, "modle", {}), ["unknown key modle"]),
        (edit(FULL, "model.bottleneck_channel", 3), ["unknown key model.bottleneck_channel"]),
        (edit(FULL, "train.optimizer.betas", [0.9, 0.99]), ["unknown key train.optimizer.betas"]),
        (edit(FULL, "dataset.splits.train.image_dir", "x"), ["unknown key dataset.splits.train.image_dir"]),
        # missing required keys
        (edit(FULL, "model", delete=True), ["missing required key model"]),
        (edit(FULL, "model.kind", delete=True), ["missing required key model.kind"]),
        (edit(FULL, "dataset.root", delete=True), ["missing required key dataset.root"]),
        (edit(FULL, "dataset.splits.train.images", delete=True), ["missing required key dataset.splits.train.images"]),
        # wrong types
        (edit(FULL, "model.bottleneck_channels", "three"), ["model.bottleneck_channels", "expected int"]),
        (edit(FULL, "model.random_weights", True), ["model.random_weights", "expected int"]),
        (edit(FULL, "train.epochs", 2.5), ["train.epochs", "expected int"]),
        (edit(FULL, "train.optimizer.lr", "fast"), ["train.optimizer.lr", "expected float"]),
        (edit(FULL, "train.scheduler.milestones", [5, "x"]), ["train.scheduler.milestones[1]", "expected int"]),
        (edit(FULL, "train.scheduler.milestones", 5), ["train.scheduler.milestones", "expected a list"]),
        (edit(FULL, "model.params", [1, 2]), ["model.params", "expected a mapping"]),
        (edit(FULL, "model.checkpoint", 5), ["model.checkpoint", "expected str"]),
        (edit(FULL, "train", "fast"), ["train", "expected a mapping"]),
        # bad choices and values
        (edit(FULL, "model.kind", "yolo"), ["model.kind", "'yolo' is not one of", "faster_rcnn"]),
        (edit(FULL, "runtime.bits", 5), ["runtime.bits", "5 is not one of"]),
        (edit(FULL, "train.optimizer.type", "rmsprop"), ["train.optimizer.type", "'rmsprop'"]),
        (edit(FULL, "train.method", "kd"), ["train.method", "'kd'"]),
        (edit(FULL, "runtime.compression", "gzip"), ["runtime.compression", "'gzip'"]),
        (edit(FULL, "model.bottleneck_channels", 0), ["bottleneck_channels must be >= 1"]),
        (
            edit(edit(FULL, "teacher", {"kind": "mask_rcnn", "random_weights": 1}), "model.kind", "faster_rcnn"),
            ["teacher.kind mask_rcnn", "model.kind faster_rcnn"],
        ),
        # not a mapping at all
        ([1, 2, 3], ["top level", "expected a mapping"]),
        (None, ["top level", "expected a mapping"]),
    ],
    ids=lambda v: re.sub(r"\W+", "_", v[0]) if isinstance(v, list) and v and isinstance(v[0], str) else "",
)
def test_bad_config_is_a_clear_error(tmp_path, data, words):
    path = write(tmp_path, data if data is not None else "")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ")
    for word in words:
        assert word in message


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  kind: faster_rcnn\n  params: {min_size: [800\n")
    with pytest.raises(ConfigError, match="not valid YAML") as e:
        load_config(path)
    assert str(path) in str(e.value) and re.search(r"line \d+", str(e.value))


def test_unknown_config_name():
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("hnd/faster_rcnn-b4ch")


def test_config_from_dict_names_its_source():
    with pytest.raises(ConfigError, match=r"^cli-args: unknown key model\.colour"):
        config_from_dict({"model": {"kind": "faster_rcnn", "colour": "red"}}, "cli-args")


# ---------------------------------------------------------------------------------------------
# Where the weights come from.


def test_checkpoint_that_does_not_exist_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ./resource/ckpt/... is relative to the working directory
    cfg = load_config("hnd/faster_rcnn-b3ch")
    with pytest.raises(ConfigError) as e:
        build_model_from_config(cfg.model, cfg.path)
    message = str(e.value)
    assert cfg.path in message and cfg.model.checkpoint in message and "does not exist" in message


def test_no_weights_at_all_is_an_error(tmp_path):
    path = write(tmp_path, {"model": {"kind": "mask_rcnn", "bottleneck_channels": 3}})
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="no weights") as e:
        build_model_from_config(cfg.model, cfg.path)
    assert str(path) in str(e.value)


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(tiny_model):
    model = tiny_model("faster_rcnn")  # configs/test/faster_rcnn-b3ch: random_weights 0
    cfg = load_config("hnd/faster_rcnn-b3ch")  # names a checkpoint that does not exist ...
    again = with_weights(cfg.model, random_weights=0)  # ... which --random-weights 0 overrides
    assert again.checkpoint is None and again.random_weights == 0
    state = torch.random.get_rng_state()
    rebuilt = build_model_from_config(again, cfg.path)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert fingerprint(rebuilt) == fingerprint(model)  # same seed, same weights (params don't matter)
    other = build_model_from_config(with_weights(again, random_weights=1), cfg.path)
    assert fingerprint(other) != fingerprint(model)


def test_checkpoint_named_in_config_or_by_with_weights_is_loaded(tmp_path, tiny_model):
    model = tiny_model("faster_rcnn")
    ckpt = tmp_path / "student.pt"
    fp = save_checkpoint(ckpt, model)
    # The tiny config asks for random weights; --checkpoint overrides it.
    cfg = load_config("test/faster_rcnn-b3ch")
    over = with_weights(cfg.model, checkpoint=str(ckpt))
    assert over.checkpoint == str(ckpt) and over.random_weights is None and over.weights_url is None
    loaded = build_model_from_config(dataclasses.replace(over, params={}), cfg.path)
    assert fingerprint(loaded) == fp
    assert with_weights(cfg.model) == cfg.model
    with pytest.raises(ConfigError, match="not both"):
        with_weights(cfg.model, checkpoint=str(ckpt), random_weights=0)


def test_weights_url_loads_released_torchvision_weights(monkeypatch):
    """org configs name torchvision's COCO files; they hold torchvision-0.3-era key names. No download here."""
    teacher = build_model("faster_rcnn")
    old_names = {}
    for k, v in teacher.state_dict().items():
        k = re.sub(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.0\.", r"\1.", k)
        old_names[re.sub(r"^rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", k)] = v
    assert "backbone.fpn.inner_blocks.0.weight" in old_names and "rpn.head.conv.weight" in old_names
    assert upgrade_legacy_keys(old_names).keys() == teacher.state_dict().keys()
    asked = []

    def fake_download(url, **kwargs):
        asked.append(url)
        return dict(old_names)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_download)
    cfg = load_config("org/faster_rcnn")
    loaded = build_model_from_config(cfg.model, cfg.path)
    assert asked == [TORCHVISION_WEIGHT_URLS["faster_rcnn"]]
    assert fingerprint(loaded) == fingerprint(teacher)
