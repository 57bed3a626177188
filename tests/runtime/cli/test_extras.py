"""A runtime-only install: a workstation command says which extra brings it, exit 2, no traceback.

Each case runs the real CLI entry point in a fresh interpreter where the missing package cannot be
imported (``sys.modules[name] = None`` makes every import of it fail, as on an install without it).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

_PROGRAM = """
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # 'import name' now raises ImportError, as without the package
sys.argv = ["medsec-edge", *{argv!r}]
from medsec_edge.runtime.cli import main
main()
"""


def _run_without(blocked: list[str], argv: list[str], tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROGRAM.format(blocked=blocked, argv=argv)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path),
                                                         "COLUMNS": "80"})


@pytest.mark.parametrize(("argv", "extra"), [
    (["train", "watermark", "--steps", "1", "--out", "runs/x"], "train"),
    (["train", "tamper", "--steps", "1", "--out", "runs/x"], "train"),
    (["train", "cipher", "--steps", "1", "--out", "runs/x"], "train"),
    (["export", "watermark", "--checkpoint", "c.pt", "--out", "b"], "export"),
    (["export", "tamper", "--checkpoint", "c.pt", "--bundle", "b"], "export"),
    (["eval", "crypto", "--images", "x"], "train"),
])
def test_a_workstation_command_without_torch_names_its_extra(tmp_path, argv, extra):
    res = _run_without(["torch"], argv, tmp_path)
    assert res.returncode == 2, res.stderr
    assert f"pip install 'medsec-edge[{extra}]'" in res.stderr
    assert "torch missing" in res.stderr
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists(), "nothing started"


def test_an_evaluation_without_scipy_names_the_eval_extra(tmp_path):
    res = _run_without(["scipy"], ["eval", "watermark", "--images", "x"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "pip install 'medsec-edge[eval]'" in res.stderr and "Traceback" not in res.stderr


def test_the_device_commands_still_work_without_torch(tmp_path):
    res = _run_without(["torch"], ["keys", "new", str(tmp_path / "k"), "--json"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "k" / "watermark.key").exists()


def test_a_plugin_whose_package_fails_to_load_becomes_a_command_naming_its_extra(tmp_path):
    """app.register_plugins: the entry point's module cannot be imported at all."""
    res = _run_without(["medsec_edge.train.commands"], ["train", "watermark", "--steps", "1"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert "pip install 'medsec-edge[train]'" in res.stderr
    assert "Traceback" not in res.stderr
    # the other commands are untouched, and help still lists it with the extra it needs
    res = _run_without(["medsec_edge.train.commands"], ["--help"], tmp_path)
    assert res.returncode == 0 and "train" in res.stdout and "medsec-edge[train]" in res.stdout
