"""Encryption: round trips, wrong keys, moved or altered blobs refused, nothing written, no PHI."""

from __future__ import annotations

import base64
import dataclasses
import io

import numpy as np
import pydicom
import pytest

from medsec_edge.runtime.crypto.keyset import DecryptionKey, KeyRing
from medsec_edge.runtime.io.dicom_writer import ENCRYPTED_ELEMENT, PRIVATE_CREATOR, PRIVATE_GROUP
from medsec_edge.runtime.crypto.encryption import (
    BLOB_MAGIC,
    Binding,
    DataKey,
    StudyKeys,
    WrappedKey,
    decrypt_bytes,
    decrypt_dataset,
    decrypt_file,
    decrypt_frames,
    encrypt_bytes,
    encrypt_dataset,
    encrypt_file,
    encrypt_frames,
    header_digest,
    unwrap_data_key,
    wrap_data_key,
)
from medsec_edge.runtime.errors import DecryptionError, InputError, MedsecError

BINDING = Binding("1.2.3.1", "1.2.3.2", "1.2.3.3", b"h" * 32)


def _secret_forms(key: DataKey) -> list[str]:
    return [key.secret.hex(), base64.b64encode(key.secret).decode(), repr(key.secret)]


def test_bytes_round_trip_with_fresh_nonces():
    key = DataKey.generate()
    one = encrypt_bytes(key, b"pixels" * 100, BINDING)
    two = encrypt_bytes(key, b"pixels" * 100, BINDING)
    assert one != two and one[:4] == BLOB_MAGIC and len(one) % 2 == 0
    assert decrypt_bytes(key, one, BINDING) == b"pixels" * 100 == decrypt_bytes(key, two, BINDING)
    assert key.secret.hex() not in repr(key)


def test_wrong_key_fails_clearly_without_leaking():
    key, other = DataKey.generate(), DataKey.generate()
    blob = encrypt_bytes(key, b"x" * 64, BINDING)
    with pytest.raises(DecryptionError, match=key.key_id.hex()) as info:
        decrypt_bytes(other, blob, BINDING)
    same_id = DataKey(key.key_id, other.secret)  # right id, wrong secret: authentication fails
    with pytest.raises(DecryptionError, match="key is wrong") as info2:
        decrypt_bytes(same_id, blob, BINDING)
    for message in (str(info.value), str(info2.value)):
        for form in _secret_forms(key) + _secret_forms(other):
            assert form not in message
    assert info2.value.exit_code == 1 and isinstance(info2.value, MedsecError)


@pytest.mark.parametrize("field", ["study_uid", "series_uid", "sop_uid", "header_digest"])
def test_blob_opens_only_under_its_binding(field):
    key = DataKey.generate()
    blob = encrypt_bytes(key, b"x" * 64, BINDING)
    other = b"g" * 32 if field == "header_digest" else "1.2.3.9"
    with pytest.raises(DecryptionError, match="UIDs or its header changed"):
        decrypt_bytes(key, blob, dataclasses.replace(BINDING, **{field: other}))


def test_every_single_bit_flip_is_refused():
    key = DataKey.generate()
    blob = encrypt_bytes(key, bytes(range(48)), BINDING)
    for position in range(len(blob)):  # header, meta, nonce, ciphertext and tag alike
        for bit in (0, 7):
            tampered = bytearray(blob)
            tampered[position] ^= 1 << bit
            with pytest.raises(DecryptionError):
                decrypt_bytes(key, bytes(tampered), BINDING)
    with pytest.raises(DecryptionError, match="truncated|bad magic"):
        decrypt_bytes(key, blob[:20], BINDING)


@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.float32])
def test_frames_round_trip_at_native_dtype(dtype):
    key = DataKey.generate()
    frames = (np.arange(3 * 8 * 8).reshape(3, 8, 8) - 50).astype(dtype)
    blobs = encrypt_frames(key, frames, BINDING)
    assert len(blobs) == 3
    out = decrypt_frames(key, blobs, BINDING)
    assert out.dtype == frames.dtype and np.array_equal(out, frames)


