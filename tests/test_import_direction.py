"""Dependencies run one way (issue 16), read from the source with ``ast`` so the rule stays true:

* ``unigendet.model`` imports nothing of the rest of the project (no training, data or checkpoint code);
* nothing in ``unigendet`` imports ``data_modules`` or ``callbacks`` except the CLI entry (``unigendet.cli``);
* no import cycles between modules (function-local imports count: they only hide a cycle).

``KNOWN`` lists today's exceptions; the layout moves of issue 16 remove them one by one, and the test fails both on a
new violation and on a listed one that is gone (so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("unigendet", "data_modules", "callbacks")
CLI_ENTRY = "unigendet.cli"

KNOWN: set[str] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name an ``import`` / ``from ... import`` anywhere in the file may refer to (module or member)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]) if node.level else \
                node.module or ""
            base = base.strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a member ``pkg.mod.name`` counts as ``pkg.mod``)."""
    modules = project_modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {resolve(n) for n in imported_names(module, path) if n.split(".")[0] in PACKAGES}
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
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


def violations(graph: dict[str, set[str]]) -> set[str]:
    out = set()
    for module, targets in graph.items():
        for target in targets:
            if module.startswith("unigendet.model") and not target.startswith("unigendet.model"):
                out.add(f"{module} -> {target}")
            if module.startswith("unigendet") and module != CLI_ENTRY and target.split(".")[0] in ("data_modules",
                                                                                                  "callbacks"):
                out.add(f"{module} -> {target}")
    out.update("cycle: " + ", ".join(component) for component in cycles(graph))
    return out


def test_the_rules_catch_what_they_describe():
    graph = {"unigendet.model.vit": {"unigendet.training.optim"}, "unigendet.training.optim": {"data_modules.base"},
             "unigendet.cli": {"callbacks.requeue"}, "a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}}
    assert violations(graph) == {"unigendet.model.vit -> unigendet.training.optim",
                                 "unigendet.training.optim -> data_modules.base", "cycle: a.x, a.y, a.z"}


def test_relative_and_function_local_imports_are_read(tmp_path):
    pkg = tmp_path / "unigendet"
    pkg.mkdir()
    src = pkg / "thing.py"
    src.write_text("def f():\n    from .model import config\n    import unigendet.inputs.records\n")
    names = imported_names("unigendet.thing", src)
    assert {"unigendet.model", "unigendet.model.config", "unigendet.inputs.records"} <= names


def test_dependencies_run_one_way():
    found = violations(import_graph())
    new, gone = found - KNOWN, KNOWN - found
    assert not new, f"imports against the layout rules (docs/design.md, issue 16): {sorted(new)}"
    assert not gone, f"fixed, so remove from KNOWN: {sorted(gone)}"
