"""A real PACS path: `run` output -> storescu -xi (Implicit VR) -> Orthanc -> retrieved -> verify.

Orthanc is started here, on free loopback ports, with a temporary configuration and storage
folder, and stopped afterwards; the Debian service is never used. What is checked is what a
reading site would check: our ``verify_file`` (seal and PS3.15 signature) and DCMTK's
``dcmsign --verify`` on the file Orthanc gives back, then the same after Orthanc transcodes the
stored instance to JPEG-LS Lossless (the signature is then ``re-encoded``, the file still valid).

Marker ``network``: it needs local servers. Without Orthanc or DCMTK the tests skip with the
reason; ``MEDSEC_EDGE_REQUIRE_ORTHANC=1`` (set by .ci/run where Orthanc is installed) turns
that skip into a failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, JPEGLSLossless

from medsec_edge.runtime.crypto.keyset import RSA_CERT, KeyRing
from medsec_edge.runtime.crypto.verification import verify_file

pytestmark = pytest.mark.network

ORTHANC = Path("/usr/sbin/Orthanc")
STORESCU = Path("/usr/bin/storescu")
DCMSIGN = Path("/usr/bin/dcmsign")
REQUIRE_ORTHANC_ENV = "MEDSEC_EDGE_REQUIRE_ORTHANC"
REPO = Path(__file__).resolve().parents[2]
SAMPLES = ("CT_small.dcm", "MR_small.dcm")
HOST = "127.0.0.1"
# Loopback only, and never through a proxy the environment may name.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _missing() -> str:
    for tool in (ORTHANC, STORESCU, DCMSIGN):
        if not tool.exists():
            return f"{tool} is not installed (apt-get install orthanc dcmtk)"
    return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Orthanc:
    http_port: int
    dicom_port: int
    aet: str = "MEDSECTEST"

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.http_port}{path}"

    def get(self, path: str) -> bytes:
        with _HTTP.open(self.url(path), timeout=20) as response:
            return response.read()

    def post(self, path: str, body: bytes) -> bytes:
        request = urllib.request.Request(self.url(path), data=body, method="POST")
        with _HTTP.open(request, timeout=60) as response:
            return response.read()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """An Orthanc of our own on free loopback ports; stopped (and its storage dropped) after."""
    missing = _missing()
    if missing:
        if os.environ.get(REQUIRE_ORTHANC_ENV, "").strip() == "1":
            pytest.fail(f"{missing}; {REQUIRE_ORTHANC_ENV}=1 requires it", pytrace=False)
        pytest.skip(missing)
    root = tmp_path_factory.mktemp("orthanc")
    server = Orthanc(_free_port(), _free_port())
    config = {
        "Name": "medsec-edge-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "StorageCompression": False,
        "Plugins": [],
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("wb")
    process = subprocess.Popen(
        [str(ORTHANC), str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                json.loads(server.get("/system"))
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if process.poll() is not None or time.monotonic() > deadline:
                    tail = (root / "orthanc.log").read_text(errors="replace")[-800:]
                    pytest.fail(f"Orthanc did not start on loopback: {tail}", pytrace=False)
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """What ``medsec-edge run`` writes (sealed and signed), and the key set that made it."""
    root = tmp_path_factory.mktemp("run")
    keys, out = root / "keys", root / "out"
    cli = Path(sys.executable).with_name("medsec-edge")
    env = {
        **os.environ,
        "MEDSEC_EDGE_THREADS": "1",
        "MEDSEC_EDGE_KEY": str(root / "watermark.key"),
        "MEDSEC_EDGE_KEYS": str(keys),
    }
    env.pop("MEDSEC_EDGE_BUNDLE", None)
    inputs = [REPO / "samples" / name for name in SAMPLES]
    result = subprocess.run(
        [str(cli), "run", *map(str, inputs), "--out", str(out), "--keys", str(keys)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    files = sorted(out.glob("*.dcm"))
    assert [f.name for f in files] == sorted(SAMPLES)
    return files, KeyRing.load(keys, private=False), keys / RSA_CERT


def _store_implicit(orthanc: Orthanc, path: Path) -> str:
    """C-STORE as Implicit VR Little Endian only (storescu -xi); the Orthanc id of the instance."""
    result = subprocess.run(
        [str(STORESCU), "-xi", "-aec", orthanc.aet, HOST, str(orthanc.dicom_port), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    found = json.loads(orthanc.post("/tools/lookup", uid.encode()))
    ids = [f["ID"] for f in found if f.get("Type") == "Instance"]
    assert len(ids) == 1
    return ids[0]


def _dcmsign_verify(path: Path, cert: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DCMSIGN), "--verify", "+rg", "+rc", "+cf", str(cert), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def stored(orthanc, outputs, tmp_path_factory):
    """Each output stored Implicit VR by Orthanc and retrieved: (Orthanc id, retrieved path)."""
    files, _, _ = outputs
    root = tmp_path_factory.mktemp("retrieved")
    result = []
    for path in files:
        instance = _store_implicit(orthanc, path)
        retrieved = root / path.name
        retrieved.write_bytes(orthanc.get(f"/instances/{instance}/file"))
        result.append((instance, retrieved))
    return result


def test_implicit_vr_round_trip_through_orthanc_verifies(stored, outputs):
    _, ring, cert = outputs
    for _, retrieved in stored:
        ds = pydicom.dcmread(retrieved)
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian  # as Orthanc stored it
        row, code = verify_file(retrieved, ring)
        assert (code, row["valid"]) == (0, True), row["reason"]
        assert row["seal"]["status"] == "valid" and row["dicom_signature"]["status"] == "valid"
        result = _dcmsign_verify(retrieved, cert)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Signature Verification : OK" in result.stdout + result.stderr


def test_a_pixel_changed_in_the_pacs_copy_is_caught(stored, outputs, tmp_path):
    _, ring, cert = outputs
    ds = pydicom.dcmread(stored[0][1])
    ds.PixelData = bytes([ds.PixelData[0] ^ 1]) + ds.PixelData[1:]
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed, enforce_file_format=True)
    row, code = verify_file(changed, ring)
    assert code == 1 and "pixels" in row["seal"]["changed"]
    assert row["dicom_signature"]["status"] == "invalid"
    assert _dcmsign_verify(changed, cert).returncode != 0


def test_orthanc_lossless_transcode_is_valid_and_re_encoded(orthanc, stored, outputs, tmp_path):
    _, ring, cert = outputs
    body = json.dumps(
        {"Transcode": str(JPEGLSLossless), "Keep": ["SOPInstanceUID"], "Force": True}
    ).encode()
    for instance, retrieved in stored:
        try:
            data = orthanc.post(f"/instances/{instance}/modify", body)
        except urllib.error.HTTPError as exc:
            pytest.skip(f"this Orthanc cannot transcode to JPEG-LS Lossless (HTTP {exc.code})")
        path = tmp_path / f"jls_{retrieved.name}"
        path.write_bytes(data)
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
        assert ds.SOPInstanceUID == pydicom.dcmread(retrieved).SOPInstanceUID
        row, code = verify_file(path, ring)
        assert (code, row["valid"]) == (0, True), row["reason"]
        assert row["dicom_signature"]["status"] == "re-encoded"
        assert row["seal"]["status"] == "valid" and "re-encoded" in row["reason"]
