"""`run`'s seal stage: every DICOM file it writes is sealed (ours) and signed (DICOM PS3.15).

In-process through typer's CliRunner with the default bundle. The key ring lives in a temporary
folder named by ``MEDSEC_EDGE_KEYS`` (``base_env``), so nothing is written to the real home. The
signatures are checked by our own verifiers and by DCMTK's ``dcmsign``, which is the reference.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from medsec_edge.runtime.cli import app
from medsec_edge.runtime.crypto.keyset import PRIVATE_FILES, RSA_CERT, KeyRing, export_public, new_key_dir
from medsec_edge.runtime.crypto.dicom_signature import verify_signatures
from medsec_edge.runtime.errors import KeyFileError
from medsec_edge.runtime.pipeline import load_watermarker, watermark_file
from medsec_edge.runtime.crypto.seal import verify_dataset
from medsec_edge.runtime.crypto.device_keys import KEYS_ENV, default_keys_path, load_or_create_ring
from medsec_edge.runtime.crypto.sealing import seal_file
from tests.runtime.cli.helpers import run_report
from tests.runtime.conftest import make_ct
from tests.tamper_fixtures import REPO, base_env, restore_logging  # noqa: F401 - fixtures

SAMPLES = REPO / "samples"
DEFAULT_BUNDLE = REPO / "bundles" / "default"
DCMSIGN = Path("/usr/bin/dcmsign")
REQUIRE_DCMSIGN_ENV = "MEDSEC_EDGE_REQUIRE_DCMSIGN"


@pytest.fixture
def cli(base_env, restore_logging):  # noqa: F811 - pytest fixtures by name
    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    return invoke


@pytest.fixture
def ring_path(base_env) -> Path:  # noqa: F811
    return Path(os.environ[KEYS_ENV])


@pytest.fixture
def require_dcmsign():
    """Skip without DCMTK's dcmsign, or fail where it must be present (env var set to 1)."""
    if DCMSIGN.exists():
        return
    reason = "DCMTK's dcmsign is not installed at /usr/bin/dcmsign (apt-get install dcmtk)"
    if os.environ.get(REQUIRE_DCMSIGN_ENV, "").strip() == "1":
        pytest.fail(f"{reason}; {REQUIRE_DCMSIGN_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


def _dcmsign_verify(path: Path, cert: Path) -> subprocess.CompletedProcess:
    # +rg: a signature must be present; +rc: a Creator RSA one; +cf: trust our certificate
    return subprocess.run([str(DCMSIGN), "--verify", "+rg", "+rc", "+cf", str(cert), str(path)],
                          capture_output=True, text=True, timeout=60)


@dataclass(frozen=True)
class SampleRun:
    out: Path
    ring_path: Path
    report: dict
    stdout: str


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> SampleRun:
    """One `run` over samples/ for the module, with a fresh watermark key and key ring path."""
    root = tmp_path_factory.mktemp("run-seal")
    ring_path = root / "keys" / "ring"
    root_logger, pyd = logging.getLogger(), logging.getLogger("pydicom")
    saved = (root_logger.handlers[:], root_logger.level, pyd.level)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSEC_EDGE_THREADS", "1")
        mp.setenv("MEDSEC_EDGE_KEY", str(root / "keys" / "watermark.key"))
        mp.setenv(KEYS_ENV, str(ring_path))
        assert not ring_path.exists()
        res = CliRunner().invoke(app, ["run", str(SAMPLES), "--out", str(root / "run"), "--json",
                                       "--bundle", str(DEFAULT_BUNDLE)])
    root_logger.handlers[:] = saved[0]
    root_logger.setLevel(saved[1])
    pyd.setLevel(saved[2])
    assert res.exit_code == 0, res.output
    return SampleRun(root / "run", ring_path, run_report(res.stdout), res.stdout)


def test_run_seals_and_signs_every_dicom_output(sample_run, cli, tmp_path):
    out, ring_path, report = sample_run.out, sample_run.ring_path, sample_run.report

    # the key ring was made on first use, private files owner-only
    ring = KeyRing.load(ring_path)
    for name in PRIVATE_FILES:
        assert stat.S_IMODE((ring_path / name).stat().st_mode) == 0o600
    assert report["seal_key_id"] == ring.signer.key_id
    assert report["dicom_key_id"] == ring.dicom_signer.key_id
    assert report["images"] == report["ok"] == report["sealed"] == 2 and report["seal_failed"] == 0
    assert "seal" in report["latency_ms"]
    assert json.loads((out / "report.json").read_text()) == report

    outputs = []
    for record in report["records"]:
        assert record["status"] == "ok" and record["sealed"] is True, record
        assert record["seal_key_id"] == ring.signer.key_id and record["seal_reason"] == ""
        assert record["latency_ms"]["seal"] > 0
        assert record["latency_ms"]["total"] >= record["latency_ms"]["seal"]
        outputs.append(Path(record["output"]))
    assert sorted(p.name for p in outputs) == ["CT_small.dcm", "MR_small.dcm"]
    assert sorted(p.name for p in out.iterdir()) == ["CT_small.dcm", "MR_small.dcm", "report.json"]

    for path in outputs:
        ds = dcmread(path)
        seal = verify_dataset(ds, ring)
        assert seal.valid, seal.reason
        assert seal.key_id == ring.signer.key_id
        signatures = verify_signatures(ds, trusted=ring.certificates, profile="creator")
        assert signatures.valid, signatures.reason
        assert len(signatures.signatures) == 1
        # still the watermarked derived image, with its record
        assert ds.ImageType[0] == "DERIVED" and ds.SourceImageSequence

    # the verify command agrees, file by file
    res = cli("verify", *outputs, "--keys", ring_path, "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.strip().splitlines()]
    assert [r["valid"] for r in rows] == [True, True]

    # and one changed pixel after the run is caught by both
    ds = dcmread(outputs[0])
    pixels = ds.pixel_array.copy()
    pixels.flat[0] ^= 1
    ds.PixelData = pixels.tobytes()
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    ds = dcmread(changed)
    assert verify_dataset(ds, ring).changed == ["pixels"]
    assert verify_signatures(ds, trusted=ring.certificates).status == "invalid"


@pytest.mark.usefixtures("require_dcmsign")
def test_dcmsign_accepts_every_output_of_run(sample_run, tmp_path):
    cert = sample_run.ring_path / RSA_CERT
    outputs = [Path(r["output"]) for r in sample_run.report["records"]]
    assert len(outputs) == 2
    for path in outputs:
        checked = _dcmsign_verify(path, cert)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    # the reference tool is not just saying yes: one changed pixel is refused
    ds = dcmread(outputs[0])
    pixels = ds.pixel_array.copy()
    pixels.flat[0] ^= 1
    ds.PixelData = pixels.tobytes()
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    assert _dcmsign_verify(changed, cert).returncode != 0


def test_run_reuses_the_key_ring_given_with_keys(cli, tmp_path):
    ring_dir = tmp_path / "given-ring"
    KeyRing.rotate(ring_dir)
    KeyRing.rotate(ring_dir)  # the newest of two sets signs
    ring = KeyRing.load(ring_dir)
    out = tmp_path / "run"
    res = cli("run", SAMPLES / "MR_small.dcm", "--out", out, "--json", "--keys", ring_dir,
              "--bundle", DEFAULT_BUNDLE, "--threads", "1")
    assert res.exit_code == 0, res.output
    report = run_report(res.stdout)
    assert report["seal_key_id"] == ring.signer.key_id != ring.sets[0].seal.key_id
    assert report["records"][0]["seal_key_id"] == ring.signer.key_id
    ds = dcmread(out / "MR_small.dcm")
    assert verify_dataset(ds, ring).valid
    assert verify_signatures(ds, trusted=[ring.newest.certificate], profile="creator").valid
    assert not Path(os.environ[KEYS_ENV]).exists(), "the default ring is not made when --keys is given"


def test_run_refuses_a_public_only_key_set_before_writing_anything(cli, tmp_path):
    public = export_public(new_key_dir(tmp_path / "set").path, tmp_path / "public")
    out = tmp_path / "run"
    res = cli("run", SAMPLES, "--out", out, "--keys", public, "--bundle", DEFAULT_BUNDLE)
    assert res.exit_code == 2
    assert "no private seal or DICOM signature key" in " ".join(res.stderr.split())
    assert not out.exists()


def test_non_dicom_outputs_are_reported_unsealed_not_failed(cli, ring_path, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    np.save(folder / "ct.npy", dcmread(SAMPLES / "CT_small.dcm").pixel_array)
    out = tmp_path / "run"
    res = cli("run", folder, "--out", out, "--json", "--bundle", DEFAULT_BUNDLE, "--threads", "1")
    assert res.exit_code == 0, res.output
    report = run_report(res.stdout)
    assert report["ok"] == 1 and report["sealed"] == 0 and report["seal_failed"] == 0
    record = report["records"][0]
    assert record["status"] == "ok" and record["sealed"] is False and record["seal_key_id"] is None
    assert "NPY output cannot carry a seal" in record["seal_reason"]
    assert "seal" not in record["latency_ms"]
    assert (out / "ct.npy").exists()


def test_a_file_the_creator_profile_cannot_sign_is_removed_not_left_unsigned(base_env, tmp_path):  # noqa: F811
    ds = dcmread(SAMPLES / "CT_small.dcm")
    del ds.SeriesInstanceUID  # the Creator RSA profile signs it, so it must be there
    src = tmp_path / "in.dcm"
    ds.save_as(src, enforce_file_format=True)
    ring = load_or_create_ring()
    watermarker, bundle = load_watermarker(DEFAULT_BUNDLE, threads=1)
    out = tmp_path / "out.dcm"
    record = watermark_file(src, out, watermarker, bundle, None, bytes.fromhex("0123456789abcdef"), keyring=ring)
    assert record.status == "seal_failed" and record.sealed is False and record.output is None
    assert "SeriesInstanceUID" in record.seal_reason and "removed" in record.reason
    assert "seal" in record.latency_ms
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_key_ring_location_and_first_use(monkeypatch, tmp_path):
    monkeypatch.setenv(KEYS_ENV, str(tmp_path / "env-ring"))
    assert default_keys_path() == tmp_path / "env-ring"
    monkeypatch.setenv(KEYS_ENV, "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_keys_path() == tmp_path / "home" / ".config" / "medsec-edge" / "keys"
    first = load_or_create_ring(tmp_path / "ring")
    again = load_or_create_ring(tmp_path / "ring")
    assert again.signer.key_id == first.signer.key_id, "an existing ring is loaded, never replaced"
    (tmp_path / "ring" / PRIVATE_FILES[0]).chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_or_create_ring(tmp_path / "ring")


def test_seal_file_replaces_earlier_signatures(tmp_path, crypto_keyset):
    path = tmp_path / "x.dcm"
    make_ct().save_as(path, enforce_file_format=True)
    ring = KeyRing((crypto_keyset,))
    seal_file(path, ring)
    result = seal_file(path, ring)  # again: the first signature would no longer verify; it is replaced
    ds = dcmread(path)
    report = verify_signatures(ds, trusted=ring.certificates, profile="creator")
    assert report.valid and [s.uid for s in report.signatures] == [result.signature_uid]
    assert verify_dataset(ds, ring).valid
