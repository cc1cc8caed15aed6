"""The folders are the layers (docs/architecture.md): no package imports one above it, no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import memcr

ROOT = Path(memcr.__file__).parent
# bottom up; packages of one rank know nothing of each other
RANK = {"system": 0, "engine": 1, "dump": 1, "lazy": 2, "park": 3, "group": 4, "service": 5}
VOCABULARY = {"memcr.errors", "memcr.options", "memcr.logs", "memcr.report", "memcr.advice", "memcr.exits"}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, top_level_only: bool) -> set[str]:
    """The memcr modules `path` imports, outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def walk(nodes: list[ast.stmt] | list[ast.excepthandler]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    found.add(full if full in MODULES else node.module)
            if top_level_only and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue  # runs later, when every module is loaded: no cycle at import
            for field in ("body", "orelse", "finalbody", "handlers"):
                walk(getattr(node, field, []))

    walk(ast.parse(path.read_text()).body)
    return {m for m in found if m.startswith("memcr.") and m in MODULES}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else None


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _package(m)))
def test_a_layer_imports_only_layers_below_it_and_the_vocabulary(module: str) -> None:
    own = _package(module)
    assert own is not None
    upward = []
    for imported in _imports(MODULES[module], top_level_only=False):
        other = _package(imported)
        if other is None:
            if imported not in VOCABULARY:
                upward.append(imported)
        elif other != own and RANK[other] >= RANK[own]:
            upward.append(imported)
    assert upward == [], f"{module} reaches up or sideways into {upward}"


def test_no_import_cycle() -> None:
    graph = {m: _imports(p, top_level_only=True) - {m} for m, p in MODULES.items()}
    state: dict[str, int] = {}
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The walker finds imports nested in functions and skips type-only ones."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from memcr.service import daemon\n"
        "def later():\n    from memcr.park import checkpoint\n"
        "from memcr.system import procfs\n"
    )
    assert _imports(source, top_level_only=False) == {"memcr.park.checkpoint", "memcr.system.procfs"}
    assert _imports(source, top_level_only=True) == {"memcr.system.procfs"}
