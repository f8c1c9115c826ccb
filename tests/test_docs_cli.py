"""The CLI reference and the flag vocabulary of the nine console scripts (#24 row 14, #26).

The reference pages are generated from the parsers when the site is built (docs/hooks/cli_reference.py),
so a page cannot drift from its parser; these tests check the generator shows every flag with its help,
choices and default, and that the parsers speak one vocabulary: every flag has help, every default is
shown, defaults that come from the config name the config key, and a flag several tools share has the
same choices and type everywhere.
"""

from __future__ import annotations

import argparse
import collections

import pytest

from hnd.common.flags import HelpFormatter, default_named
from test_docs import CLI, nav_pages

SCRIPTS = sorted(CLI.console_scripts())
# The parsers a user meets: each script's, and each mode's (hnd-bench --rate-accuracy).
MODES = [(script, flag) for script, modes in CLI.MODE_PARSERS.items() for flag in modes]
PARSERS = SCRIPTS + [f"{script} {flag}" for script, flag in MODES]

# Flags whose default is the config's runtime section (the code reads RuntimeConfig when the flag is
# not given): their help must name the key.
CONFIG_BACKED = {
    "hnd-edge": {
        "--bits": "bits",
        "--granularity": "granularity",
        "--compression": "compression",
        "--max-inflight": "max_inflight",
        "--timeout": "deadline_s",
    },
    "hnd-server": {
        "--port": "port",
        "--max-batch": "max_batch",
        "--max-delay-ms": "max_delay_ms",
        "--max-queue": "max_queue",
    },
}

# A shared flag that deliberately differs, and why.
DIFFERENT = {
    ("--bits", "hnd-bench"): "a comma list of settings to sweep",
    ("--granularity", "hnd-bench"): "a comma list of settings to sweep",
    **{
        (flag, "hnd-bench --rate-accuracy"): "a comma list of settings to sweep"
        for flag in ("--bits", "--granularity", "--crf", "--jpeg-quality", "--webp-quality")
    },
    ("--bits", "hnd-bench --adapt-trace"): "a comma list of split settings to measure",
    ("--format", "hnd-export-head"): "the head file's format (onnx / torch), not an image format",
    ("--images", "hnd-make-synthetic-coco"): "how many images to draw, not where to read them",
    ("--video", "hnd-make-synthetic-coco"): "write videos (a switch), not read one",
}


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help is not argparse.SUPPRESS]


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    out = {s: CLI.cli_parser(s) for s in SCRIPTS}
    out.update({f"{s} {flag}": CLI.parser_for(s, [flag]) for s, flag in MODES})
    return out


def test_every_console_script_has_a_parser_and_a_page_in_the_nav(parsers):
    assert len(SCRIPTS) == 9
    nav = nav_pages()
    for script in SCRIPTS:
        assert isinstance(parsers[script], argparse.ArgumentParser)
        assert f"{CLI.CLI_DIR}/{script}.md" in nav, f"mkdocs.yml's nav has no reference page for {script}"


@pytest.mark.parametrize("name", PARSERS)
def test_reference_page_shows_every_flag_with_help_choices_and_default(name, parsers):
    parser = parsers[name]
    script = name.split()[0]
    page = CLI.cli_markdown(script)
    assert page.startswith(f"# {script}\n")
    if name != script:
        assert f"\n## {name}\n" in page
    parser.prog = name
    assert parser.format_usage().strip() in page
    # The rows of this parser: its own section (a mode's section follows the script's own).
    modes = [f"\n## {script} {flag}\n" for s, flag in MODES if s == script]
    section = page.split(f"\n## {name}\n")[1] if name != script else page
    for heading in modes:
        section = section.split(heading)[0]
    for action in actions(parser):
        row = next((line for line in section.splitlines() if line.startswith(f"| `{CLI.flag_names(action)}`")), None)
        assert row is not None, f"{script}: no row for {action.option_strings or action.dest}"
        assert CLI.cell(CLI.help_text(parser, action)) in row
        for choice in action.choices or ():
            assert str(choice) in row
        default = CLI.default_text(action)
        if default:
            assert f"`{default}`" in row


def test_reference_page_follows_a_changed_parser(monkeypatch):
    """The page is the parser rendered: a new flag, choice or default shows at once."""
    from hnd.server import healthcheck

    original = healthcheck.build_parser

    def changed() -> argparse.ArgumentParser:
        p = original()
        p.add_argument("--colour", choices=("red", "blue"), default="red", help="a new flag")
        return p

    monkeypatch.setattr(healthcheck, "build_parser", changed)
    page = CLI.cli_markdown("hnd-healthcheck")
    assert "| `--colour {red,blue}` | a new flag (default: red) | `red` |" in page


@pytest.mark.parametrize("script", PARSERS)
def test_every_flag_has_help(script, parsers):
    missing = [a.option_strings or [a.dest] for a in actions(parsers[script]) if not (a.help or "").strip()]
    assert not missing, f"{script}: flags without help: {missing}"


@pytest.mark.parametrize("script", PARSERS)
def test_every_default_is_shown_in_help(script, parsers):
    parser = parsers[script]
    assert parser.formatter_class is HelpFormatter
    hidden = []
    for a in actions(parser):
        if a.nargs == 0 or a.default is None:
            continue
        shown = parser._get_formatter()._expand_help(a)
        if not default_named(shown, a.default):
            hidden.append(f"{a.option_strings or a.dest}={a.default!r}")
    assert not hidden, f"{script}: defaults --help does not show: {hidden}"


