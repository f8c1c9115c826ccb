"""Deployment files agree with the code: docker/*.Dockerfile, docker/compose.yaml, .dockerignore, DEPLOY.md.

Static checks parse the files (a small Dockerfile instruction parser, PyYAML for compose, tomllib for
pyproject) and hold them against the package: console scripts, argparse parsers of the CLIs, default
ports, constraints.txt pins, files in the repository. DEPLOY.md's TLS commands are run and their
certificates are used against a real hnd-server. Building an image needs a container engine that can
get the base image; where there is none the build test is skipped and says why.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"server": DOCKER / "server.Dockerfile", "edge": DOCKER / "edge.Dockerfile"}
COMPOSE = DOCKER / "compose.yaml"
DEPLOY = ROOT / "docs" / "guide" / "deployment.md"  # the deployment guide (DEPLOY.md points to it)
PROGRAMS = {"server": "hnd-server", "edge": "hnd-edge"}


# ---------------------------------------------------------------------------------------------
# Helpers: pyproject, constraints, CLI parsers


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def console_scripts() -> dict[str, str]:
    return pyproject()["project"].get("scripts", {})


def constraints() -> dict[str, str]:
    """``{normalized name: version}`` of the ``name==version`` lines of constraints.txt."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def script_module(script: str) -> ModuleType:
    """The module whose ``main()`` a console script runs (pyproject.toml -> hnd.common.launch.SCRIPTS)."""
    from hnd.common.launch import SCRIPTS

    scripts = console_scripts()
    assert script in scripts, f"{script} is not a console script in pyproject.toml [project.scripts]"
    return importlib.import_module(SCRIPTS[script].module)


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def cli_parser(script: str) -> argparse.ArgumentParser:
    """The argparse parser behind a console script of pyproject.toml.

    ``build_parser()`` of the script's module (hnd.server.cli, hnd.edge.cli, ...); for a module
    without one, the parser that ``main`` builds, caught at its ``parse_args`` call.
    """
    module = script_module(script)
    func = "main"
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        getattr(module, func)([])
    except _Captured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{script}: {module.__name__}.main builds no argparse parser")


def parse_cli(script: str, args: list[str], where: str) -> argparse.Namespace:
    """Parse ``args`` with the script's own parser; a flag it does not accept fails the test."""
    parser = cli_parser(script)
    errors: list[str] = []

    def error(message: str):
        errors.append(message)
        raise SystemExit(2)

    parser.error = error  # type: ignore[method-assign]
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: {script} does not accept {shlex.join(args)}: {'; '.join(errors) or 'exit'}")


def option_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def grpc_port(ns: argparse.Namespace) -> int:
    """The port hnd-server listens on for parsed args: --port, else the config's runtime.port."""
    from hnd.common.config import load_config

    return ns.port if ns.port is not None else load_config(ns.config).runtime.port


def default_metrics_port() -> int:
    from hnd.server import cli

    return cli.DEFAULT_METRICS_PORT


# ---------------------------------------------------------------------------------------------
# A small Dockerfile parser


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction (CMD, ENTRYPOINT, HEALTHCHECK CMD), else None."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(.*)$", text, re.S)
            text = m.group(1) if m else ""
        text = text.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped (Dockerfile syntax)."""
    out: list[Instruction] = []
    buf: list[str] = []
    start = 0
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment lines inside a continuation are skipped
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf.append(line[:-1].strip())
            continue
        buf.append(line)
        text = " ".join(b for b in buf if b)
        buf = []
        keyword, _, args = text.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
    assert not buf, f"{path}: ends inside a continuation line"
    return out


def one(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in instructions if i.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def build_args(instructions: list[Instruction]) -> dict[str, str]:
    out = {}
    for i in instructions:
        if i.keyword == "ARG" and "=" in i.args:
            name, _, value = i.args.partition("=")
            out[name.strip()] = value.strip().strip('"')
    return out


def image_command(instructions: list[Instruction]) -> tuple[str, list[str]]:
    """(program, default arguments) from ENTRYPOINT + CMD, both exec form."""
    entry = one(instructions, "ENTRYPOINT").exec_form()
    cmd = one(instructions, "CMD").exec_form()
    assert entry is not None and cmd is not None, "ENTRYPOINT and CMD must be exec form (signals reach the program)"
    return entry[0], entry[1:] + cmd


def copy_sources(ins: Instruction) -> tuple[list[str], str]:
    parts = [p for p in ins.args.split() if not p.startswith("--")]
    return parts[:-1], parts[-1]


# ---------------------------------------------------------------------------------------------
# .dockerignore matching (Docker's rules: patterns from the context root, ** for any depth, last match wins)


def dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    pats = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        pat = pat.strip("/")
        rx, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx += "(?:.*/)?"
                i += 3
            elif pat.startswith("**", i):
                rx += ".*"
                i += 2
            elif pat[i] == "*":
                rx += "[^/]*"
                i += 1
            elif pat[i] == "?":
                rx += "[^/]"
                i += 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                rx += pat[i : j + 1]
                i = j + 1
            else:
                rx += re.escape(pat[i])
                i += 1
        pats.append((negate, re.compile(rx + "$")))
    return pats


def ignored(rel: str, pats=None) -> bool:
    """Whether a context-relative path is left out of the build context (it or a parent matches)."""
    pats = dockerignore_patterns() if pats is None else pats
    parts = rel.strip("/").split("/")
    result = False
    for k in range(1, len(parts) + 1):
        prefix = "/".join(parts[:k])
        for negate, rx in pats:
            if rx.match(prefix):
                result = not negate
        if result and k < len(parts):
            return True  # an excluded folder takes its contents with it
    return result


# ---------------------------------------------------------------------------------------------
# Compose helpers


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose variable interpolation with the defaults (as with no .env / environment)."""
    return _VAR.sub(lambda m: m.group(2) or "", value)


