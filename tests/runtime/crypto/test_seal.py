"""The seal: round trips, every tamper named by part, record forgery, keys, our private block."""

from __future__ import annotations

import copy
import io
import json

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from medsec_edge.runtime.crypto.keyset import KeyRing, SealSigner
from medsec_edge.runtime.io.dicom_writer import (
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    RECORD_ELEMENT,
    SEAL_ELEMENT,
    SOURCE_UID_ELEMENT,
)
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage
from medsec_edge.runtime.io.dicom_writer import identity_of, read_record
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.writers import write_image
from medsec_edge.runtime.crypto.seal import (
    PART_NAMES,
    SEALED_ATTRIBUTES,
    part_digests,
    read_seal,
    seal_dataset,
    verify_dataset,
)


@pytest.fixture(scope="module")
def signer():
    return SealSigner.generate()


def _roundtrip(ds):
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def _seal_element(ds):
    return ds[ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR).get_tag(SEAL_ELEMENT)]


def test_sealed_file_verifies_after_writing_and_reading(ct_ds, signer):
    seal_dataset(ct_ds, signer)
    verdict = verify_dataset(_roundtrip(ct_ds), [signer.verifier])
    assert (verdict.valid, verdict.status, verdict.changed) == (True, "valid", [])
    assert verdict.key_id == signer.key_id
    record = read_seal(ct_ds)
    assert set(record["parts"]) == set(PART_NAMES)
    assert _seal_element(ct_ds).tag == 0x00111010  # (0011,xx10) in our creator's block
    assert (
        "Doe^Jane" not in _seal_element(ct_ds).value
        and "PID-4711" not in _seal_element(ct_ds).value
    )


def test_a_lossless_re_encoding_keeps_the_seal(ct_ds, signer):
    seal_dataset(ct_ds, signer)
    compressed = _roundtrip(ct_ds)
    compressed.compress(RLELossless, encoding_plugin="pydicom", generate_instance_uid=False)
    compressed = _roundtrip(compressed)
    assert compressed.file_meta.TransferSyntaxUID == RLELossless
    assert verify_dataset(compressed, [signer.verifier]).valid


