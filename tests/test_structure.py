"""The code's shape, as rules a change cannot quietly break: no import circle between the project's
modules, nothing in the package imports ``benchmarks``, modules under ``ray_jobs/`` and ``pipelines/`` stay
at most 500 lines and functions outside tests and benchmarks at most 80 lines.

Imports are read from the source (``ast``), at any depth: a lazy import inside a function is still an
arrow; one under ``if TYPE_CHECKING:`` is not (it never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prefopt_core", "pipelines", "ray_jobs")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules(packages=PACKAGES) -> dict[str, Path]:
    out = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Project modules ``name`` imports: ``import a.b``, ``from a import b`` (a submodule b counts as a.b)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    stack: list[ast.AST] = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m in known and m != name} | {
        m for m in found if m.split(".")[0] == "benchmarks"
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (depth-first search), or ``None``."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, name, set(modules)) for name, path in modules.items()}


def test_cycle_finder_finds_a_hand_made_circle():
    """a -> b -> c -> a is a circle; a -> b, a -> c, b -> c is not."""
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_between_project_modules():
    """A package ``__init__`` that only documents its submodules imports nothing, so the graph's circles
    are real ones (module A needs B and B needs A)."""
    graph = {k: {m for m in v if not m.startswith("benchmarks")} for k, v in _graph().items()}
    assert _cycle(graph) is None


def test_nothing_in_the_package_imports_benchmarks():
    offenders = sorted(k for k, v in _graph().items() if any(m.startswith("benchmarks") for m in v))
    assert offenders == []


def test_ray_jobs_and_pipelines_modules_are_at_most_500_lines():
    long = {
        name: n
        for name, path in _modules(("pipelines", "ray_jobs")).items()
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}


def test_functions_are_at_most_80_lines():
    long = {}
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{name}.{node.name}"] = n
    assert long == {}