def service_args(service: dict) -> list[str]:
    cmd = service["command"]
    assert isinstance(cmd, list), "compose commands are lists (no shell splitting surprises)"
    return [interpolate(str(c)) for c in cmd]


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("side", ["server", "edge"])
def test_dockerfile_basics(side):
    ins = parse_dockerfile(DOCKERFILES[side])
    froms = [i for i in ins if i.keyword == "FROM"]
    assert len(froms) == 1
    base = froms[0].args.split()[0]
    args = build_args(ins)
    resolved = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base)
    assert re.match(r"python:3\.11[-.]", resolved), f"base image {resolved}: Python 3.11 as in constraints.txt"
    # Unprivileged at run time: the last USER is neither root nor uid 0, and comes before ENTRYPOINT.
    users = [i for i in ins if i.keyword == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].args.split(":")[0] not in ("root", "0")
    assert users[-1].line < one(ins, "ENTRYPOINT").line
    program, _ = image_command(ins)
    assert program == PROGRAMS[side]


@pytest.mark.parametrize("side", ["server", "edge"])
def test_dockerfile_programs_are_console_scripts(side):
    scripts = console_scripts()
    ins = parse_dockerfile(DOCKERFILES[side])
    program, _ = image_command(ins)
    assert program in scripts
    named = {w for i in ins if i.keyword in ("RUN", "HEALTHCHECK") for w in re.findall(r"\bhnd-[a-z-]+\b", i.args)}
    assert named, "the image neither smoke-tests nor health-checks a console script"
    for name in named:
        assert name in scripts, f"{DOCKERFILES[side].name} runs {name}, which pyproject.toml does not declare"


@pytest.mark.parametrize("side", ["server", "edge"])
def test_copy_sources_exist_and_are_in_the_context(side):
    ins = parse_dockerfile(DOCKERFILES[side])
    pats = dockerignore_patterns()
    copied: set[str] = set()
    for i in ins:
        if i.keyword in ("COPY", "ADD"):
            assert i.keyword == "COPY", "use COPY (ADD fetches URLs and unpacks archives)"
            assert "--from" not in i.args
            sources, _ = copy_sources(i)
            for src in sources:
                path = ROOT / src
                assert path.exists(), f"{DOCKERFILES[side].name}:{i.line}: COPY {src}: no such file in the repository"
                assert not ignored(src, pats), f"COPY {src}: excluded by .dockerignore"
                files = (
                    [path]
                    if path.is_file()
                    else [p for p in path.rglob("*") if p.suffix in (".py", ".pyi", ".yaml", ".proto")]
                )
                for f in files:
                    rel = f.relative_to(ROOT).as_posix()
                    assert not ignored(rel, pats), f"{rel} (needed by COPY {src}) is excluded by .dockerignore"
                copied.add(src.rstrip("/"))
    tool = pyproject()["tool"]["setuptools"]
    need = set(tool["package-dir"].values()) | {"pyproject.toml", "constraints.txt"}
    readme = pyproject()["project"].get("readme")
    if isinstance(readme, str):
        need.add(readme)  # setuptools reads it when building the wheel
    need.update(pyproject()["project"].get("license-files", []))  # and these (a missing one fails the build)
    assert need <= copied, f"the image does not copy {sorted(need - copied)} (pyproject.toml needs them)"


