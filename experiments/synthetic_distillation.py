"""HND vs GHND on a synthetic COCO-format dataset, and what bottleneck quantization costs.

Steps, all through the project's own entry points (hnd-make-synthetic-coco, hnd-train, hnd-eval):

1. make a synthetic detection dataset (rectangles / ellipses / triangles, COCO 2017 layout);
2. train a Faster R-CNN ResNet-50-FPN teacher from seeded random weights with the detection
   losses (``method: supervised``; ``--train-bn`` since there are no pretrained statistics);
3. distil two 3-channel students from it: HND (layer1 only) and GHND (layer1..layer4);
   the untrained student (teacher weights + random bottleneck) is saved as a baseline;
4. evaluate everything on the val split with hnd-eval: full precision, then head ->
   codec.roundtrip -> tail at 8, 4 and 2 bits (per tensor and per channel).

Writes ``OUT/results.json`` and ``OUT/results.md`` (a table to paste into train/EXPERIMENT.md).

    python experiments/synthetic_distillation.py --out /tmp/hnd-exp                 # CPU profile
    python experiments/synthetic_distillation.py --out /tmp/hnd-exp --profile gpu --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import TypedDict

import torch

from hnd.train import evaluate as hnd_eval
from hnd.train import cli as train_cli
from hnd.train import train as hnd_train
from hnd.train.synthetic import make_synthetic_coco, write_config


class Profile(TypedDict):
    train_images: int
    val_images: int
    size: int  # images are size x size pixels; the models' min_size = max_size
    batch_size: int
    teacher_epochs: int
    student_epochs: int
    teacher_lr: float
    workers: int
    bits: list[tuple[int, str]]  # (bits, granularity) settings evaluated after training


PROFILES: dict[str, Profile] = {
    # ~16 minutes on 2 (shared) CPU cores: small images, few proposals, a short schedule.
    "cpu": Profile(
        train_images=320,
        val_images=50,
        size=96,
        batch_size=4,
        teacher_epochs=4,
        student_epochs=3,
        teacher_lr=0.01,
        workers=1,
        bits=[(8, "tensor"), (4, "tensor"), (2, "tensor"), (2, "channel")],
    ),
    # About 10 minutes on one H100 (the teacher's 16 epochs take 3.3 of them).
    "gpu": Profile(
        train_images=1000,
        val_images=150,
        size=128,
        batch_size=8,
        teacher_epochs=16,
        student_epochs=8,
        teacher_lr=0.02,
        workers=8,
        bits=[(8, "tensor"), (4, "tensor"), (2, "tensor"), (4, "channel"), (2, "channel")],
    ),
    # Seconds: checks the pipeline end to end.
    "smoke": Profile(
        train_images=8,
        val_images=4,
        size=96,
        batch_size=2,
        teacher_epochs=1,
        student_epochs=1,
        teacher_lr=0.01,
        workers=0,
        bits=[(8, "tensor"), (2, "channel")],
    ),
}


def model_params(size: int) -> dict:
    """torchvision kwargs: fixed input size, and proposal / sampling counts scaled to a few objects per image."""
    return {
        "min_size": size,
        "max_size": size,
        "box_detections_per_img": 20,
        "rpn_pre_nms_top_n_train": 300,
        "rpn_post_nms_top_n_train": 150,
        "rpn_batch_size_per_image": 64,
        "rpn_pre_nms_top_n_test": 150,
        "rpn_post_nms_top_n_test": 75,
        "box_batch_size_per_image": 64,
    }


def write_configs(out: Path, data: Path, p: Profile) -> dict[str, Path]:
    params = model_params(p["size"])
    dataset = {"name": "synthetic", "num_workers": p["workers"], "aspect_ratio_group_factor": 0}
    teacher_ckpt = out / "teacher" / "best.pt"
    base = "test/faster_rcnn-b3ch"
    cfgs = {}
    tm = max(1, int(p["teacher_epochs"] * 0.75))
    cfgs["teacher"] = write_config(
        base,
        data,
        out / "configs" / "teacher.yaml",
        dataset=dataset,
        teacher=None,
        model={"bottleneck_channels": None, "num_classes": 4, "params": params, "random_weights": 0},
        train={
            "method": "supervised",
            "epochs": p["teacher_epochs"],
            "batch_size": p["batch_size"],
            "log_freq": 50,
            "optimizer": {"type": "sgd", "lr": p["teacher_lr"], "momentum": 0.9, "weight_decay": 0.0001},
            "scheduler": {"milestones": [tm], "gamma": 0.1},
            "warmup_iters": 100,
            "trainable": ["backbone", "rpn", "roi_heads"],
            "holdout_fraction": 0.1,
            "seed": 0,
        },
    )
    sm = max(1, int(p["student_epochs"] * 0.75))
    for method, layers in (("hnd", [1]), ("ghnd", [1, 2, 3, 4])):
        cfgs[method] = write_config(
            base,
            data,
            out / "configs" / f"{method}.yaml",
            dataset=dataset,
            model={"bottleneck_channels": 3, "num_classes": 4, "params": params, "random_weights": 0},
            teacher={"num_classes": 4, "params": params, "checkpoint": str(teacher_ckpt), "random_weights": None},
            train={
                "method": method,
                "epochs": p["student_epochs"],
                "batch_size": p["batch_size"],
                "log_freq": 50,
                "optimizer": {"type": "adam", "lr": 0.001},
                "scheduler": {"milestones": [sm], "gamma": 0.1},
                "warmup_iters": 100,
                "distill_layers": [f"backbone.body.layer{i}" for i in layers],
                "trainable": ["backbone.body.conv1", "backbone.body.layer1"],
                "holdout_fraction": 0.1,
                "seed": 0,
            },
        )
    return cfgs


def run(cli_main, argv: list[str]) -> None:
    print(
        "$", cli_main.__module__.replace("hnd.train.", "hnd-").replace("evaluate", "eval"), " ".join(argv), flush=True
    )
    rc = cli_main(argv)
    if rc != 0:
        raise SystemExit(f"step failed with exit code {rc}")


def evaluate(
    cfg: Path,
    ckpt: Path,
    out_json: Path,
    device: str,
    workers: int,
    bits: int | None = None,
    granularity: str = "tensor",
) -> dict:
    argv = [
        "--config",
        str(cfg),
        "--checkpoint",
        str(ckpt),
        "--split",
        "val",
        "--device",
        device,
        "--workers",
        str(workers),
        "--output",
        str(out_json),
    ]
    if bits is not None:
        argv += ["--bits", str(bits), "--granularity", granularity]
    run(hnd_eval.main, argv)
    metrics = json.loads(out_json.read_text())
    print(f"=> {out_json.stem}: bbox AP {metrics['bbox']['AP']:.4f} AP50 {metrics['bbox']['AP50']:.4f}", flush=True)
    return metrics


def table(results: dict, bit_settings: list[tuple[int, str]]) -> str:
    cols = ["float32"] + [f"{b}-bit {g}" for b, g in bit_settings]
    lines = ["| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, label in (
        ("teacher", "teacher (supervised, random init)"),
        ("untrained", "student b3ch, untrained bottleneck"),
        ("hnd", "student b3ch, HND"),
        ("ghnd", "student b3ch, GHND"),
    ):
        row = results.get(name, {})
        cells = []
        for col in cols:
            m = row.get(col)
            cells.append("-" if m is None else f"{m['AP']:.3f} / {m['AP50']:.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--select-by",
        choices=["bbox", "loss", "last"],
        default="bbox",
        help="students' model selection on the held-out split (the teacher always uses bbox)",
    )
    return ap.parse_args(argv)


def train_stage(
    name: str, cfgs: dict[str, Path], out: Path, device: str, extra: list[str], timings: dict[str, float]
) -> None:
    """``hnd-train`` of ``cfgs[name]`` into ``out/name``; its seconds go to ``timings["train_<name>"]``."""
    t = time.perf_counter()
    run(
        train_cli.main,
        ["--config", str(cfgs[name]), "--output-dir", str(out / name), "--device", device, "--no-progress", *extra],
    )
    timings[f"train_{name}"] = time.perf_counter() - t


def train_models(out: Path, cfgs: dict[str, Path], device: str, select_by: str, timings: dict[str, float]) -> None:
    """The teacher, then the untrained student (``out/untrained.pt``, the baseline), then HND and GHND."""
    from hnd.common.checkpoint import save_checkpoint
    from hnd.common.config import load_config

    train_stage("teacher", cfgs, out, device, ["--train-bn", "--select-by", "bbox"], timings)
    _, untrained = hnd_train.build_distillation_models(load_config(cfgs["hnd"]))
    save_checkpoint(out / "untrained.pt", untrained)
    train_stage("hnd", cfgs, out, device, ["--select-by", select_by], timings)
    train_stage("ghnd", cfgs, out, device, ["--select-by", select_by], timings)


def evaluate_models(out: Path, cfgs: dict[str, Path], p: Profile, device: str) -> dict[str, dict]:
    """bbox metrics per model ("teacher", "untrained", "hnd", "ghnd") and setting ("float32", and for the
    students "<bits>-bit <granularity>" of the profile's bits); each evaluation's JSON under ``out/eval``."""
    results: dict[str, dict] = {}
    evals = out / "eval"
    evals.mkdir(exist_ok=True)
    workers = p["workers"]
    results["teacher"] = {
        "float32": evaluate(cfgs["teacher"], out / "teacher/best.pt", evals / "teacher.json", device, workers)["bbox"]
    }
    results["untrained"] = {
        "float32": evaluate(cfgs["hnd"], out / "untrained.pt", evals / "untrained.json", device, workers)["bbox"]
    }
    for name in ("hnd", "ghnd"):
        ckpt = out / name / "best.pt"
        results[name] = {"float32": evaluate(cfgs[name], ckpt, evals / f"{name}.json", device, workers)["bbox"]}
        for bits, gran in p["bits"]:
            m = evaluate(cfgs[name], ckpt, evals / f"{name}-{bits}bit-{gran}.json", device, workers, bits, gran)
            results[name][f"{bits}-bit {gran}"] = m["bbox"]
    return results


def summarize(
    out: Path, profile: str, p: Profile, device: str, timings: dict[str, float], results: dict[str, dict]
) -> dict:
    """results.json: profile and its settings, the machine, timings, bbox results and each model's training
    history (from its last.pt)."""
    machine = (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    )
    summary = {
        "profile": profile,
        "settings": p,
        "device": machine,
        "torch": torch.__version__,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "bbox": results,
    }
    for name in ("teacher", "hnd", "ghnd"):
        last = torch.load(out / name / "last.pt", map_location="cpu", weights_only=True)
        summary[f"{name}_history"] = last["history"]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    p = PROFILES[args.profile]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    data = out / "data"
    make_synthetic_coco(data, images=p["train_images"], val_images=p["val_images"], size=(p["size"], p["size"]), seed=0)
    cfgs = write_configs(out, data, p)
    timings["data"] = time.perf_counter() - t0
    train_models(out, cfgs, args.device, args.select_by, timings)
    t = time.perf_counter()
    results = evaluate_models(out, cfgs, p, args.device)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    summary = summarize(out, args.profile, p, args.device, timings, results)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    md = table(results, p["bits"])
    (out / "results.md").write_text(md + "\n")
    print(md)
    print(json.dumps(summary["timings_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
