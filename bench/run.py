"""One hnd-bench run: plan, measure against a real server, model the links, summarise, write the outputs."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hnd.common.checkpoint import fingerprint
from hnd.common.config import load_config
from hnd.common.build import build_model_from_config
from hnd.common.files import atomic_write_json, atomic_write_text
from hnd.edge.client import ClientSettings, SplitClient
from hnd.common.meta import check_fingerprint
from hnd.edge.pipeline import EdgeOptions

from hnd.bench.agreement import add_agreement
from hnd.bench.frames import MIXED_SEED, MIXED_SIZE, load_frames, mixed_frames
from hnd.bench.linkmodel import CROSSOVER_MBIT, FORMULA, SWEEP_MBIT, crossovers
from hnd.bench.measure import Measured, Sample, apply_server_profile, measure, pool_compute, serving
from hnd.bench.plan import PROG, BenchOptions, Plan, Setting, all_settings, plan
from hnd.bench.report import machine_info, plot_bytes, plot_latency, render_markdown
from hnd.bench.summary import BenchResult, FrameInfo, MixedInfo, RunInfo, Sweep, envelopes, summarize, to_json, wire_p50

OUTPUTS = ("results.md", "results.json", "bytes_per_frame.png", "latency_vs_bandwidth.png")


@dataclass
class Frames:
    images: list[np.ndarray]
    names: list[str]
    labels: list[bool] | None  # --mixed: True when the frame holds something to detect


def _frames(o: BenchOptions, p: Plan, out: Path) -> Frames:
    if o.mixed:
        images, names, labels = mixed_frames(p.frames, p.model.kind, out / "mixed-frames", o.empty_fraction)
        return Frames(images, names, labels)
    images, names = load_frames(o.images, o.video, p.frames)
    return Frames(images, names, None)


def _measure(
    p: Plan, model: torch.nn.Module, settings: list[Setting], frames: Frames, progress: bool
) -> tuple[Measured, str]:
    """Every frame through every setting against a real server; returns the measurements and the server's
    description."""
    rt = load_config(p.config_path).runtime
    fp = fingerprint(model)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(p.threads)  # the edge's half of the machine
    try:
        with serving(p.config_path, p.weights, model, p.in_process, p.threads) as (target, server_desc, answered):
            client = SplitClient(
                ClientSettings(
                    target=target, max_message_bytes=rt.max_message_bytes, timeout_s=max(rt.deadline_s, 600.0)
                )
            )
            try:
                info = client.model_info()
                check_fingerprint(info.weights_fingerprint, fp)
                measured = measure(settings, frames.images, frames.names, model, fp, client, progress, answered)
            finally:
                client.close()
    finally:
        torch.set_num_threads(previous_threads)
    return measured, server_desc


def run_bench(o: BenchOptions) -> dict[str, Any]:
    """Measure, model, write results.md / results.json / plots into ``o.out``; returns the JSON data."""
    out = Path(o.out)
    out.mkdir(parents=True, exist_ok=True)
    p = plan(o, out)
    load_before = [round(v, 2) for v in os.getloadavg()]
    _announce(o, p)
    cfg = load_config(p.config_path)
    model = build_model_from_config(p.model, cfg.path)
    frames = _frames(o, p, out)
    base = EdgeOptions(codec=cfg.runtime.codec, max_inflight=1, keep_detections=False)
    settings = all_settings(p.bits, o.granularities, base, p.filter.threshold if p.filter else None)

    (samples, records, detections, requests), server_desc = _measure(p, model, settings, frames, o.progress)
    reference_counts = add_agreement(settings, samples, detections, p.agreement_score)
    pool_compute(settings, samples)
    if o.server_profile:
        apply_server_profile(settings, samples, o.server_profile)

    rows = [summarize(s, samples[s.key], p.links, frames.labels, requests.get(s.key)) for s in settings]
    links = LinkCurves.of(settings, samples, o.sweep_rtt_ms)
    run = _run_info(o, p, out, frames, settings, server_desc, reference_counts)
    sweep = links.sweep(settings)
    machine = {**machine_info(), "loadavg_at_start": load_before}
    result = to_json(BenchResult(machine=machine, run=run, results=rows, records=records, sweep=sweep))
    write_outputs(result, out)
    links.plot(settings, samples, out / "latency_vs_bandwidth.png")
    for name in OUTPUTS:
        (out / name).chmod(0o644)  # atomic writes create 0600 temp files; results are for sharing
    return result


def _announce(o: BenchOptions, p: Plan) -> None:
    """Prints the plan's notes (with one for --server-profile, added to them) to stderr."""
    if o.server_profile:
        p.notes.append(
            "server compute replaced by --server-profile "
            + ", ".join(f"{k} {v:g} ms" for k, v in o.server_profile.items())
            + " in the link model (decode, queue and "
            "response encoding as measured; measured e2e and *_raw stay this machine's)"
        )
    for note in p.notes:
        print(f"{PROG}: {note}", file=sys.stderr)