@pytest.mark.parametrize("bits_stored, signed", [(16, False), (12, False), (16, True), (10, True)])
def test_every_one_bit_pixel_flip_is_caught(ct_factory, signer, bits_stored, signed):
    ds = ct_factory(16, 16, bits_stored=bits_stored, signed=signed, seed=bits_stored)
    seal_dataset(ds, signer)
    raw = bytearray(ds.PixelData)
    rng = np.random.default_rng(1)
    pixels = rng.choice(16 * 16, 24, replace=False)
    flips = 0
    for pixel in pixels:
        for bit in range(bits_stored):  # every stored bit of each chosen pixel
            tampered = copy.deepcopy(ds)
            flipped = bytearray(raw)
            flipped[2 * pixel + bit // 8] ^= 1 << (bit % 8)
            tampered.PixelData = bytes(flipped)
            verdict = verify_dataset(tampered, [signer.verifier])
            assert (verdict.status, verdict.changed) == ("invalid", ["pixels"]), (pixel, bit)
            flips += 1
    assert flips == 24 * bits_stored


def test_flips_anywhere_in_a_multi_frame_image_are_caught(ct_factory, signer):
    ds = ct_factory(16, 16, frames=3, seed=5)
    ds.NumberOfFrames = 3
    seal_dataset(ds, signer)
    assert verify_dataset(ds, [signer.verifier]).valid
    raw = bytearray(ds.PixelData)
    for offset in (0, len(raw) // 2, len(raw) - 2):  # first, middle and last frame
        tampered = copy.deepcopy(ds)
        flipped = bytearray(raw)
        flipped[offset] ^= 1
        tampered.PixelData = bytes(flipped)
        assert verify_dataset(tampered, [signer.verifier]).changed == ["pixels"]


def _changed_value(keyword, value):
    if keyword.endswith("UID"):
        return pydicom.uid.generate_uid()
    if keyword == "PixelSpacing":
        return [0.5, 0.6]
    if keyword == "AcquisitionDate":
        return "20240103"
    if keyword == "PhotometricInterpretation":
        return "MONOCHROME1"
    if keyword in ("RescaleSlope", "RescaleIntercept"):
        return float(value) + 0.5
    if isinstance(value, int):
        return value + 1 if keyword not in ("BitsAllocated",) else 8
    return str(value) + "1"


@pytest.mark.parametrize("keyword", [k for k in SEALED_ATTRIBUTES if k != "NumberOfFrames"])
def test_every_sealed_attribute_change_is_caught_and_named(ct_ds, signer, keyword):
    seal_dataset(ct_ds, signer)
    changed = _roundtrip(ct_ds)
    value = changed.data_element(keyword).value
    setattr(changed, keyword, _changed_value(keyword, value))
    verdict = verify_dataset(changed, [signer.verifier])
    assert verdict.status == "invalid"
    # geometry attributes also change how the pixels decode; the attribute itself is always named
    assert keyword in verdict.changed
    assert set(verdict.changed) <= {keyword, "pixels"}
    removed = _roundtrip(ct_ds)
    del removed[keyword]
    verdict = verify_dataset(removed, [signer.verifier])
    assert verdict.status == "invalid" and keyword in verdict.changed


def test_added_attribute_and_emptied_attribute_are_changes(ct_ds, signer):
    seal_dataset(ct_ds, signer)
    added = _roundtrip(ct_ds)
    added.NumberOfFrames = 1  # absent when sealed
    assert verify_dataset(added, [signer.verifier]).changed == ["NumberOfFrames"]
    emptied = _roundtrip(ct_ds)
    emptied.PatientID = ""  # present but empty differs from the sealed value
    assert verify_dataset(emptied, [signer.verifier]).changed == ["PatientID"]


def test_values_are_canonical_so_equal_values_in_another_spelling_still_verify(ct_ds, signer):
    seal_dataset(ct_ds, signer)
    same = _roundtrip(ct_ds)
    same.PixelSpacing = ["0.50", "0.500"]  # DS spelled differently, same numbers
    same.RescaleSlope = "1.0"
    assert verify_dataset(same, [signer.verifier]).valid


def test_pixel_swap_between_two_images_is_caught(ct_factory, signer):
    a, b = ct_factory(seed=1), ct_factory(seed=2)
    seal_dataset(a, signer)
    seal_dataset(b, signer)
    a.PixelData, b.PixelData = b.PixelData, a.PixelData
    for ds in (a, b):
        verdict = verify_dataset(ds, [signer.verifier])
        assert (verdict.status, verdict.changed) == ("invalid", ["pixels"])


def test_seal_moved_to_another_image_is_caught(ct_factory, signer):
    a, b = ct_factory(seed=1), ct_factory(seed=1)  # same pixels, other identity
    seal_dataset(a, signer)
    b.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(
        SEAL_ELEMENT, "UT", _seal_element(a).value
    )
    verdict = verify_dataset(b, [signer.verifier])
    assert verdict.status == "invalid"
    assert {"SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"} <= set(verdict.changed)
    assert "pixels" not in verdict.changed


@pytest.mark.parametrize("field", ["parts", "signature", "digest", "key_id_swap", "garbage"])
def test_a_forged_or_damaged_record_fails_as_a_whole(ct_ds, signer, field):
    seal_dataset(ct_ds, signer)
    record = read_seal(ct_ds)
    if field == "parts":  # claim the pixels were different, to hide a pixel change
        ct_ds.PixelData = bytes(len(ct_ds.PixelData))
        record["parts"]["pixels"] = part_digests(ct_ds)["pixels"].hex()
    elif field == "signature":
        sig = bytearray(__import__("base64").b64decode(record["signature"]))
        sig[0] ^= 1
        record["signature"] = __import__("base64").b64encode(bytes(sig)).decode()
    elif field == "digest":
        record["digest"] = "00" * 32
    elif field == "key_id_swap":
        other = SealSigner.generate()
        record["key_id"] = other.key_id
        verdict = verify_dataset(_with_record(ct_ds, record), [signer.verifier, other.verifier])
        assert verdict.status == "invalid" and "altered or forged" in verdict.reason
        return
    text = "{not json" if field == "garbage" else json.dumps(record)
    verdict = verify_dataset(_with_record(ct_ds, text), [signer.verifier])
    assert verdict.status == "invalid" and not verdict.valid


def _with_record(ds, record):
    text = record if isinstance(record, str) else json.dumps(record)
    _seal_element(ds).value = text
    return ds


def test_unsigned_and_unknown_key(ct_ds, signer):
    verdict = verify_dataset(ct_ds, [signer.verifier])
    assert (verdict.valid, verdict.status) == (False, "unsigned")
    other = SealSigner.generate()
    seal_dataset(ct_ds, other)
    verdict = verify_dataset(ct_ds, [signer.verifier])
    assert verdict.status == "unknown_key" and other.key_id in verdict.reason
    assert verify_dataset(ct_ds, {other.key_id: other.verifier}).valid


def test_resealing_replaces_the_seal_and_keeps_our_other_elements(tmp_path, ct_ds, signer):
    src = tmp_path / "src.dcm"
    ct_ds.save_as(src, enforce_file_format=True)
    image = read_image(src)
    out = write_image(image, image.pixels, tmp_path / "out.dcm", record={"payload": "ab"})
    ds = pydicom.dcmread(out)
    seal_dataset(ds, signer)
    other = SealSigner.generate()
    seal_dataset(ds, other)  # reseal with another key: one seal element, the new key
    ds.save_as(tmp_path / "sealed.dcm", enforce_file_format=True)
    sealed = pydicom.dcmread(tmp_path / "sealed.dcm")
    block = sealed.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert {RECORD_ELEMENT, SOURCE_UID_ELEMENT, SEAL_ELEMENT} <= {
        t.element & 0xFF for t in sealed.keys() if t.group == PRIVATE_GROUP and t.element >= 0x1000
    }
    assert block[SEAL_ELEMENT].VR == "UT"
    assert read_record(sealed) == {"payload": "ab"}
    sealed_image = read_image(tmp_path / "sealed.dcm")
    assert identity_of(sealed_image)["sop_uid"] == ct_ds.SOPInstanceUID
    assert verify_dataset(sealed, [signer.verifier, other.verifier]).key_id == other.key_id
    assert verify_dataset(sealed, [signer.verifier]).status == "unknown_key"


def test_key_ring_rotation_old_seals_still_verify(tmp_path, ct_factory):
    ring_dir = tmp_path / "ring"
    KeyRing.rotate(ring_dir)
    old_ring = KeyRing.load(ring_dir)
    old = seal_dataset(ct_factory(seed=3), old_ring.signer)
    KeyRing.rotate(ring_dir)
    ring = KeyRing.load(ring_dir)
    new = seal_dataset(ct_factory(seed=4), ring.signer)
    assert read_seal(new)["key_id"] != read_seal(old)["key_id"]
    assert verify_dataset(old, ring).valid and verify_dataset(new, ring).valid
    assert verify_dataset(new, old_ring).status == "unknown_key"


def test_image_without_pixels_has_a_missing_marker_not_a_crash(ct_ds, signer):
    del ct_ds.PixelData
    seal_dataset(ct_ds, signer)
    assert verify_dataset(ct_ds, [signer.verifier]).valid
    ct_ds.PixelData = b"\x00\x00" * 64 * 64
    assert verify_dataset(ct_ds, [signer.verifier]).changed == ["pixels"]


def test_non_dicom_module_imports_cleanly():
    # MedicalImage/ImageMeta are untouched by sealing: sealing is a DICOM-only operation.
    image = MedicalImage(np.zeros((16, 16), np.uint16), ImageMeta(bits_stored=16, signed=False))
    assert image.dataset is None


@pytest.mark.parametrize("allocated,stored,signed,frames", [
    (8, 8, False, 1), (8, 6, False, 1), (16, 16, False, 1), (16, 12, False, 1), (16, 16, True, 1),
    (16, 12, True, 1), (16, 12, True, 3), (32, 32, False, 1), (32, 20, True, 2),
])
def test_native_pixels_equal_pydicoms_decoding(allocated, stored, signed, frames):
    """The fast path must give exactly what pydicom decodes, or seals would not survive a
    lossless re-encode (which goes through pydicom's decoder)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from medsec_edge.runtime.crypto.seal import native_pixels

    rng = np.random.default_rng(allocated * 100 + stored)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 5, 7, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
    raw = rng.integers(0, 2**allocated, 5 * 7 * frames, dtype=np.uint64).astype(f"<u{allocated // 8}")
    ds.PixelData = raw.tobytes() + (b"\0" if raw.nbytes % 2 else b"")  # high bits set on purpose
    fast = native_pixels(ds)
    assert fast is not None
    expected = ds.pixel_array
    assert fast.dtype == expected.dtype and fast.shape == expected.shape
    assert np.array_equal(fast, expected)


# --------------------------------------------------------------------------------------------
# version 2: display attributes, frame display groups, our private block


def test_a_window_added_to_a_file_that_had_none_is_caught(ct_ds, signer):
    del ct_ds.WindowCenter, ct_ds.WindowWidth
    sealed = _roundtrip(seal_dataset(ct_ds, signer))
    assert verify_dataset(sealed, [signer.verifier]).valid
    sealed.WindowCenter, sealed.WindowWidth = 40, 80
    verdict = verify_dataset(sealed, [signer.verifier])
    assert verdict.status == "invalid"
    assert verdict.changed == ["WindowCenter", "WindowWidth"]


def test_a_changed_frame_window_in_the_functional_groups_is_caught(ct_factory, signer):
    ds = ct_factory(frames=2)
    voi = pydicom.Dataset()
    voi.WindowCenter, voi.WindowWidth = 40, 400
    group = pydicom.Dataset()
    group.FrameVOILUTSequence = pydicom.Sequence([voi])
    ds.SharedFunctionalGroupsSequence = pydicom.Sequence([group])
    sealed = _roundtrip(seal_dataset(ds, signer))
    assert verify_dataset(sealed, [signer.verifier]).valid
    sealed.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0].WindowWidth = 40
    assert verify_dataset(sealed, [signer.verifier]).changed == ["frame_display"]


def _derived(tmp_path, ct_ds):
    src = tmp_path / "src.dcm"
    ct_ds.save_as(src, enforce_file_format=True)
    image = read_image(src)
    out = write_image(image, image.pixels, tmp_path / "out.dcm", record={"payload": "ab"})
    return pydicom.dcmread(out)


@pytest.mark.parametrize(
    "change",
    ["record", "source_uid", "added", "removed"],
)
def test_our_private_block_is_sealed(tmp_path, ct_ds, signer, change):
    sealed = _roundtrip(seal_dataset(_derived(tmp_path, ct_ds), signer))
    assert verify_dataset(sealed, [signer.verifier]).valid
    block = sealed.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    if change == "record":
        block[RECORD_ELEMENT].value = json.dumps({"payload": "ac"}, sort_keys=True)
    elif change == "source_uid":
        block[SOURCE_UID_ELEMENT].value = "1.2.3.4"
    elif change == "added":
        block.add_new(0x40, "LO", "later")
    else:
        del sealed[block.get_tag(RECORD_ELEMENT)]
    verdict = verify_dataset(sealed, [signer.verifier])
    assert verdict.status == "invalid" and verdict.changed == ["medsec_private"]


def test_what_encrypt_adds_later_is_outside_the_seal(tmp_path, ct_ds, signer):
    from medsec_edge.runtime.io.dicom_writer import ENCRYPTED_ELEMENT, WRAPPED_KEY_ELEMENT

    sealed = _roundtrip(seal_dataset(_derived(tmp_path, ct_ds), signer))
    block = sealed.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    block.add_new(ENCRYPTED_ELEMENT, "OB", b"\x01\x02\x03")
    block.add_new(WRAPPED_KEY_ELEMENT, "UT", "{}")
    assert verify_dataset(sealed, [signer.verifier]).valid


def test_the_seal_survives_an_implicit_vr_copy_of_our_private_block(tmp_path, ct_ds, signer):
    # Implicit VR: our private elements come back as UN bytes, padded; the seal reads them alike
    sealed = seal_dataset(_derived(tmp_path, ct_ds), signer)
    block = sealed.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    block.add_new(0x30, "OB", b"\x01\x02\x03")  # odd length: padded when written
    seal_dataset(sealed, signer)
    sealed.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    implicit = _roundtrip(sealed)
    raw = implicit.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[RECORD_ELEMENT]
    assert raw.VR == "UN" and isinstance(raw.value, bytes)
    assert verify_dataset(implicit, [signer.verifier]).valid


def test_version_1_seals_still_verify(ct_ds, signer):
    from medsec_edge.runtime.crypto import seal as seal_module

    parts = part_digests(ct_ds, version=1)
    digest = seal_module.canonical_digest(parts)
    message = seal_module._signed_message(signer.key_id, digest)
    record = {
        "version": 1,
        "algorithm": "Ed25519",
        "key_id": signer.key_id,
        "digest": digest.hex(),
        "parts": {name: value.hex() for name, value in parts.items()},
        "signature": __import__("base64").b64encode(signer.sign(message)).decode(),
    }
    ct_ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(
        SEAL_ELEMENT, "UT", json.dumps(record)
    )
    assert set(parts) == set(PART_NAMES[: 1 + len(SEALED_ATTRIBUTES)])
    assert verify_dataset(_roundtrip(ct_ds), [signer.verifier]).valid
    ct_ds.PatientID = "PID-0001"
    assert verify_dataset(_roundtrip(ct_ds), [signer.verifier]).changed == ["PatientID"]
