"""MkDocs hook: the CLI reference, one page per console script, generated from the real argparse parsers.

The pages are made at build time (``on_files``), never committed, so a parser and its page cannot
disagree: the page *is* the parser, rendered. ``tests/test_docs_cli.py`` checks the renderer (every
flag with its help, choices and default on the page). Console scripts come from pyproject.toml's
``[project.scripts]``; each script's module has a ``build_parser()``.

    cli_markdown("hnd-edge")  -> the page's Markdown
"""

from __future__ import annotations

import argparse
import html
import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI_DIR = "reference/cli"


def console_scripts() -> dict[str, str]:
    """``{script: "module:function"}`` from pyproject.toml."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def cli_parser(script: str) -> argparse.ArgumentParser:
    """The parser behind a console script: ``build_parser()`` of the module it runs (every entry point is
    ``hnd.common.launch``, whose ``SCRIPTS`` table names the module)."""
    from hnd.common.launch import SCRIPTS

    module = importlib.import_module(SCRIPTS[script].module)
    return module.build_parser()


# A flag that hands the whole command line to another parser: ``hnd-bench --rate-accuracy ...`` runs
# hnd.bench.rate's (hnd.bench.cli.main). Its page gets a section per mode.
MODE_PARSERS = {"hnd-bench": {"--rate-accuracy": "hnd.bench.rate", "--adapt-trace": "hnd.bench.adapt_trace"}}


def parser_for(script: str, args: list[str] | tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """The parser that takes ``script args``: the script's own, or its mode's (MODE_PARSERS)."""
    for flag, module in MODE_PARSERS.get(script, {}).items():
        if flag in args:
            parser = importlib.import_module(module).build_parser()
            parser.prog = f"{script} {flag}"
            return parser
    return cli_parser(script)


def flag_names(action: argparse.Action) -> str:
    """``--bits {2,4,6,8}`` / ``checkpoint``: how the action is written on a command line."""
    if not action.option_strings:
        return action.metavar if isinstance(action.metavar, str) else action.dest
    names = ", ".join(action.option_strings)
    if action.nargs == 0:
        return names
    if action.choices is not None:
        return f"{names} {{{','.join(map(str, action.choices))}}}"
    metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
    return f"{names} {metavar}"


def default_text(action: argparse.Action) -> str:
    """The default as the parser holds it; empty where there is none worth showing."""
    if action.nargs == 0 or action.required or action.default in (None, argparse.SUPPRESS):
        return ""
    if isinstance(action.default, list | tuple):
        return " ".join(map(str, action.default))
    return str(action.default)


def help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The action's help with ``%(default)s`` and friends expanded, as ``--help`` prints it."""
    if not action.help:
        return ""
    return parser._get_formatter()._expand_help(action)


def cell(text: str) -> str:
    return html.escape(" ".join(text.split()), quote=False).replace("|", "\\|")


def cli_markdown(script: str) -> str:
    """The reference page of one console script: description, usage, one table per argument group; then
    the same for each of its modes (MODE_PARSERS)."""
    parser = cli_parser(script)
    parser.prog = script
    lines = [f"# {script}", "", "<!-- generated from the parser by docs/hooks/cli_reference.py: do not edit -->", ""]
    lines += parser_markdown(parser, "##")
    for flag in MODE_PARSERS.get(script, {}):
        mode = parser_for(script, [flag])
        lines += [f"## {mode.prog}", ""] + parser_markdown(mode, "###")
    return "\n".join(lines)


def description(parser: argparse.ArgumentParser, script: str) -> str:
    """The parser's description without a leading ``script:`` (module docstrings start that way)."""
    text = (parser.description or "").removeprefix(f"{script}: ")
    return text[:1].upper() + text[1:]


def parser_markdown(parser: argparse.ArgumentParser, level: str) -> list[str]:
    """Description, usage and one table per argument group, group titles at heading ``level``."""
    lines = []
    if parser.description:
        lines += [cell(description(parser, parser.prog)), ""]
    lines += ["```text", parser.format_usage().strip(), "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f"{level} {group.title[0].upper()}{group.title[1:]}", ""]
        if group.description:
            lines += [cell(group.description), ""]
        lines += ["| argument | help | default |", "|---|---|---|"]
        for a in actions:
            names = f"`{flag_names(a)}`" + (" (required)" if a.required and a.option_strings else "")
            default = default_text(a)
            lines.append(f"| {names} | {cell(help_text(parser, a))} | {f'`{default}`' if default else ''} |")
        lines.append("")
    if parser.epilog:
        lines += ["```text", parser.epilog.strip(), "```", ""]
    return lines


def index_markdown() -> str:
    """The index: every command, the extra its role installs (hnd.common.launch), what it does."""
    from hnd.common.launch import SCRIPTS

    rows = [
        f"| [{s}]({s}.md) | `{SCRIPTS[s].extra}` | {cell(description(cli_parser(s), s))} |"
        for s in sorted(console_scripts())
    ]
    return "\n".join(
        ["# Command-line tools", "", "Generated from each tool's argparse parser when the site is built.", ""]
        + ["| command | extra | what it does |", "|---|---|---|", *rows, ""]
        + [
            '`pip install -c constraints.txt ".[EXTRA]"` installs a role; a command run without its extra says '
            "which one it needs, in one line.",
            "",
        ]
    )


def on_files(files, config, **kwargs):  # MkDocs event
    from mkdocs.structure.files import File

    for script in console_scripts():
        files.append(File.generated(config, f"{CLI_DIR}/{script}.md", content=cli_markdown(script)))
    files.append(File.generated(config, f"{CLI_DIR}/index.md", content=index_markdown()))
    return files
