"""Key sets for the cryptographic layer: seal, encryption and DICOM signature keys, and rotation.

Layer: runtime (cryptography). One directory holds one key set, made by ``new_key_dir``:

==========================  ====  =============================================================
file                        mode  content
==========================  ====  =============================================================
``keyset.json``             0644  index: kind, version, creation time (UTC), the key ids
``seal_ed25519.key.pem``    0600  Ed25519 private key (PKCS#8 PEM): signs seals (``seal.py``)
``seal_ed25519.pub.pem``    0644  its public key (SubjectPublicKeyInfo PEM)
``encrypt_x25519.key.pem``  0600  X25519 private key: unwraps study data keys (``encryption``)
``encrypt_x25519.pub.pem``  0644  its public key: whoever encrypts for this device uses it
``dicom_rsa.key.pem``       0600  RSA-2048 private key: DICOM PS3.15 signatures
``dicom_rsa.cert.pem``      0644  self-signed X.509 certificate (SHA-256) of that RSA key
``watermark.key``           0600  the watermark's HMAC secret (``watermark_key.py``'s format)
==========================  ====  =============================================================

One set holds every key the device uses. The watermark key is a shared secret, not a key pair:
it has no public half, so ``export_public`` never copies it, and ``KeyRing.rotate`` carries it
into the new set unchanged (marks already made must keep matching their images).

Keys are PEM, not JSON like the watermark key, so that standard tools read the same
files (``dcmsign --sign dicom_rsa.key.pem dicom_rsa.cert.pem``, ``openssl``); the JSON index carries
the key ids. A key id is the first 16 hex characters of SHA-256 over the raw public key bytes
(Ed25519 and X25519: the 32 raw bytes; RSA, which has no raw form: the DER SubjectPublicKeyInfo).

The private files follow ``watermark_key.py``'s rules: created 0600 in one step (O_CREAT|O_EXCL, never
overwriting), and a private file that group or others can access is refused when loaded. A key
set may lack its private files (a verifier's copy from ``export_public``): it then verifies and
encrypts but cannot sign or decrypt. Nothing here logs or raises key material.

Rotation: a key ring is a directory of key set directories (``KeyRing.rotate`` adds one). Every
public key in the ring verifies and every private encryption key decrypts; only the newest set
signs. If the newest set has no private seal key the ring has no signer rather than falling back
to a retired key.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa, x25519
from cryptography.x509.oid import NameOID

from medsec_edge.runtime.errors import KeyFileError
from medsec_edge.runtime.crypto.watermark_key import (
    KEY_BYTES,
    WatermarkKey,
    load_key,
    read_key_file,
    store_key,
)

__all__ = [
    "KEYSET_FILE",
    "DecryptionKey",
    "DicomSigningKey",
    "KeyRing",
    "KeySet",
    "RecipientKey",
    "SealSigner",
    "SealVerifier",
    "WATERMARK_KEY",
    "add_watermark_key",
    "export_public",
    "key_id_of",
    "load_key_dir",
    "new_key_dir",
]

logger = logging.getLogger(__name__)

KEYSET_FILE = "keyset.json"
KEYSET_KIND = "medsec-edge-keyset"
KEYSET_VERSION = 1
SEAL_PRIVATE, SEAL_PUBLIC = "seal_ed25519.key.pem", "seal_ed25519.pub.pem"
ENC_PRIVATE, ENC_PUBLIC = "encrypt_x25519.key.pem", "encrypt_x25519.pub.pem"
RSA_PRIVATE, RSA_CERT = "dicom_rsa.key.pem", "dicom_rsa.cert.pem"
WATERMARK_KEY = "watermark.key"  # secret, never exported; not in the index (its id is its hash)
PRIVATE_FILES = (SEAL_PRIVATE, ENC_PRIVATE, RSA_PRIVATE)
PUBLIC_FILES = (SEAL_PUBLIC, ENC_PUBLIC, RSA_CERT)
RSA_BITS = 2048
CERT_VALID_DAYS = 5 * 365
_MAX_FILE_BYTES = 16_384  # an RSA-2048 PEM is ~1.7 kB


def key_id_of(public_key) -> str:
    """16 hex characters: SHA-256 of the raw public key (RSA: DER SubjectPublicKeyInfo)."""
    if isinstance(public_key, (ed25519.Ed25519PublicKey, x25519.X25519PublicKey)):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    elif isinstance(public_key, rsa.RSAPublicKey):
        raw = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        raise KeyFileError(f"no key id for a {type(public_key).__name__}")
    return hashlib.sha256(raw).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# key objects (repr never shows private material)


@dataclass(frozen=True)
class SealVerifier:
    """An Ed25519 public key that checks seals."""

    key_id: str
    public_key: ed25519.Ed25519PublicKey = field(repr=False, compare=False)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.public_key.verify(signature, message)
        except (InvalidSignature, ValueError, TypeError):
            return False
        return True


@dataclass(frozen=True)
class SealSigner:
    """An Ed25519 private key that signs seals."""

    key_id: str
    private_key: ed25519.Ed25519PrivateKey = field(repr=False, compare=False)

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @property
    def verifier(self) -> SealVerifier:
        return SealVerifier(self.key_id, self.private_key.public_key())

    @classmethod
    def generate(cls) -> SealSigner:
        """A fresh in-memory key (tests, ephemeral use); ``new_key_dir`` for a kept one."""
        key = ed25519.Ed25519PrivateKey.generate()
        return cls(key_id_of(key.public_key()), key)


@dataclass(frozen=True)
class RecipientKey:
    """An X25519 public key data keys are wrapped for."""

    key_id: str
    public_key: x25519.X25519PublicKey = field(repr=False, compare=False)


@dataclass(frozen=True)
class DecryptionKey:
    """An X25519 private key that unwraps data keys wrapped for its ``RecipientKey``."""

    key_id: str
    private_key: x25519.X25519PrivateKey = field(repr=False, compare=False)

    @property
    def recipient(self) -> RecipientKey:
        return RecipientKey(self.key_id, self.private_key.public_key())

    @classmethod
    def generate(cls) -> DecryptionKey:
        key = x25519.X25519PrivateKey.generate()
        return cls(key_id_of(key.public_key()), key)


@dataclass(frozen=True)
class DicomSigningKey:
    """An RSA private key and its X.509 certificate, for DICOM PS3.15 signatures."""

    key_id: str
    private_key: rsa.RSAPrivateKey = field(repr=False, compare=False)
    certificate: x509.Certificate = field(repr=False, compare=False)


@dataclass(frozen=True)
class KeySet:
    """The keys of one key directory; private parts are None where the files are absent."""

    path: Path
    created: str
    seal: SealVerifier
    recipient: RecipientKey
    certificate: x509.Certificate = field(repr=False, compare=False)
    seal_signer: SealSigner | None = field(default=None, repr=False, compare=False)
    decryption: DecryptionKey | None = field(default=None, repr=False, compare=False)
    dicom_signer: DicomSigningKey | None = field(default=None, repr=False, compare=False)
    watermark: WatermarkKey | None = field(default=None, repr=False, compare=False)

    @property
    def watermark_key_id(self) -> str | None:
        return self.watermark.key_id if self.watermark is not None else None

    @property
    def dicom_key_id(self) -> str:
        return key_id_of(self.certificate.public_key())

    @property
    def has_private(self) -> bool:
        return self.seal_signer is not None


# --------------------------------------------------------------------------------------------
# files


def _write_exclusive(path: Path, content: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` holding ``content``; FileExistsError if anything is there."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, mode)
    try:
        if os.name == "posix":
            os.fchmod(fd, mode)  # the umask may have taken bits from ``mode``
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_file(path: Path, *, private: bool) -> bytes:
    """Read a key file; a private one must be a regular file only its owner can access."""
    return read_key_file(
        path, what="key file", max_bytes=_MAX_FILE_BYTES, missing=f"key file {path} is missing: "
        "create keys with 'medsec-edge keys new'", private="private key" if private else None,
        consequence="sign or decrypt as this device",
    )


def _private_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _public_pem(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _self_signed_certificate(key: rsa.RSAPrivateKey, key_id: str, common_name: str | None):
    # The subject names the device key, never a person or a patient.
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medsec-edge"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name or f"medsec-edge signer {key_id}"),
        ]
    )
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + _dt.timedelta(days=CERT_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=True,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_key_dir(path: str | Path, *, common_name: str | None = None,
                watermark: WatermarkKey | None | bool = True) -> KeySet:
    """Create a complete key set in ``path`` (created 0700 if absent); refuse to overwrite.

    ``watermark``: True makes a new watermark key, a ``WatermarkKey`` stores that one (rotation
    keeps the secret), False or None makes a set without one. The index ``keyset.json`` is
    written last, so a directory without it is not a key set. If anything fails, the files
    written so far are removed again.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise KeyFileError(f"{path} exists and is not a directory: choose a new key directory")
    taken = [n for n in (KEYSET_FILE, *PRIVATE_FILES, *PUBLIC_FILES, WATERMARK_KEY) if (path / n).exists()]
    if taken:
        raise KeyFileError(
            f"{path} already holds key files ({', '.join(taken)}); refusing to overwrite them. "
            "Use a new directory, or 'KeyRing.rotate' to add a key set to a ring"
        )
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFileError(f"cannot create key directory {path}: {exc.strerror}") from None

    seal_key = ed25519.Ed25519PrivateKey.generate()
    enc_key = x25519.X25519PrivateKey.generate()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    seal_id = key_id_of(seal_key.public_key())
    enc_id = key_id_of(enc_key.public_key())
    rsa_id = key_id_of(rsa_key.public_key())
    cert = _self_signed_certificate(rsa_key, rsa_id, common_name)
    created = _utc_now()
    index = {
        "kind": KEYSET_KIND,
        "version": KEYSET_VERSION,
        "created": created,
        "keys": {
            "seal": {"algorithm": "Ed25519", "key_id": seal_id},
            "encryption": {"algorithm": "X25519", "key_id": enc_id},
            "dicom_signature": {
                "algorithm": f"RSA-{RSA_BITS}",
                "key_id": rsa_id,
                "certificate_sha256": cert.fingerprint(hashes.SHA256()).hex(),
            },
        },
    }
    files = [
        (SEAL_PRIVATE, _private_pem(seal_key), 0o600),
        (SEAL_PUBLIC, _public_pem(seal_key.public_key()), 0o644),
        (ENC_PRIVATE, _private_pem(enc_key), 0o600),
        (ENC_PUBLIC, _public_pem(enc_key.public_key()), 0o644),
        (RSA_PRIVATE, _private_pem(rsa_key), 0o600),
        (RSA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644),
        (KEYSET_FILE, (json.dumps(index, indent=2) + "\n").encode("ascii"), 0o644),
    ]
    written: list[Path] = []
    try:
        for name, content, mode in files:
            target = path / name
            try:
                _write_exclusive(target, content, mode)
            except FileExistsError:
                raise KeyFileError(
                    f"{target} appeared while the key set was written; refusing to overwrite it"
                ) from None
            except OSError as exc:
                raise KeyFileError(f"cannot write key file {target}: {exc.strerror}") from None
            written.append(target)
            if name == RSA_CERT and watermark:
                # before the index: a set whose index exists is complete
                wm = WatermarkKey.from_secret(secrets.token_bytes(KEY_BYTES)) if watermark is True else watermark
                store_key(path / WATERMARK_KEY, wm)
                written.append(path / WATERMARK_KEY)
    except BaseException:
        for target in written:
            target.unlink(missing_ok=True)
        raise
    logger.info(
        "created key set in %s (seal %s, encryption %s, dicom %s)", path, seal_id, enc_id, rsa_id
    )
    return load_key_dir(path)


