"""The import graph of the packages: no cycles, no upward imports between layers, and nothing outside
the command-line package imports it (or any other command module).

Every import counts, also those inside functions: a lazy import is still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("harness", "probes", "finetune")
# The flow of DESIGN.md section 2, bottom to top: a module may import its own layer or lower ones.
LAYERS = {
    "harness.paths": 0,
    "harness.data": 1,
    "harness.prompts": 2,
    "harness.metrics": 2,
    "harness.backends": 3,
    "harness.engine": 4,
    "harness.classification": 5,
    "harness.tasks": 5,
    "harness.runs": 6,
    "harness.serving": 6,
    "harness.study": 7,
    "harness.view": 7,  # the viewer reads runs, metrics and data; nothing below imports it
    "probes": 7,
    "finetune": 7,
    "harness.api": 8,
    "harness": 8,  # harness/__init__.py: the public API
    "harness.demo": 8,
    "harness.demo_models": 1,
    "harness.cli": 9,
    "probes.cli": 9,
    "finetune.cli": 9,
}
COMMAND_MODULES = ("harness.cli", "probes.cli", "finetune.cli")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for p in (REPO / pkg).rglob("*.py"):
            out[_module_name(p)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name refers to (the longest known prefix)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def _imports(mod: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for n in names:
            r = _resolve(n)
            # `from harness import __version__`: the root package only holds the version and the lazy API
            if r is not None and r != mod and r != "harness":
                out.add(r)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _layer(mod: str) -> int:
    best = None
    for prefix, rank in LAYERS.items():
        if (mod == prefix or mod.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rank)
    assert best is not None, f"{mod}: no layer in LAYERS (add its package)"
    return best[1]


def _is_command(mod: str) -> bool:
    return any(mod == c or mod.startswith(c + ".") for c in COMMAND_MODULES)


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_upward_imports():
    bad = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
           for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m)]
    assert not bad, "\n".join(sorted(bad))


def test_nothing_outside_the_cli_imports_a_command_module():
    bad = [f"{m} imports {d}" for m, deps in GRAPH.items() if not _is_command(m)
           for d in deps if _is_command(d)]
    assert not bad, "\n".join(sorted(bad))


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if m.startswith("harness.")))
def test_no_import_side_effects_registering_plugins(mod):
    """No module registers itself into another module's table when imported (explicit registries)."""
    tree = ast.parse(MODULES[mod].read_text())
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            f = node.value.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            assert not name.startswith("register"), f"{mod}: calls {name}() at import time"