@pytest.mark.parametrize("side", ["server", "edge"])
def test_dependencies_install_before_the_source_is_copied(side):
    ins = parse_dockerfile(DOCKERFILES[side])
    package_dirs = set(pyproject()["tool"]["setuptools"]["package-dir"].values())

    def index(pred) -> int:
        return next(n for n, i in enumerate(ins) if pred(i))

    first_source = index(lambda i: i.keyword == "COPY" and set(copy_sources(i)[0]) & package_dirs)
    deps_copy = index(
        lambda i: i.keyword == "COPY" and {"pyproject.toml", "constraints.txt"} <= set(copy_sources(i)[0])
    )
    deps_run = index(lambda i: i.keyword == "RUN" and "-r /tmp/requirements.txt" in i.args)
    install = index(lambda i: i.keyword == "RUN" and re.search(r"pip install [^&]*--no-deps[^&]* \.(\s|$)", i.args))
    assert deps_copy < deps_run < first_source < install
    # Nothing from the source tree is copied before the dependency layer.
    assert not any(i.keyword == "COPY" and n < deps_run and n != deps_copy for n, i in enumerate(ins))


@pytest.mark.parametrize("side", ["server", "edge"])
def test_pins_match_constraints(side):
    pins = constraints()
    ins = parse_dockerfile(DOCKERFILES[side])
    args = build_args(ins)
    if side == "server":
        assert args["TORCH_VERSION"] == pins["torch"]
        assert args["TORCHVISION_VERSION"] == pins["torchvision"]
    else:
        assert not {"TORCH_VERSION", "TORCHVISION_VERSION"} & set(args), "the edge image holds no torch"
    for i in ins:
        if i.keyword != "RUN":
            continue
        for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"'$]*)", i.args):
            assert normalize(name) in pins, f"{name}=={version} is pinned in the image but not in constraints.txt"
            assert version.split("+")[0] == pins[normalize(name)], f"{name}=={version} vs constraints.txt"
        for cmd in re.split(r"&&|;", i.args):
            if "pip install" in cmd and not re.search(r"pip install [\"']?setuptools|--no-deps", cmd):
                assert "-c constraints.txt" in cmd, f"pip install without -c constraints.txt: {cmd.strip()}"


def test_edge_image_installs_the_edge_extra_and_no_torch():
    ins = parse_dockerfile(DOCKERFILES["edge"])
    run = next(i.args for i in ins if i.keyword == "RUN" and "-r /tmp/requirements.txt" in i.args)
    assert "['optional-dependencies']['edge']" in run and "torch==" not in run
    assert "find_spec('torch') is None" in run  # the build fails if torch slipped in
    edge = pyproject()["project"]["optional-dependencies"]["edge"]
    core = pyproject()["project"]["dependencies"]
    assert any(d.startswith("onnxruntime") for d in edge)
    assert not any(normalize(re.split(r"[<>=\[ ]", d)[0]) in {"torch", "torchvision"} for d in core + edge)


@pytest.mark.parametrize("side", ["server", "edge"])
def test_default_command_uses_flags_the_cli_accepts(side):
    program, args = image_command(parse_dockerfile(DOCKERFILES[side]))
    parse_cli(program, args, f"{DOCKERFILES[side].name} ENTRYPOINT+CMD")


def test_server_image_ports_match_the_code():
    from hnd.common.config import RuntimeConfig

    ins = parse_dockerfile(DOCKERFILES["server"])
    program, args = image_command(ins)
    ns = parse_cli(program, args, "server.Dockerfile")
    assert ns.host == "0.0.0.0", "inside a container the server must listen on all interfaces"
    port = grpc_port(ns)
    assert port == RuntimeConfig().port == 50051
    assert ns.metrics_port == default_metrics_port() == 9100
    assert ns.metrics_host == "0.0.0.0", "/metrics binds to loopback by default: unreachable from outside a container"
    exposed = {int(p.split("/")[0]) for i in ins if i.keyword == "EXPOSE" for p in i.args.split()}
    assert exposed == {port, ns.metrics_port}
    # The health check probes the port the server listens on, with a parser-valid command line.
    health = one(ins, "HEALTHCHECK").exec_form()
    assert health is not None
    hns = parse_cli(health[0], health[1:], "server.Dockerfile HEALTHCHECK")
    assert hns.server.rsplit(":", 1)[1] == str(port)
    # Long enough for the model to load and warm up before failures count.
    assert re.search(r"--start-period=\d+", one(ins, "HEALTHCHECK").args)


def test_edge_image_defaults():
    ins = parse_dockerfile(DOCKERFILES["edge"])
    program, args = image_command(ins)
    ns = parse_cli(program, args, "edge.Dockerfile")
    assert ns.head is not None and ns.head.startswith("/models/"), "the edge image runs on head-only weights"
    assert ns.checkpoint is None
    from hnd.common.config import RuntimeConfig

    assert ns.server.rsplit(":", 1)[1] == str(RuntimeConfig().port)
    assert one(ins, "STOPSIGNAL").args == "SIGINT"  # hnd-edge finishes its output on KeyboardInterrupt
    assert not [i for i in ins if i.keyword == "EXPOSE"], "the edge listens on nothing"


