"""Rate-accuracy of Entropic Students vs HND / GHND at 2/4/8 bits vs JPEG, same teacher, same frames.

Builds on experiments/synthetic_distillation.py (its data, teacher, HND and GHND students: run it first
or let this script run it), then, through the project's own entry points:

1. trains Entropic Students (sc2bench's 24-channel FP bottleneck) from the same teacher at several rate
   weights beta (``hnd-train``, ``train.method: entropic``: stage 1 distillation + beta * bits, tables,
   stage 2 detection fine-tuning of the tail);
2. evaluates on the same val split with ``hnd-eval``: HND / GHND through the affine codec at 8/4/2 bits
   (zstd, per tensor) and the Entropic Students through learned entropy coding; each reports bbox AP and
   the mean coded bytes per image;
3. evaluates the teacher on the val frames compressed as JPEG at several qualities (bytes = JPEG file);
4. times, per frame, the heads and the codecs (encode / decode) on the val frames.

Writes ``OUT/entropic_results.json`` and ``OUT/entropic_results.md``.

    python experiments/synthetic_distillation.py --out /tmp/hnd-exp          # baseline (or let this run it)
    python experiments/entropic_rate_accuracy.py --out /tmp/hnd-exp          # adds the Entropic Students
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_distillation as base
from hnd.train import evaluate as hnd_eval
from hnd.train import cli as train_cli
from hnd.bench.agreement import match_f1
from hnd.bench.rate import image_roundtrip
from hnd.train.synthetic import write_config

BETAS = (2.56, 20.48, 163.84)
# Sized for the project's 2-core machine while 7 other engineers load it (~1/5 of a core each): minutes.
base.PROFILES.setdefault(
    "mini",
    dict(
        train_images=64,
        val_images=16,
        size=64,
        batch_size=4,
        teacher_epochs=4,
        student_epochs=2,
        teacher_lr=0.005,
        workers=0,
        bits=[(8, "tensor"), (4, "tensor"), (2, "tensor")],
    ),
)
JPEG_QUALITIES = (10, 25, 50, 75, 95)
WEBP_QUALITIES = (10, 25, 50, 80)
PRIOR_LR = 0.01
AFFINE = ((8, "tensor"), (4, "tensor"), (2, "tensor"))


def entropic_config(
    out: Path,
    data: Path,
    p: dict,
    beta: float,
    stage1_epochs: int,
    stage2_epochs: int,
    prior_lr: float | None = PRIOR_LR,
    warmup_iters: int = 50,
) -> Path:
    """An Entropic Student config from the shared teacher. prior_lr: stage 1's lr for the prior (None: the
    optimizer's 1e-3, sc2bench); with 1e-3 a few hundred iterations leave the densities near their broad
    init (about 5 bits per symbol), with 1e-2 the rate settles within ~100 (docs/ENTROPIC.md)."""
    params = base.model_params(p["size"])
    dataset = {"name": "synthetic", "num_workers": p["workers"], "aspect_ratio_group_factor": 0}
    return write_config(
        "test/faster_rcnn-entropic-b24ch",
        data,
        out / "configs" / f"entropic-beta{beta}-e{stage1_epochs}.yaml",
        dataset=dataset,
        model={"num_classes": 4, "params": params, "random_weights": 0},
        teacher={
            "num_classes": 4,
            "params": params,
            "checkpoint": str(out / "teacher" / "best.pt"),
            "random_weights": None,
        },
        train={
            "method": "entropic",
            "epochs": stage1_epochs,
            "batch_size": p["batch_size"],
            "log_freq": 10,  # the rate's curve in log.jsonl
            "optimizer": {"type": "adam", "lr": 0.001},
            "scheduler": {"milestones": [max(1, int(stage1_epochs * 0.75))], "gamma": 0.1},
            "warmup_iters": warmup_iters,
            "holdout_fraction": 0.1,
            "seed": 0,
            "beta": beta,
            "prior_lr": prior_lr,
            "stage2": {
                "epochs": stage2_epochs,
                "optimizer": {"type": "sgd", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0005},
                "scheduler": {"milestones": [max(1, stage2_epochs)], "gamma": 0.1},
                "warmup_iters": 0,
            },
        },
    )


def load_model(cfg: Path, ckpt: Path, device: str = "cpu") -> torch.nn.Module:
    from hnd.common.build import build_model_from_config
    from hnd.common.config import load_config, with_weights

    c = load_config(cfg)
    return build_model_from_config(with_weights(c.model, checkpoint=str(ckpt)), c.path).to(device).eval()


def val_loader(cfg: Path):
    from hnd.common.config import load_config
    from hnd.train.data import build_dataset, make_loader

    c = load_config(cfg)
    return make_loader(build_dataset(c.dataset, "val", c.model.kind, train=False), 1, 0)


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in 0..1 (the loader's to_tensor of a uint8 frame) -> the H x W x 3 uint8 frame, exactly."""
    return img.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