# --------------------------------------------------------------------------------------------
# loading


def _load_index(path: Path) -> dict:
    raw = _read_file(path / KEYSET_FILE, private=False)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"{path / KEYSET_FILE} is not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("kind") != KEYSET_KIND:
        raise KeyFileError(
            f"{path / KEYSET_FILE} is not a medsec-edge key set index (wrong 'kind')"
        )
    version = doc.get("version")
    if version != KEYSET_VERSION or isinstance(version, bool):
        raise KeyFileError(
            f"{path / KEYSET_FILE} has format version {version!r}, this medsec-edge reads "
            f"version {KEYSET_VERSION}: upgrade medsec-edge"
        )
    keys = doc.get("keys")
    try:
        ids = {
            part: str(keys[part]["key_id"]) for part in ("seal", "encryption", "dicom_signature")
        }
    except (KeyError, TypeError):
        raise KeyFileError(
            f"{path / KEYSET_FILE} lacks the key ids of seal, encryption, dicom_signature"
        ) from None
    return {"created": str(doc.get("created", "")), "ids": ids}


def _parse_public(path: Path, kind) -> object:
    try:
        key = serialization.load_pem_public_key(_read_file(path, private=False))
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not a PEM public key") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected {kind.__name__}")
    return key


def _parse_private(path: Path, kind) -> object:
    try:
        key = serialization.load_pem_private_key(_read_file(path, private=True), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # TypeError: an encrypted PEM; the message never quotes the file.
        raise KeyFileError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, kind):
        raise KeyFileError(f"{path} holds a {type(key).__name__}, expected {kind.__name__}")
    return key


