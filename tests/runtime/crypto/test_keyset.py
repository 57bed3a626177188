"""Key sets: file modes, refusal to overwrite or to load shared private keys, ids, rotation."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from medsec_edge.runtime.crypto import keyset as ck
from medsec_edge.runtime.crypto.keyset import (
    KeyRing,
    SealSigner,
    export_public,
    key_id_of,
    load_key_dir,
    new_key_dir,
)
from medsec_edge.runtime.errors import KeyFileError

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private_forms(path: Path) -> list[str]:
    """Ways the private key of a PEM file could leak into a message."""
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    der = key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_body = path.read_text().splitlines()[1]
    return [pem_body, der.hex(), base64.b64encode(der).decode()[:40]]


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    return new_key_dir(tmp_path_factory.mktemp("ks") / "device")


@posix_only
def test_new_key_dir_writes_private_0600_public_0644_and_a_0700_directory(keyset):
    path = keyset.path
    assert _mode(path) == 0o700
    for name in ck.PRIVATE_FILES:
        assert _mode(path / name) == 0o600, name
    assert _mode(path / ck.WATERMARK_KEY) == 0o600
    for name in (*ck.PUBLIC_FILES, ck.KEYSET_FILE):
        assert _mode(path / name) == 0o644, name
    assert sorted(p.name for p in path.iterdir()) == sorted(
        (*ck.PRIVATE_FILES, *ck.PUBLIC_FILES, ck.KEYSET_FILE, ck.WATERMARK_KEY)
    )


def test_key_ids_are_sha256_of_the_raw_public_key(keyset):
    raw = keyset.seal.public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert keyset.seal.key_id == hashlib.sha256(raw).hexdigest()[:16]
    spki = keyset.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert keyset.dicom_key_id == hashlib.sha256(spki).hexdigest()[:16]
    index = json.loads((keyset.path / ck.KEYSET_FILE).read_text())
    assert index["keys"]["seal"]["key_id"] == keyset.seal.key_id
    assert index["keys"]["encryption"]["key_id"] == keyset.recipient.key_id
    assert index["keys"]["dicom_signature"]["key_id"] == keyset.dicom_key_id
    # a known vector: Ed25519 private bytes 0..31
    known = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    expected = hashlib.sha256(
        known.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    ).hexdigest()[:16]
    assert key_id_of(known) == expected and len(expected) == 16


def test_loaded_keys_work_together(keyset):
    assert keyset.seal_signer is not None and keyset.decryption is not None
    assert keyset.dicom_signer is not None
    message = b"medsec"
    assert keyset.seal.verify(keyset.seal_signer.sign(message), message)
    assert not keyset.seal.verify(keyset.seal_signer.sign(message), b"other")
    assert keyset.decryption.recipient.key_id == keyset.recipient.key_id
    cert = keyset.certificate
    assert cert.subject == cert.issuer  # self-signed
    assert cert.signature_hash_algorithm.name == "sha256"
    assert cert.public_key().key_size == 2048
    assert "medsec-edge" in cert.subject.rfc4514_string()


def test_reprs_never_show_private_material(keyset):
    texts = [
        repr(keyset),
        repr(keyset.seal_signer),
        repr(keyset.decryption),
        repr(keyset.dicom_signer),
    ]
    for name in ck.PRIVATE_FILES:
        for form in _private_forms(keyset.path / name):
            assert all(form not in text for text in texts)


def test_new_key_dir_refuses_to_overwrite(tmp_path):
    first = new_key_dir(tmp_path / "k")
    before = {p.name: p.read_bytes() for p in first.path.iterdir()}
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        new_key_dir(tmp_path / "k")
    assert {p.name: p.read_bytes() for p in first.path.iterdir()} == before
    # one stray file of ours is enough to refuse
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / ck.SEAL_PRIVATE).write_text("x")
    with pytest.raises(KeyFileError, match=ck.SEAL_PRIVATE):
        new_key_dir(tmp_path / "other")


@posix_only
@pytest.mark.parametrize("name", ck.PRIVATE_FILES)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644], ids=lambda m: f"{m:04o}")
def test_shared_private_key_is_refused_without_leaking(keyset, name, mode):
    path = keyset.path / name
    path.chmod(mode)
    try:
        with pytest.raises(KeyFileError) as info:
            load_key_dir(keyset.path)
        message = str(info.value)
        assert str(path) in message and f"chmod 600 {path}" in message
        assert f"{mode:04o}" in message
        for form in _private_forms(path):
            assert form not in message
        exc = info.value
        assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
        # the public half is still usable, without touching private files
        assert load_key_dir(keyset.path, private=False).seal_signer is None
    finally:
        path.chmod(0o600)
    assert load_key_dir(keyset.path).seal_signer is not None


def test_mixed_up_key_set_is_refused(tmp_path):
    a = new_key_dir(tmp_path / "a")
    b = new_key_dir(tmp_path / "b")
    (a.path / ck.SEAL_PUBLIC).unlink()
    (a.path / ck.SEAL_PUBLIC).write_bytes((b.path / ck.SEAL_PUBLIC).read_bytes())
    with pytest.raises(KeyFileError, match="mixed up"):
        load_key_dir(a.path)


def test_missing_or_foreign_files_are_refused_clearly(tmp_path):
    with pytest.raises(KeyFileError, match="not a key set"):
        load_key_dir(tmp_path)
    ks = new_key_dir(tmp_path / "k")
    (ks.path / ck.ENC_PUBLIC).unlink()
    with pytest.raises(KeyFileError, match="missing"):
        load_key_dir(ks.path)
    ks2 = new_key_dir(tmp_path / "k2")
    other = x25519.X25519PrivateKey.generate()
    (ks2.path / ck.SEAL_PUBLIC).unlink()
    (ks2.path / ck.SEAL_PUBLIC).write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(KeyFileError, match="expected Ed25519PublicKey"):
        load_key_dir(ks2.path)


def test_export_public_has_no_private_file_and_cannot_sign(keyset, tmp_path):
    out = export_public(keyset.path, tmp_path / "pub")
    assert not any((out / name).exists() for name in (*ck.PRIVATE_FILES, ck.WATERMARK_KEY))
    public = load_key_dir(out)
    assert public.seal_signer is None and public.decryption is None and public.dicom_signer is None
    assert public.watermark is None and KeyRing.load(out).watermark is None
    secret = keyset.watermark.secret
    for name in (p.name for p in out.iterdir()):
        data = (out / name).read_bytes()
        assert secret not in data and base64.b64encode(secret) not in data, name
    assert public.seal.key_id == keyset.seal.key_id
    with pytest.raises(KeyFileError, match="exists"):
        export_public(keyset.path, out)


def test_key_ring_newest_signs_all_verify_and_decrypt(tmp_path):
    ring_dir = tmp_path / "ring"
    old = KeyRing.rotate(ring_dir)
    new = KeyRing.rotate(ring_dir)
    ring = KeyRing.load(ring_dir)
    assert [s.seal.key_id for s in ring.sets] == [old.seal.key_id, new.seal.key_id]
    assert ring.signer.key_id == new.seal.key_id
    assert ring.recipient.key_id == new.recipient.key_id
    assert set(ring.verifiers) == {old.seal.key_id, new.seal.key_id}
    assert set(ring.decryption_keys) == {old.recipient.key_id, new.recipient.key_id}
    message = b"x"
    assert ring.verifiers[old.seal.key_id].verify(old.seal_signer.sign(message), message)
    # a retired newest private key: no signer, never a fall back to the older key
    (new.path / ck.SEAL_PRIVATE).unlink()
    assert KeyRing.load(ring_dir).signer is None
    # a single key set is a ring of one, and cannot be rotated in place
    single = KeyRing.load(old.path)
    assert single.signer.key_id == old.seal.key_id
    with pytest.raises(KeyFileError, match="single key set"):
        KeyRing.rotate(old.path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyFileError, match="no key set"):
        KeyRing.load(tmp_path / "empty")


def test_in_memory_signer_has_a_matching_verifier():
    signer = SealSigner.generate()
    assert signer.verifier.key_id == signer.key_id == key_id_of(signer.private_key.public_key())
    assert signer.verifier.verify(signer.sign(b"m"), b"m")


# --------------------------------------------------------------------------------------------
# the watermark key in the set


def test_the_set_holds_the_watermark_key_and_the_ring_exposes_it(keyset):
    from medsec_edge.runtime.crypto.watermark_key import load_key

    assert keyset.watermark is not None
    assert keyset.watermark == load_key(keyset.path / ck.WATERMARK_KEY)
    assert keyset.watermark_key_id == keyset.watermark.key_id
    assert KeyRing.load(keyset.path).watermark.secret == keyset.watermark.secret
    assert base64.b64encode(keyset.watermark.secret).decode() not in repr(keyset)
    assert load_key_dir(keyset.path, private=False).watermark is None, "a secret: private only"


@posix_only
def test_a_loose_watermark_key_in_the_set_is_refused(keyset):
    path = keyset.path / ck.WATERMARK_KEY
    path.chmod(0o644)
    try:
        with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
            load_key_dir(keyset.path)
    finally:
        path.chmod(0o600)


def test_rotation_keeps_the_watermark_key(tmp_path):
    ring_dir = tmp_path / "ring"
    first = KeyRing.rotate(ring_dir)
    second = KeyRing.rotate(ring_dir)
    assert second.seal.key_id != first.seal.key_id
    assert second.watermark.secret == first.watermark.secret
    assert KeyRing.load(ring_dir).watermark.key_id == first.watermark.key_id
    # a ring from before the watermark key moved in gets none (never a fresh one that would
    # make the marks already made read as another image's): the device's first use imports it
    old_ring = tmp_path / "old-ring"
    new_key_dir(old_ring / "a", watermark=False)
    assert KeyRing.rotate(old_ring).watermark is None


def test_a_watermark_key_is_added_once(tmp_path):
    from medsec_edge.runtime.crypto.watermark_key import WatermarkKey

    path = new_key_dir(tmp_path / "k", watermark=False).path
    assert load_key_dir(path).watermark is None
    key = WatermarkKey.from_secret(bytes(range(32)))
    assert ck.add_watermark_key(path, key).watermark == key
    with pytest.raises(KeyFileError, match="refusing to overwrite"):
        ck.add_watermark_key(path, WatermarkKey.from_secret(bytes(32)))
    assert load_key_dir(path).watermark == key
