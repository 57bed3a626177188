"""DICOM PS3.15 signatures: round trips with the real DCMTK dcmsign both ways, and tampering."""

from __future__ import annotations

import datetime as dt
import io
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import RLELossless

from medsec_edge.runtime.crypto.keyset import RSA_CERT, RSA_PRIVATE, SealSigner, new_key_dir
from medsec_edge.runtime.crypto.dicom_signature import (
    CERTIFICATE_TYPE,
    add_certified_timestamp,
    mac_stream,
    remove_signatures,
    sign_dataset,
    verify_signatures,
)
from medsec_edge.runtime.errors import InputError, UsageError
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.writers import write_image
from medsec_edge.runtime.crypto.seal import seal_dataset

DCMSIGN = Path("/usr/bin/dcmsign")
REQUIRE_DCMSIGN_ENV = "MEDSEC_EDGE_REQUIRE_DCMSIGN"


@pytest.fixture
def require_dcmsign():
    """Skip without DCMTK's dcmsign, or fail where it must be present (env var set to 1)."""
    if DCMSIGN.exists():
        return
    reason = "DCMTK's dcmsign is not installed at /usr/bin/dcmsign (apt-get install dcmtk)"
    if os.environ.get(REQUIRE_DCMSIGN_ENV, "").strip() == "1":
        pytest.fail(f"{reason}; {REQUIRE_DCMSIGN_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


needs_dcmsign = pytest.mark.usefixtures("require_dcmsign")


def dcmsign(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(DCMSIGN), *map(str, args)], capture_output=True, text=True, timeout=60
    )


def dcmsign_verify(path: Path, cert: Path) -> subprocess.CompletedProcess:
    # +rg: a signature must be present; +rc: a Creator RSA signature must be present;
    # +cf: trust our self-signed certificate.
    return dcmsign("--verify", "+rg", "+rc", "+cf", cert, path)