def _run_info(
    o: BenchOptions,
    p: Plan,
    out: Path,
    frames: Frames,
    settings: list[Setting],
    server_desc: str,
    reference_counts: list[int],
) -> RunInfo:
    """What ran (config, weights, server, links, frames, settings) for the outputs."""
    return RunInfo(
        config=p.config,
        weights=("seeded random, seed " + p.weights[1])
        if p.random
        else (p.weights[1] if p.weights else "from the config"),
        random_weights=p.random,
        notes=p.notes,
        server=server_desc,
        threads=p.threads,
        formula=FORMULA,
        agreement_score=p.agreement_score,
        agreement_iou=0.5,
        reference_detections=reference_counts,
        links=p.links,
        frames=[
            FrameInfo(n, int(f.shape[0]), int(f.shape[1]), frames.labels[i] if frames.labels is not None else None)
            for i, (f, n) in enumerate(zip(frames.images, frames.names))
        ],
        mixed=MixedInfo(p.frames, o.empty_fraction, list(MIXED_SIZE), MIXED_SEED, str(out / "mixed-frames"))
        if o.mixed
        else None,
        filter=p.filter,
        settings=[s.key for s in settings],
    )


@dataclass
class LinkCurves:
    """Modelled latency against link bandwidth at ``rtt_ms``: each setting's curve and the best of each mode,
    over ``mbits`` (the crossover grid; ``shown``: the part the outputs sweep), and where the best changes
    (``marks``)."""

    rtt_ms: float
    mbits: np.ndarray
    shown: np.ndarray  # bool mask over mbits
    curves: dict[str, np.ndarray]
    best: dict[str, np.ndarray]
    marks: list[dict[str, Any]]

    @classmethod
    def of(cls, settings: list[Setting], samples: dict[str, list[Sample]], rtt_ms: float) -> LinkCurves:
        mbits = np.geomspace(CROSSOVER_MBIT[0], CROSSOVER_MBIT[1], 2000)
        curves, best = envelopes(settings, samples, mbits, rtt_ms)
        marks = crossovers(best, mbits)
        shown = (mbits >= SWEEP_MBIT[0]) & (mbits <= SWEEP_MBIT[1])
        return cls(rtt_ms, mbits, shown, curves, best, marks)

    def sweep(self, settings: list[Setting]) -> Sweep:
        """The JSON's sweep: every 5th shown grid point, the crossovers, and each split setting's against the
        best offload."""
        shown, mbits = self.shown, self.mbits
        return Sweep(
            rtt_ms=self.rtt_ms,
            mbit=mbits[shown][::5].tolist(),
            best={k: v[shown][::5].tolist() for k, v in self.best.items()},
            crossovers=self.marks,
            split_vs_best_offload={
                s.key: crossovers({s.key: self.curves[s.key], "best offload": self.best["best offload"]}, mbits)
                for s in settings
                if s.mode == "split"
            },
        )

    def plot(self, settings: list[Setting], samples: dict[str, list[Sample]], path: Path) -> None:
        """latency_vs_bandwidth.png over the shown range, with each sent setting's link share alone."""
        shown = self.shown
        wire = {
            s.key: wire_p50(samples[s.key], self.mbits[shown], self.rtt_ms)
            for s in settings
            if s.mode != "local" and not s.filtered
        }
        plot_latency(
            {k: v[shown] for k, v in self.curves.items()},
            {k: v[shown] for k, v in self.best.items()},
            wire,
            self.mbits[shown],
            [c for c in self.marks if SWEEP_MBIT[0] <= c["mbit"] <= SWEEP_MBIT[1]],
            self.rtt_ms,
            path,
        )


def write_outputs(result: dict[str, Any], out: Path) -> None:
    """results.json, results.md and the bytes plot from the JSON form of a run."""
    atomic_write_json(out / "results.json", result, indent=1)
    atomic_write_text(out / "results.md", render_markdown(result))
    plot_bytes(result["results"], out / "bytes_per_frame.png")
