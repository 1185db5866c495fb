"""Imports run one way: inside edgens.runtime there is no cycle (counting lazy and type-checking imports too), and
the runtime imports nothing of edgens but the error family, atomic file writing and itself (so never torch).

The source is read with ``ast``, not imported, so every import statement counts wherever it stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the runtime may import from the rest of edgens: modules that import nothing but the standard library.
RUNTIME_MAY_IMPORT = {"edgens.arrays", "edgens.checks", "edgens.ensemble", "edgens.errors", "edgens.fileio"}


def _module_name(path: Path, package_dir: Path, package: str) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def _imports(path: Path, module: str) -> set[str]:
    """Every edgens module ``path`` imports (``from a import b`` counts a.b where a.b is a module, else a)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("edgens")}


def _runtime_graph() -> dict[str, set[str]]:
    """Module -> the runtime modules it imports. The package itself (its __init__, which re-exports the public API)
    is left out: it sits on top, and importing any submodule runs it first anyway."""
    runtime_dir = ROOT / "runtime"
    modules = {_module_name(path, runtime_dir, "edgens.runtime"): path for path in runtime_dir.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = _imports(path, name)
        graph[name] = {other for other in imported if other in modules and other not in (name, "edgens.runtime")}
        outside = {other for other in imported if not other.startswith("edgens.runtime")}
        # "from edgens.errors import X" also records edgens.errors.X: keep the module part
        outside = {other for other in outside if not any(other.startswith(f"{ok}.") for ok in RUNTIME_MAY_IMPORT)}
        assert outside <= RUNTIME_MAY_IMPORT, f"{name} imports {sorted(outside - RUNTIME_MAY_IMPORT)}"
    del graph["edgens.runtime"]
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph`` (as a path that returns to its start), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_runtime_modules_import_one_way() -> None:
    graph = _runtime_graph()
    assert "edgens.runtime.predictor" in graph and len(graph) >= 10
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in the runtime: " + " -> ".join(cycle or [])


def test_what_the_predictor_is_built_from_does_not_drive_it() -> None:
    graph = _runtime_graph()
    drivers = {name for name, edges in graph.items() if "edgens.runtime.predictor" in edges}
    assert {"edgens.runtime.profile", "edgens.runtime.early_exit", "edgens.runtime.faults"} <= drivers
    reachable, todo = set(), ["edgens.runtime.predictor"]
    while todo:  # everything the Predictor imports, directly or not
        for nxt in graph[todo.pop()]:
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert not reachable & drivers, f"the Predictor is built from modules that drive it: {reachable & drivers}"


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
