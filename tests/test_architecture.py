"""The layering, read from the source: ``core`` at the bottom, the stage packages on it, the
orchestration (``pipeline``) on top, and no import cycle anywhere.

Imports are read with ``ast`` from every library module, including imports inside functions and
``if TYPE_CHECKING:`` blocks: a lazy or type-only import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = "core"
STAGES = ("connectors", "chunkers", "embedders", "stores", "rerankers")
ORCHESTRATION = "pipeline"
PACKAGES = (CORE, *STAGES, ORCHESTRATION)


def library_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The library modules ``name`` imports (a ``from package import module`` counts as the module)."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    resolved = set()
    for module in found:
        while module and module not in modules:  # a name imported from a module: the module
            module = module.rpartition(".")[0]
        if module and module != name:
            resolved.add(module)
    return resolved


def import_graph() -> dict[str, set[str]]:
    modules = library_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            advanced = False
            for successor in successors:
                if successor not in index:
                    index[successor] = low[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    advanced = True
                    break
                if successor in on_stack:
                    low[node] = min(low[node], index[successor])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_library_module_takes_part_in_an_import_cycle():
    assert cycles(import_graph()) == []


def test_core_imports_nothing_above_it_and_stages_import_only_core():
    allowed = {CORE: {CORE}, **{stage: {CORE, stage} for stage in STAGES}}
    wrong = []
    for module, imported in import_graph().items():
        package = module.split(".")[0]
        if package in allowed:
            wrong += [
                f"{module} imports {target}"
                for target in sorted(imported)
                if target.split(".")[0] not in allowed[package]
            ]
    assert wrong == []


def test_the_orchestration_package_needs_no_lazy_attribute_hook():
    source = (REPO / ORCHESTRATION / "__init__.py").read_text(encoding="utf-8")
    assert "__getattr__" not in source
