"""The command line contract (DESIGN.md, CLI): outputs, JSON lines, exit codes, no patient data."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from tests.runtime.cli.helpers import run_report
from tests.runtime.test_no_torch import modules_loaded_after

CLI = [sys.executable, "-m", "medsec_edge.runtime.cli"]


def _cli(*args: str, env_key: Path) -> subprocess.CompletedProcess:
    # the device key set (watermark key inside) and the old key file's place in a temporary
    # folder: nothing is written to the real home
    env = dict(os.environ, MEDSEC_EDGE_KEYS=str(env_key.parent), MEDSEC_EDGE_KEY=str(env_key.parent.parent / "old.key"),
               MEDSEC_EDGE_THREADS="2")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300,
                          stdin=subprocess.DEVNULL)


@pytest.fixture()
def key_path(tmp_path: Path) -> Path:
    """Where the device key set keeps its watermark key."""
    return tmp_path / "keys" / "ring" / "watermark.key"


@pytest.fixture()
def ct(tmp_path: Path) -> Path:
    src = Path(get_testdata_file("CT_small.dcm", download=False))
    dst = tmp_path / "in" / "ct.dcm"
    dst.parent.mkdir()
    shutil.copy(src, dst)
    return dst


def test_embed_then_extract_matches_identity(tmp_path, ct, key_path):
    before = hashlib.sha256(ct.read_bytes()).hexdigest()
    out = tmp_path / "out" / "ct.dcm"
    res = _cli("embed", str(ct), str(out), "--json", env_key=key_path)
    assert res.returncode == 0, res.stderr
    assert hashlib.sha256(ct.read_bytes()).hexdigest() == before, "input never modified"
    assert (key_path.stat().st_mode & 0o777) == 0o600
    ds_in, ds_out = dcmread(ct), dcmread(out)
    assert ds_out.SOPInstanceUID != ds_in.SOPInstanceUID
    assert ds_out.ImageType[0] == "DERIVED"
    assert ds_out.SourceImageSequence[0].ReferencedSOPInstanceUID == ds_in.SOPInstanceUID
    res = _cli("extract", str(out), str(ct), "--json", env_key=key_path)
    assert res.returncode == 1, "the unwatermarked input makes the command fail"
    lines = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [row["path"] for row in lines] == [str(out), str(ct)]
    assert lines[0]["found"] is True and lines[0]["identity_match"] is True
    assert lines[0]["payload_kind"] == "identity"
    assert {"payload", "confidence", "bits_corrected", "key_id"} <= set(lines[0])
    assert lines[1]["found"] is False
    # moving the pixels to another patient's header is detected
    moved = tmp_path / "moved.dcm"
    ds_out.PatientID = "SOMEONE-ELSE"
    ds_out.save_as(moved)
    res = _cli("extract", str(moved), "--json", env_key=key_path)
    row = json.loads(res.stdout)
    assert row["found"] is True and row["identity_match"] is False and res.returncode == 1


def test_explicit_payload_and_bad_payload(tmp_path, ct, key_path):
    out = tmp_path / "x.dcm"
    assert _cli("embed", str(ct), str(out), "--payload", "0123456789abcdef", env_key=key_path).returncode == 0
    row = json.loads(_cli("extract", str(out), "--json", env_key=key_path).stdout)
    assert row["payload"] == "0123456789abcdef" and row["payload_kind"] == "user"
    bad = _cli("embed", str(ct), str(tmp_path / "y.dcm"), "--payload", "xyz", env_key=key_path)
    assert bad.returncode == 2 and not (tmp_path / "y.dcm").exists()


@pytest.mark.parametrize("name", ["liver.dcm", "OBXXXX1A.dcm", "rtdose.dcm"])
def test_refused_inputs_exit_4_and_write_nothing(tmp_path, key_path, name):
    src = get_testdata_file(name, download=False)
    if src is None:
        pytest.skip(f"{name} not installed")
    out = tmp_path / "out"
    res = _cli("embed", src, str(out / "x.dcm"), env_key=key_path)
    assert res.returncode == 4
    assert name in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not any(out.rglob("*.dcm"))


def test_run_writes_verified_images_and_a_phi_free_report(tmp_path, ct, key_path):
    mr = Path(get_testdata_file("MR_small.dcm", download=False))
    shutil.copy(mr, ct.parent / "mr.dcm")
    out = tmp_path / "run"
    res = _cli("run", str(ct.parent), "--out", str(out), "--json", env_key=key_path)
    assert res.returncode == 0, res.stderr
    report = run_report(res.stdout)
    assert report["ok"] == 2 and report["images"] == 2
    assert report["sealed"] == 2, "every DICOM output is sealed and signed (tests/runtime/test_run_seal.py)"
    assert {"embed", "verify", "seal", "total"} <= set(report["latency_ms"])
    assert (out / "ct.dcm").exists() and (out / "mr.dcm").exists()
    text = (out / "report.json").read_text()
    for ds in (dcmread(ct), dcmread(mr)):
        for value in (str(ds.PatientName), str(ds.PatientID)):
            if value:
                assert value not in text


def test_device_commands_never_import_torch(tmp_path, ct):
    out = tmp_path / "o"
    code = f"""
import os
os.environ["MEDSEC_EDGE_KEY"] = {str(tmp_path / 'k' / 'old.key')!r}
os.environ["MEDSEC_EDGE_KEYS"] = {str(tmp_path / 'k' / 'ring')!r}
from typer.testing import CliRunner
from medsec_edge.runtime.cli import app
r = CliRunner().invoke(app, ["run", {str(ct)!r}, "--out", {str(out)!r}, "--json"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(app, ["extract", {str(out / 'ct.dcm')!r}, "--json"])
assert r.exit_code == 0, r.output
"""
    modules = modules_loaded_after(code)["modules"]
    assert "torch" not in modules and "onnx" not in modules
    assert "onnxruntime" in modules  # the models really ran
