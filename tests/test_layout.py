"""The package's import graph: every import of k2l_dist (module level or inside a
function) between its parts. The parts are ordered along the data flow, and each imports
only parts before it: so each can be read and tested with only the parts below it."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import k2l_dist

PACKAGE = Path(k2l_dist.__file__).parent
# Every subpackage and top-level module, lowest first: the data flow (data → keypoints →
# prepare → augment → models → loss → clustering → eval → training) above the shared
# foundations, with the entry points on top.
ORDER = ["utils", "config", "distributed", "data", "keypoints", "prepare", "augment", "models", "loss", "clustering",
         "eval", "training", "cli", "__main__", "__init__"]


def _node(path: Path) -> str:
    rel = path.relative_to(PACKAGE).as_posix()
    return rel.split("/")[0] if "/" in rel else rel[:-3]


def _target(module: str) -> str:
    parts = module.split(".")[1:]
    return parts[0] if parts else "__init__"


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        src = _node(path)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("k2l_dist"):
                names = [node.module]
                if node.module == "k2l_dist":  # `from k2l_dist import distributed`
                    names = [f"k2l_dist.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("k2l_dist")]
            for name in names:
                dst = _target(name)
                if dst != src:
                    graph[src].add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_package_imports_have_no_cycle():
    graph = import_graph()
    assert "eval" in graph["training"]  # the graph is read at all: training runs the evaluation
    assert find_cycle(graph) is None, f"import cycle: {' → '.join(find_cycle(graph))}"


def test_every_part_is_placed_in_the_order():
    parts = {_node(p) for p in PACKAGE.rglob("*.py")}
    assert parts == set(ORDER), f"not in ORDER: {sorted(parts - set(ORDER))}; gone: {sorted(set(ORDER) - parts)}"


def test_every_part_imports_only_earlier_parts():
    graph = import_graph()
    rank = {name: i for i, name in enumerate(ORDER)}
    wrong = [(a, b) for a in ORDER for b in sorted(graph.get(a, ())) if rank[b] > rank[a]]
    assert not wrong, f"imports against the data flow: {wrong}"