def test_dockerignore_keeps_the_context_small_and_secret_free():
    pats = dockerignore_patterns()
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "resource/ckpt/x.pt",
        "model.pt",
        "configs/x.pt",
        "common/__pycache__/a.cpython-311.pyc",
        "bench-out/r.json",
        "demo-out/a.png",
        "hnd.egg-info/PKG-INFO",
        ".pytest_cache/v",
        ".hypothesis/x",
        "build/lib/x.py",
        "secrets/server.key",
        "resource/deploy/secrets/token",
        "server.key",
        "ca.crt",
    ):
        assert ignored(rel, pats), f"{rel} would be sent to the image build"
    for rel in (
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "common/config.py",
        "configs/hnd/faster_rcnn-b3ch.yaml",
        "proto/v1/tensor_pb2.py",
        "server/cli.py",
        "edge/cli.py",
    ):
        assert not ignored(rel, pats), f"{rel} is needed in the build context"


# ---------------------------------------------------------------------------------------------
# Compose


def test_compose_builds_the_two_images():
    c = compose()
    assert set(c["services"]) == {"server", "edge"}
    for side in ("server", "edge"):
        build = c["services"][side]["build"]
        context = (COMPOSE.parent / build["context"]).resolve()
        assert context == ROOT
        assert (context / build["dockerfile"]).resolve() == DOCKERFILES[side].resolve()
        assert c["services"][side]["init"] is True


@pytest.mark.parametrize("side", ["server", "edge"])
def test_compose_commands_use_flags_the_cli_accepts(side):
    service = compose()["services"][side]
    parse_cli(PROGRAMS[side], service_args(service), f"compose.yaml services.{side}.command")


def test_compose_ports_and_addresses_match():
    c = compose()
    server, edge = c["services"]["server"], c["services"]["edge"]
    sns = parse_cli("hnd-server", service_args(server), "compose server")
    ens = parse_cli("hnd-edge", service_args(edge), "compose edge")
    port = grpc_port(sns)
    assert sns.host == "0.0.0.0"
    published = {}
    for spec in server["ports"]:
        parts = str(spec).split(":")
        assert parts[0] == "127.0.0.1", f"{spec}: publish on loopback only in the try-out file"
        published[int(parts[-1])] = int(parts[-2])
    assert set(published) == {port, sns.metrics_port}
    assert sns.metrics_port == default_metrics_port()
    assert sns.metrics_host == "0.0.0.0"  # the container's address; published on the host's loopback above
    assert ens.server == f"server:{port}"
    assert edge["depends_on"]["server"]["condition"] == "service_healthy"
    hc = server["healthcheck"]["test"]
    assert hc[0] == "CMD"
    hns = parse_cli(hc[1], hc[2:], "compose server healthcheck")
    assert hns.server.rsplit(":", 1)[1] == str(port)
    # TLS in the command means the probe needs the CA too, and must dial a name in the SAN.
    assert sns.tls_cert and hns.tls_ca == ens.tls_ca
    assert hns.server.split(":")[0] in ("localhost", "127.0.0.1")


def test_compose_secrets_and_volumes():
    c = compose()
    declared = c["secrets"]
    for name, spec in declared.items():
        assert "file" in spec and "${HND_DEPLOY_DIR" in spec["file"], name
    for side in ("server", "edge"):
        service = c["services"][side]
        mounted = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        assert mounted <= set(declared)
        used = {a.split("/run/secrets/", 1)[1] for a in service_args(service) if a.startswith("/run/secrets/")}
        hc = service.get("healthcheck", {}).get("test", [])
        used |= {a.split("/run/secrets/", 1)[1] for a in hc if a.startswith("/run/secrets/")}
        assert used <= mounted, f"{side} reads secrets it does not mount: {sorted(used - mounted)}"
    sns = parse_cli("hnd-server", service_args(c["services"]["server"]), "compose server")
    ens = parse_cli("hnd-edge", service_args(c["services"]["edge"]), "compose edge")
    assert sns.tls_cert and sns.tls_key and sns.token_file and ens.tls_ca and ens.token_file
    assert "server.key" not in {s if isinstance(s, str) else s["source"] for s in c["services"]["edge"]["secrets"]}
    # Server: the whole model folder, read-only. Edge: the head file only, read-only.
    server_vols = [interpolate(v) for v in c["services"]["server"]["volumes"]]
    assert any(v.endswith(":/models:ro") for v in server_vols)
    assert sns.checkpoint.startswith("/models/")
    edge_vols = [interpolate(v) for v in c["services"]["edge"]["volumes"]]
    assert ens.checkpoint is None and ens.head is not None
    model_mounts = [v.split(":") for v in edge_vols if v.split(":")[1].startswith("/models")]
    assert len(model_mounts) == 1, "the edge mounts one file from the model folder: the head"
    host, target, mode = model_mounts[0]
    assert Path(host).name == "head.onnx" and target == ens.head and mode == "ro"  # the torch-free edge
    video_mount = next(v for v in edge_vols if v.split(":")[1] == ens.video)
    assert video_mount.endswith(":ro")
    out_volume = next(v for v in edge_vols if v.split(":")[1] == str(Path(ens.output).parent))
    assert out_volume.split(":")[0] in c["volumes"]
    # Host paths stay in git-ignored, .dockerignored resource/ by default.
    default_dir = (COMPOSE.parent / interpolate("${HND_DEPLOY_DIR:-../resource/deploy}")).resolve()
    assert default_dir.relative_to(ROOT).parts[0] == "resource"
    assert ignored("resource/deploy/secrets/server.key")