def _check_id(path: Path, what: str, expected: str, public_key) -> None:
    actual = key_id_of(public_key)
    if actual != expected:
        raise KeyFileError(
            f"{path}: {what} key has id {actual}, the index says {expected}: the key set was "
            "mixed up; restore it from a backup or create a new one"
        )


def load_key_dir(path: str | Path, *, private: bool = True) -> KeySet:
    """Load a key set; private keys too when ``private`` and their files exist.

    A private file that exists must be owner-only (else ``KeyFileError``); every key must have the
    id the index names, and a private key must match its public key.
    """
    path = Path(path).expanduser()
    if not (path / KEYSET_FILE).is_file():
        raise KeyFileError(
            f"{path} is not a key set (no {KEYSET_FILE}): create one with 'medsec-edge keys new'"
        )
    index = _load_index(path)
    ids = index["ids"]
    seal_pub = _parse_public(path / SEAL_PUBLIC, ed25519.Ed25519PublicKey)
    enc_pub = _parse_public(path / ENC_PUBLIC, x25519.X25519PublicKey)
    try:
        cert = x509.load_pem_x509_certificate(_read_file(path / RSA_CERT, private=False))
    except ValueError:
        raise KeyFileError(f"{path / RSA_CERT} is not a PEM X.509 certificate") from None
    cert_pub = cert.public_key()
    if not isinstance(cert_pub, rsa.RSAPublicKey):
        raise KeyFileError(f"{path / RSA_CERT} does not certify an RSA key")
    _check_id(path / SEAL_PUBLIC, "seal", ids["seal"], seal_pub)
    _check_id(path / ENC_PUBLIC, "encryption", ids["encryption"], enc_pub)
    _check_id(path / RSA_CERT, "DICOM signature", ids["dicom_signature"], cert_pub)

    seal_signer = decryption = dicom_signer = watermark = None
    if private:
        if (path / SEAL_PRIVATE).exists():
            key = _parse_private(path / SEAL_PRIVATE, ed25519.Ed25519PrivateKey)
            _check_id(path / SEAL_PRIVATE, "seal", ids["seal"], key.public_key())
            seal_signer = SealSigner(ids["seal"], key)
        if (path / ENC_PRIVATE).exists():
            key = _parse_private(path / ENC_PRIVATE, x25519.X25519PrivateKey)
            _check_id(path / ENC_PRIVATE, "encryption", ids["encryption"], key.public_key())
            decryption = DecryptionKey(ids["encryption"], key)
        if (path / RSA_PRIVATE).exists():
            key = _parse_private(path / RSA_PRIVATE, rsa.RSAPrivateKey)
            _check_id(
                path / RSA_PRIVATE, "DICOM signature", ids["dicom_signature"], key.public_key()
            )
            dicom_signer = DicomSigningKey(ids["dicom_signature"], key, cert)
        if os.path.lexists(path / WATERMARK_KEY):
            watermark = load_key(path / WATERMARK_KEY)  # refuses a loose or malformed file
    return KeySet(
        path=path,
        created=index["created"],
        seal=SealVerifier(ids["seal"], seal_pub),
        recipient=RecipientKey(ids["encryption"], enc_pub),
        certificate=cert,
        seal_signer=seal_signer,
        decryption=decryption,
        dicom_signer=dicom_signer,
        watermark=watermark,
    )


