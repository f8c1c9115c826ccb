"""The documentation is tested: README.md, DEPLOY.md, CHANGELOG.md and every page under docs/.

Every ``hnd-*`` (and ``python -m hnd....``) command line in a shell block parses with that command's real
parser (the flags exist, choices are valid) and names configs that exist; every repository path named in
backticks exists; every relative link resolves (file and anchor). The site itself is built with
``mkdocs build --strict`` by .ci/run (which also fails on a page left out of the nav).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hnd.common.config import ConfigError, resolve_config_path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_hook(name: str):
    """A module of docs/hooks (they are MkDocs hooks, not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"docs_hooks_{name}", DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = load_hook("cli_reference")


def documents() -> list[Path]:
    """The Markdown a user reads: README.md, DEPLOY.md, CHANGELOG.md (the site includes it) and the site's pages."""
    pages = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)
    return [ROOT / "README.md", ROOT / "DEPLOY.md", ROOT / "CHANGELOG.md", *pages]


def doc_ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


# ---------------------------------------------------------------------------------------------
# Command lines in shell blocks

SHELL_FENCE = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
SHELL_OPERATORS = ("&", "&&", "|", "||", ";", ">", ">>", "2>&1", "2>", "<")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(?::[A-Z0-9_]+)?$")  # N, SEED, DIR, HOST:PORT


@dataclass
class Command:
    doc: str
    script: str
    args: list[str]
    elided: bool = False  # written with "..." for the rest: required arguments may be left out
    inline: bool = False  # inline code in prose (`hnd-edge --adapt`): flags may be named without a value

    def __str__(self) -> str:
        return f"{self.doc}: {self.script} {shlex.join(self.args)}"


def shell_commands(path: Path) -> list[Command]:
    """Every ``hnd-*`` command in the file's shell blocks, with its arguments (continuations joined,
    comments and what follows a shell operator dropped; ``[--flag V]`` optional parts kept as flags)."""
    scripts = CLI.console_scripts()
    out = []
    for block in SHELL_FENCE.findall(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line.removeprefix("$ "), comments=True)
            except ValueError:
                continue
            for n, w in enumerate(words):
                if w in SHELL_OPERATORS:
                    words = words[:n]
                    break
            while words and (re.fullmatch(r"\w+=.*", words[0]) or words[0] in ("sudo", "nice", "exec", "time")):
                words = words[1:]
            if len(words) > 2 and Path(words[0]).name.startswith("python") and words[1] == "-m":
                if not words[2].startswith("hnd."):
                    continue
                words = [f"python -m {words[2]}", *words[3:]]  # a module run as a program: its own parser
            elif not words or not Path(words[0]).name.startswith("hnd-"):
                continue
            script = words[0] if words[0].startswith("python -m ") else Path(words[0]).name
            assert script in scripts or script.startswith("python -m "), (
                f"{path.name}: {script} is not a console script of pyproject.toml"
            )
            args = [w.strip("[]") for w in words[1:] if w.strip("[]") not in ("", "...")]
            out.append(Command(str(path.relative_to(ROOT)), script, args, elided="..." in words))
    return out


def inline_commands(path: Path) -> list[Command]:
    """Commands quoted in the prose (`hnd-edge --key-interval N`, `python -m hnd.bench.head --threads 2`):
    parsed like a shell line with nothing required and flags that may be named without their value."""
    scripts = CLI.console_scripts()
    out = []
    for span in code_spans(path.read_text()):
        if not re.match(r"^(hnd-[a-z-]+|python -m hnd\.[\w.]+)\s+-", span):
            continue
        try:
            words = shlex.split(span)
        except ValueError:
            continue
        script, args = (f"python -m {words[2]}", words[3:]) if words[0] == "python" else (words[0], words[1:])
        if script in scripts or script.startswith("python -m "):
            args = [w.strip("[]") for w in args if w.strip("[]") not in ("", "...")]
            out.append(Command(str(path.relative_to(ROOT)), script, args, elided=True, inline=True))
    return out