def test_compose_with_docker_compose_v1_config_if_installed(tmp_path):
    """Schema check with docker-compose (v1, no daemon needed) where it is installed."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (the static checks above still ran)")
    deploy = tmp_path / "deploy"
    (deploy / "secrets").mkdir(parents=True)
    (deploy / "models").mkdir()
    for f in (
        "secrets/server.crt",
        "secrets/server.key",
        "secrets/ca.crt",
        "secrets/token",
        "models/head.onnx",
        "sample.mp4",
    ):
        (deploy / f).write_text("")
    # v1 predates the top-level `name:` of the Compose Specification; check everything else.
    data = compose()
    data.pop("name", None)
    copy = DOCKER / f".compose-check-{os.getpid()}.yaml"
    copy.write_text(yaml.safe_dump(data))
    try:
        r = subprocess.run(
            [exe, "-f", str(copy), "config", "-q"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "HND_DEPLOY_DIR": str(deploy)},
        )
    finally:
        copy.unlink()
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# DEPLOY.md


def deploy_text() -> str:
    return DEPLOY.read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(r"```%s\n(.*?)```" % lang, deploy_text(), re.S)


def tagged_block(tag: str) -> str:
    m = re.search(r"<!-- test: %s -->\n```bash\n(.*?)```" % re.escape(tag), deploy_text(), re.S)
    assert m, f"DEPLOY.md has no block tagged {tag}"
    return m.group(1)


def documented_commands() -> list[tuple[str, list[str]]]:
    """(console script, its arguments) for every hnd-* command line in DEPLOY.md's shell blocks,
    the systemd ExecStart, and the arguments after an hnd image name in `docker run` lines."""
    scripts = console_scripts()
    out = []
    blocks = code_blocks("bash") + code_blocks("ini")
    for block in blocks:
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("ExecStart=", 1)[-1]
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for n, w in enumerate(words):  # one command: stop at the first shell operator
                if w in ("&", "&&", "|", "||", ";", ">", ">>", "2>&1"):
                    words = words[:n]
                    break
            for n, w in enumerate(words):
                name = Path(w).name
                image = re.fullmatch(r"(hnd-(?:server|edge)):[\w.-]+", w)
                if w == "--health-cmd":
                    health = shlex.split(words[n + 1])
                    out.append((health[0], health[1:]))
                if image and words[0] == "docker" and "run" in words[:3]:
                    out.append((image.group(1), words[n + 1 :]))
                    break
                if name.startswith("hnd-") and n == 0:
                    assert name in scripts, f"DEPLOY.md runs {name}, which pyproject.toml does not declare"
                    out.append((name, words[1:]))
                    break
    return out


def test_deploy_md_commands_use_flags_the_clis_accept():
    commands = documented_commands()
    seen = {name for name, _ in commands}
    assert {"hnd-server", "hnd-edge", "hnd-export-head", "hnd-healthcheck"} <= seen
    for name, args in commands:
        parse_cli(name, args, "DEPLOY.md")
    # Every hnd-* word anywhere in the guide is a console script or an image name.
    scripts = set(console_scripts())
    for word in set(re.findall(r"(?<![\w/.-])hnd-[a-z]+(?:-[a-z]+)*(?![\w-])", deploy_text())):
        assert word in scripts or word in ("hnd-server", "hnd-edge", "hnd-edge-out") or word in kubernetes_names(), word


def kubernetes_names() -> set[str]:
    """hnd-* names that deploy/k8s defines (objects, Secrets, claims) and the metadata keys the server sends."""
    from hnd.server.app import REPLICA_KEY, WEIGHTS_KEY

    text = "\n".join(p.read_text() for p in (ROOT / "deploy" / "k8s").rglob("*.yaml"))
    return set(re.findall(r"(?<![\w/.-])hnd-[a-z]+(?:-[a-z]+)*(?![\w-])", text)) | {REPLICA_KEY, WEIGHTS_KEY}


def test_deploy_md_names_the_metrics_the_server_exports():
    from hnd.server.metrics import ServerMetrics

    exported = set()
    for family in ServerMetrics().registry.collect():
        exported.add(family.name + ("_total" if family.type == "counter" else ""))
    documented = set(re.findall(r"\bhnd_[a-z_]+", deploy_text()))
    documented = {re.sub(r"_(bucket|sum|count)$", "", n) for n in documented}
    # Custom-metrics names that deploy/k8s's prometheus-adapter rules derive from the exported ones
    # (tests/test_k8s.py checks the derivation).
    adapter = yaml.safe_load((ROOT / "deploy" / "k8s" / "prometheus-adapter-values.yaml").read_text())
    documented -= {rule["name"]["as"] for rule in adapter["rules"]["custom"]} - exported
    assert documented <= exported, f"DEPLOY.md names metrics the server lacks: {sorted(documented - exported)}"
    assert exported <= documented, f"DEPLOY.md misses metrics: {sorted(exported - documented)}"
    from hnd.server.metrics import STAGES

    for stage in STAGES:
        assert f"`{stage}`" in deploy_text()


def test_deploy_md_ports_and_defaults_match_the_code():
    from hnd.common.config import RuntimeConfig

    text = deploy_text()
    rt = RuntimeConfig()
    assert f"| {rt.port}/tcp |" in text and f"| {default_metrics_port()}/tcp |" in text
    assert f"`max_batch` {rt.max_batch}, `max_delay_ms` {rt.max_delay_ms:g}, `max_queue` {rt.max_queue}" in text
    parser = cli_parser("hnd-server")
    defaults = {a.dest: a.default for a in parser._actions}
    assert defaults["host"] == defaults["metrics_host"]
    assert f"(both default to `{defaults['host']}`" in text
    assert f"`--drain-seconds` ({defaults['drain_seconds']:g} s)" in text


def deploy_section(title: str) -> str:
    """The text of DEPLOY.md's ``## title`` section, up to the next ``## ``."""
    m = re.search(r"^## %s\n(.*?)(?=^## )" % re.escape(title), deploy_text() + "\n## ", re.S | re.M)
    assert m, f"DEPLOY.md has no section {title!r}"
    return m.group(1)


