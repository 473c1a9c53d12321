"""The house's picture: dependencies point down, and no module imports its way round a circle.

Every ``import`` of the package (function bodies included, so a lazy import cannot hide a cycle)
is read with ``ast`` and checked against the layers below. A module may import its own layer or
lower ones; a method author imports nothing from ``training/``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "badit_exp"

# lowest first; a module's layer is that of its longest matching prefix
LAYERS = [
    ["config", "io_utils", "provenance", "plotting", "metrics", "tuning", "executors"],  # leaves
    ["dist", "data", "models"],  # process groups, data, model loading
    ["evaluation", "analysis"],  # generation and scoring, analyses of a model
    ["methods"],  # adapters, the engine protocol they use (methods.access)
    ["training"],  # engines, the stage loop, the runner
    ["compose"],  # ConfigStore + validation (needs the method registry)
    ["train", "report", "analyze", "params", "study", "study_report", "study_plan", "__main__"],  # entry points
]


def _modules() -> Dict[str, Path]:
    out = {}
    for p in (SRC / PKG).rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(path: Path, modules: Dict[str, Path]) -> Set[str]:
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from badit_exp import dist` imports the submodule badit_exp.dist
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                     else node.module for a in node.names]
        else:
            continue
        found |= {n for n in names if n == PKG or n.startswith(PKG + ".")}
    return found


def _layer(module: str) -> int:
    rel = module[len(PKG) + 1:] if module != PKG else ""
    for i, names in enumerate(LAYERS):
        if any(rel == n or rel.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py; add it to LAYERS")


def _graph():
    modules = _modules()
    return {m: {i for i in _imports(p, modules) if i != m and i != PKG}
            for m, p in modules.items() if m != PKG}


def test_dependencies_point_down():
    upward = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
              for m, deps in _graph().items() for i in deps if _layer(i) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_methods_import_nothing_from_training():
    bad = [(m, i) for m, deps in _graph().items() if m.startswith(f"{PKG}.methods")
           for i in deps if i.startswith(f"{PKG}.training")]
    assert not bad, bad


def test_no_import_cycles():
    graph = _graph()
    state: Dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_config_is_a_leaf():
    assert _graph()[f"{PKG}.config"] == set()
