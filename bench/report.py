"""hnd-bench's outputs: the machine header, results.md and the PNG plots (matplotlib, Agg backend)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hnd.bench.linkmodel import CROSSOVER_MBIT
from hnd.bench.plan import FILTER_SUFFIX


def machine_info() -> dict[str, Any]:
    """CPU model, cores, GPU, library versions and the date: enough to know where numbers came from."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"^Model name:\s*(.+)$", lscpu, re.M)
        if m and cpu in ("unknown", ""):
            cpu = m.group(1).strip()
    import torchvision

    import hnd

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "hnd": hnd.__version__,
        "platform": platform.platform(),
        "loadavg_1_5_15min": [round(v, 2) for v in os.getloadavg()],  # other work on the machine skews timings
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------------------
# Outputs


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "—" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def render_markdown(result: dict[str, Any]) -> str:
    """results.md: run notes, a per-setting summary, the mode x setting x link table and the crossovers."""
    lines = ["# hnd-bench results", ""] + _run_section(result) + _per_setting_section(result) + _link_section(result)
    lines += _filter_section(result) + _crossover_section(result) + [""]
    return "\n".join(lines)


def _run_section(result: dict[str, Any]) -> list[str]:
    """The machine, model, frames, server, notes and how the figures were made."""
    run = result["run"]
    lines = []
    m = result["machine"]
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, GPU: {m['gpu'] or 'none'}; torch {m['torch']}; "
        f"{m['date']}; load average {m.get('loadavg_at_start', ['?'])[0]} at the start, "
        f"{m['loadavg_1_5_15min'][0]} at the end.  "
    )
    if run.get("mixed"):
        mixed = run["mixed"]
        objects = sum(1 for f in run["frames"] if f.get("objects"))
        lines.append(
            f"Model: `{run['config']}`, weights: {run['weights']}. Frames: {len(run['frames'])} synthetic "
            f"{mixed['size'][0]}x{mixed['size'][1]} frames (`--mixed`, seed {mixed['seed']}), {objects} with "
            f"objects and {len(run['frames']) - objects} empty scenes, in {mixed['folder']}.  "
        )
    else:
        lines.append(
            f"Model: `{run['config']}`, weights: {run['weights']}. Frames: "
            + ", ".join(f"{f['name']} ({f['width']}x{f['height']})" for f in run["frames"])
            + ".  "
        )
    lines.append(f"Server: {run['server']}; edge: this process, {run['threads']} torch thread(s).  ")
    lines += [f"**{n}**  " for n in run["notes"]]
    lines += [
        "",
        f"Link model: `{run['formula']}`. Agreement: IoU-matched F1 at IoU 0.5, score >= "
        f"{run['agreement_score']}, against local mode's (unsplit float model) detections "
        f"({', '.join(map(str, run['reference_detections']))} per frame at that score). "
        "Edge and server ms: the network's compute is the median over the mode's runs on each frame (the "
        "same work whatever the codec setting); measured e2e: the raw loopback run. Raw per-run times are in "
        "results.json.",
        "",
    ]
    return lines


def _per_setting_section(result: dict[str, Any]) -> list[str]:
    rows, links = result["results"], result["run"]["links"]
    f1_label = "F1 vs local" + (" (random weights: not meaningful)" if result["run"]["random_weights"] else "")
    lines: list[str] = []
    lines += [
        "## Per setting",
        "",
        "| mode | setting | request B/frame mean (all frames) | p50 | ratio vs raw RGB | response B | edge ms p50 | "
        "server ms p50 | loopback ms p50 | measured e2e ms p50 | "
        + f1_label
        + " | "
        + " | ".join(f"{link['name']} p50 ms" for link in links)
        + " |",
        "|" + "---|" * (11 + len(links)),
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['setting']} | {_fmt(r['request_bytes']['mean'])} | "
            f"{_fmt(r['request_bytes']['p50'])} | "
            f"{_fmt(r['compression_ratio'], '.1f')} | {_fmt(r['response_bytes']['mean'])} | "
            f"{_fmt(r['edge_ms']['p50'], '.1f')} | {_fmt((r['server_ms'] or {}).get('p50'), '.1f')} | "
            f"{_fmt((r['loopback_ms'] or {}).get('p50'), '.2f')} | {_fmt(r['measured_total_ms']['p50'], '.1f')} | "
            f"{_fmt(r['agreement_f1'], '.3f')} | "
            + " | ".join(_fmt(r["latency_ms"][link["name"]]["p50"], ".1f") for link in links)
            + " |"
        )
    return lines


