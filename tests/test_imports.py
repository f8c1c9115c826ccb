"""The import graph of hnd, read from the source (every import, at module level or inside a function): base
interfaces never import their implementations (factories live beside the CLI / API that picks), and the
edge never imports the server."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    """Every hnd module -> its file, from pyproject.toml's package-dir mapping."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    out = {}
    for package, folder in package_dir.items():
        if package.count(".") > 1:
            continue
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """module -> the hnd modules it imports (``from hnd.x import y`` counts hnd.x.y when it is a module, else
    hnd.x); imports under ``if TYPE_CHECKING:`` never run and do not count."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if _type_checking_only(node, parents):
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("hnd"):
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in mods]
                targets = subs or [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif (
                isinstance(node, ast.Call)
                and ast.unparse(node.func).endswith("import_module")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):  # importlib.import_module("hnd.aio")
                targets = [node.args[0].value]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def reachable(graph: dict[str, set[str]], start: set[str]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        v = todo.pop()
        if v not in seen:
            seen.add(v)
            todo += graph[v]
    return seen


def test_the_graph_is_read_from_the_source():
    graph = import_graph()
    assert "hnd.edge.api" in graph["hnd.edge.cli"]  # module-level
    assert "hnd.edge.torch_modes" in graph["hnd.edge.api"]  # inside make_mode
    assert "hnd.aio" in graph["hnd"]  # importlib.import_module
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_import_graph_of_hnd_is_a_dag():
    """No two hnd modules import each other, directly or around a circle: the edge's modes do not import the
    factory that picks them, nor hnd-train / hnd-eval / hnd-make-synthetic-coco's recipes the CLI that picks."""
    assert cycles(import_graph()) == []


def test_the_edge_never_imports_the_server():
    graph = import_graph()
    edge = {m for m in graph if m.startswith("hnd.edge")} | {"hnd.aio"}
    assert {m for m in reachable(graph, edge) if m.startswith("hnd.server")} == set()
