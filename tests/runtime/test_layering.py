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


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or not."""
    reachable, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    return reachable


def test_what_a_call_meets_does_not_import_what_runs_it() -> None:
    # The stack pool, the tally and the bundle format are parts the execution and the façade are built from.
    graph = _runtime_graph()
    runners = {"edgens.runtime.predictor", "edgens.runtime.execution"}
    parts = ["edgens.runtime.pool", "edgens.runtime.tally", *(name for name in graph
                                                             if name.startswith("edgens.runtime.bundle"))]
    assert len(parts) >= 7
    for part in parts:
        assert not _reachable(graph, part) & runners, f"{part} imports {_reachable(graph, part) & runners}"


def test_the_bundle_format_imports_nothing_else_of_the_runtime() -> None:
    graph = _runtime_graph()
    for name, edges in graph.items():
        if name.startswith("edgens.runtime.bundle"):
            outside = {other for other in edges if not other.startswith("edgens.runtime.bundle")}
            assert not outside, f"{name} imports {sorted(outside)}"


WEB_FRAMEWORKS = ("starlette", "uvicorn", "fastapi", "httptools", "h11", "aiohttp", "grpc")


def _all_imports(path: Path) -> set[str]:
    """Every module ``path`` imports (top-level names and dotted ones), edgens or not."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module)
    return found


def _edgens_module_path(module: str) -> Path | None:
    """The file of an edgens module in this checkout (runtime and export live beside the edgens folder)."""
    parts = module.split(".")[1:]
    if parts and parts[0] in ("runtime", "export"):
        base, parts = ROOT / parts[0], parts[1:]
    else:
        base = ROOT / "edgens"
    for candidate in (base.joinpath(*parts).with_suffix(".py"), base.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def test_the_service_imports_no_web_framework() -> None:
    """The service is transport-free: nothing it imports, directly or through edgens, is a web framework."""
    seen, todo, frameworks = set(), ["edgens.serve.service"], set()
    while todo:
        module = todo.pop()
        path = _edgens_module_path(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        for imported in _all_imports(path):
            if imported.split(".")[0] in WEB_FRAMEWORKS:
                frameworks.add(f"{module} imports {imported}")
            if imported.startswith("edgens"):
                todo.append(imported)
    assert "edgens.runtime.predictor" in seen and not frameworks, sorted(frameworks)


def test_modules_stay_small_and_the_call_stays_simple() -> None:
    import dataclasses

    from edgens.runtime.execution import Call

    sizes = {path.relative_to(ROOT).as_posix(): len(path.read_text(encoding="utf-8").splitlines())
             for path in (ROOT / "runtime").rglob("*.py")}
    assert sizes["runtime/predictor.py"] <= 400, sizes["runtime/predictor.py"]
    assert not {name: n for name, n in sizes.items() if n > 500}
    assert len(dataclasses.fields(Call)) <= 10


def _private_runtime_names() -> set[str]:
    """The private names the runtime defines: module-level functions and classes, methods, and attributes it sets
    on ``self``."""
    names = set()
    for path in (ROOT / "runtime").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {name for name in names if name.startswith("_") and not name.startswith("__")}


def test_no_code_outside_the_runtime_uses_its_private_names() -> None:
    private = _private_runtime_names()
    assert "_prepare" in private and "_runners" in private
    uses = []
    for folder in ("edgens", "export", "benchmarks", "scripts", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if folder == "edgens" and path.relative_to(ROOT / "edgens").parts[0] in ("runtime", "export"):
                continue  # the symbolic links to the runtime and export folders
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("edgens.runtime"):
                    uses += [f"{path.name}: import {a.name}" for a in node.names if a.name in private]
                elif isinstance(node, ast.Attribute) and node.attr in private and not (
                        isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    uses.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
    assert not uses, uses
