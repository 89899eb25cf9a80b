"""qirl's packages import each other without cycles (lazy imports inside functions included).

A unit is a subpackage (`qirl.models`, `qirl.rewards`, ...) or a top-level module (`qirl.samples`).
A cycle between units means two layers that can only be understood, tested and changed together; a
function-level import that closes one only hides it from the interpreter, so those count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qirl

ROOT = Path(qirl.__file__).resolve().parent


def unit(module: str) -> str:
    """'qirl.rewards.vlm.model' -> 'qirl.rewards'; 'qirl.samples' -> 'qirl.samples'."""
    return ".".join(module.split(".")[:2])


def import_graph() -> dict[str, dict[str, str]]:
    """{unit: {imported unit: a file that imports it}} over every import statement of every module."""
    graph: dict[str, dict[str, str]] = {}
    for file in sorted(ROOT.rglob("*.py")):
        module = ".".join(("qirl", *file.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("qirl.") and unit(name) != unit(module):
                    graph.setdefault(unit(module), {}).setdefault(unit(name), str(file.relative_to(ROOT)))
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One cycle of units as a path [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in list(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": ""}, "b": {"c": ""}}) is None


def test_no_import_cycle_between_qirl_packages():
    graph = import_graph()
    assert "qirl.models" in graph and "qirl.rl" in graph  # the walk saw the tree
    cycle = find_cycle(graph)
    if cycle:
        where = "; ".join(f"{a} -> {b} in {graph[a][b]}" for a, b in zip(cycle, cycle[1:], strict=False))
        raise AssertionError(f"import cycle: {where}")


def test_models_do_not_import_what_sits_above_them():
    above = {"qirl.rewards", "qirl.rl", "qirl.eval", "qirl.samples", "qirl.pretrain", "qirl.cli"}
    assert not above & set(import_graph().get("qirl.models", {}))
