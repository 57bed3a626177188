"""Encryption of images at rest and in transit: AES-256-GCM under per-study data keys.

Layer: runtime (numpy, pydicom, cryptography). An image leaving the device may have to cross
storage or networks its owner does not control; encryption keeps its pixels and identity
confidential, and authenticated encryption makes any change, a wrong key, or an encrypted image
moved under another header fail loudly (``DecryptionError``) instead of decrypting to garbage.

Data (``encrypt_bytes``, ``encrypt_frames``): AES-256-GCM (cryptography's ``AESGCM``) with a fresh
random 96-bit nonce per message. A blob is::

    b"MSEE" | version (1 byte) | data key id (16 bytes) | meta length (2 bytes, big endian)
    | meta (JSON: kind, and for frames index, count, dtype, shape) | nonce (12) | ciphertext+tag

A blob always has even length (the meta JSON gains a trailing space when needed), so it fits a
DICOM OB value without a pad byte. The associated data is everything before the nonce plus the
``Binding``: Study, Series and SOP Instance UIDs and a digest of the clear header, so a blob
opens only under the image it was made for, frames only in their place (index and count are
authenticated). With random nonces one data key may encrypt up to 2**32 messages (NIST SP
800-38D); a study is far below that.

Keys (``wrap_data_key``): each study gets a fresh 256-bit data key with a random 16-byte id. It
is wrapped for a recipient's X25519 public key (``crypto_keys``): an ephemeral X25519 key pair,
HKDF-SHA256 of the shared secret (salt: both public keys; info: a domain tag and the data key
id) gives a one-time 256-bit key-encryption key, and AES-256-GCM encrypts the data key under it
with the recipient's and data key's ids as associated data (an ECIES / HPKE-base-mode style
scheme; AES-GCM rather than RFC 3394 key wrap so that one primitive serves both layers).

DICOM (``encrypt_dataset``, ``encrypt_file``): the whole original file is encrypted into our
private block (element 0x20; the wrapped key, as JSON, in 0x21), and the clear header stays
readable for routing: UIDs, modality and image geometry remain, while person names, dates and
times (at every level), patient and accession ids, addresses and other identifying attributes
are blanked, private elements, overlays, icons and signatures dropped, and there is no Pixel
Data. This is not the full PS3.15 Annex E de-identification profile (UIDs are kept on purpose:
they route the file and bind the blob). ``decrypt_file`` restores the original byte for byte.
Nothing is written unless decryption succeeded; errors name key ids and short image hashes only.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import io
import json
import logging
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from medsec_edge.runtime.crypto.keyset import DecryptionKey, RecipientKey, key_id_of
from medsec_edge.runtime.io.dicom_writer import ENCRYPTED_ELEMENT, PRIVATE_CREATOR, PRIVATE_GROUP, WRAPPED_KEY_ELEMENT
from medsec_edge.runtime.errors import DecryptionError, InputError, UsageError
from medsec_edge.runtime.io.atomic import write_bytes_atomic
from medsec_edge.runtime.crypto.seal import attribute_digest

__all__ = [
    "Binding",
    "DataKey",
    "StudyKeys",
    "WrappedKey",
    "decrypt_bytes",
    "decrypt_dataset",
    "decrypt_file",
    "decrypt_frames",
    "deidentified_header",
    "encrypt_bytes",
    "encrypt_dataset",
    "encrypt_file",
    "encrypt_frames",
    "header_digest",
    "unwrap_data_key",
    "wrap_data_key",
]

logger = logging.getLogger(__name__)

DATA_KEY_BYTES = 32
DATA_KEY_ID_BYTES = 16
NONCE_BYTES = 12
BLOB_MAGIC = b"MSEE"
BLOB_VERSION = 1
WRAP_SCHEME = "X25519-HKDF-SHA256-A256GCM"
WRAP_VERSION = 1
_WRAP_INFO = b"medsec-edge key wrap v1"
_BINDING_DOMAIN = b"medsec-edge binding v1"
_MAX_MESSAGE = 2**31 - 1  # one-shot AEAD limit of the library
HEADER_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "PatientIdentityRemoved",
)
# Blanked (kept, empty) in the clear header, at every level, besides every PN, DA, DT, TM.
_BLANKED = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientAge",
        "PatientSex",
        "PatientSize",
        "PatientWeight",
        "PatientComments",
        "AdditionalPatientHistory",
        "MedicalRecordLocator",
        "AccessionNumber",
        "StudyID",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "RequestAttributesSequence",
        "EthnicGroup",
        "Occupation",
        "MilitaryRank",
        "BranchOfService",
        "RegionOfResidence",
        "CountryOfResidence",
        "StudyDescription",
        "SeriesDescription",
        "ImageComments",
        "RequestingService",
        "PerformedProcedureStepID",
        "ScheduledProcedureStepID",
        "ReasonForStudy",
    }
)
_REMOVED = frozenset(
    {
        "OtherPatientIDsSequence",
        "IconImageSequence",
        "ReferencedPatientSequence",
        "DigitalSignaturesSequence",
        "MACParametersSequence",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "ExtendedOffsetTable",
        "ExtendedOffsetTableLengths",
    }
)


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _short_id(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else "(no SOP Instance UID)"


# --------------------------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class DataKey:
    """A 256-bit AES key and its random public 16-byte id; ``repr`` shows the id only."""

    key_id: bytes
    secret: bytes = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.key_id) != DATA_KEY_ID_BYTES or len(self.secret) != DATA_KEY_BYTES:
            raise UsageError(
                f"a data key is {DATA_KEY_BYTES} bytes with a {DATA_KEY_ID_BYTES}-byte id"
            )

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_bytes(DATA_KEY_ID_BYTES), AESGCM.generate_key(bit_length=256))

    @property
    def id_hex(self) -> str:
        return self.key_id.hex()


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted for one recipient's X25519 key (see module docstring)."""

    recipient_key_id: str
    data_key_id: bytes
    ephemeral_public: bytes
    nonce: bytes
    ciphertext: bytes

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": WRAP_VERSION,
                "scheme": WRAP_SCHEME,
                "recipient_key_id": self.recipient_key_id,
                "data_key_id": self.data_key_id.hex(),
                "ephemeral_public": base64.b64encode(self.ephemeral_public).decode(),
                "nonce": base64.b64encode(self.nonce).decode(),
                "ciphertext": base64.b64encode(self.ciphertext).decode(),
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> WrappedKey:
        try:
            doc = json.loads(text)
            if doc.get("scheme") != WRAP_SCHEME or doc.get("version") != WRAP_VERSION:
                raise DecryptionError(
                    f"wrapped key uses scheme {doc.get('scheme')!r} version "
                    f"{doc.get('version')!r}, this medsec-edge reads {WRAP_SCHEME} version "
                    f"{WRAP_VERSION}"
                )
            return cls(
                recipient_key_id=str(doc["recipient_key_id"]),
                data_key_id=bytes.fromhex(doc["data_key_id"]),
                ephemeral_public=base64.b64decode(doc["ephemeral_public"], validate=True),
                nonce=base64.b64decode(doc["nonce"], validate=True),
                ciphertext=base64.b64decode(doc["ciphertext"], validate=True),
            )
        except DecryptionError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, binascii.Error):
            raise DecryptionError(
                "the wrapped data key is malformed: the file was damaged"
            ) from None