def variants(args: list[str]) -> list[list[str]]:
    """``--bits 8|4|2`` written as alternatives: one argument list per alternative of each such word."""
    alternatives = [w.split("|") if "|" in w and not w.startswith("-") else [w] for w in args]
    out = [[a[0] for a in alternatives]]
    for i, alts in enumerate(alternatives):
        for alt in alts[1:]:
            out.append([*out[0][:i], alt, *out[0][i + 1 :]])
    return out


def fill_placeholders(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """A value written as a placeholder (``--epochs N``) takes a value of the flag's type."""
    options = {s: a for a in parser._actions for s in a.option_strings}
    out = list(args)
    for i in range(1, len(out)):
        action = options.get(out[i - 1])
        if action is None or action.nargs == 0 or not PLACEHOLDER.match(out[i]):
            continue
        if action.choices:
            out[i] = str(next(iter(action.choices)))
        elif action.type in (int, float):
            out[i] = "1"
    return out


def parse(script: str, args: list[str], elided: bool = False, inline: bool = False) -> argparse.Namespace:
    """``args`` through the script's real parser (or its mode's: hnd-bench --rate-accuracy); its error
    message is raised, not printed. ``elided``: the line left arguments out (``...``), so none is required."""
    parser = module_parser(script.removeprefix("python -m ")) if script.startswith("python -m ") else None
    parser = parser or CLI.parser_for(script, args)
    if elided:
        for action in parser._actions:
            action.required = False
        for group in parser._mutually_exclusive_groups:
            group.required = False

    def error(message: str):
        raise ValueError(message)

    parser.error = error  # type: ignore[method-assign]
    if inline:  # a known flag named without its value (prose: "`hnd-edge --adapt` picks ...") is left out
        options = {s: a for a in parser._actions for s in a.option_strings}
        args = [
            a
            for i, a in enumerate(args)
            if not (
                a in options
                and options[a].nargs != 0
                and (i + 1 == len(args) or (args[i + 1].startswith("-") and args[i + 1] not in ("-1",)))
            )
        ]
    return parser.parse_args(fill_placeholders(parser, args))


class _Parser(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def module_parser(name: str) -> argparse.ArgumentParser:
    """The parser of ``python -m NAME``: the module's ``build_parser()``, or the one its ``main`` builds
    (caught when it parses)."""
    module = importlib.import_module(name)
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, *args, **kwargs):
        raise _Parser(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture  # type: ignore[method-assign]
    try:
        module.main([])
    except _Parser as found:
        return found.parser
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise AssertionError(f"python -m {name}: its main() builds no argparse parser")


def all_commands() -> list[Command]:
    return [c for doc in documents() for c in shell_commands(doc)]


def test_the_docs_have_commands_of_every_kind():
    """The extractor finds what it should (a regex that finds nothing would pass everything below)."""
    seen = {c.script for c in all_commands()}
    assert {"hnd-server", "hnd-edge", "hnd-export-head", "hnd-train", "hnd-eval", "hnd-make-synthetic-coco"} <= seen
    readme = {c.script for c in shell_commands(ROOT / "README.md")}
    assert {"hnd-server", "hnd-edge", "hnd-export-head"} <= readme


@pytest.mark.parametrize("doc", documents(), ids=doc_ids(documents()))
def test_shell_commands_parse_with_the_real_parsers(doc):
    problems = []
    for command in shell_commands(doc) + inline_commands(doc):
        for args in variants(command.args):
            try:
                ns = parse(command.script, args, elided=command.elided, inline=command.inline)
            except ValueError as e:
                problems.append(f"{command}: {e}")
                continue
            config = getattr(ns, "config", None)
            if isinstance(config, str) and not PLACEHOLDER.match(config) and "..." not in config:
                try:
                    resolve_config_path(config)
                except ConfigError as e:
                    problems.append(f"{command}: {e}")
    assert not problems, "\n".join(problems)


def test_command_checks_catch_what_they_should():
    """An unknown flag, a bad choice and a missing config are each caught; placeholders are not."""
    with pytest.raises(ValueError, match="unrecognized"):
        parse("hnd-edge", ["--images", "d", "--no-such-flag"])
    assert parse("hnd-edge", ["--server", "h:1"], elided=True).server == "h:1"
    with pytest.raises(ValueError, match="unrecognized"):
        parse("hnd-edge", ["--no-such-flag"], elided=True)
    with pytest.raises(ValueError, match="invalid choice"):
        parse("hnd-edge", ["--images", "d", "--bits", "3"])
    assert parse("hnd-edge", ["--images", "DIR", "--bits", "N"]).bits in (0, 2, 4, 6, 8, 16, 32)
    parse("hnd-server", ["--max-short-side", "--max-long-side"], elided=True, inline=True)  # prose names flags
    with pytest.raises(ValueError, match="unrecognized"):
        parse("hnd-server", ["--max-short-side", "--no-such-flag"], elided=True, inline=True)
    with pytest.raises(ValueError, match="unrecognized"):  # a module run as a program: its main()'s parser
        parse("python -m hnd.bench.tail", ["--no-such-flag"])
    assert parse("python -m hnd.bench.tail", ["--device", "cpu"]).device == "cpu"
    with pytest.raises(ConfigError):
        resolve_config_path("hnd/no_such_model")
    assert variants(["--bits", "8|4"]) == [["--bits", "8"], ["--bits", "4"]]


# ---------------------------------------------------------------------------------------------
# Configs and repository paths named in the text

TOP_LEVEL = sorted(p.name for p in ROOT.iterdir() if not p.name.startswith(".") or p.name == ".ci")
CONFIG_NAME = re.compile(r"^(?:org|hnd|ghnd|entropic|ext|test)/[\w.{},-]+$")


def git_ignored(path: str) -> bool:
    """A path the repository ignores: something a command makes (.ci/edge-venv, bench-out/), not a file
    of the repository."""
    names = [path, path.rstrip("/") + "/"]  # a pattern with a slash at the end matches folders only
    r = subprocess.run(["git", "check-ignore", "--no-index", *names], cwd=ROOT, capture_output=True, text=True)
    return bool(r.stdout.strip())


def braces(text: str) -> list[str]:
    """Shell brace expansion: ``a{1,2}b`` -> ``a1b``, ``a2b``."""
    parts = re.split(r"\{([^{}]*)\}", text)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def code_spans(text: str) -> list[str]:
    """Inline code of the prose (fenced blocks left out)."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def named_paths(text: str) -> list[str]:
    """Repository paths in inline code: ``common/codec.py``, ``configs/hnd/*.yaml``, ``bench/results/``."""
    out = []
    for span in code_spans(text):
        if not re.fullmatch(r"[\w.{},*/-]+", span) or "/" not in span or span.startswith(("/", "./", "../")):
            continue
        if span.split("/")[0] in TOP_LEVEL:
            out.append(span)
    return out


@pytest.mark.parametrize("doc", documents(), ids=doc_ids(documents()))
def test_named_paths_and_configs_exist(doc):
    text = doc.read_text()
    missing = []
    paths = [p for path in named_paths(text) for p in braces(path)]
    # A table of a folder's files names them relative to that folder (`deploy/k8s/`: `examples/x.yaml`).
    folders = [ROOT] + [ROOT / p for p in paths if (ROOT / p).is_dir()]
    for p in paths:
        if not any(list(folder.glob(p.rstrip("/"))) for folder in folders) and not git_ignored(p):
            missing.append(p)
    for span in code_spans(text):
        if CONFIG_NAME.match(span):
            for name in braces(span):
                try:
                    resolve_config_path(name)
                except ConfigError:
                    missing.append(f"config {name}")
    assert not missing, f"{doc.relative_to(ROOT)} names what does not exist: {missing}"


def test_path_checks_catch_what_they_should():
    assert named_paths("see `common/codec.py`, `configs/hnd/*.yaml` and `pip install .[edge]`") == [
        "common/codec.py",
        "configs/hnd/*.yaml",
    ]
    assert braces("experiments/results/cpu-2core.{md,json}") == [
        "experiments/results/cpu-2core.md",
        "experiments/results/cpu-2core.json",
    ]
    assert not list(ROOT.glob("common/no_such_module.py")) and not git_ignored("common/no_such_module.py")
    assert git_ignored(".ci/venv")


# ---------------------------------------------------------------------------------------------
# Links

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(title: str) -> str:
    """A heading's anchor as GitHub and MkDocs' toc both make it (lower case, punctuation dropped)."""
    title = re.sub(r"[`*_]", "", title.strip().lower())
    return re.sub(r"[^\w\- ]", "", title).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {slug(t) for t in re.findall(r"^#+ (.+)$", text, re.M)}


def generated_pages() -> set[Path]:
    """Pages the site's hooks generate (the CLI reference)."""
    names = [*CLI.console_scripts(), "index"]
    return {DOCS / CLI.CLI_DIR / f"{n}.md" for n in names}


@pytest.mark.parametrize("doc", documents(), ids=doc_ids(documents()))
def test_relative_links_resolve(doc):
    broken = []
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z+.-]*:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if dest in generated_pages():
            continue
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links {broken}"