def test_frames_dropped_reordered_or_moved_are_refused():
    key = DataKey.generate()
    frames = np.arange(3 * 4 * 4, dtype=np.uint16).reshape(3, 4, 4)
    blobs = encrypt_frames(key, frames, BINDING)
    with pytest.raises(DecryptionError, match="reordered"):
        decrypt_frames(key, [blobs[1], blobs[0], blobs[2]], BINDING)
    with pytest.raises(DecryptionError, match="dropped"):
        decrypt_frames(key, blobs[:2], BINDING)
    other_image = encrypt_frames(key, frames, dataclasses.replace(BINDING, sop_uid="1.2.3.4"))
    with pytest.raises(DecryptionError):
        decrypt_frames(key, [blobs[0], other_image[1], blobs[2]], BINDING)


def test_wrapped_key_round_trip_and_refusals():
    recipient, stranger = DecryptionKey.generate(), DecryptionKey.generate()
    key = DataKey.generate()
    wrapped = WrappedKey.from_json(wrap_data_key(key, recipient.recipient).to_json())
    assert wrapped.recipient_key_id == recipient.key_id and wrapped.data_key_id == key.key_id
    assert unwrap_data_key(wrapped, recipient).secret == key.secret
    assert unwrap_data_key(wrapped, {recipient.key_id: recipient}).secret == key.secret
    with pytest.raises(DecryptionError, match=f"wrapped for key {recipient.key_id}"):
        unwrap_data_key(wrapped, stranger)
    impostor = DecryptionKey(recipient.key_id, stranger.private_key)  # right id, wrong key
    with pytest.raises(DecryptionError, match="wrong key or the wrapped key was altered") as info:
        unwrap_data_key(wrapped, impostor)
    for form in _secret_forms(key):
        assert form not in str(info.value)
    for field in ("ciphertext", "ephemeral_public", "nonce"):
        value = bytearray(getattr(wrapped, field))
        value[0] ^= 1
        with pytest.raises(DecryptionError):
            unwrap_data_key(dataclasses.replace(wrapped, **{field: bytes(value)}), recipient)
    with pytest.raises(DecryptionError, match="malformed"):
        WrappedKey.from_json('{"scheme": "X25519-HKDF-SHA256-A256GCM", "version": 1}')


def test_study_keys_one_fresh_key_per_study():
    keys = StudyKeys(DecryptionKey.generate().recipient)
    a1, a2, b = keys.for_study("1.2.1"), keys.for_study("1.2.1"), keys.for_study("1.2.2")
    assert a1 is a2 and a1[0].key_id != b[0].key_id and a1[0].secret != b[0].secret


# --------------------------------------------------------------------------------------------
# DICOM


@pytest.fixture
def recipient():
    return DecryptionKey.generate()


def test_encrypted_file_has_a_deidentified_readable_header(tmp_path, ct_ds, recipient):
    src = tmp_path / "plain.dcm"
    ct_ds.save_as(src, enforce_file_format=True)
    out = encrypt_file(src, tmp_path / "enc.dcm", StudyKeys(recipient.recipient))
    raw = out.read_bytes()
    for phi in (
        b"Doe^Jane",
        b"PID-4711",
        b"19700101",
        b"20240102",
        b"Who^Doctor",
        "Müller".encode("latin-1"),
    ):
        assert phi not in raw, phi
    clear = pydicom.dcmread(out)
    assert "PixelData" not in clear
    assert clear.PatientIdentityRemoved == "YES"
    assert not clear.PatientName and not clear.PatientID and not clear.StudyDate
    assert not clear.PatientBirthDate and not clear.AcquisitionDate
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"):
        assert clear.data_element(keyword).value == ct_ds.data_element(keyword).value
    assert (clear.Modality, clear.Rows, clear.Columns) == ("CT", 64, 64)
    assert clear.ReferencedImageSequence[0].ReferencedSOPInstanceUID  # sequences kept


