"""Installs per role: the console scripts, the extras they need, the wheel, the README's set-up and .ci/run.

- Every console script goes through ``hnd.common.launch``: in an install without the script's extra it
  answers one line naming the extra (exit 2), never a ``ModuleNotFoundError`` traceback.
- The role matrix (edge / server / train / bench / all): each role is emulated in a fresh interpreter that
  cannot import hnd's optional dependencies outside the role's extras; its scripts answer ``--help``, the
  others name their extra.
- A real device install: ``.ci/make-edge-venv`` (run by the README's set-up and .ci/run; it downloads, so
  never from a test) builds the wheel and installs it with ``[edge]`` in a fresh venv. The e2e test runs
  every console script there and an ONNX-head edge against a live server.
- The wheel holds every bundled config and .proto file, and builds without setuptools warnings.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from hnd.common import launch

ROOT = Path(__file__).resolve().parents[1]
EDGE_VENV = ROOT / ".ci" / "edge-venv"
ROLES = ("edge", "server", "train", "bench", "all")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> tuple[str, set[str]]:
    """(normalized distribution, extras it names) of a PEP 508 requirement string."""
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?", req)
    assert m, req
    return normalize(m.group(1)), {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def role_extras(role: str) -> set[str]:
    """The extras a ``pip install ".[role]"`` installs, nested ones expanded."""
    extras = pyproject()["project"]["optional-dependencies"]
    out, todo = set(), [role]
    while todo:
        extra = todo.pop()
        if extra not in out:
            out.add(extra)
            todo += [
                e for req in extras[extra] for name, inner in [requirement_name(req)] if name == "hnd" for e in inner
            ]
    return out


def blocked_imports(role: str) -> list[str]:
    """Top-level import names of hnd's optional dependencies that an install of ``role`` does not have."""
    project = pyproject()["project"]
    core = {requirement_name(r)[0] for r in project["dependencies"]}
    have = core | {requirement_name(r)[0] for e in role_extras(role) for r in project["optional-dependencies"][e]}
    optional = {
        requirement_name(r)[0] for e, reqs in project["optional-dependencies"].items() if e != "dev" for r in reqs
    } - {"hnd"}
    assert optional - have or role == "all"
    out = set()
    for top, dists in importlib.metadata.packages_distributions().items():
        names = {normalize(d) for d in dists}
        if names & optional - have and not names & have:
            out.add(top)
    return sorted(out)


