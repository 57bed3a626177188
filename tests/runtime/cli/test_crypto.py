"""The cryptographic commands (cli_crypto.register): keys, seal, verify, encrypt, decrypt, restore.

Run in-process on a fresh typer app (CliRunner); the PS3.15 signature ``seal`` writes is checked
with DCMTK's real ``dcmsign`` where it is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import typer
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from medsec_edge.runtime.cli.crypto import register
from medsec_edge.runtime.crypto.keyset import (
    ENC_PRIVATE,
    PRIVATE_FILES,
    RSA_CERT,
    SEAL_PRIVATE,
    KeyRing,
)
from medsec_edge.runtime.io.dicom_writer import ENCRYPTED_ELEMENT, PRIVATE_CREATOR, PRIVATE_GROUP
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.pipeline import load_watermarker
from medsec_edge.runtime.crypto.reversible import embed_reversible, write_reversible

DCMSIGN = Path("/usr/bin/dcmsign")
PEM_MARKERS = ("-----BEGIN", "PRIVATE KEY")


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    register(app)
    return app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    return CliRunner()


def _invoke(runner, app, *args):
    result = runner.invoke(app, [str(a) for a in args])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    for marker in PEM_MARKERS:
        assert marker not in text, "no key material on stdout or stderr"
    return result


def _lines(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


@pytest.fixture(scope="module")
def keys(tmp_path_factory, runner, app) -> Path:
    """One key set made through the CLI (RSA generation is the slow part: once per module)."""
    path = tmp_path_factory.mktemp("cli-keys") / "device"
    result = _invoke(runner, app, "keys", "new", path, "--common-name", "test device", "--json")
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory, runner, app) -> Path:
    path = tmp_path_factory.mktemp("cli-keys-other") / "other"
    assert _invoke(runner, app, "keys", "new", path).exit_code == 0
    return path


@pytest.fixture
def ct(tmp_path) -> Path:
    dst = tmp_path / "in" / "ct.dcm"
    dst.parent.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm", download=False), dst)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# keys


def test_keys_new_prints_ids_only_and_refuses_to_overwrite(tmp_path, runner, app):
    path = tmp_path / "k"
    result = _invoke(runner, app, "keys", "new", path, "--json")
    assert result.exit_code == 0, result.output
    (row,) = _lines(result)
    ring = KeyRing.load(path)
    assert row["seal_key_id"] == ring.signer.key_id
    assert row["encryption_key_id"] == ring.recipient.key_id
    assert row["dicom_key_id"] == ring.dicom_signer.key_id
    assert row["private"] is True
    for name in PRIVATE_FILES:
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o600
    before = {name: _sha(path / name) for name in PRIVATE_FILES}
    again = _invoke(runner, app, "keys", "new", path)
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output
    assert before == {name: _sha(path / name) for name in PRIVATE_FILES}


def test_rotate_and_export_public(tmp_path, runner, app, ct):
    ring = tmp_path / "ring"
    first = _lines(_invoke(runner, app, "keys", "rotate", ring, "--json"))[0]
    sealed_old = tmp_path / "old.dcm"
    assert _invoke(runner, app, "seal", ct, sealed_old, "--keys", ring).exit_code == 0
    second = _lines(_invoke(runner, app, "keys", "rotate", ring, "--json"))[0]
    assert second["seal_key_id"] != first["seal_key_id"]
    sealed_new = tmp_path / "new.dcm"
    assert _invoke(runner, app, "seal", ct, sealed_new, "--keys", ring).exit_code == 0

    public = tmp_path / "public"
    result = _invoke(runner, app, "keys", "export-public", Path(second["path"]), public, "--json")
    assert result.exit_code == 0, result.output
    assert _lines(result)[0]["private"] is False
    assert not any((public / name).exists() for name in PRIVATE_FILES)

    rows = _lines(_invoke(runner, app, "verify", sealed_old, sealed_new, "--keys", ring, "--json"))
    assert [r["valid"] for r in rows] == [True, True], "old keys still verify after rotation"
    assert rows[0]["seal"]["key_id"] == first["seal_key_id"]
    assert rows[1]["seal"]["key_id"] == second["seal_key_id"], "the newest key signs"
    # the export holds the new set only: the old seal is from a key it does not know
    rows = _lines(
        _invoke(runner, app, "verify", sealed_old, sealed_new, "--keys", public, "--json")
    )
    assert [r["seal"]["status"] for r in rows] == ["unknown_key", "valid"]


# --------------------------------------------------------------------------------------------
# seal and verify


def test_seal_then_verify_json_lines_and_exit_codes(tmp_path, runner, app, keys, ct):
    before = _sha(ct)
    out = tmp_path / "out" / "sealed.dcm"
    result = _invoke(runner, app, "seal", ct, out, "--keys", keys, "--json")
    assert result.exit_code == 0, result.output
    row = _lines(result)[0]
    assert row["seal_key_id"] == KeyRing.load(keys).signer.key_id
    assert _sha(ct) == before, "the input is never modified"
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert "DigitalSignaturesSequence" in ds
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(ct).pixel_array)

    result = _invoke(runner, app, "verify", out, "--keys", keys, "--json")
    assert result.exit_code == 0, result.output
    (row,) = _lines(result)
    assert row["path"] == str(out) and row["valid"] is True and row["reason"]
    assert row["seal"] == {"status": "valid", "changed": [], "key_id": row["seal"]["key_id"]}
    assert row["dicom_signature"]["status"] == "valid"

    # the unsigned input makes the command fail; lines come in input order
    result = _invoke(runner, app, "verify", out, ct, "--keys", keys, "--json")
    assert result.exit_code == 1
    rows = _lines(result)
    assert [r["path"] for r in rows] == [str(out), str(ct)]
    assert rows[1]["valid"] is False
    assert rows[1]["seal"]["status"] == "unsigned"
    assert rows[1]["dicom_signature"]["status"] == "unsigned"

    table = _invoke(runner, app, "verify", out, "--keys", keys)
    assert table.exit_code == 0 and "valid" in table.stdout


def test_verify_names_what_changed(tmp_path, runner, app, keys, ct):
    sealed = tmp_path / "sealed.dcm"
    assert _invoke(runner, app, "seal", ct, sealed, "--keys", keys).exit_code == 0

    ds = pydicom.dcmread(sealed)
    pixels = ds.pixel_array.copy()
    pixels[5, 7] ^= 1  # one bit of one pixel
    ds.PixelData = pixels.tobytes()
    flipped = tmp_path / "flipped.dcm"
    ds.save_as(flipped)

    ds = pydicom.dcmread(sealed)
    ds.PatientID = "SOMEONE-ELSE"
    moved = tmp_path / "moved.dcm"
    ds.save_as(moved)

    result = _invoke(runner, app, "verify", flipped, moved, sealed, "--keys", keys, "--json")
    assert result.exit_code == 1
    rows = _lines(result)
    assert rows[0]["seal"]["changed"] == ["pixels"]
    assert rows[1]["seal"]["changed"] == ["PatientID"]
    assert all(r["seal"]["status"] == "invalid" for r in rows[:2])
    assert all(r["dicom_signature"]["status"] == "invalid" for r in rows[:2])
    assert rows[2]["valid"] is True
    assert "SOMEONE-ELSE" not in result.output, "no patient data in the report"


def test_verify_with_another_key_set_is_not_valid(tmp_path, runner, app, keys, other_keys, ct):
    sealed = tmp_path / "sealed.dcm"
    assert _invoke(runner, app, "seal", ct, sealed, "--keys", keys).exit_code == 0
    result = _invoke(runner, app, "verify", sealed, "--keys", other_keys, "--json")
    assert result.exit_code == 1
    (row,) = _lines(result)
    assert row["seal"]["status"] == "unknown_key"
    assert row["dicom_signature"]["status"] == "untrusted"


def test_seal_refuses_bad_input_public_keys_and_its_own_input(
    tmp_path, runner, app, keys, ct
):
    text = tmp_path / "notes.dcm"
    text.write_text("not a DICOM file\n" * 20)
    out = tmp_path / "out.dcm"
    result = _invoke(runner, app, "seal", text, out, "--keys", keys)
    assert result.exit_code == 4 and not out.exists()
    assert "not a DICOM file" in result.output

    public = tmp_path / "public"
    assert _invoke(runner, app, "keys", "export-public", keys, public).exit_code == 0
    result = _invoke(runner, app, "seal", ct, out, "--keys", public)
    assert result.exit_code == 2 and not out.exists()

    before = _sha(ct)
    result = _invoke(runner, app, "seal", ct, ct, "--keys", keys)
    assert result.exit_code == 2 and _sha(ct) == before

    result = _invoke(runner, app, "verify", text, "--keys", keys, "--json")
    assert result.exit_code == 4
    assert _lines(result)[0]["valid"] is False


def test_resealing_replaces_the_earlier_signature(tmp_path, runner, app, keys, ct):
    once, twice = tmp_path / "once.dcm", tmp_path / "twice.dcm"
    assert _invoke(runner, app, "seal", ct, once, "--keys", keys).exit_code == 0
    result = _invoke(runner, app, "seal", once, twice, "--keys", keys, "--json")
    assert _lines(result)[0]["replaced_signatures"] == 1
    assert len(pydicom.dcmread(twice).DigitalSignaturesSequence) == 1
    assert _invoke(runner, app, "verify", twice, "--keys", keys).exit_code == 0


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm"])
def test_dcmsign_accepts_what_seal_writes(tmp_path, runner, app, keys, name):
    if not DCMSIGN.exists():
        pytest.skip("DCMTK's dcmsign is not installed at /usr/bin/dcmsign (apt-get install dcmtk)")
    out = tmp_path / "sealed.dcm"
    src = Path(get_testdata_file(name, download=False))
    assert _invoke(runner, app, "seal", src, out, "--keys", keys).exit_code == 0
    # +rg: a signature must be present; +rc: a Creator RSA one; +cf: trust our certificate
    proc = subprocess.run(
        [str(DCMSIGN), "--verify", "+rg", "+rc", "+cf", str(keys / RSA_CERT), str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Signature Verification : OK" in proc.stdout + proc.stderr
    assert _invoke(runner, app, "verify", out, "--keys", keys).exit_code == 0


# --------------------------------------------------------------------------------------------
# encrypt and decrypt


def test_encrypt_for_a_public_key_then_decrypt_byte_for_byte(tmp_path, runner, app, keys, ct):
    public = tmp_path / "public"
    assert _invoke(runner, app, "keys", "export-public", keys, public).exit_code == 0
    enc, dec = tmp_path / "enc.dcm", tmp_path / "dec.dcm"
    result = _invoke(runner, app, "encrypt", ct, enc, "--to", public, "--json")
    assert result.exit_code == 0, result.output
    assert _lines(result)[0]["recipient_key_id"] == KeyRing.load(keys).recipient.key_id
    clear = pydicom.dcmread(enc)
    assert "PixelData" not in clear and not str(clear.get("PatientName", ""))
    assert _invoke(runner, app, "decrypt", enc, dec, "--keys", keys).exit_code == 0
    assert dec.read_bytes() == ct.read_bytes()


def test_decrypt_wrong_key_or_flipped_bit_exits_1_and_writes_nothing(
    tmp_path, runner, app, keys, other_keys, ct
):
    enc = tmp_path / "enc.dcm"
    assert _invoke(runner, app, "encrypt", ct, enc, "--to", keys).exit_code == 0
    out = tmp_path / "dec.dcm"
    result = _invoke(runner, app, "decrypt", enc, out, "--keys", other_keys)
    assert result.exit_code == 1 and not out.exists()
    assert "wrapped for key" in result.output

    data = enc.read_bytes()
    blob = bytes(
        pydicom.dcmread(enc).private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[ENCRYPTED_ELEMENT].value
    )
    start = data.index(blob)
    flipped = tmp_path / "flipped.dcm"
    for pos in (start + len(blob) // 2, start + len(blob) - 1):  # ciphertext, tag
        damaged = bytearray(data)
        damaged[pos] ^= 0x01
        flipped.write_bytes(bytes(damaged))
        result = _invoke(runner, app, "decrypt", flipped, out, "--keys", keys)
        assert result.exit_code == 1 and not out.exists()
        assert "decryption failed" in result.output

    # a flip that breaks the DICOM encoding itself: bad input, not a crash
    damaged = bytearray(data)
    vr_at = data.index(b"\x28\x00\x03\x01US")  # (0028,0103) Pixel Representation, its VR
    damaged[vr_at + 4] ^= 0x07
    flipped.write_bytes(bytes(damaged))
    result = _invoke(runner, app, "decrypt", flipped, out, "--keys", keys)
    assert result.exit_code == 4 and not out.exists()
    assert result.exception is None or isinstance(result.exception, SystemExit)

    # a public export cannot decrypt
    public = tmp_path / "public"
    assert _invoke(runner, app, "keys", "export-public", keys, public).exit_code == 0
    result = _invoke(runner, app, "decrypt", enc, out, "--keys", public)
    assert result.exit_code == 1 and not out.exists()


def test_private_key_readable_by_others_is_refused(tmp_path, runner, app, ct):
    path = tmp_path / "loose"
    assert _invoke(runner, app, "keys", "new", path).exit_code == 0
    os.chmod(path / ENC_PRIVATE, 0o644)
    result = _invoke(runner, app, "decrypt", ct, tmp_path / "x.dcm", "--keys", path)
    assert result.exit_code == 2
    assert "chmod 600" in result.output
    os.chmod(path / SEAL_PRIVATE, 0o640)
    result = _invoke(runner, app, "seal", ct, tmp_path / "y.dcm", "--keys", path)
    assert result.exit_code == 2


# --------------------------------------------------------------------------------------------
# restore


@pytest.fixture(scope="module")
def watermarker():
    return load_watermarker(threads=1)[0]


def test_restore_gives_back_the_original(tmp_path, runner, app, keys, other_keys, ct, watermarker):
    image = read_image(ct)
    marked, record = embed_reversible(
        image, watermarker, bytes.fromhex("00112233445566ff"), KeyRing.load(keys).recipient
    )
    wm = write_reversible(image, marked, tmp_path / "wm.dcm", record)
    out = tmp_path / "restored.dcm"

    result = _invoke(runner, app, "restore", wm, out, "--keys", other_keys)
    assert result.exit_code == 1 and not out.exists()

    result = _invoke(runner, app, "restore", wm, out, "--keys", keys, "--json")
    assert result.exit_code == 0, result.output
    (row,) = _lines(result)
    assert row["bit_exact"] is True and row["output"] == str(out)
    restored = pydicom.dcmread(out)
    assert restored.SOPInstanceUID == image.dataset.SOPInstanceUID
    assert np.array_equal(restored.pixel_array, image.pixels)
    assert image.dataset.SOPInstanceUID not in result.output, "short hashes, not UIDs"

    result = _invoke(runner, app, "restore", ct, tmp_path / "none.dcm", "--keys", keys)
    assert result.exit_code == 4 and "no reversible record" in result.output
    assert not (tmp_path / "none.dcm").exists()


def test_encrypt_refuses_a_non_ascii_uid_as_bad_input(tmp_path, runner, app, keys):
    """Found by the fuzz test: a UID byte outside ASCII ended encrypt in a UnicodeEncodeError
    traceback; it is bad input (exit 4) and nothing is written."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    ds.StudyInstanceUID = "1.2.\xc03"
    src = tmp_path / "uid.dcm"
    ds.save_as(src)
    out = tmp_path / "enc.dcm"
    result = _invoke(runner, app, "encrypt", src, out, "--to", keys)
    assert result.exit_code == 4 and not out.exists()
    assert "non-ASCII" in result.output


def test_seal_refuses_an_unknown_transfer_syntax_as_bad_input(tmp_path, runner, app, keys, ct):
    """Found by the slow fuzz run: a Transfer Syntax UID that is no transfer syntax ended seal in a
    ValueError traceback; it is bad input (exit 4) and nothing is written."""
    ds = pydicom.dcmread(get_testdata_file("rtplan.dcm", download=False))  # no Pixel Data to decode
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    src = tmp_path / "ts.dcm"
    ds.save_as(src, enforce_file_format=False)
    out = tmp_path / "sealed.dcm"
    result = _invoke(runner, app, "seal", src, out, "--keys", keys)
    assert result.exit_code == 4 and not out.exists()
    assert "transfer syntax" in result.output.lower()