@pytest.mark.parametrize("script", sorted(CONFIG_BACKED))
def test_defaults_from_the_config_name_the_config_key(script, parsers):
    parser = parsers[script]
    by_flag = {s: a for a in actions(parser) for s in a.option_strings}
    for flag, key in CONFIG_BACKED[script].items():
        action = by_flag[flag]
        assert action.default is None, f"{script} {flag}: its default is the config's, so the parser's is None"
        assert f"runtime.{key}" in parser._get_formatter()._expand_help(action), f"{script} {flag}"


def test_shared_flags_have_the_same_choices_and_type(parsers):
    seen: dict[str, dict[str, tuple]] = collections.defaultdict(dict)
    for script, parser in parsers.items():
        for a in actions(parser):
            for flag in a.option_strings:
                if (flag, script) not in DIFFERENT:
                    choices = tuple(sorted(map(str, a.choices))) if a.choices else None
                    seen[flag][script] = (choices, a.type, a.nargs, type(a).__name__)
    differing = {flag: by for flag, by in seen.items() if len(set(by.values())) > 1}
    assert not differing, f"flags that mean different things in different tools: {differing}"
    # The flags the issue named, present where they should be.
    assert {"hnd-server", "hnd-train", "hnd-eval"} <= set(seen["--device"])
    assert {"hnd-edge", "hnd-demo", "hnd-eval"} <= set(seen["--bits"])
    assert {"hnd-server", "hnd-edge", "hnd-demo", "hnd-train", "hnd-eval", "hnd-bench"} <= set(seen["--config"])


def test_device_flag_takes_auto_cpu_cuda_and_cuda_n(parsers):
    for script in ("hnd-server", "hnd-train", "hnd-eval"):
        parser = parsers[script]
        parser.error = lambda message: (_ for _ in ()).throw(ValueError(message))  # type: ignore[method-assign]
        base = ["--config", "test/faster_rcnn-b3ch"]
        for name in ("auto", "cpu", "cuda", "cuda:1"):
            assert parser.parse_args([*base, "--device", name]).device == name
        with pytest.raises(ValueError, match="not a device"):
            parser.parse_args([*base, "--device", "gpu"])


def test_pick_device_resolves_auto_and_refuses_a_missing_gpu(monkeypatch):
    import torch

    from hnd.common.build import pick_device
    from hnd.common.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {name}: no CUDA device"):
            pick_device(name)


def test_log_level_is_case_insensitive_with_the_logging_names(parsers):
    for script in ("hnd-server", "hnd-edge"):
        args = ["--config", "test/faster_rcnn-b3ch"] + (["--images", "d"] if script == "hnd-edge" else [])
        assert parsers[script].parse_args([*args, "--log-level", "debug"]).log_level == "DEBUG"


def test_eval_bits_zero_is_the_learned_coding_as_on_the_edge(parsers):
    from hnd.common.errors import HndError
    from hnd.train.eval_cli import _check_codec_args

    args = parsers["hnd-eval"].parse_args(["--config", "test/faster_rcnn-entropic-b24ch", "--bits", "0"])
    _check_codec_args(args)
    assert (args.bits, args.compression) == (None, "learned")
    args = parsers["hnd-eval"].parse_args(["--config", "x", "--bits", "0", "--compression", "zstd"])
    with pytest.raises(HndError, match="0 is the learned coding"):
        _check_codec_args(args)


def test_the_index_lists_every_command_with_the_extra_it_needs():
    from hnd.common.launch import SCRIPTS

    index = CLI.index_markdown()
    for script in SCRIPTS:
        assert f"| [{script}]({script}.md) | `{SCRIPTS[script].extra}` |" in index
    assert "| hnd-" not in index.replace("| [hnd-", "")  # descriptions do not repeat the command's name


def test_server_and_edge_default_to_the_same_config(parsers):
    """The runtime pair meets on one model when neither names one (hnd-server once required --config);
    training and evaluation name theirs."""
    from hnd.common.flags import DEFAULT_CONFIG

    for script in ("hnd-server", "hnd-edge", "hnd-demo"):
        action = next(a for a in parsers[script]._actions if "--config" in a.option_strings)
        assert action.default == DEFAULT_CONFIG and not action.required, script
    for script in ("hnd-train", "hnd-eval"):
        assert next(a for a in parsers[script]._actions if "--config" in a.option_strings).required


def test_the_api_reference_finds_hnd_in_the_repository_layout(tmp_path):
    """mkdocstrings (griffe) reads ``hnd.common.config`` etc. through the symlink tree the hook lays out
    (pyproject.toml maps hnd's subpackages onto top-level folders, which griffe cannot follow). Needs the
    docs extra (.ci/run installs it)."""
    griffe = pytest.importorskip("griffe", reason="the docs extra is not installed")
    pytest.importorskip("mkdocs", reason="the docs extra is not installed")
    from test_docs import load_hook

    tree = load_hook("api_source").package_tree(tmp_path)
    module = griffe.load("hnd.common.config", search_paths=[str(tree)])
    assert "load_config" in module.members and module["load_config"].docstring is not None
    assert griffe.load("hnd.edge.api", search_paths=[str(tree)])["connect"].docstring is not None


def test_the_built_site_is_ignored_by_git():
    """`mkdocs build` writes the site into the checkout: git ignores it, as it does build/ and dist/."""
    import subprocess
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    cfg = yaml.load((root / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)  # !!python/name tags as text
    site = cfg.get("site_dir", "site")
    r = subprocess.run(["git", "check-ignore", "-q", f"{site}/index.html"], cwd=root)
    assert r.returncode == 0, f"git does not ignore {site}/, where mkdocs build writes the site"