# A fresh interpreter where the import names in argv[1] are not found (as in a venv without them), then each (script, argv) of argv[2] through hnd.common.launch.run: prints [[exit code, stderr], ...].
PROBE = """
import contextlib, io, json, sys
blocked = set(json.loads(sys.argv[1]))

class Without:
    # finds nothing in blocked: find_spec() says None, import raises ModuleNotFoundError

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)

sys.meta_path[:] = [Without(f) for f in sys.meta_path]
from hnd.common.launch import run
out = []
for script, argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = run(script, argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            import traceback
            traceback.print_exc()
            code = "raised"
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


def probe(role: str, cases: list[tuple[str, list[str]]]) -> list[tuple[object, str]]:
    run = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(blocked_imports(role)), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return [tuple(r) for r in json.loads(run.stdout.splitlines()[-1])]


def assert_names_extra(script: str, code, err: str, extra: str) -> None:
    """One line ``<script>: error: ...`` naming ``extra``, exit 2, no traceback."""
    err = err.strip()
    assert code == 2, (script, code, err)
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith(f"{script}: error: No module named "), err
    assert f'".[{extra}]"' in err or f"[{extra}," in err, err


# ---------------------------------------------------------------------------------------------
# The launcher


def test_every_console_script_runs_through_the_launcher():
    scripts = pyproject()["project"]["scripts"]
    assert set(scripts) == set(launch.SCRIPTS)
    extras = pyproject()["project"]["optional-dependencies"]
    for name, target in scripts.items():
        module, _, attr = target.partition(":")
        assert module == launch.__name__, target
        assert getattr(launch, attr).__name__ == name.replace("-", "_")
        assert launch.SCRIPTS[name].extra in extras and launch.SCRIPTS[name].extra != "dev"
        assert callable(importlib.import_module(launch.SCRIPTS[name].module).main), name


def test_every_optional_dependency_maps_to_its_extras():
    """The launcher reads the extras from hnd's installed metadata: every optional distribution, found by
    its import name, maps back to the extras pyproject.toml lists it in."""
    project = pyproject()["project"]
    by_extra = launch.extras_requiring()
    installed: dict[str, set[str]] = {}  # distribution -> its top-level import names
    for top, dists in importlib.metadata.packages_distributions().items():
        for d in dists:
            installed.setdefault(normalize(d), set()).add(top)
    for extra in ROLES:
        for req in project["optional-dependencies"][extra]:
            name, _ = requirement_name(req)
            if name == "hnd":
                continue
            assert extra in by_extra[name], (extra, name)
            tops = installed[name]
            assert any(normalize(launch.DISTRIBUTIONS.get(t, t)) == name for t in tops), (
                f"{name} imports as {tops}: add it to DISTRIBUTIONS"
            )


def test_a_missing_extra_is_one_line_and_other_missing_modules_keep_their_traceback(monkeypatch, capsys):
    def needs(module: str):
        def main(argv):
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)

        return main

    monkeypatch.setattr(
        launch.importlib, "import_module", lambda name: type("M", (), {"main": needs("grpc_health.v1")})
    )
    assert launch.run("hnd-healthcheck", []) == 2
    assert_names_extra("hnd-healthcheck", 2, capsys.readouterr().err, "server")
    # av is not in the edge extra: the edge names its own extra and the one that has it.
    monkeypatch.setattr(launch.importlib, "import_module", lambda name: type("M", (), {"main": needs("av")}))
    assert launch.run("hnd-edge", []) == 2
    assert_names_extra("hnd-edge", 2, capsys.readouterr().err, "edge,video")
    monkeypatch.setattr(launch.importlib, "import_module", lambda name: type("M", (), {"main": needs("no_such_pkg")}))
    with pytest.raises(ModuleNotFoundError):
        launch.run("hnd-edge", [])


# ---------------------------------------------------------------------------------------------
# The role matrix


@pytest.mark.parametrize("role", ROLES)
def test_role_install_answers_every_console_script(role):
    """In an install of ``role`` its scripts print their help; every other script prints its help too (its
    module imports no missing dependency) or names its extra in one line; none raises."""
    scripts = list(launch.SCRIPTS)
    results = probe(role, [(s, ["--help"]) for s in scripts])
    have = role_extras(role)
    for script, (code, err) in zip(scripts, results):
        extra = launch.SCRIPTS[script].extra
        if extra in have or code == 0:
            assert code == 0, f"{script} --help in a {role} install: {code} {err}"
        else:
            assert_names_extra(script, code, err, extra)
    if role == "edge":  # the device's install: nothing but hnd-edge imports there
        assert [code for code, _ in results] == [0 if launch.SCRIPTS[s].extra == "edge" else 2 for s in scripts]


def test_torch_free_edge_names_the_onnx_route_for_a_torch_head(tmp_path):
    """hnd-edge in an edge install with a torch head (a .pt file, --random-weights, no --head): one line
    that names hnd-export-head's ONNX export, exit 2 (it was a ModuleNotFoundError traceback, exit 1)."""
    from runtime_support import write_frames

    images = write_frames(tmp_path / "frames", 1)
    common = ["--server", "127.0.0.1:1", "--images", str(images), "--config", "test/faster_rcnn-b3ch"]
    cases = [
        ("hnd-edge", [*common, "--random-weights", "0"]),
        ("hnd-edge", [*common, "--head", str(tmp_path / "head.pt")]),
        ("hnd-edge", common),
    ]
    for code, err in probe("edge", cases):
        assert code == 2 and "Traceback" not in err and "\n" not in err.strip(), err
        assert err.startswith("hnd-edge: error: No module named 'torch': ") and "hnd-export-head" in err, err
        assert "--head head.onnx" in err


