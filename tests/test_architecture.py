"""The architecture holds: data flows one way (peft_steer never imports TRL), no import cycle, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("peft_steer", "trl_integration")
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    """``{dotted module name: file}`` of every module of both packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module that ``name`` imports anywhere in its file (function-level imports too), as dotted names.

    Imports under ``if TYPE_CHECKING:`` are left out: they name types for checkers and never run.
    """
    is_package = path.name == "__init__.py"
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from package import submodule` imports the submodule too
            found.update(f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules)
    return found


def _runtime_nodes(tree: ast.AST):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (child for orelse in node.orelse for child in [orelse, *_runtime_nodes(orelse)])
            continue
        yield node
        yield from _runtime_nodes(node)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_peft_steer_never_imports_trl(graph):
    offenders = {
        name: sorted(target for target in targets if target.split(".")[0] in ("trl", "trl_integration"))
        for name, targets in graph.items()
        if name.startswith("peft_steer")
    }
    assert not {name: found for name, found in offenders.items() if found}


def test_no_import_cycle(graph):
    """Between the project's own modules (a package's ``__init__`` re-exporting its modules is not a cycle unless a
    module imports the package back)."""
    edges = {
        name: {target for target in targets if target in graph and target != name} for name, targets in graph.items()
    }
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, " ; ".join(" -> ".join(cycle) for cycle in cycles)


def test_no_module_over_400_lines():
    long = {
        str(path.relative_to(ROOT)): n
        for path in module_files().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long


COMPAT_MODULES = (
    "peft_steer/adapter/_peft_compat.py",
    "trl_integration/_trl_compat.py",
    "trl_integration/_accelerate_compat.py",
)


@pytest.mark.parametrize("relative", COMPAT_MODULES)
def test_a_compat_module_lists_what_it_offers_first(relative):
    """Where library internals are touched, ``__all__`` comes before the first definition and names every public one,
    so that a reader sees at the top what the rest of the package relies on."""
    tree = ast.parse((ROOT / relative).read_text(encoding="utf-8"))
    body = [node for node in tree.body if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Expr))]
    declared = [node for node in body if isinstance(node, ast.Assign) and _names(node) == ["__all__"]]
    assert declared and body.index(declared[0]) == 0, f"{relative}: __all__ is not its first statement"
    public = {node.name for node in body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    public |= {name for node in body if isinstance(node, ast.Assign) for name in _names(node) if name.isupper()}
    assert sorted(name for name in public if not name.startswith("_")) == sorted(ast.literal_eval(declared[0].value))


def _names(node: ast.Assign) -> list[str]:
    return [target.id for target in node.targets if isinstance(target, ast.Name)]
