"""MkDocs hook: the table of bundled configs on reference/configs.md, generated from configs/ itself.

The page holds the marker ``<!-- bundled configs -->``; the build replaces it with one row per YAML file
under configs/ (loaded through hnd.common.config, so a config that does not load fails the build), so a
new config appears without anyone editing the page.

    configs_markdown()  -> the table
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- bundled configs -->"


def bundled_configs() -> list[str]:
    """Names of the bundled configs (``hnd/faster_rcnn-b3ch``), sorted."""
    folder = ROOT / "configs"
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def configs_markdown() -> str:
    from hnd.common.config import load_config

    lines = [
        "| config | model | bottleneck | training | wire (runtime) |",
        "|---|---|---|---|---|",
    ]
    for name in bundled_configs():
        cfg = load_config(name)
        m = cfg.model
        if m.bottleneck_channels is None:
            bottleneck = "none (teacher)"
        else:
            bottleneck = f"{m.bottleneck_type}, {m.bottleneck_channels} channels"
        if m.filter is not None:
            bottleneck += f", neural filter (threshold {m.filter.threshold:g})"
        method = cfg.train.method if cfg.train is not None else ""
        rt = cfg.runtime
        wire = "learned coding" if rt.compression == "learned" else f"{rt.bits}-bit {rt.granularity}, {rt.compression}"
        lines.append(f"| `{name}` | {m.kind} | {bottleneck} | {method} | {wire} |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown, page, config, files, **kwargs):  # MkDocs event
    if MARKER in markdown:
        return markdown.replace(MARKER, configs_markdown())
    return markdown