class ImageOffload:
    """The teacher on frames sent as JPEG / WebP at ``quality`` (the offload baseline); counts the file bytes."""

    def __init__(self, teacher: torch.nn.Module, family: str, quality: int) -> None:
        self.teacher, self.roundtrip = teacher, image_roundtrip(family, quality)
        self.sizes: list[int] = []

    def __call__(self, images: list[torch.Tensor]) -> list[dict]:
        sent = []
        for img in images:
            data, decoded = self.roundtrip(to_uint8(img))
            self.sizes.append(len(data))
            sent.append(torch.from_numpy(decoded).permute(2, 0, 1).float().div(255).to(img.device))
        return self.teacher(sent)

    @property
    def bytes_per_image(self) -> float:
        return float(np.mean(self.sizes))


@torch.inference_mode()
def score(predictor, loader, device: str, reference: list[dict] | None, f1_score: float) -> dict:
    """bbox AP / AP50 (COCO, on the val annotations), F1 against the teacher's detections on the original
    frames (IoU 0.5, both cut at ``f1_score``), bytes per frame; and the detections."""
    outputs, ids, _ = hnd_eval.predict_dataset(predictor, loader, device)
    results = hnd_eval.to_coco_results(outputs, ids, ["bbox"])
    metrics, _ = hnd_eval.coco_evaluate(loader.dataset.coco, results, ids)
    ref = outputs if reference is None else reference
    f1 = float(np.mean([match_f1(r, o, 0.5, f1_score) for r, o in zip(ref, outputs)]))
    bytes_ = getattr(predictor, "bytes_per_image", None)
    return {
        "AP": metrics["bbox"]["AP"],
        "AP50": metrics["bbox"]["AP50"],
        "f1_vs_teacher": f1,
        "bytes": float(bytes_) if bytes_ is not None else None,
        "outputs": outputs,
    }


def accuracy_rows(
    cfgs: dict[str, Path], ckpts: dict[str, Path], ent: dict[float, tuple[Path, Path]], device: str, f1_score: float
) -> tuple[list[dict], dict]:
    """Every setting on the same val frames against the same teacher: HND / GHND at 8/4/2 bits (zstd), the
    Entropic Students (learned coding), the teacher on JPEG / WebP frames."""
    loader = val_loader(cfgs["teacher"])
    teacher = load_model(cfgs["teacher"], ckpts["teacher"], device)
    ref = score(teacher, loader, device, None, f1_score)
    n_ref = sum(int((o["scores"] >= f1_score).sum()) for o in ref["outputs"])
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
    floor = float(np.mean([match_f1(r, empty, 0.5, f1_score) for r in ref["outputs"]]))
    info = {
        "val_frames": len(loader.dataset),
        "teacher_detections_at_cut": n_ref,
        "f1_score_cut": f1_score,
        "f1_empty_detector": floor,
    }
    rows = []

    def add(name: str, family: str, r: dict) -> None:
        rows.append({"name": name, "family": family, **{k: v for k, v in r.items() if k != "outputs"}})
        b = "-" if r["bytes"] is None else f"{r['bytes']:,.0f}"
        print(f"=> {name}: AP {r['AP']:.4f} AP50 {r['AP50']:.4f} F1 {r['f1_vs_teacher']:.3f} bytes {b}", flush=True)

    add("teacher, original frames", "teacher", ref)
    for name in ("hnd", "ghnd"):
        model = load_model(cfgs[name], ckpts[name], device)
        for bits, gran in AFFINE:
            pred = hnd_eval.make_predictor(model, bits=bits, granularity=gran)
            add(f"{name.upper()} b3ch {bits}-bit zstd", name, score(pred, loader, device, ref["outputs"], f1_score))
    for beta, (cfg, ckpt) in ent.items():
        pred = hnd_eval.make_predictor(load_model(cfg, ckpt, device), compression="learned")
        add(f"Entropic b24ch beta {beta:g}", "entropic", score(pred, loader, device, ref["outputs"], f1_score))
    for family, qualities in (("JPEG", JPEG_QUALITIES), ("WebP", WEBP_QUALITIES)):
        for q in qualities:
            pred = ImageOffload(teacher, family, q)
            add(f"teacher on {family} q{q}", family.lower(), score(pred, loader, device, ref["outputs"], f1_score))
    return rows, info