def test_deploy_md_build_arguments_are_the_dockerfiles():
    """Every build argument DEPLOY.md names is an ARG of a Dockerfile, and every ARG is documented (it
    documented TORCH_VARIANT / TORCH_INDEX_URL, which no Dockerfile had)."""
    args = {
        line.split()[1].split("=")[0]
        for path in DOCKERFILES.values()
        for line in path.read_text().splitlines()
        if line.startswith("ARG ")
    }
    section = deploy_section("Build the images")
    bullet = re.search(r"^- Build arguments.*?(?=^- |\Z)", section, re.S | re.M)
    assert bullet, "DEPLOY.md 'Build the images' has no 'Build arguments' bullet"
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", bullet.group(0)))
    documented |= set(re.findall(r"--build-arg ([A-Z][A-Z0-9_]+)", deploy_text()))
    assert documented == args, f"documented {sorted(documented)}, Dockerfiles have {sorted(args)}"


def edge_commands() -> list[tuple[str, list[str]]]:
    """(where, hnd-edge arguments) of every edge command line the deployment files give."""
    out = [("DEPLOY.md", args) for name, args in documented_commands() if name == "hnd-edge"]
    out.append(("edge.Dockerfile", image_command(parse_dockerfile(DOCKERFILES["edge"]))[1]))
    out.append(("compose.yaml", service_args(compose()["services"]["edge"])))
    for path in sorted((ROOT / "deploy").rglob("*.yaml")):
        for d in yaml.safe_load_all(path.read_text()):
            for c in (d or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                if c["image"].startswith("hnd-edge"):
                    out.append((path.name, c["args"]))
    return out


def test_edge_commands_run_an_onnx_head():
    """The edge image and an edge install have no torch: every documented edge command gives an ONNX
    head (a .pt head, --random-weights or no --head stops there with one line)."""
    commands = edge_commands()
    assert {where for where, _ in commands} >= {"DEPLOY.md", "edge.Dockerfile", "compose.yaml", "edge-job.yaml"}
    for where, args in commands:
        ns = parse_cli("hnd-edge", args, where)
        assert ns.head and ns.head.endswith(".onnx"), f"{where}: hnd-edge {shlex.join(args)}"
        assert ns.random_weights is None and ns.checkpoint is None, f"{where}: hnd-edge {shlex.join(args)}"


def test_deploy_md_installs_per_role():
    """ "Without containers" installs an extra on every machine (a bare `pip install .` is the core only,
    which runs no command), and its role table is the launcher's: each command under the extra it needs."""
    from hnd.common.launch import SCRIPTS

    extras = pyproject()["project"]["optional-dependencies"]
    section = deploy_section("Without containers")
    for line in section.splitlines():
        if re.search(r"\bpip install\b", line):
            named = re.findall(r"\[([a-z,]+)\]", line)
            assert named, f"DEPLOY.md installs no extra: {line.strip()}"
            assert set(",".join(named).split(",")) <= set(extras), line
    rows = re.findall(r"^\| [^|]+ \| `([a-z]+)`[^|]*\| (.*?) \|$", section, re.M)
    assert rows, "DEPLOY.md 'Without containers' has no role table"
    listed = set()
    for extra, commands in rows:
        for script in re.findall(r"`(hnd-[a-z-]+)`", commands):
            listed.add(script)
            assert SCRIPTS[script].extra == extra or extra == "all", (
                f"{script} needs {SCRIPTS[script].extra}, not {extra}"
            )
    assert listed == set(SCRIPTS)


def test_deploy_md_links_resolve():
    text = deploy_text()
    slugs = set()
    for title in re.findall(r"^#+ (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    for anchor in re.findall(r"\]\(#([^)]+)\)", text):
        assert anchor in slugs, f"DEPLOY.md links #{anchor}, no such heading"
    fragment = (DOCKER / "README-fragment.md").read_text()
    for target in re.findall(r"\]\(([^)#]+)", fragment):
        assert (ROOT / target).exists(), f"README-fragment.md links {target}"


@pytest.fixture(scope="module")
def deploy_secrets(tmp_path_factory):
    """The CA, server and client certificates and the token, made by DEPLOY.md's own commands."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: DEPLOY.md's TLS commands cannot run here")
    work = tmp_path_factory.mktemp("deploy")
    # One shell, as a reader types them one after the other (the TLS block's `cd secrets` once put the token
    # in secrets/secrets/).
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", tagged_block("tls") + tagged_block("token")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"DEPLOY.md's TLS and token blocks failed:\n{r.stdout}\n{r.stderr}"
    return work / "secrets"


def test_deploy_md_tls_commands_make_valid_certificates(deploy_secrets):
    s = deploy_secrets
    for cert, purpose in (("server.crt", "sslserver"), ("edge-01.crt", "sslclient")):
        r = subprocess.run(
            ["openssl", "verify", "-CAfile", s / "ca.crt", "-purpose", purpose, s / cert],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", s / "server.crt", "-noout", "-text"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("DNS:server", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in text  # compose service name, container health check
    assert not (s / "ca.csr").exists()
    assert oct((s / "server.key").stat().st_mode & 0o777) == "0o600"
    assert len((s / "token").read_text().strip()) == 64


def test_deploy_md_certificates_work_with_hnd_server(deploy_secrets, tiny_model):
    """The guide's certificates, token and mutual TLS against a real server, dialled as the containers do."""
    import grpc
    import torch
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from hnd.edge.client import ClientSettings, EdgeError, SplitClient
    from hnd.server.app import BackgroundServer, ServerSettings, TlsFiles, read_token
    from hnd.server.service import ModelRunner

    s = deploy_secrets
    runner = ModelRunner(tiny_model("faster_rcnn"), torch.device("cpu"))
    token = read_token(str(s / "token"))
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        token=token,
        tls=TlsFiles(str(s / "server.crt"), str(s / "server.key"), str(s / "ca.crt")),
    )
    main = script_module("hnd-healthcheck").main
    with BackgroundServer(runner, settings) as srv:
        client_files = dict(tls_ca=str(s / "ca.crt"), tls_cert=str(s / "edge-01.crt"), tls_key=str(s / "edge-01.key"))
        for host in ("localhost", "127.0.0.1"):  # the names the health checks dial
            creds = grpc.ssl_channel_credentials(
                (s / "ca.crt").read_bytes(), (s / "edge-01.key").read_bytes(), (s / "edge-01.crt").read_bytes()
            )
            with grpc.secure_channel(f"{host}:{srv.port}", creds) as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        client = SplitClient(ClientSettings(target=f"localhost:{srv.port}", token=token, **client_files))
        try:
            assert client.model_info().weights_fingerprint == runner.fingerprint
        finally:
            client.close()
        # Without the client certificate (mutual TLS) or without the token: refused.
        client = SplitClient(
            ClientSettings(target=f"localhost:{srv.port}", tls_ca=str(s / "ca.crt"), token=token, connect_timeout_s=2)
        )
        with pytest.raises(EdgeError):
            client.model_info()
        client.close()
        client = SplitClient(ClientSettings(target=f"localhost:{srv.port}", **client_files, connect_timeout_s=5))
        with pytest.raises(EdgeError, match="UNAUTHENTICATED"):
            client.model_info()
        client.close()
    # The health-check command of the image, over TLS without a client certificate, with a plain
    # (one-way TLS) server: exit 0 when SERVING.
    settings = ServerSettings(
        host="127.0.0.1", port=0, token=token, tls=TlsFiles(str(s / "server.crt"), str(s / "server.key"))
    )
    with BackgroundServer(runner, settings) as srv:
        args = ["--server", f"localhost:{srv.port}", "--tls-ca", str(s / "ca.crt"), "--timeout", "10"]
        try:
            rc = main(args)
        except SystemExit as exc:
            rc = exc.code
        assert rc in (0, None), f"hnd-healthcheck {shlex.join(args)} exited {rc}"


# ---------------------------------------------------------------------------------------------
# Building an image (needs a container engine that can get the base image)


def _engine() -> tuple[list[str] | None, str]:
    """A command prefix that can build here, or None and why not."""
    base = build_args(parse_dockerfile(DOCKERFILES["edge"]))["PYTHON_IMAGE"]
    reasons = []
    docker = shutil.which("docker")
    if docker:
        r = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
        if r.returncode == 0:
            return [docker, "build"], ""
        reasons.append(
            "docker: client only, no daemon reachable (`docker info` failed: "
            f"{(r.stderr.strip().splitlines() or ['?'])[-1]})"
        )
    else:
        reasons.append("docker: not installed")
    podman = shutil.which("podman")
    if podman:
        r = subprocess.run([podman, "image", "exists", base], capture_output=True, timeout=60)
        if r.returncode == 0:
            return [podman, "build", "--format", "docker"], ""
        reasons.append(
            f"podman: installed, but the base image {base} is not in its local store and the test "
            "does not pull (no registry access on the project machine); `podman pull` or "
            "`podman load` it to run this test"
        )
    else:
        reasons.append("podman: not installed")
    return None, "; ".join(reasons)


@pytest.mark.timeout(3600)
def test_build_edge_image():
    """Build docker/edge.Dockerfile and run `hnd-edge --help` in it as the unprivileged user.

    The build downloads the CPU torch wheels and PyPI packages inside the engine (the tests
    themselves download nothing). Set HND_SKIP_IMAGE_BUILD=1 to skip it on a machine with an engine.
    """
    if os.environ.get("HND_SKIP_IMAGE_BUILD"):
        pytest.skip("HND_SKIP_IMAGE_BUILD is set")
    engine, why = _engine()
    if engine is None:
        pytest.skip(f"no container engine can build the edge image here: {why}")
    tag = f"hnd-edge:test-{os.getpid()}"
    r = subprocess.run(
        [*engine, "-f", str(DOCKERFILES["edge"]), "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=3500
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    run = [engine[0], "run", "--rm"]
    try:
        r = subprocess.run([*run, tag, "--help"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and "--server" in r.stdout, r.stdout + r.stderr
        r = subprocess.run([*run, "--entrypoint", "id", tag, "-u"], capture_output=True, text=True, timeout=300)
        assert r.stdout.strip() == "10001"
        r = subprocess.run(
            [
                *run,
                "--entrypoint",
                "python",
                tag,
                "-c",
                "import importlib.util as u, onnxruntime; print(u.find_spec('torch'))",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.stdout.strip() == "None", r.stdout + r.stderr
    finally:
        subprocess.run([engine[0], "rmi", "-f", tag], capture_output=True, timeout=300)


def test_the_docs_run_on_a_device_only_what_an_edge_install_has():
    """Commands the docs give to the camera device (a shell block's lines under a `# the device` / `# camera device` comment, or
    prose saying "from an edge: `hnd-...`") are scripts of the edge extra: the guide once sent the device's
    user to hnd-healthcheck, which an edge install does not run."""
    from hnd.common.launch import SCRIPTS

    found = []
    for page in (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))):
        text = page.read_text()
        found += [(page.name, s) for s in re.findall(r"from an\s+edge:\s+`(hnd-[a-z-]+)", text)]
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            device = False
            for line in block.replace("\\\n", " ").splitlines():
                if line.lstrip().startswith("#"):
                    device = re.match(r"\s*#\s*(?:the\s+|a\s+)?(?:camera\s+)?device\b(?!')", line) is not None
                elif device and (m := re.match(r"\s*(hnd-[a-z-]+)\b", line)):
                    found.append((page.name, m.group(1)))
    assert any(script == "hnd-edge" for _, script in found), found
    for page, script in found:
        assert SCRIPTS[script].extra == "edge", (
            f"{page}: runs {script} on the device, which needs {SCRIPTS[script].extra}"
        )