def add_watermark_key(path: str | Path, key: WatermarkKey) -> KeySet:
    """Store ``key`` in the key set at ``path`` that has none (migration); refuse to replace one."""
    path = Path(path).expanduser()
    load_key_dir(path, private=False)  # only into a sound key set
    store_key(path / WATERMARK_KEY, key)
    return load_key_dir(path)


def export_public(path: str | Path, out: str | Path) -> Path:
    """Copy a key set's index and public files (never a private one) into a new folder ``out``."""
    src, out = Path(path).expanduser(), Path(out).expanduser()
    load_key_dir(src, private=False)  # refuse to export something that is not a sound key set
    try:
        out.mkdir(mode=0o755, parents=True, exist_ok=False)
    except FileExistsError:
        raise KeyFileError(f"{out} exists: export public keys into a new directory") from None
    for name in (*PUBLIC_FILES, KEYSET_FILE):
        _write_exclusive(out / name, _read_file(src / name, private=False), 0o644)
    return out


# --------------------------------------------------------------------------------------------
# rotation


@dataclass(frozen=True)
class KeyRing:
    """Several key sets: all verify and decrypt; the newest signs and is the recipient."""

    sets: tuple[KeySet, ...]

    @classmethod
    def load(cls, path: str | Path, *, private: bool = True) -> KeyRing:
        """A ring directory (key sets in subdirectories) or a single key set directory."""
        path = Path(path).expanduser()
        if (path / KEYSET_FILE).is_file():
            return cls((load_key_dir(path, private=private),))
        if not path.is_dir():
            raise KeyFileError(f"no key ring at {path}: create one with 'medsec-edge keys new'")
        sets = [
            load_key_dir(child, private=private)
            for child in sorted(path.iterdir())
            if child.is_dir() and (child / KEYSET_FILE).is_file()
        ]
        if not sets:
            raise KeyFileError(
                f"key ring {path} holds no key set: create one with 'medsec-edge keys new'"
            )
        return cls(tuple(sorted(sets, key=lambda s: (s.created, s.path.name))))

    @staticmethod
    def rotate(path: str | Path, *, common_name: str | None = None) -> KeySet:
        """Add a new key set to the ring at ``path``; it becomes the signer on the next load.

        The watermark key is carried over unchanged: a new secret would make every mark already
        made read as another image's. A ring without one gets none (the device's first use
        imports or makes it: ``device_keys``), never a fresh one that would orphan old marks.
        """
        path = Path(path).expanduser()
        if (path / KEYSET_FILE).is_file():
            raise KeyFileError(
                f"{path} is a single key set, not a ring: move it into a subdirectory of a ring"
            )
        watermark: WatermarkKey | bool = True
        if path.is_dir() and any((c / KEYSET_FILE).is_file() for c in path.iterdir() if c.is_dir()):
            watermark = KeyRing.load(path).watermark or False
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        return new_key_dir(path / f"{stamp}-{secrets.token_hex(2)}", common_name=common_name,
                           watermark=watermark)

    @property
    def newest(self) -> KeySet:
        return self.sets[-1]

    @property
    def signer(self) -> SealSigner | None:
        """The newest set's seal key; None if that set has no private key (older keys retire)."""
        return self.newest.seal_signer

    @property
    def dicom_signer(self) -> DicomSigningKey | None:
        return self.newest.dicom_signer

    @property
    def recipient(self) -> RecipientKey:
        return self.newest.recipient

    @property
    def watermark(self) -> WatermarkKey | None:
        """The newest set's watermark key; None for a public export or a set from before it."""
        return self.newest.watermark

    @property
    def verifiers(self) -> dict[str, SealVerifier]:
        return {s.seal.key_id: s.seal for s in self.sets}

    @property
    def decryption_keys(self) -> dict[str, DecryptionKey]:
        return {s.decryption.key_id: s.decryption for s in self.sets if s.decryption is not None}

    @property
    def certificates(self) -> list[x509.Certificate]:
        """Every set's DICOM signature certificate: the ones a verifier pins as trusted."""
        return [s.certificate for s in self.sets]