# ---------------------------------------------------------------------------------------------
# README, .ci/run and the wheel


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(block: str) -> list[str]:
    """The commands of a shell block: one per line or `&&` part, comments dropped."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        out += [c.strip() for c in line.split("&&") if c.strip() and not c.strip().startswith("#")]
    return out


def test_ci_runs_the_readmes_set_up_and_test_commands():
    """.ci/run installs what the README's set-up installs (node_modules, the edge venv included) and runs
    exactly the README's test command, with .venv as $VENV."""
    readme = (ROOT / "README.md").read_text()
    (setup,) = [b for b in bash_blocks(readme) if "-m venv .venv" in b][:1]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    for command in commands(setup):
        if re.match(r"(\.venv/bin/)?hnd-", command):
            continue  # the demo: a run, not a set-up step
        expected = command.replace(".venv/bin/", '"$VENV/bin/').replace('"$VENV/bin/pip', '"$VENV/bin/pip"')
        expected = expected.replace("-m venv .venv", '-m venv "$VENV"')
        assert expected in ci, f".ci/run does not run the README's set-up command {command!r} (as {expected!r})"
    # And the other way: what .ci/run prepares for the tests (packages of other languages, the venvs
    # made by .ci/make-*) is in the README's set-up too (CI ran `npm ci`, the README did not: the Node
    # client test failed on a fresh clone).
    steps = [c for c in commands(setup) if not re.match(r"(\.venv/bin/)?hnd-", c)]
    for line in ci:
        if re.match(r"(npm |\.ci/make-)", line):
            assert line in steps, f"the README's set-up lacks {line!r}, which .ci/run runs before the tests"
    # Every other page's set-up of a development venv runs the same steps (else the tests fail there).
    for page in (ROOT / "docs").rglob("*.md"):
        for block in bash_blocks(page.read_text()):
            if '-e ".[all,dev]"' in block and "-m venv .venv" in block:
                assert [c for c in commands(block) if not re.match(r"(\.venv/bin/)?hnd-", c)] == steps, page
    test_command = next(c for b in bash_blocks(readme) for c in commands(b) if " -m pytest" in c)
    assert test_command == ".venv/bin/python -m pytest -q"
    pytest_lines = [line for line in ci if "-m pytest" in line and not line.startswith("#")]
    assert pytest_lines == ['"$VENV/bin/python" -m pytest -q']