def test_decrypt_file_restores_the_original_byte_for_byte(tmp_path, ct_ds, recipient):
    src = tmp_path / "plain.dcm"
    ct_ds.save_as(src, enforce_file_format=True)
    enc = encrypt_file(src, tmp_path / "enc.dcm", StudyKeys(recipient.recipient))
    dec = decrypt_file(enc, tmp_path / "dec.dcm", recipient)
    assert dec.read_bytes() == src.read_bytes()
    original = decrypt_dataset(pydicom.dcmread(enc), recipient)
    assert original.PatientName == "Doe^Jane" and np.array_equal(
        original.pixel_array, ct_ds.pixel_array
    )


def test_dataset_api_and_key_ring_after_rotation(tmp_path, ct_ds):
    ring_dir = tmp_path / "ring"
    KeyRing.rotate(ring_dir)
    old_ring = KeyRing.load(ring_dir)
    key = DataKey.generate()
    clear = encrypt_dataset(ct_ds, key, wrap_data_key(key, old_ring.recipient))
    KeyRing.rotate(ring_dir)
    ring = KeyRing.load(ring_dir)
    assert ring.recipient.key_id != old_ring.recipient.key_id
    restored = decrypt_dataset(pydicom.dcmread(io.BytesIO(_bytes(clear))), ring)
    assert restored.PatientID == "PID-4711" and restored.SOPInstanceUID == ct_ds.SOPInstanceUID
    assert decrypt_dataset(clear, key).PatientID == "PID-4711"  # the data key itself works too


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("tamper", ["wrong_key", "swapped_uid", "header_rows", "flipped_bit"])
def test_failed_decryption_writes_nothing(tmp_path, ct_ds, recipient, tamper):
    src = tmp_path / "plain.dcm"
    ct_ds.save_as(src, enforce_file_format=True)
    enc = encrypt_file(src, tmp_path / "enc.dcm", StudyKeys(recipient.recipient))
    keys = recipient
    if tamper == "wrong_key":
        keys = DecryptionKey(recipient.key_id, DecryptionKey.generate().private_key)
    else:
        clear = pydicom.dcmread(enc)
        if tamper == "swapped_uid":
            clear.SOPInstanceUID = pydicom.uid.generate_uid()
        elif tamper == "header_rows":
            clear.Rows = 32
        else:
            elem = clear[
                clear.private_block(PRIVATE_GROUP, PRIVATE_CREATOR).get_tag(ENCRYPTED_ELEMENT)
            ]
            blob = bytearray(elem.value)
            blob[len(blob) // 2] ^= 0x10
            elem.value = bytes(blob)
        clear.save_as(enc, enforce_file_format=True)
    out = tmp_path / "dec.dcm"
    with pytest.raises(DecryptionError):
        decrypt_file(enc, out, keys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.dcm", "plain.dcm"]


def test_not_encrypted_and_unreadable_inputs(tmp_path, ct_ds, recipient):
    src = tmp_path / "plain.dcm"
    ct_ds.save_as(src, enforce_file_format=True)
    with pytest.raises(InputError, match="not a medsec-edge encrypted"):
        decrypt_file(src, tmp_path / "out.dcm", recipient)
    (tmp_path / "junk.dcm").write_bytes(b"not dicom")
    with pytest.raises(InputError, match="junk.dcm"):
        encrypt_file(tmp_path / "junk.dcm", tmp_path / "enc.dcm", StudyKeys(recipient.recipient))
    assert not (tmp_path / "out.dcm").exists() and not (tmp_path / "enc.dcm").exists()


def test_header_digest_follows_the_clear_header(ct_ds):
    before = header_digest(ct_ds)
    ct_ds.PatientName = "Other^Name"  # not part of the bound header (it is blanked in the clear)
    assert header_digest(ct_ds) == before
    ct_ds.Columns = 65
    assert header_digest(ct_ds) != before