def _link_section(result: dict[str, Any]) -> list[str]:
    rows, links = result["results"], result["run"]["links"]
    lines: list[str] = []
    lines += [
        "",
        "## Mode x setting x link",
        "",
        "| mode | setting | link | bytes/frame mean | bytes/frame p50 | ratio vs raw RGB | edge ms p50 | "
        "server ms p50 | e2e ms p50 | e2e ms p95 |",
        "|" + "---|" * 10,
    ]
    for r in rows:
        for link in links:
            lat = r["latency_ms"][link["name"]]
            lines.append(
                f"| {r['mode']} | {r['setting']} | {link['name']} ({_fmt(link['mbit'], 'g')} Mbit/s, "
                f"{_fmt(link['rtt_ms'], 'g')} ms) | {_fmt(r['request_bytes']['mean'])} | "
                f"{_fmt(r['request_bytes']['p50'])} | "
                f"{_fmt(r['compression_ratio'], '.1f')} | {_fmt(r['edge_ms']['p50'], '.1f')} | "
                f"{_fmt((r['server_ms'] or {}).get('p50'), '.1f')} | {_fmt(lat['p50'], '.1f')} | "
                f"{_fmt(lat['p95'], '.1f')} |"
            )
    return lines


def _crossover_section(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    sweep = result["sweep"]
    lines += ["", f"## Crossovers (bandwidth sweep at RTT {sweep['rtt_ms']:g} ms, p50 latency)", ""]
    if not sweep["crossovers"]:
        lines.append(f"None between {CROSSOVER_MBIT[0]:g} and {CROSSOVER_MBIT[1]:g} Mbit/s: " + _ordering(sweep) + ".")
    for c in sweep["crossovers"]:
        a, b = c["between"]
        slower = b if c["faster_above"] == a else a
        lines.append(
            f"- {a} vs {b}: cross at {c['mbit']:.3g} Mbit/s ({c['latency_ms']:.0f} ms); "
            f"{c['faster_above']} is faster above, {slower} below."
        )
    for end in (0, -1):
        lines.append(f"- at {sweep['mbit'][end]:.3g} Mbit/s: {_ordering(sweep, end)}.")
    lines += ["", "Each split setting against the best offload setting at each bandwidth:", ""]
    for key, found in sweep["split_vs_best_offload"].items():
        where = "; ".join(f"cross at {c['mbit']:.3g} Mbit/s, {c['faster_above']} faster above" for c in found)
        lines.append(f"- {key}: {where or f'no crossover in {CROSSOVER_MBIT[0]:g}-{CROSSOVER_MBIT[1]:g} Mbit/s'}.")
    return lines


def _filter_section(result: dict[str, Any]) -> list[str]:
    """ "With the neural filter": each filtered setting next to the same setting without the filter."""
    run, rows, links = result["run"], result["results"], result["run"]["links"]
    filtered = [r for r in rows if r.get("filter")]
    if not filtered:
        return []
    by = {(r["mode"], r["setting"]): r for r in rows}
    labelled = "with_objects" in filtered[0]["filter"]  # synthetic frames say which hold objects
    lines = _filter_intro(run["filter"])
    head = _filter_head(links, labelled)
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in filtered:
        plain = by.get((r["mode"], r["setting"][: -len(FILTER_SUFFIX)]))
        for row in ([plain] if plain else []) + [r]:
            lines.append("| " + " | ".join(_filter_cells(row, links, labelled)) + " |")
    return lines + ["", _filter_probabilities(run["frames"], filtered[0]["filter"]["probability"], labelled)]


def _filter_intro(flt: dict[str, Any]) -> list[str]:
    """The section's heading and what its columns count; a warning when the filter's weights are random."""
    lines = [
        "",
        "## With the neural filter",
        "",
        f"Threshold {flt['threshold']:g} ({flt['threshold_from']}); filter weights: {flt['weights']}. A frame "
        "whose filter probability is below the threshold is not encoded nor sent: 0 bytes, no server time, "
        'and its latency is its edge time (preprocess + stem + filter), with no link cost. "all frames" '
        'counts those frames (what the link carries on average); "sent" only the frames that went to '
        "the server. Server requests: the server's own count (hnd_requests_total) for that setting.",
        "",
    ]
    if not flt["trained"]:
        lines += ["**The filter has random weights: which frames it drops says nothing about what they show.**", ""]
    return lines


def _filter_head(links: list[dict[str, Any]], labelled: bool) -> list[str]:
    """The filter table's column names: per-frame counts and bytes, then two latency columns per link."""
    head = ["setting", "frames sent / filtered"]
    if labelled:
        head.append("filtered: with objects / empty")
    head += [
        "server requests",
        "request B/frame mean, all frames",
        "mean, sent frames",
        "payload B/frame mean, all frames",
        "edge ms p50 of a filtered frame",
    ]
    for link in links:
        head += [f"{link['name']} e2e ms mean / p50 / p95, all frames", f"{link['name']} mean / p50 / p95, sent frames"]
    return head


def _filter_cells(row: dict[str, Any], links: list[dict[str, Any]], labelled: bool) -> list[str]:
    """One setting's cells under _filter_head; "—" where the row has no filter (the plain setting)."""
    f = row.get("filter")
    cells = [row["setting"], f"{row['frames_sent']} / {row['frames_filtered']}"]
    if labelled:
        cells.append(f"{f['with_objects']['filtered']} / {f['empty']['filtered']}" if f else "—")
    sent = row["sent_only"]
    cells += [
        _fmt(row["server_requests"], "d") if row["server_requests"] is not None else "—",
        _fmt(row["request_bytes"]["mean"]),
        _fmt((sent["request_bytes"] or {}).get("mean")),
        _fmt(row["payload_bytes"]["mean"]),
        _fmt((f["filtered_edge_ms"] or {}).get("p50"), ".1f") if f else "—",
    ]
    for link in links:
        cells += [_mean_p50_p95(row["latency_ms"][link["name"]]), _mean_p50_p95(sent["latency_ms"][link["name"]])]
    return cells


def _mean_p50_p95(stats: dict[str, float] | None) -> str:
    return "—" if not stats else " / ".join(_fmt(stats[k], ",.1f") for k in ("mean", "p50", "p95"))


def _filter_probabilities(frames: list[dict[str, Any]], probs: list[float], labelled: bool) -> str:
    """One line: each frame's filter probability (and, for labelled frames, whether it shows objects)."""
    return (
        "Filter probability per frame ("
        + ("objects / empty, " if labelled else "")
        + "< threshold: dropped): "
        + ", ".join(
            f"{fr['name']}" + (f" ({'objects' if fr.get('objects') else 'empty'})" if labelled else "") + f" {p:.4f}"
            for fr, p in zip(frames, probs)
        )
        + "."
    )


def _ordering(sweep: dict[str, Any], index: int | None = None) -> str:
    """The modes from fastest to slowest at one sweep point (the middle one by default)."""
    i = len(sweep["mbit"]) // 2 if index is None else index
    at = {k: v[i] for k, v in sweep["best"].items()}
    return " < ".join(f"{k} ({at[k] / 1e3:.2f} s)" for k in sorted(at, key=lambda k: at[k])) + (
        " throughout" if index is None else ""
    )


def plot_bytes(rows: list[dict[str, Any]], path: Path) -> None:
    """Horizontal bars: request bytes per frame per setting (log scale), raw RGB as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sent = [r for r in rows if r["mode"] != "local"]
    colors = {"split": "tab:blue", "offload": "tab:orange", "filter": "tab:cyan"}
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(sent) + 1.6), dpi=100)
    y = np.arange(len(sent))
    ax.barh(
        y,
        [r["request_bytes"]["mean"] for r in sent],
        color=[colors["filter" if r.get("filter") else r["mode"]] for r in sent],
    )
    ax.set_yticks(y, [f"{r['mode']}: {r['setting']}" for r in sent], fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    raw = rows[0]["raw_rgb_bytes"]["mean"]
    ax.axvline(raw, color="k", ls="--", lw=1)
    ax.text(raw, len(sent) - 0.4, " raw RGB", fontsize=8, va="bottom")
    ax.set_xlabel("request bytes per frame (mean over all frames, log scale)")
    title = "Bytes on the wire per frame (local mode sends nothing)"
    if any(r.get("filter") for r in sent):
        title += "\nwith filter: frames the filter drops count as 0 B"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


_MODE_COLORS = {"split": "tab:blue", "offload": "tab:orange", "local": "tab:green"}


def plot_latency(
    curves: dict[str, np.ndarray],
    best: dict[str, np.ndarray],
    wire: dict[str, np.ndarray],
    mbits: np.ndarray,
    marks: list[dict[str, Any]],
    rtt_ms: float,
    path: Path,
) -> None:
    """Left: modeled p50 latency against bandwidth, every setting thin, each mode's best thick, crossovers
    marked. Right: the link's share alone (serialization both ways + RTT) per setting, free of compute noise.

    curves, wire: per setting key ("split: 4-bit tensor", ...); best: "best split", "best offload", "local".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, ax_wire) = plt.subplots(1, 2, figsize=(13, 5.2), dpi=90)
    _plot_end_to_end(ax, curves, best, mbits, marks, rtt_ms)
    _plot_link_share(ax_wire, wire, mbits)
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for axis in (ax.xaxis, ax_wire.xaxis, ax_wire.yaxis):
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_end_to_end(
    ax: Any,
    curves: dict[str, np.ndarray],
    best: dict[str, np.ndarray],
    mbits: np.ndarray,
    marks: list[dict[str, Any]],
    rtt_ms: float,
) -> None:
    """plot_latency's left panel: every setting thin, each mode's best thick, the crossovers as x."""
    for key, curve in curves.items():
        ax.plot(mbits, curve / 1e3, color=_MODE_COLORS[key.split(":")[0]], lw=0.7, alpha=0.45)
    for name, curve in best.items():
        ax.plot(mbits, curve / 1e3, color=_MODE_COLORS[name.split()[-1]], lw=2.2, label=name)
    for c in marks:
        ax.plot(c["mbit"], c["latency_ms"] / 1e3, "kx", ms=9, mew=2)
        ax.annotate(
            f"{c['mbit']:.2g} Mbit/s",
            (c["mbit"], c["latency_ms"] / 1e3),
            textcoords="offset points",
            xytext=(6, 8),
            fontsize=8,
        )
    ax.set_xscale("log")
    # Settings that a slow link ruins shoot off the top; the comparison lives near the modes' best.
    ax.set_ylim(0, 2.0 * max(float(c.max()) for c in best.values()) / 1e3)
    ax.set_xlabel("link bandwidth (Mbit/s, both directions)")
    ax.set_ylabel("end-to-end latency p50 (s)")
    ax.set_title(f"End-to-end latency at RTT {rtt_ms:g} ms (thin: each setting; x: crossovers)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def _plot_link_share(ax: Any, wire: dict[str, np.ndarray], mbits: np.ndarray) -> None:
    """plot_latency's right panel: each setting's time on the link, a mode's settings told apart by line style
    (then width, past four)."""
    styles = ["-", "--", ":", "-."]
    count = {"split": 0, "offload": 0}
    for key, curve in wire.items():
        mode = key.split(":")[0]
        ax.plot(
            mbits,
            curve / 1e3,
            color=_MODE_COLORS[mode],
            ls=styles[count[mode] % 4],
            lw=1.0 + 0.6 * (count[mode] // 4),
            label=key,
        )
        count[mode] += 1
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link bandwidth (Mbit/s, both directions)")
    ax.set_ylabel("time on the link p50 (s)")
    ax.set_title("Link share only: 8 * (request + response bytes) / bandwidth + RTT", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6.5, ncol=2)