def _save(ds, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _cert(keyset) -> Path:
    return keyset.path / RSA_CERT


# --------------------------------------------------------------------------------------------
# ours -> dcmsign


@needs_dcmsign
def test_our_signature_is_accepted_by_dcmsign(tmp_path, ct_ds, crypto_keyset):
    uid = sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    path = _save(ct_ds, tmp_path / "signed.dcm")
    result = dcmsign_verify(path, _cert(crypto_keyset))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Signature Verification : OK" in result.stdout + result.stderr
    assert uid in result.stdout + result.stderr
    ours = verify_signatures(
        pydicom.dcmread(path), trusted=[crypto_keyset.certificate], profile="creator"
    )
    assert ours.valid and ours.signatures[0].trusted is True
    sig = ours.signatures[0]
    assert sig.mac_algorithm == "SHA256" and "(7FE0,0010)" in sig.signed_tags
    ds = pydicom.dcmread(path)
    mac = ds.MACParametersSequence[0]
    assert mac.MACCalculationTransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.DigitalSignaturesSequence[0].CertificateType == CERTIFICATE_TYPE


@needs_dcmsign
def test_dcmsign_rejects_our_signature_after_tampering(tmp_path, ct_ds, crypto_keyset):
    sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    path = _save(ct_ds, tmp_path / "signed.dcm")
    for name, change in (
        ("patient", lambda ds: setattr(ds, "PatientID", "PID-0000")),
        (
            "pixel",
            lambda ds: setattr(ds, "PixelData", bytes([ds.PixelData[0] ^ 1]) + ds.PixelData[1:]),
        ),
        ("private", lambda ds: ds.add_new(0x00091010, "LO", "added later")),  # not signed: OK
    ):
        ds = pydicom.dcmread(path)
        change(ds)
        tampered = _save(ds, tmp_path / f"tampered_{name}.dcm")
        result = dcmsign_verify(tampered, _cert(crypto_keyset))
        ours = verify_signatures(pydicom.dcmread(tampered), trusted=[crypto_keyset.certificate])
        if name == "private":  # an element added after signing is outside the signature
            assert result.returncode == 0 and ours.valid
        else:
            assert result.returncode != 0, name
            assert "corrupted" in (result.stdout + result.stderr).lower()
            assert ours.status == "invalid" and "MAC mismatch" in ours.reason


@needs_dcmsign
def test_signing_our_own_sealed_derived_output(tmp_path, ct_ds, crypto_keyset):
    # the real product: a derived image (private block, Source Image Sequence), sealed, signed
    src = _save(ct_ds, tmp_path / "src.dcm")
    image = read_image(src)
    out = write_image(image, image.pixels, tmp_path / "wm.dcm", record={"payload": "00ff"})
    ds = pydicom.dcmread(out)
    seal_dataset(ds, SealSigner.generate())
    sign_dataset(ds, crypto_keyset.dicom_signer)
    signed = _save(ds, tmp_path / "wm_signed.dcm")
    result = dcmsign_verify(signed, _cert(crypto_keyset))
    assert result.returncode == 0, result.stdout + result.stderr
    tags = verify_signatures(pydicom.dcmread(signed)).signatures[0].signed_tags
    # private elements turn UN in an Implicit VR copy: never signed (the seal covers them)
    assert not [t for t in tags if int(t[1:5], 16) % 2]
    assert "(0008,2112)" in tags and "(7FE0,0010)" in tags  # Source Image Sequence, pixels


@needs_dcmsign
def test_two_signatures_and_compressed_pixel_data(tmp_path, ct_ds, crypto_keyset):
    ct_ds.compress(RLELossless, encoding_plugin="pydicom")
    ct_ds = pydicom.dcmread(io.BytesIO(_bytes(ct_ds)))
    second = new_key_dir(tmp_path / "second")
    sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    sign_dataset(ct_ds, second.dicom_signer)
    path = _save(ct_ds, tmp_path / "two.dcm")
    ds = pydicom.dcmread(path)
    assert [int(i.MACIDNumber) for i in ds.DigitalSignaturesSequence] == [0, 1]
    assert ds.MACParametersSequence[0].MACCalculationTransferSyntaxUID == RLELossless
    both = dcmsign(
        "--verify", "+rg", "+cf", _cert(crypto_keyset), "+cf", second.path / RSA_CERT, path
    )
    assert both.returncode == 0, both.stdout + both.stderr
    assert (both.stdout + both.stderr).count("Signature Verification : OK") == 2
    report = verify_signatures(ds, trusted=[crypto_keyset.certificate])
    assert report.status == "untrusted"  # the second signer is not trusted
    assert [s.status for s in report.signatures] == ["valid", "untrusted"]
    assert verify_signatures(ds, trusted=[crypto_keyset.certificate, second.certificate]).valid


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# dcmsign -> ours


@needs_dcmsign
@pytest.mark.parametrize("compressed", [False, True], ids=["native", "rle"])
def test_we_verify_what_dcmsign_signed_and_compute_its_exact_mac_stream(
    tmp_path, ct_ds, crypto_keyset, compressed
):
    if compressed:
        ct_ds.compress(RLELossless, encoding_plugin="pydicom")
    src = _save(ct_ds, tmp_path / "in.dcm")
    out, dump = tmp_path / "out.dcm", tmp_path / "mac.bin"
    result = dcmsign(
        "--sign",
        crypto_keyset.path / RSA_PRIVATE,
        _cert(crypto_keyset),
        "--mac-sha256",
        "--profile-creator",
        "--dump",
        dump,
        src,
        out,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ds = pydicom.dcmread(out)
    report = verify_signatures(ds, trusted=[crypto_keyset.certificate], profile="creator")
    assert report.valid, report.reason
    # byte for byte the stream dcmsign fed into its MAC
    item = ds.DigitalSignaturesSequence[0]
    assert mac_stream(ds, item, ds.MACParametersSequence[0].DataElementsSigned) == dump.read_bytes()
    # and a change after dcmsign signed is caught by us
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    assert verify_signatures(ds).status == "invalid"


@needs_dcmsign
def test_dcmsign_signature_over_selected_tags_and_removed_element(tmp_path, ct_ds, crypto_keyset):
    src = _save(ct_ds, tmp_path / "in.dcm")
    out = tmp_path / "out.dcm"
    result = dcmsign(
        "--sign",
        crypto_keyset.path / RSA_PRIVATE,
        _cert(crypto_keyset),
        "--mac-sha256",
        "--tag",
        "PatientID",
        "--tag",
        "SOPInstanceUID",
        "--tag",
        "PixelData",
        src,
        out,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    ds = pydicom.dcmread(out)
    report = verify_signatures(ds)
    assert report.valid and report.signatures[0].signed_tags == [
        "(0008,0018)",
        "(0010,0020)",
        "(7FE0,0010)",
    ]
    # valid but too narrow for the Creator RSA profile
    creator = verify_signatures(ds, profile="creator")
    assert creator.status == "invalid" and "StudyInstanceUID" in creator.reason
    ds.PatientName = "Changed^Name"  # not signed: still valid
    assert verify_signatures(ds).valid
    del ds.PatientID  # signed: its removal is named
    report = verify_signatures(ds)
    assert report.status == "invalid" and "(0010,0020)" in report.reason


# --------------------------------------------------------------------------------------------
# ours alone


def test_untrusted_expired_and_unsupported(ct_ds, crypto_keyset, tmp_path):
    sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    other = new_key_dir(tmp_path / "other")
    report = verify_signatures(ct_ds, trusted=[other.certificate])
    assert report.status == "untrusted" and not report.valid
    assert verify_signatures(ct_ds).signatures[0].trusted is None  # trust not checked
    # a signing time outside the certificate's validity is not trusted
    late = pydicom.dcmread(io.BytesIO(_bytes(ct_ds)))
    remove_signatures(late)
    sign_dataset(
        late, crypto_keyset.dicom_signer, now=dt.datetime(2100, 1, 1, tzinfo=dt.timezone.utc)
    )
    report = verify_signatures(late, trusted=[crypto_keyset.certificate])
    assert report.status == "untrusted" and "not valid when it signed" in report.reason
    ct_ds.MACParametersSequence[0].MACAlgorithm = "RIPEMD160"
    assert verify_signatures(ct_ds).status == "unsupported"


def test_unsigned_required_uids_and_removal(ct_ds, crypto_keyset):
    assert verify_signatures(ct_ds).status == "unsigned"
    del ct_ds.SeriesInstanceUID
    with pytest.raises(InputError, match="SeriesInstanceUID"):
        sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    ct_ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    with pytest.raises(UsageError, match="MAC algorithm"):
        sign_dataset(ct_ds, crypto_keyset.dicom_signer, mac_algorithm="MD5")
    assert remove_signatures(ct_ds) == 1
    assert "DigitalSignaturesSequence" not in ct_ds and "MACParametersSequence" not in ct_ds


def test_timestamp_is_outside_the_mac_and_reported(ct_ds, crypto_keyset):
    uid = sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    add_certified_timestamp(ct_ds, uid, b"\x30\x03\x02\x01\x00")  # stands in for a TSA token
    report = verify_signatures(pydicom.dcmread(io.BytesIO(_bytes(ct_ds))))
    assert report.valid and report.signatures[0].timestamp_present
    with pytest.raises(UsageError):
        add_certified_timestamp(ct_ds, "1.2.3", b"x")


def test_a_replaced_certificate_does_not_verify(ct_ds, crypto_keyset, tmp_path):
    sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    other = new_key_dir(tmp_path / "other")
    from cryptography.hazmat.primitives.serialization import Encoding

    ct_ds.DigitalSignaturesSequence[0][0x04000115].value = other.certificate.public_bytes(
        Encoding.DER
    )
    report = verify_signatures(ct_ds, trusted=[other.certificate])
    assert report.status == "invalid"


@needs_dcmsign
def test_implicit_vr_input_signed_by_us_is_accepted_by_dcmsign(tmp_path, ct_ds, crypto_keyset):
    # Private elements of an Implicit VR file are UN (unsignable); both sides skip them alike.
    ct_ds.private_block(0x0011, "MEDSEC_EDGE 1", create=True).add_new(0x01, "UT", '{"a": 1}')
    ct_ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    src = _save(ct_ds, tmp_path / "implicit.dcm")
    ds = pydicom.dcmread(src)
    sign_dataset(ds, crypto_keyset.dicom_signer)
    signed = _save(ds, tmp_path / "implicit_signed.dcm")
    result = dcmsign_verify(signed, _cert(crypto_keyset))
    assert result.returncode == 0, result.stdout + result.stderr
    report = verify_signatures(pydicom.dcmread(signed))
    assert report.valid and "(0011,1001)" not in report.signatures[0].signed_tags


# --------------------------------------------------------------------------------------------
# the PACS path: transfer syntax changes after signing


DCMCONV = Path("/usr/bin/dcmconv")


def _derived_sealed_signed(tmp_path, ct_ds, keyset) -> Path:
    src = _save(ct_ds, tmp_path / "src.dcm")
    image = read_image(src)
    out = write_image(image, image.pixels, tmp_path / "wm.dcm", record={"payload": "00ff"})
    ds = pydicom.dcmread(out)
    seal_dataset(ds, SealSigner.generate())
    sign_dataset(ds, keyset.dicom_signer)
    return _save(ds, tmp_path / "wm_signed.dcm")


@needs_dcmsign
@pytest.mark.parametrize("bits", [8, 16])
def test_signature_survives_implicit_vr_conversion_by_dcmconv(
    tmp_path, ct_factory, crypto_keyset, bits
):
    ds = ct_factory()
    if bits == 8:  # Pixel Data may be OB natively but is OW in Implicit VR: sign what stays
        pixels = (ds.pixel_array % 256).astype("uint8")
        ds.set_pixel_data(pixels, "MONOCHROME2", 8)
    signed = _derived_sealed_signed(tmp_path, ds, crypto_keyset)
    implicit = tmp_path / "implicit.dcm"
    subprocess.run([str(DCMCONV), "+ti", signed, implicit], check=True, timeout=60)
    converted = pydicom.dcmread(implicit)
    assert converted.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    result = dcmsign_verify(implicit, _cert(crypto_keyset))
    assert result.returncode == 0, result.stdout + result.stderr
    report = verify_signatures(converted, trusted=[crypto_keyset.certificate], profile="creator")
    assert report.status == "valid", report.reason


def test_private_unknown_and_mistyped_elements_are_not_signed(ct_ds, crypto_keyset):
    ct_ds.add_new(0x00091010, "LO", "vendor private")
    ct_ds.add_new(0x00190010, "LO", "VENDOR")  # a private creator
    ct_ds.add_new(0x00080070, "SH", "typed SH")  # Manufacturer: the dictionary says LO
    ct_ds.add_new(0x00211001, "SQ", pydicom.Sequence([pydicom.Dataset()]))
    item = pydicom.Dataset()
    item.add_new(0x00091001, "LO", "private inside a sequence")
    ct_ds.add_new(0x00082218, "SQ", pydicom.Sequence([item]))  # AnatomicRegionSequence
    sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    tags = {int(t) for t in ct_ds.MACParametersSequence[0].DataElementsSigned}
    for unstable in (0x00091010, 0x00190010, 0x00080070, 0x00211001, 0x00082218):
        assert unstable not in tags
    assert 0x00100020 in tags and 0x7FE00010 in tags  # PatientID, Pixel Data


@needs_dcmsign
@pytest.mark.parametrize("tool", ["dcmcrle", "dcmcjpls"])
def test_lossless_re_encode_is_reported_re_encoded_not_invalid(
    tmp_path, ct_ds, crypto_keyset, tool
):
    sign_dataset(ct_ds, crypto_keyset.dicom_signer)
    signed = _save(ct_ds, tmp_path / "signed.dcm")
    encoded = tmp_path / "encoded.dcm"
    subprocess.run([f"/usr/bin/{tool}", signed, encoded], check=True, timeout=60)
    again = pydicom.dcmread(encoded)
    assert again.file_meta.TransferSyntaxUID.is_compressed
    report = verify_signatures(again, trusted=[crypto_keyset.certificate], profile="creator")
    assert report.status == "re-encoded" and not report.valid, report.reason
    assert "re-encoded losslessly" in report.reason
    # a changed pixel value in a re-encoded file is still tampering
    arr = again.pixel_array.copy()
    arr[3, 5] ^= 1
    again.compress(RLELossless, arr, encoding_plugin="pydicom", generate_instance_uid=False)
    report = verify_signatures(pydicom.dcmread(io.BytesIO(_bytes(again))), profile="creator")
    assert report.status == "invalid" and "MAC mismatch" in report.reason