def test_link_check_catches_a_broken_link(tmp_path):
    (tmp_path / "a.md").write_text("# A b\n\n[x](b.md) [y](#a-b) [z](#nope)\n")
    links = LINK.findall((tmp_path / "a.md").read_text())
    assert links == ["b.md", "#a-b", "#nope"]
    assert anchors(tmp_path / "a.md") == {"a-b"}


# ---------------------------------------------------------------------------------------------
# The site's navigation


def nav_pages() -> set[str]:
    def walk(node) -> list[str]:
        if isinstance(node, str):
            return [node]
        if isinstance(node, list):
            return [p for n in node for p in walk(n)]
        if isinstance(node, dict):
            return [p for v in node.values() for p in walk(v)]
        return []

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    return set(walk(config["nav"]))


def test_every_page_is_in_the_nav_and_every_nav_entry_exists():
    """What ``mkdocs build --strict`` checks too, here without building: a new page (a benchmark write-up)
    must be added to mkdocs.yml's nav, and a nav entry must be a page."""
    pages = {str(p.relative_to(DOCS)) for p in documents() if p.is_relative_to(DOCS)}
    generated = {str(p.relative_to(DOCS)) for p in generated_pages()}
    nav = nav_pages()
    assert not pages - nav, f"pages missing from mkdocs.yml's nav: {sorted(pages - nav)}"
    assert not nav - pages - generated, f"nav entries with no page: {sorted(nav - pages - generated)}"