def _kek(
    shared: bytes, ephemeral_public: bytes, recipient_public: bytes, data_key_id: bytes
) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=ephemeral_public + recipient_public,
        info=_WRAP_INFO + data_key_id,
    ).derive(shared)


def _raw(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _wrap_aad(recipient_key_id: str, data_key_id: bytes) -> bytes:
    return _lp(_WRAP_INFO) + _lp(recipient_key_id.encode("ascii")) + _lp(data_key_id)


def wrap_data_key(key: DataKey, recipient: RecipientKey) -> WrappedKey:
    """Encrypt ``key`` so that only ``recipient``'s private key can recover it."""
    ephemeral = x25519.X25519PrivateKey.generate()
    eph_raw = _raw(ephemeral.public_key())
    recipient_raw = _raw(recipient.public_key)
    kek = _kek(ephemeral.exchange(recipient.public_key), eph_raw, recipient_raw, key.key_id)
    nonce = secrets.token_bytes(NONCE_BYTES)
    ciphertext = AESGCM(kek).encrypt(nonce, key.secret, _wrap_aad(recipient.key_id, key.key_id))
    return WrappedKey(recipient.key_id, key.key_id, eph_raw, nonce, ciphertext)


def _pick_decryption_key(wrapped: WrappedKey, keys) -> DecryptionKey:
    if isinstance(keys, DecryptionKey):
        by_id = {keys.key_id: keys}
    elif isinstance(keys, Mapping):
        by_id = dict(keys)
    elif hasattr(keys, "decryption_keys"):  # a KeyRing
        by_id = dict(keys.decryption_keys)
    else:
        by_id = {k.key_id: k for k in keys}
    key = by_id.get(wrapped.recipient_key_id)
    if key is None:
        held = ", ".join(sorted(by_id)) or "none"
        raise DecryptionError(
            f"the data key was wrapped for key {wrapped.recipient_key_id}; the keys held here are "
            f"{held}: decrypt with the recipient's key ring"
        )
    return key


def unwrap_data_key(wrapped: WrappedKey, keys) -> DataKey:
    """Recover a data key with the matching ``DecryptionKey`` (one, a mapping, or a KeyRing)."""
    key = _pick_decryption_key(wrapped, keys)
    try:
        ephemeral = x25519.X25519PublicKey.from_public_bytes(wrapped.ephemeral_public)
        recipient_raw = _raw(key.private_key.public_key())
        if key_id_of(key.private_key.public_key()) != wrapped.recipient_key_id:
            raise InvalidTag
        kek = _kek(
            key.private_key.exchange(ephemeral),
            wrapped.ephemeral_public,
            recipient_raw,
            wrapped.data_key_id,
        )
        secret = AESGCM(kek).decrypt(
            wrapped.nonce,
            wrapped.ciphertext,
            _wrap_aad(wrapped.recipient_key_id, wrapped.data_key_id),
        )
        return DataKey(wrapped.data_key_id, secret)
    except (InvalidTag, ValueError, UsageError):
        raise DecryptionError(
            f"cannot unwrap data key {wrapped.data_key_id.hex()} with key {key.key_id}: wrong key "
            "or the wrapped key was altered"
        ) from None


class StudyKeys:
    """One fresh data key per Study Instance UID, wrapped once for ``recipient``."""

    def __init__(self, recipient: RecipientKey) -> None:
        self.recipient = recipient
        self._keys: dict[str, tuple[DataKey, WrappedKey]] = {}

    def for_study(self, study_uid: str) -> tuple[DataKey, WrappedKey]:
        if study_uid not in self._keys:
            key = DataKey.generate()
            self._keys[study_uid] = (key, wrap_data_key(key, self.recipient))
        return self._keys[study_uid]


# --------------------------------------------------------------------------------------------
# messages


def header_digest(ds: Dataset) -> bytes:
    """SHA-256 over the clear header's identity and geometry (``HEADER_ATTRIBUTES``)."""
    h = hashlib.sha256(_lp(_BINDING_DOMAIN + b"/header"))
    for keyword in HEADER_ATTRIBUTES:
        h.update(_lp(keyword.encode("ascii")) + _lp(attribute_digest(ds, keyword)))
    return h.digest()


@dataclass(frozen=True)
class Binding:
    """What a blob is bound to (authenticated, not encrypted): the image's UIDs and header."""

    study_uid: str
    series_uid: str
    sop_uid: str
    header_digest: bytes = b""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> Binding:
        uids = [str(ds.get(k, "") or "") for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")]
        if not all(uid.isascii() for uid in uids):
            raise InputError("a Study, Series or SOP Instance UID holds non-ASCII bytes: not a valid DICOM UID")
        return cls(*uids, header_digest(ds))

    def encode(self) -> bytes:
        return (
            _lp(_BINDING_DOMAIN)
            + _lp(self.study_uid.encode("ascii", "surrogateescape"))
            + _lp(self.series_uid.encode("ascii", "surrogateescape"))
            + _lp(self.sop_uid.encode("ascii", "surrogateescape"))
            + _lp(self.header_digest)
        )


def encrypt_bytes(
    key: DataKey, plaintext: bytes, binding: Binding, *, meta: dict | None = None
) -> bytes:
    """One AES-256-GCM blob (format in the module docstring) of ``plaintext``."""
    if len(plaintext) > _MAX_MESSAGE:
        raise UsageError("a message over 2 GiB cannot be encrypted in one piece: encrypt frames")
    meta_bytes = json.dumps(
        meta or {"kind": "bytes"}, sort_keys=True, separators=(",", ":")
    ).encode()
    fixed = len(BLOB_MAGIC) + 1 + DATA_KEY_ID_BYTES + 2
    if (fixed + len(meta_bytes) + NONCE_BYTES + len(plaintext) + 16) % 2:
        meta_bytes += b" "  # even length: a DICOM OB value would otherwise gain a pad byte
    header = BLOB_MAGIC + bytes([BLOB_VERSION]) + key.key_id + struct.pack(">H", len(meta_bytes))
    header += meta_bytes
    nonce = secrets.token_bytes(NONCE_BYTES)
    return header + nonce + AESGCM(key.secret).encrypt(nonce, plaintext, header + binding.encode())


def _open(key: DataKey, blob: bytes, binding: Binding) -> tuple[dict, bytes]:
    fixed = len(BLOB_MAGIC) + 1 + DATA_KEY_ID_BYTES + 2
    if len(blob) < fixed + NONCE_BYTES + 16 or blob[:4] != BLOB_MAGIC:
        raise DecryptionError("not a medsec-edge encrypted blob (bad magic or truncated)")
    if blob[4] != BLOB_VERSION:
        raise DecryptionError(f"encrypted blob version {blob[4]} is not supported ({BLOB_VERSION})")
    key_id = blob[5 : 5 + DATA_KEY_ID_BYTES]
    if key_id != key.key_id:
        raise DecryptionError(
            f"blob was encrypted with data key {key_id.hex()}, not {key.key_id.hex()}: use the "
            "study's data key"
        )
    (meta_len,) = struct.unpack(">H", blob[fixed - 2 : fixed])
    header = blob[: fixed + meta_len]
    nonce = blob[fixed + meta_len : fixed + meta_len + NONCE_BYTES]
    if len(nonce) != NONCE_BYTES:
        raise DecryptionError("encrypted blob is truncated")
    try:
        plaintext = AESGCM(key.secret).decrypt(
            nonce, blob[fixed + meta_len + NONCE_BYTES :], header + binding.encode()
        )
        meta = json.loads(header[fixed:])
    except InvalidTag:
        raise DecryptionError(
            f"decryption failed for image {_short_id(binding.sop_uid)} with data key "
            f"{key.key_id.hex()}: the data, its UIDs or its header changed, or the key is wrong"
        ) from None
    return meta, plaintext


def decrypt_bytes(key: DataKey, blob: bytes, binding: Binding) -> bytes:
    """The plaintext of ``blob``; ``DecryptionError`` on any change, wrong key or binding."""
    return _open(key, blob, binding)[1]


def encrypt_frames(key: DataKey, frames: np.ndarray, binding: Binding) -> list[bytes]:
    """One blob per frame of ``frames`` (frames first: pass ``pixels[None]`` for one frame)."""
    frames = np.asarray(frames)
    if frames.ndim < 3:
        raise UsageError(f"frames must be frames-first (F, H, W[, 3]); got shape {frames.shape}")
    dtype = frames.dtype.newbyteorder("<") if frames.dtype.byteorder == ">" else frames.dtype
    count = int(frames.shape[0])
    blobs = []
    for index in range(count):
        frame = np.ascontiguousarray(frames[index], dtype=dtype)
        meta = {
            "kind": "frame",
            "index": index,
            "count": count,
            "dtype": frame.dtype.str,
            "shape": list(frame.shape),
        }
        blobs.append(encrypt_bytes(key, frame.tobytes(), binding, meta=meta))
    return blobs


def decrypt_frames(key: DataKey, blobs: list[bytes], binding: Binding) -> np.ndarray:
    """Frames-first array back from ``encrypt_frames``' blobs, refusing missing or moved frames."""
    frames = []
    first = None
    for position, blob in enumerate(blobs):
        meta, plaintext = _open(key, blob, binding)
        if (
            meta.get("kind") != "frame"
            or meta.get("index") != position
            or meta.get("count") != len(blobs)
        ):
            raise DecryptionError(
                f"frame blob at position {position} is frame {meta.get('index')} of "
                f"{meta.get('count')}: frames were dropped, added or reordered"
            )
        if first is None:
            first = meta
        elif (meta["dtype"], meta["shape"]) != (first["dtype"], first["shape"]):
            raise DecryptionError("frame blobs disagree on dtype or shape")
        frames.append(
            np.frombuffer(plaintext, dtype=np.dtype(meta["dtype"])).reshape(meta["shape"])
        )
    if not frames:
        raise DecryptionError("no frame blobs to decrypt")
    return np.stack(frames)


# --------------------------------------------------------------------------------------------
# DICOM


def _drop(elem) -> bool:
    return (
        elem.tag.group < 0x0008
        or elem.tag.is_private
        or elem.keyword in _REMOVED
        or (elem.tag.group & 0xFF00) == 0x6000  # overlays and curves can carry burned-in text
    )


def _blank(ds: Dataset) -> None:
    for elem in list(ds):
        if _drop(elem):
            del ds[elem.tag]
        elif elem.VR == "SQ" and elem.keyword not in _BLANKED:
            for item in elem.value:
                _blank(item)
        elif elem.VR in ("PN", "DA", "DT", "TM") or elem.keyword in _BLANKED:
            elem.value = [] if elem.VR == "SQ" else None


def deidentified_header(ds: Dataset) -> Dataset:
    """The clear header kept beside the encrypted original (see module docstring)."""
    clear = Dataset()
    for elem in ds:
        if not _drop(elem):
            clear.add(copy.deepcopy(elem))
    _blank(clear)
    clear.PatientIdentityRemoved = "YES"
    clear.DeidentificationMethod = (
        "medsec-edge: identifiers blanked, original encrypted"  # LO: at most 64 characters
    )
    clear.file_meta = FileMetaDataset()
    clear.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta = getattr(ds, "file_meta", None)
    sop_class = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    if sop_class:
        clear.file_meta.MediaStorageSOPClassUID = sop_class
    if ds.get("SOPInstanceUID"):
        clear.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return clear


def _dataset_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _encrypt_original(original: bytes, ds: Dataset, key: DataKey, wrapped: WrappedKey) -> Dataset:
    if wrapped.data_key_id != key.key_id:
        raise UsageError("the wrapped key is not this data key: wrap the study's data key")
    clear = deidentified_header(ds)
    blob = encrypt_bytes(key, original, Binding.from_dataset(clear), meta={"kind": "dicom-file"})
    block = clear.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(ENCRYPTED_ELEMENT, "OB", blob)
    block.add_new(WRAPPED_KEY_ELEMENT, "UT", wrapped.to_json())
    return clear


def encrypt_dataset(ds: Dataset, key: DataKey, wrapped: WrappedKey) -> Dataset:
    """A de-identified clear dataset carrying ``ds`` (as a DICOM file) encrypted under ``key``."""
    return _encrypt_original(_dataset_bytes(ds), ds, key, wrapped)


def _decrypt_original(clear: Dataset, keys) -> bytes:
    try:
        block = clear.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        block = None
    if block is None or ENCRYPTED_ELEMENT not in block or WRAPPED_KEY_ELEMENT not in block:
        raise InputError(
            f"image {_short_id(str(clear.get('SOPInstanceUID', '')))} is not a medsec-edge "
            "encrypted DICOM file (no encrypted block)"
        )
    wrapped_text = block[WRAPPED_KEY_ELEMENT].value
    if isinstance(wrapped_text, bytes):
        wrapped_text = wrapped_text.decode("utf-8", "replace")
    wrapped = WrappedKey.from_json(str(wrapped_text).rstrip("\x00 "))
    data_key = keys if isinstance(keys, DataKey) else unwrap_data_key(wrapped, keys)
    blob = bytes(block[ENCRYPTED_ELEMENT].value)
    return decrypt_bytes(data_key, blob, Binding.from_dataset(clear))


def decrypt_dataset(clear: Dataset, keys) -> Dataset:
    """The original dataset of an encrypted one (``keys``: DecryptionKey(s), KeyRing, DataKey)."""
    original = _decrypt_original(clear, keys)
    return pydicom.dcmread(io.BytesIO(original))


def encrypt_file(src: str | Path, dst: str | Path, study_keys: StudyKeys) -> Path:
    """Encrypt the DICOM file ``src`` (its exact bytes) into a clear-header DICOM file ``dst``."""
    src, dst = Path(src), Path(dst)
    try:
        original = src.read_bytes()
        ds = pydicom.dcmread(io.BytesIO(original), stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{src.name}: not a readable DICOM file ({type(exc).__name__})") from None
    key, wrapped = study_keys.for_study(str(ds.get("StudyInstanceUID", "") or ""))
    clear = _encrypt_original(original, ds, key, wrapped)
    write_bytes_atomic(dst, _dataset_bytes(clear), src)
    logger.debug(
        "encrypted image %s with data key %s",
        _short_id(str(ds.get("SOPInstanceUID", ""))),
        key.id_hex,
    )
    return dst


def decrypt_file(src: str | Path, dst: str | Path, keys) -> Path:
    """Write the original file back from an encrypted one; nothing is written on failure."""
    src, dst = Path(src), Path(dst)
    try:
        clear = pydicom.dcmread(src)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{src.name}: not a readable DICOM file ({type(exc).__name__})") from None
    original = _decrypt_original(clear, keys)
    return write_bytes_atomic(dst, original, src)
