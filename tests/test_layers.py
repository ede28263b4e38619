"""The package's layers (``../shared/DESIGN.md``): a network imports nothing above ``networks/``, the model-file
modules (record, ONNX) nothing from the engine side, and no module imports itself through others (no cycle).

Read from the source with ``ast`` (every import statement, lazy ones inside functions and ``TYPE_CHECKING`` blocks
included: a lazy import still points the way it points)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "monai_ecrm"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (``from pkg import name`` counts as ``pkg.name`` when that is
    a module, else as ``pkg``)."""
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    candidate = f"{module}.{alias.name}"
                    found.add(candidate if candidate in files else module)
        graph[name] = {target for target in found if target in files and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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


def test_the_walk_sees_imports_of_every_form():
    graph = import_graph()
    assert "monai_ecrm.networks.blocks.ecrm" in graph["monai_ecrm.networks.blocks"]  # from .ecrm import ECRM
    assert "monai_ecrm.record" in graph["monai_ecrm"]  # from .record import load_model
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_networks_import_nothing_outside_networks():
    graph = import_graph()
    upward = {
        name: sorted(target for target in targets if not target.startswith("monai_ecrm.networks"))
        for name, targets in graph.items()
        if name.startswith("monai_ecrm.networks")
    }
    assert {name: targets for name, targets in upward.items() if targets} == {}


def test_model_file_modules_import_nothing_from_the_engine_side_or_the_command():
    graph = import_graph()
    for name in ("monai_ecrm.record", "monai_ecrm.onnx"):
        above = [
            t for t in graph[name] if t.startswith(("monai_ecrm.handlers", "monai_ecrm.clinical", "monai_ecrm.bundle"))
        ]
        assert above == [], f"{name} imports {above}"


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_engine_side_imports_nothing_from_the_clinical_command():
    graph = import_graph()
    engine = {
        name: targets
        for name, targets in graph.items()
        if name.startswith(("monai_ecrm.handlers", "monai_ecrm.inferers"))
    }
    upward = {
        name: sorted(t for t in targets if t.startswith("monai_ecrm.clinical")) for name, targets in engine.items()
    }
    assert {name: targets for name, targets in upward.items() if targets} == {}