def comparison(rows: list[dict], measure: str, f1_floor: float) -> list[dict]:
    """For each Entropic point: the fewest bytes any HND / GHND setting, and any JPEG / WebP quality, needs
    to reach at least its ``measure`` (AP or f1_vs_teacher), and the ratios (the target: <= 0.5).

    A point whose F1 vs the teacher is no better than ``f1_floor`` (what a detector that returns nothing
    scores: the share of frames where the teacher has nothing above the cut either) has no accuracy to
    match: it gets no ratios, rather than a flattering one against settings that do detect."""
    out = []
    for e in (r for r in rows if r["family"] == "entropic"):
        item = {"name": e["name"], "bytes": e["bytes"], measure: e[measure]}
        item["detects_nothing"] = e["f1_vs_teacher"] <= f1_floor + 1e-9
        if item["detects_nothing"]:
            for label in ("split", "jpeg", "webp"):
                item[label], item[f"{label}_ratio"] = None, None
            out.append(item)
            continue
        for label, fams in (("split", ("hnd", "ghnd")), ("jpeg", ("jpeg",)), ("webp", ("webp",))):
            ok = [r for r in rows if r["family"] in fams and r[measure] >= e[measure]]
            best = min(ok, key=lambda r: r["bytes"]) if ok else None
            item[label] = None if best is None else {"name": best["name"], "bytes": best["bytes"]}
            item[f"{label}_ratio"] = None if best is None else e["bytes"] / best["bytes"]
        out.append(item)
    return out


def per_frame(models: dict[str, torch.nn.Module], frames: list[np.ndarray], repeats: int = 2) -> dict[str, dict]:
    """Per frame at the frames' own size: head ms, codec encode / decode ms (medians), bytes, head parameters.
    HND at 8 / 4 / 2 bits (zstd, per tensor), each Entropic Student with its learned coding, and JPEG /
    WebP bytes of the same frames for scale."""
    from hnd.bench.rate import model_at
    from hnd.common.split import split_model
    from hnd.edge.pipeline import to_tensor

    hw = frames[0].shape[:2]
    inputs = [to_tensor(f) for f in frames]
    out: dict[str, dict] = {}
    for name, model in models.items():
        head, _ = split_model(model_at(model, "native", hw))
        entropic = hasattr(head, "prior_tables")
        prior = head.prior_tables() if entropic else None
        h_ms, zs = _time_head(head, inputs, repeats)
        params = _head_params(head, entropic)
        for mode, args in _codec_modes(entropic).items():
            e_ms, d_ms, sizes = _time_codec(zs, args, prior, repeats)
            key = name if entropic else f"{name} {mode}"
            out[key] = {
                "codec": mode if not entropic else "learned",
                "bytes_mean": float(np.mean(sizes)),
                "head_ms_p50": float(np.median(h_ms)),
                "encode_ms_p50": float(np.median(e_ms)),
                "decode_ms_p50": float(np.median(d_ms)),
                "head_params": params,
                "latent_shape": list(zs[0].shape),
            }
            print(f"=> per frame {key}: {out[key]}", flush=True)
    out.update(_image_codecs(frames))
    return out