def test_the_configs_page_lists_every_bundled_config():
    """reference/configs.md's table is generated from configs/ (docs/hooks/config_reference.py)."""
    hook = load_hook("config_reference")
    assert hook.MARKER in (DOCS / "reference" / "configs.md").read_text()
    table = hook.configs_markdown()
    names = hook.bundled_configs()
    assert len(names) == len(list((ROOT / "configs").rglob("*.yaml"))) > 40
    for name in names:
        assert f"| `{name}` |" in table
    assert "| `hnd/faster_rcnn-b3ch` | faster_rcnn | hnd, 3 channels | hnd | 8-bit tensor, zstd |" in table


def test_ci_builds_the_site_strictly():
    """.ci/run fails on a broken link, a missing anchor or a page left out of the nav (#26)."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^[^#\n]*mkdocs build --strict", ci, re.M)
    assert re.search(r'pip"? install [^\n]*-e "\.\[[^\]]*docs[^\]]*\]"', ci)
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    assert config["validation"] == {
        "omitted_files": "warn",
        "absolute_links": "warn",
        "unrecognized_links": "warn",
        "anchors": "warn",
    }  # warnings, which --strict turns into errors


@pytest.mark.parametrize(
    "page",
    sorted(p for p in (DOCS / "benchmarks").glob("*.md") if p.name != "index.md"),
    ids=lambda p: p.name,
)
def test_every_benchmark_page_names_its_date_machine_and_command(page):
    """A figure is only as good as what it says about how it was made (#26): the date, the machine (and
    its load), the command that reproduces it."""
    text = page.read_text()
    assert re.search(r"\b20\d\d-\d\d-\d\d\b", text), f"{page.name}: no date (YYYY-MM-DD)"
    assert re.search(r"machine|H100|H200|KVM|GPU", text, re.I), f"{page.name}: no machine"
    command = r"(?:^|`)(?:python -m hnd\.|hnd-[a-z]|python experiments/)"  # inline or in a shell block
    assert re.search(command, text, re.M), f"{page.name}: no command"
