"""verify_file: one row per file whatever it holds, and the PACS path (Implicit VR, re-encode)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pydicom
import pytest

from medsec_edge.runtime.crypto.dicom_signature import sign_dataset
from medsec_edge.runtime.crypto.keyset import KeyRing
from medsec_edge.runtime.crypto.seal import seal_dataset
from medsec_edge.runtime.crypto.verification import verify_file
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.writers import write_image

DCMTK = Path("/usr/bin")
REQUIRE_DCMSIGN_ENV = "MEDSEC_EDGE_REQUIRE_DCMSIGN"


def _need(tool: str) -> Path:
    path = DCMTK / tool
    if path.exists():
        return path
    reason = f"DCMTK's {tool} is not installed at {path} (apt-get install dcmtk)"
    if os.environ.get(REQUIRE_DCMSIGN_ENV, "").strip() == "1":
        pytest.fail(f"{reason}; {REQUIRE_DCMSIGN_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ring(tmp_path_factory):
    path = tmp_path_factory.mktemp("ring") / "keys"
    KeyRing.rotate(path)
    return KeyRing.load(path)


@pytest.fixture
def sealed(tmp_path, ct_ds, ring) -> Path:
    """Our product: a derived image, sealed then signed, written once."""
    del ct_ds.WindowCenter, ct_ds.WindowWidth
    src = tmp_path / "src.dcm"
    ct_ds.save_as(src, enforce_file_format=True)
    image = read_image(src)
    out = write_image(image, image.pixels, tmp_path / "wm.dcm", record={"payload": "00ff"})
    ds = pydicom.dcmread(out)
    seal_dataset(ds, ring.signer)
    sign_dataset(ds, ring.dicom_signer)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_our_output_verifies(sealed, ring):
    row, code = verify_file(sealed, ring)
    assert (code, row["valid"], row["dicom_signature"]["status"]) == (0, True, "valid")


def test_an_added_window_is_caught(tmp_path, sealed, ring):
    ds = pydicom.dcmread(sealed)
    ds.WindowCenter, ds.WindowWidth = 40, 80
    ds.save_as(tmp_path / "windowed.dcm", enforce_file_format=True)
    row, code = verify_file(tmp_path / "windowed.dcm", ring)
    assert code == 1 and not row["valid"]
    assert row["seal"]["changed"] == ["WindowCenter", "WindowWidth"]


def test_implicit_vr_copy_verifies(tmp_path, sealed, ring):
    out = tmp_path / "implicit.dcm"
    subprocess.run([_need("dcmconv"), "+ti", sealed, out], check=True, timeout=60)
    row, code = verify_file(out, ring)
    assert code == 0 and row["valid"], row["reason"]
    assert row["dicom_signature"]["status"] == "valid"


@pytest.mark.parametrize("tool", ["dcmcjpls", "dcmcrle"])
def test_lossless_re_encode_is_valid_and_says_re_encoded(tmp_path, sealed, ring, tool):
    out = tmp_path / "re-encoded.dcm"
    subprocess.run([_need(tool), sealed, out], check=True, timeout=60)
    row, code = verify_file(out, ring)
    assert code == 0 and row["valid"], row["reason"]
    assert row["dicom_signature"]["status"] == "re-encoded"
    assert row["seal"]["status"] == "valid" and "re-encoded" in row["reason"]


def test_re_encoded_with_a_changed_private_record_is_invalid(tmp_path, sealed, ring):
    ds = pydicom.dcmread(sealed)
    block = ds.private_block(0x0011, "MEDSEC_EDGE 1")
    block[0x01].value = '{"payload": "ffff"}'
    ds.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    out = tmp_path / "re-encoded.dcm"
    subprocess.run([_need("dcmcrle"), tmp_path / "changed.dcm", out], check=True, timeout=60)
    row, code = verify_file(out, ring)
    assert code == 1 and not row["valid"] and row["seal"]["changed"] == ["medsec_private"]


def _unknown_syntax(tmp_path, sealed) -> Path:
    data = sealed.read_bytes()
    old = b"1.2.840.10008.1.2.1\x00"
    assert old in data
    path = tmp_path / "unknown_ts.dcm"
    path.write_bytes(data.replace(old, b"1.2.3.4.5.6.7.8.99\x00", 1))
    return path


def _empty_pixels(tmp_path, sealed) -> Path:
    ds = pydicom.dcmread(sealed)
    ds.PixelData = b""
    path = tmp_path / "empty_pixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _random_after_preamble(tmp_path, sealed) -> Path:
    path = tmp_path / "random.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(4096))
    return path


@pytest.mark.parametrize(
    "make, code",
    [(_unknown_syntax, 4), (_empty_pixels, 4), (_random_after_preamble, 4)],
    ids=["unknown_transfer_syntax", "empty_pixel_data", "random_after_DICM"],
)
def test_a_bad_file_is_one_row_with_a_one_line_reason_and_the_batch_goes_on(
    tmp_path, sealed, ring, make, code
):
    bad = make(tmp_path, sealed)
    rows = [verify_file(path, ring) for path in (bad, sealed)]
    (row, got), (good, good_code) = rows
    assert got == code and row["valid"] is False, row
    assert row["reason"] and "\n" not in row["reason"] and "Traceback" not in row["reason"]
    assert row["reason"].startswith(bad.name)
    assert good_code == 0 and good["valid"]