def _codec_modes(entropic: bool) -> dict[str, dict]:
    """codec.encode's arguments by name: the learned coding for an Entropic Student, else HND's affine bits."""
    if entropic:
        return {"learned": dict(bits=0, granularity="channel", compression="learned")}
    return {f"{b}-bit": dict(bits=b, granularity="tensor", compression="zstd") for b, _ in AFFINE}


def _time_head(head, inputs: list[torch.Tensor], repeats: int) -> tuple[list[float], list[torch.Tensor]]:
    """The head's best-of-``repeats`` ms per frame (after one warm-up) and each frame's bottleneck."""
    head([inputs[0]])  # warm-up
    h_ms, zs = [], []
    for x in inputs:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            z, _meta = head([x])
            best = min(best, (time.perf_counter() - t) * 1e3)
        h_ms.append(best)
        zs.append(z)
    return h_ms, zs


def _head_params(head, entropic: bool) -> int:
    """Parameters on the edge: the encoder, and for HND the stem (conv1, bn1) it runs first."""
    if entropic:
        return int(sum(p.numel() for p in head.encoder.parameters()))
    return int(
        sum(p.numel() for p in head.encoder.parameters())
        + sum(p.numel() for p in [head.conv1.weight, *head.bn1.parameters()])
    )


def _time_codec(zs: list[torch.Tensor], args: dict, prior, repeats: int) -> tuple[list[float], list[float], list[int]]:
    """Per bottleneck: best-of-``repeats`` encode and decode ms, and the encoded size on the wire."""
    from hnd.common import codec

    e_ms, d_ms, sizes = [], [], []
    for z in zs:
        be, bd = float("inf"), float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            enc = codec.encode(z, **args, prior=prior)
            be = min(be, (time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            codec.decode(enc, prior=prior)
            bd = min(bd, (time.perf_counter() - t) * 1e3)
        e_ms.append(be)
        d_ms.append(bd)
        sizes.append(enc.wire_size)
    return e_ms, d_ms, sizes


def _image_codecs(frames: list[np.ndarray]) -> dict[str, dict]:
    """JPEG q50 / q75 and WebP q50 of the same frames, for scale: mean bytes, encode + decode ms p50."""
    out = {}
    for family, qualities in (("JPEG", (50, 75)), ("WebP", (50,))):
        for q in qualities:
            rt = image_roundtrip(family, q)
            sizes, e_ms = [], []
            for f in frames:
                t = time.perf_counter()
                data, _ = rt(f)
                e_ms.append((time.perf_counter() - t) * 1e3)
                sizes.append(len(data))
            out[f"{family} q{q}"] = {
                "bytes_mean": float(np.mean(sizes)),
                "encode_decode_ms_p50": float(np.median(e_ms)),
            }
    return out


def synthetic_video(out: Path, frames: int) -> list[np.ndarray]:
    """A camera-like clip (moving shapes on a photo background, sensor noise, 320 x 240): hnd-make-synthetic-coco --video."""
    from hnd.bench.frames import load_frames
    from hnd.train.synthetic_cli import main as make_main

    root = out / "video"
    mp4 = root / "val2017.mp4"
    if not mp4.is_file():
        base.run(make_main, [str(root), "--video", "--frames", str(frames), "--images", "0", "--val-images", "1"])
    found = sorted(root.rglob("*.mp4"))
    if not found:
        raise SystemExit(f"{root}: hnd-make-synthetic-coco --video wrote no .mp4")
    return load_frames(None, str(found[0]), frames)[0]


def plot(rows: list[dict], path: Path, title: str) -> None:
    """bytes / frame (log) against F1 vs the teacher and against bbox AP, one curve per family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families = {"hnd": "HND b3ch", "ghnd": "GHND b3ch", "entropic": "Entropic b24ch", "jpeg": "JPEG", "webp": "WebP"}
    for ax, measure, label in (
        (axes[0], "f1_vs_teacher", "F1 vs the teacher's detections"),
        (axes[1], "AP", "bbox AP"),
    ):
        for fam, name in families.items():
            pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["bytes"])
            if not pts:
                continue
            ax.plot([r["bytes"] for r in pts], [r[measure] for r in pts], marker="o", label=name)
            for r in pts:
                tag = r["name"].split()[-1] if fam in ("jpeg", "webp", "entropic") else r["name"].split()[2]
                ax.annotate(tag, (r["bytes"], r[measure]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        teacher = next(r for r in rows if r["family"] == "teacher")
        ax.axhline(teacher[measure], color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per frame (log)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    lines = ["| setting | bbox AP | AP50 | F1 vs teacher | bytes / frame |", "|---|---|---|---|---|"]
    for r in rows:
        b = "-" if r["bytes"] is None else f"{r['bytes']:,.0f}"
        lines.append(f"| {r['name']} | {r['AP']:.3f} | {r['AP50']:.3f} | {r['f1_vs_teacher']:.3f} | {b} |")
    return "\n".join(lines)


def comparison_table(items: list[dict], measure: str) -> str:
    label = {"AP": "bbox AP", "f1_vs_teacher": "F1 vs teacher"}[measure]
    lines = [
        f"| Entropic | bytes | {label} | fewest HND/GHND bytes at >= that | ratio | fewest JPEG | ratio | fewest WebP | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(item: dict, key: str) -> str:
        v = item[key]
        if item.get("detects_nothing"):
            return "no accuracy to match (F1 at the empty-detector floor) | -"
        if v is None:
            return "none reaches it | -"
        return f"{v['bytes']:,.0f} ({v['name']}) | {item[key + '_ratio']:.2f}x"

    for it in items:
        lines.append(
            f"| {it['name']} | {it['bytes']:,.0f} | {it[measure]:.3f} | {cell(it, 'split')} | {cell(it, 'jpeg')} | "
            f"{cell(it, 'webp')} |"
        )
    return "\n".join(lines)


def per_frame_table(res: dict[str, dict]) -> str:
    lines = [
        "| setting | bytes / frame | head ms | encode ms | decode ms | head parameters |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        if "head_ms_p50" in r:
            lines.append(
                f"| {name} | {r['bytes_mean']:,.0f} | {r['head_ms_p50']:.1f} | {r['encode_ms_p50']:.2f} | "
                f"{r['decode_ms_p50']:.2f} | {r['head_params']:,} |"
            )
        else:
            lines.append(f"| {name} (whole frame) | {r['bytes_mean']:,.0f} | - | - | - | - |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="the synthetic_distillation output folder (reused)")
    ap.add_argument("--profile", choices=sorted(base.PROFILES), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    ap.add_argument("--stage1-epochs", type=int, default=None, help="default: the profile's student epochs")
    ap.add_argument("--stage2-epochs", type=int, default=1)
    ap.add_argument("--prior-lr", type=float, default=PRIOR_LR, help=f"stage 1's prior lr (default {PRIOR_LR})")
    ap.add_argument("--warmup-iters", type=int, default=50)
    ap.add_argument(
        "--f1-score",
        type=float,
        default=0.2,
        help="score cut for F1 vs the teacher (default 0.2: the small synthetic teacher rarely scores 0.5)",
    )
    ap.add_argument("--video-frames", type=int, default=12, help="frames of the synthetic camera clip (default 12)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return ap.parse_args(argv)


def train_entropic_students(
    out: Path, data: Path, p: dict, args: argparse.Namespace, stage1: int, spent: dict[str, float]
) -> dict[float, tuple[Path, Path]]:
    """beta -> (config, best.pt) of an Entropic Student per ``args.betas``, trained with ``hnd-train`` unless
    its best.pt is there already; each training's seconds go to ``spent``."""
    ent: dict[float, tuple[Path, Path]] = {}
    for beta in args.betas:
        cfg = entropic_config(out, data, p, beta, stage1, args.stage2_epochs, args.prior_lr, args.warmup_iters)
        target = out / f"entropic-beta{beta}-e{stage1}"
        ent[beta] = (cfg, target / "best.pt")
        if not (target / "best.pt").is_file():
            t = time.perf_counter()
            argv = ["--config", str(cfg), "--output-dir", str(target), "--device", args.device, "--no-progress"]
            base.run(train_cli.main, argv)
            spent[f"train_entropic_beta{beta}"] = time.perf_counter() - t
    return ent


def per_frame_results(
    out: Path, cfgs: dict[str, Path], ckpts: dict[str, Path], ent: dict[float, tuple[Path, Path]], video_frames: int
) -> dict[str, dict]:
    """``per_frame`` of HND and each Entropic Student, by frame set: the sample photos (native size, one run
    per photo, averaged) and the synthetic camera clip of ``video_frames`` frames."""
    from hnd.edge.capture import sample_images

    models = {
        "hnd": load_model(cfgs["hnd"], ckpts["hnd"]),
        **{f"entropic beta {b:g}": load_model(*v) for b, v in ent.items()},
    }
    photos, names = sample_images()
    frames = {
        f"sample photos ({len(photos)}, native size, one by one)": [[f] for f in photos],
        f"synthetic camera clip ({video_frames} frames)": [synthetic_video(out, video_frames)],
    }
    # the sample photos differ in size: one run per photo, averaged
    return {label: mean_runs([per_frame(models, g) for g in groups]) for label, groups in frames.items()}


def mean_runs(runs: list[dict[str, dict]]) -> dict[str, dict]:
    """``per_frame`` results of several runs -> one: float figures averaged, the others from the first run."""
    return {
        k: {
            f: float(np.mean([r[k][f] for r in runs])) if isinstance(runs[0][k][f], float) else runs[0][k][f]
            for f in runs[0][k]
        }
        for k in runs[0]
    }


def write_results(out: Path, res: dict, p: dict) -> str:
    """``res`` as OUT/entropic_results.json, its tables as OUT/entropic_results.md and the plot; returns the
    markdown."""
    (out / "entropic_results.json").write_text(json.dumps(res, indent=2))
    md = "\n\n".join(
        [
            table(res["rows"]),
            comparison_table(res["comparison_f1"], "f1_vs_teacher"),
            comparison_table(res["comparison_ap"], "AP"),
            *[f"Per frame, {label}:\n\n{per_frame_table(r)}" for label, r in res["per_frame"].items()],
        ]
    )
    (out / "entropic_results.md").write_text(md + "\n")
    plot(
        res["rows"],
        out / "entropic_rate_accuracy.png",
        f"synthetic {p['size']}x{p['size']}, {res['val_frames']} val frames, one teacher",
    )
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    p = base.PROFILES[args.profile]
    out: Path = args.out
    t0 = time.perf_counter()
    if not (out / "ghnd" / "best.pt").is_file():
        base.main(["--out", str(out), "--profile", args.profile, "--device", args.device])
    data = out / "data"
    cfgs = base.write_configs(out, data, p)
    stage1 = args.stage1_epochs or p["student_epochs"]
    spent: dict[str, float] = {}
    ent = train_entropic_students(out, data, p, args, stage1, spent)
    ckpts = {name: out / name / "best.pt" for name in ("teacher", "hnd", "ghnd")}

    t = time.perf_counter()
    rows, info = accuracy_rows(cfgs, ckpts, ent, args.device, args.f1_score)
    spent["eval"] = time.perf_counter() - t
    t = time.perf_counter()
    pf = per_frame_results(out, cfgs, ckpts, ent, args.video_frames)
    spent["per_frame"] = time.perf_counter() - t
    spent["total"] = time.perf_counter() - t0
    from hnd.bench.report import machine_info

    res = {
        "profile": args.profile,
        "settings": p,
        "betas": args.betas,
        "stage1_epochs": stage1,
        "stage2_epochs": args.stage2_epochs,
        "prior_lr": args.prior_lr,
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "timings_s": {k: round(v, 1) for k, v in spent.items()},
        **info,
        "rows": rows,
        "comparison_f1": comparison(rows, "f1_vs_teacher", info["f1_empty_detector"]),
        "comparison_ap": comparison(rows, "AP", info["f1_empty_detector"]),
        "per_frame": pf,
    }
    print(write_results(out, res, p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
