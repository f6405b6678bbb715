"""The import rule: jetmesh's packages form a layered graph, and the CLI is its edge.

The graph is built from every import statement of the package's source (module level,
inside functions and under ``TYPE_CHECKING`` alike: an import hidden in a function is
still a dependency), read with ``ast``; nothing is imported. Its nodes are the packages
bus, memory, agents, a2a, orchestrator and the CLI package ``orchestrator.cli`` (the one
composition root, a node of its own). The test fails on

- any import of ``jetmesh.orchestrator.cli`` from outside it (nothing depends on the CLI);
- any cycle between packages, unless the cycle's edge is in `ALLOWED` (none left is the
  aim; each entry says why it is still there).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("bus", "memory", "agents", "a2a", "orchestrator")
CLI = "orchestrator.cli"

ALLOWED: dict[tuple[str, str], str] = {}
"""Package edges (importer, imported) that close a cycle but are tolerated for now, with
why. Keep this empty: a new entry needs a reason and a plan to remove it."""


def _node(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "jetmesh" or parts[1] not in PACKAGES:
        return None
    if parts[1:3] == ["orchestrator", "cli"]:
        return CLI
    return parts[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["jetmesh", *parts])


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names an import statement can load (`from m import x`: m and m.x)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")
        if not is_package:
            base = base[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    return [target, *(f"{target}.{a.name}" for a in node.names)]


def import_graph() -> dict[tuple[str, str], list[str]]:
    """(importer package, imported package) -> where ("path:line"), for every import."""
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = _module_name(path)
            source = _node(module)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for stmt in ast.walk(tree):
                if not isinstance(stmt, ast.Import | ast.ImportFrom):
                    continue
                names = _imported(stmt, module, path.name == "__init__.py")
                for target in {_node(n) for n in names} - {None, source}:
                    assert target is not None
                    edges[(str(source), target)].append(
                        f"{path.relative_to(ROOT)}:{stmt.lineno}")
    return dict(edges)


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    succ: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        succ[a].add(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: list[str] = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted({*PACKAGES, CLI}):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[tuple[str, str], list[str]]:
    return import_graph()


def test_the_graph_sees_imports_inside_functions(graph: dict[tuple[str, str], list[str]]
                                                 ) -> None:
    # The CLI wires everything together, mostly from inside its commands: if the walk
    # missed function-level imports, these edges would be missing.
    assert {(CLI, p) for p in PACKAGES} <= set(graph)


def test_nothing_imports_the_cli(graph: dict[tuple[str, str], list[str]]) -> None:
    into_cli = {k: v for k, v in graph.items() if k[1] == CLI}
    assert not into_cli, f"the CLI is the composition root; imported from {into_cli}"


def test_no_import_cycle_between_packages(graph: dict[tuple[str, str], list[str]]) -> None:
    kept = {k: v for k, v in graph.items() if k not in ALLOWED}
    found = cycles(kept)
    detail = {f"{a} -> {b}": where for (a, b), where in sorted(kept.items())
              if any(a in c and b in c for c in found)}
    assert not found, f"import cycles between packages {found}: {detail}"


def test_allowlist_is_not_stale(graph: dict[tuple[str, str], list[str]]) -> None:
    # An allowed edge that no longer exists, or no longer closes a cycle, must go.
    for edge in ALLOWED:
        assert edge in graph, f"{edge} is allowed but no longer imported: remove it"
        assert cycles({**{k: v for k, v in graph.items() if k not in ALLOWED},
                       edge: graph[edge]}), f"{edge} no longer closes a cycle: remove it"


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({("bus", "agents"): ["x"], ("agents", "bus"): ["y"]}) == [["agents", "bus"]]
    assert cycles({("a2a", "orchestrator"): ["x"], ("orchestrator", "agents"): ["y"],
                   ("agents", "a2a"): ["z"]}) == [["a2a", "agents", "orchestrator"]]
    assert cycles({("agents", "bus"): ["x"]}) == []
