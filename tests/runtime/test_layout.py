"""The runtime's layout rules (DESIGN.md, Layout), read from the source: no import cycles, and no
import of a workstation package (train, export, evaluation, calibration), not even lazily."""

from __future__ import annotations

import ast
from pathlib import Path

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"
WORKSTATION = ("train", "export", "evaluation", "calibration")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(RUNTIME).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["medsec_edge.runtime", *parts])


def _imports() -> dict[str, set[str]]:
    """Every runtime module and the medsec_edge modules it imports anywhere (lazily too)."""
    files = {_module_name(p): p for p in RUNTIME.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{path}: relative import (use medsec_edge.runtime...)"
                if not (node.module or "").startswith("medsec_edge"):
                    continue
                subs = [f"{node.module}.{a.name}" for a in node.names]
                deps.update(subs if all(s in files for s in subs) else [node.module])
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("medsec_edge"))
        graph[name] = {d for d in deps if d != name}
    return graph


def test_runtime_never_names_a_workstation_package():
    offenders = sorted(f"{m} -> {d}" for m, deps in _imports().items() for d in deps
                       if d.split(".")[1] in WORKSTATION)
    assert offenders == []


def test_runtime_has_no_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    cycles: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [node, dep]) if dep in path else f"{node} -> {dep}")
            elif dep in graph and dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert cycles == []


def test_capabilities_live_in_their_own_subpackages():
    top = sorted(p.name for p in RUNTIME.iterdir() if p.suffix == ".py")
    assert top == ["__init__.py", "bench.py", "bundle.py", "bundle_store.py", "errors.py", "pipeline.py"]
    for package in ("io", "watermark", "tamper", "crypto", "backends", "cli"):
        assert (RUNTIME / package / "__init__.py").is_file(), package


def test_each_command_package_imports_first_in_a_fresh_interpreter():
    """The workstation command modules build on cli.options; composing the app loads them through
    the entry points. Importing one of them first must not meet a half-initialised module."""
    import subprocess
    import sys

    for module in ("medsec_edge.train.commands", "medsec_edge.export.commands",
                   "medsec_edge.evaluation.commands", "medsec_edge.runtime.cli"):
        code = f"import {module} as m; m.register if hasattr(m, 'register') else m.app"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        assert result.returncode == 0, f"{module}: {result.stderr[-2000:]}"