def test_readmes_role_table_is_the_launchers():
    """The README's install table: one row per role the tests emulate, each installing its extra, each
    command it lists run by that extra (hnd.common.launch.SCRIPTS)."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(
        r"^\| (\w+)[^|]*\| `pip install -c constraints.txt (?:-e )?\"\.\[([a-z,]+)\]\"`[^|]*\| (.*?) \|$", readme, re.M
    )
    assert [role for role, _, _ in rows] == list(ROLES)
    for role, extras, commands in rows:
        assert extras.split(",")[0] == role
        for script in re.findall(r"`(hnd-[a-z-]+)`", commands):
            assert launch.SCRIPTS[script].extra in role_extras(role), f"README: {script} listed under {role}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """hnd's wheel built from this checkout (no build isolation: nothing is downloaded) and the build log."""
    out = tmp_path_factory.mktemp("dist")
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index"]
    build = subprocess.run(
        [*pip_wheel, "-w", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (path,) = out.glob("hnd-*-py3-none-any.whl")
    return path, build.stdout + build.stderr


def test_the_wheel_holds_every_config_proto_and_the_license(wheel):
    path, log = wheel
    names = set(zipfile.ZipFile(path).namelist())
    for folder, package, suffix in (("configs", "hnd/configs", ".yaml"), ("proto/hnd", "hnd/proto/hnd", ".proto")):
        files = sorted((ROOT / folder).rglob(f"*{suffix}"))
        assert files
        for f in files:
            assert f"{package}/{f.relative_to(ROOT / folder).as_posix()}" in names, f"the wheel lacks {f}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in zipfile.ZipFile(path).read(metadata).decode()
    # setuptools' warnings: data folders missing from `packages`, the deprecated license table.
    assert "is absent from the `packages` configuration" not in log
    assert "project.license` as a TOML table is deprecated" not in log


# ---------------------------------------------------------------------------------------------
# A real edge install (made by .ci/make-edge-venv at set-up time)


@pytest.fixture(scope="module")
def edge_venv() -> Path:
    python = EDGE_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no {EDGE_VENV.relative_to(ROOT)}: run .ci/make-edge-venv (the README's set-up does)")
    installed = Path(
        subprocess.run(
            [str(python), "-c", "import hnd, os; print(os.path.dirname(hnd.__file__))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    dirs = pyproject()["tool"]["setuptools"]["package-dir"]
    for package, folder in dirs.items():
        target = installed.joinpath(*package.split(".")[1:])
        for source in (ROOT / folder).glob("*.py"):
            copy = target / source.name
            if not copy.exists() or copy.read_bytes() != source.read_bytes():
                pytest.fail(
                    f"{EDGE_VENV.relative_to(ROOT)} is older than {source.relative_to(ROOT)}: run .ci/make-edge-venv"
                )
    return EDGE_VENV


def test_fresh_edge_venv_has_no_torch_and_every_script_answers(edge_venv):
    bin_dir = edge_venv / "bin"
    no_torch = subprocess.run([str(bin_dir / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode == 1 and "No module named 'torch'" in no_torch.stderr
    for script, spec in launch.SCRIPTS.items():
        run = subprocess.run([str(bin_dir / script), "--help"], capture_output=True, text=True, timeout=120)
        if spec.extra == "edge":
            assert run.returncode == 0 and run.stdout.startswith(f"usage: {script}"), run.stderr
        else:
            assert_names_extra(script, run.returncode, run.stderr, spec.extra)


def test_fresh_edge_venv_runs_an_onnx_head_against_a_server(edge_venv, tiny_model, tmp_path):
    from runtime_support import export_onnx_files, serving

    model = tiny_model("faster_rcnn")
    files = export_onnx_files(tmp_path, model, "test/faster_rcnn-b3ch", "head.onnx")
    out = tmp_path / "records.jsonl"
    with serving(model) as server:
        base = [str(edge_venv / "bin" / "hnd-edge"), "--server", f"127.0.0.1:{server.port}", "--no-progress"]
        base += ["--images", str(files["images"]), "--config", "test/faster_rcnn-b3ch", "--threads", "1"]
        run = subprocess.run(
            [*base, "--head", str(files["head"]), "--output", str(out)], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        assert [json.loads(line)["status"] for line in out.read_text().splitlines()] == ["OK", "OK"]
        pt = subprocess.run([*base, "--head", str(files["ckpt"])], capture_output=True, text=True, timeout=300)
        assert pt.returncode == 2 and pt.stderr.count("\n") == 1 and "hnd-export-head" in pt.stderr, pt.stderr


# ---------------------------------------------------------------------------------------------
# The files of a published project


def test_license_citation_and_changelog_agree_with_pyproject():
    import yaml

    project = pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert (cff["version"], cff["license"]) == (project["version"], project["license"])
    paper = cff["preferred-citation"]
    assert paper["title"].startswith("Neural Compression and Filtering for Edge-assisted Real-time Object Detection")
    assert [a["family-names"] for a in paper["authors"]] == ["Matsubara", "Levorato"]
    hnd = next(r for r in cff["references"] if r["title"].startswith("Head Network Distillation"))
    assert hnd["doi"] == "10.1109/ACCESS.2020.3039714"
    # Keep a Changelog: [Unreleased] first, then releases or development rounds, newest first; only its
    # six kinds of change.
    changelog = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## (.*)$", changelog, re.M)
    assert versions[0] == "[Unreleased]"
    dates = []
    for heading in versions[1:]:
        m = re.fullmatch(r"(?:\[\d+\.\d+\.\d+\]|Round \d+) - (\d{4}-\d{2}-\d{2})", heading)
        assert m, f"CHANGELOG.md: {heading!r} is neither a version nor a round with its date"
        dates.append(m.group(1))
    assert dates == sorted(dates, reverse=True)
    kinds = set(re.findall(r"^### (.*)$", changelog, re.M))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, kinds
