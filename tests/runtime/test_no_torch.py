"""The runtime layer never imports torch or onnx (DESIGN.md, Layout), proven in a fresh interpreter.

Each check runs code with ``sys.executable`` in a subprocess and reads back the names in
``sys.modules``; ``modules_loaded_after`` is the one helper to reuse for new checks (for instance
running the CLI in-process: ``modules_loaded_after("from medsec_edge.runtime.cli import main; ...")``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

FORBIDDEN_IN_RUNTIME = ("torch", "onnx")  # never, not even lazily
LAZY_ONLY = ("onnxruntime", "tensorrt", "cuda")  # only inside backends' functions, when used

# Walks the runtime package's folder and imports every module in it; prints the module names
# it imported and then everything in sys.modules, as JSON on the last line.
_IMPORT_ALL_RUNTIME = """
import importlib, pkgutil
import medsec_edge.runtime as runtime
imported = []
for info in pkgutil.walk_packages(runtime.__path__, prefix="medsec_edge.runtime."):
    if info.name.endswith(".__main__"):  # runs the CLI; cli/root.py is what it imports
        continue
    importlib.import_module(info.name)
    imported.append(info.name)
"""


def modules_loaded_after(code: str, *, timeout_s: float = 60) -> dict:
    """Run ``code`` in a fresh interpreter; return ``{"modules": [...], "imported": [...]}``.

    ``modules`` is every name in ``sys.modules`` afterwards; ``imported`` is the value of a
    variable ``imported`` the code may set (else empty). A failing ``code`` fails the test with
    its stderr.
    """
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json as _json, sys as _sys
        _sys.stdout.write("\\n" + _json.dumps({
            "modules": sorted(_sys.modules),
            "imported": list(globals().get("imported", [])),
        }) + "\\n")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        cwd=Path(__file__).parent,  # not the repo root: the installed package must be what loads
    )
    if result.returncode != 0:
        pytest.fail(f"subprocess failed ({result.returncode}):\n{result.stderr[-4000:]}", pytrace=False)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _top_level(modules: list[str]) -> set[str]:
    return {name.split(".", 1)[0] for name in modules}


@pytest.fixture(scope="module")
def runtime_import() -> dict:
    return modules_loaded_after(_IMPORT_ALL_RUNTIME)


def test_every_runtime_module_was_imported(runtime_import):
    runtime_dir = Path(__file__).resolve().parents[2] / "runtime"
    expected = {
        "medsec_edge.runtime." + ".".join(p.relative_to(runtime_dir).with_suffix("").parts)
        for p in runtime_dir.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    }
    # The walk must have found the module files of the source tree (an editable install).
    assert expected <= set(runtime_import["imported"]), expected - set(runtime_import["imported"])
    assert "medsec_edge.runtime.bundle" in runtime_import["imported"]
    assert "medsec_edge.runtime.backends.tensorrt_backend" in runtime_import["imported"]


def test_runtime_never_imports_torch_or_onnx(runtime_import):
    loaded = _top_level(runtime_import["modules"])
    assert "medsec_edge" in loaded
    offenders = sorted(loaded & set(FORBIDDEN_IN_RUNTIME))
    assert offenders == [], f"importing the runtime pulled in {offenders}"


def test_runtime_imports_backend_libraries_lazily(runtime_import):
    loaded = _top_level(runtime_import["modules"])
    offenders = sorted(loaded & set(LAZY_ONLY))
    assert offenders == [], f"importing the runtime pulled in {offenders}; import them inside functions"


def test_onnxruntime_session_does_not_import_onnx():
    # Using the default backend (the device's real work) still keeps onnx and torch out.
    result = modules_loaded_after(
        """
        import numpy as np
        from medsec_edge.runtime.backends import get_backend
        get_backend("onnxruntime").probe()
        """
    )
    loaded = _top_level(result["modules"])
    assert "onnxruntime" in loaded  # the check below is meaningful: the backend did load
    assert not loaded & set(FORBIDDEN_IN_RUNTIME)
