"""The console scripts' entry points: a missing optional dependency is one line naming the extra to install.

hnd installs per role (pyproject.toml's extras): a camera device takes ``hnd[edge]`` (ONNX Runtime, no
torch), a GPU host ``hnd[server]``, a workstation ``hnd[train]`` or ``hnd[all]``. Every console script of
pyproject.toml ``[project.scripts]`` points here; :func:`run` imports the script's module and calls its
``main()``. A ``ModuleNotFoundError`` for one of hnd's optional dependencies, at import or while running
(a torch head on a torch-free edge), becomes ``<prog>: error: ...`` naming the extra that installs it,
exit status 2. A missing module that is not one of hnd's dependencies is a bug and keeps its traceback.

This module imports nothing beyond the standard library, so it answers in any install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass

EXIT_MISSING_EXTRA = 2


@dataclass(frozen=True)
class Script:
    """A console script: the module whose ``main()`` it runs and the extra of the role it belongs to."""

    module: str
    extra: str


# The role matrix: which extra each command needs (README / DEPLOY.md "Without containers").
SCRIPTS: dict[str, Script] = {
    "hnd-edge": Script("hnd.edge.cli", "edge"),
    "hnd-server": Script("hnd.server.cli", "server"),
    "hnd-healthcheck": Script("hnd.server.healthcheck", "server"),
    "hnd-export-head": Script("hnd.edge.export_head", "train"),
    "hnd-train": Script("hnd.train.cli", "train"),
    "hnd-eval": Script("hnd.train.eval_cli", "train"),
    "hnd-make-synthetic-coco": Script("hnd.train.synthetic_cli", "train"),
    "hnd-bench": Script("hnd.bench.cli", "bench"),
    "hnd-demo": Script("hnd.demo", "bench"),
}

# Import names of hnd's dependencies whose distribution is named otherwise (the rest import as they install).
DISTRIBUTIONS = {
    "PIL": "pillow",
    "skimage": "scikit-image",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "grpc_tools": "grpcio-tools",
    "prometheus_client": "prometheus-client",
    "cv2": "opencv-python-headless",
    "yaml": "PyYAML",
    "google": "protobuf",
    "grpc": "grpcio",
}

# The one hint that is not an extra: a torch-free edge runs the head exported to ONNX instead.
ONNX_ROUTE = (
    "a torch head (--head FILE.pt, --checkpoint, --random-weights or no --head) needs PyTorch, which an edge "
    "install leaves out: export the head to ONNX where torch is (hnd-export-head model.pt head.onnx) and "
    "give --head head.onnx, or install the edge,server extras"
)


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extras_requiring() -> dict[str, set[str]]:
    """``{normalized distribution: the extras that install it}`` from hnd's installed metadata.

    Extras that name other extras (``bench = ["hnd[edge,video,server]", ...]``) are expanded; a distribution
    of the core (no ``extra`` marker) maps to ``{""}``.
    """
    try:
        requirements = importlib.metadata.requires("hnd") or []
    except importlib.metadata.PackageNotFoundError:  # run from a source tree without an install
        return {}
    direct: dict[str, set[str]] = {}  # extra -> distributions
    nested: dict[str, set[str]] = {}  # extra -> extras it includes
    for line in requirements:
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[([^\]]*)\])?[^;]*(?:;.*extra\s*==\s*['\"]([^'\"]+))?", line)
        if m is None:
            continue
        name, includes, extra = _normalize(m.group(1)), m.group(2), m.group(3) or ""
        if name == "hnd":
            nested.setdefault(extra, set()).update(e.strip() for e in (includes or "").split(","))
        else:
            direct.setdefault(extra, set()).add(name)

    def closure(extra: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(direct.get(extra, ()))
        for inner in nested.get(extra, ()):
            if inner not in seen:
                out |= closure(inner, seen | {extra})
        return out

    out: dict[str, set[str]] = {}
    for extra in set(direct) | set(nested):
        for name in closure(extra):
            out.setdefault(name, set()).add(extra)
    return out


def missing_extra_message(script: str, exc: ModuleNotFoundError) -> str | None:
    """The one line for ``exc`` raised in ``script``, or None when the module is not one of hnd's dependencies."""
    top = (exc.name or "").split(".")[0]
    dist = _normalize(DISTRIBUTIONS.get(top, top))
    extras = extras_requiring().get(dist)
    if not top or extras is None or extras == {""}:
        return None
    own = SCRIPTS[script].extra
    if script == "hnd-edge" and top in ("torch", "torchvision"):
        fix = ONNX_ROUTE
    else:
        needed = own if own in extras else f"{own},{_smallest(extras)}"
        fix = f'{script} needs hnd\'s "{needed}" extra: pip install -c constraints.txt ".[{needed}]" (or the wheel with [{needed}])'
    return f"{script}: error: No module named {top!r}: {fix}"


def _smallest(extras: set[str]) -> str:
    """The role to name among ``extras``: the first of the order below (a narrow extra before a union)."""
    order = ["edge", "video", "server", "train", "bench", "all"]
    return min(extras, key=lambda e: order.index(e) if e in order else len(order))


def run(script: str, argv: list[str] | None = None) -> int:
    """Run ``script``'s ``main(argv)``; a missing optional dependency prints one line and returns 2."""
    try:
        main: Callable[[list[str] | None], int] = importlib.import_module(SCRIPTS[script].module).main
        return main(argv)
    except ModuleNotFoundError as exc:
        message = missing_extra_message(script, exc)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return EXIT_MISSING_EXTRA


def _entry(script: str) -> Callable[[], int]:
    def entry() -> int:
        return run(script)

    entry.__name__ = entry.__qualname__ = script.replace("-", "_")
    entry.__doc__ = f"The ``{script}`` console script."
    return entry


hnd_edge = _entry("hnd-edge")
hnd_server = _entry("hnd-server")
hnd_healthcheck = _entry("hnd-healthcheck")
hnd_export_head = _entry("hnd-export-head")
hnd_train = _entry("hnd-train")
hnd_eval = _entry("hnd-eval")
hnd_make_synthetic_coco = _entry("hnd-make-synthetic-coco")
hnd_bench = _entry("hnd-bench")
hnd_demo = _entry("hnd-demo")
