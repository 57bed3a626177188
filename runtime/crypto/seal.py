"""The seal: an Ed25519 signature over an image's pixels and identity, kept in the file itself.

Layer: runtime (numpy, pydicom, cryptography). The watermark survives processing; the seal is its
complement: it breaks on any change to the decoded pixels or to the attributes that say whose
image it is and how to read its pixels, and it says which of them changed. It lives in our
private block (``dicom_out``: group 0x0011, creator "MEDSEC_EDGE 1", element 0x10), so a file
keeps it through any DICOM tool that keeps private elements.

Digest (version 2; version 1 seals still verify with their own part list). Every part is hashed on its own with SHA-256 over a length-prefixed encoding
(8-byte big endian length before every field), so no two different inputs encode alike:

- ``pixels``: the decoded pixel array (pydicom's ``pixel_array``: native dtype, frames first,
  masked to BitsStored) in little endian C order, preceded by its dtype string and shape. A file
  re-encoded losslessly keeps its seal; a changed pixel value does not.
- one part per attribute of ``SEALED_ATTRIBUTES``, tagged by keyword. A missing attribute is
  encoded as an explicit marker, different from a present but empty one. Values are canonical
  (numbers as numbers, strings without DICOM padding), so rewriting a file does not break it.
  Version 2 adds the display attributes (``DISPLAY_ATTRIBUTES``: window, VOI/modality LUT,
  padding): a window added to a file that had none changes what a reader sees, and version 1
  did not look at them, so no missing-marker could catch it.
- ``frame_display`` (version 2): the per-frame and shared functional groups that say how to
  read and measure the pixels (pixel value transformation, frame VOI LUT, pixel measures).
- ``medsec_private`` (version 2): our private block (watermark record, source UID, reversible
  record), all of it but the seal itself and what ``encrypt`` adds later. The PS3.15 signature
  leaves private elements out (they turn UN in an Implicit VR copy and could never verify), so
  the seal is what vouches for them. Values are compared as read back from any transfer
  syntax: text without padding, binary padded to even length.

The canonical digest is SHA-256 over the length-prefixed list of (part name, part digest); the
signature is Ed25519 over a domain tag, the key id and that digest. The record keeps the part
digests, so ``verify_dataset`` reports which parts changed (``changed``), after checking the
signature over the recorded parts (a forged part list fails as a whole).

Verdicts are values (``SealVerdict``): ``valid``, ``invalid`` (something changed, or the record
is damaged or forged), ``unsigned`` (no seal) or ``unknown_key`` (sealed by a key we do not
hold). The record holds digests only: no patient data, no key material.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from medsec_edge.runtime.crypto.keyset import SealSigner, SealVerifier
from medsec_edge.runtime.io.dicom_writer import (
    ENCRYPTED_ELEMENT,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    RECORD_ELEMENT,
    SEAL_ELEMENT,
    SOURCE_UID_ELEMENT,
    WRAPPED_KEY_ELEMENT,
)
from medsec_edge.runtime.errors import InputError

__all__ = [
    "SEAL_VERSION",
    "SEALED_ATTRIBUTES",
    "DISPLAY_ATTRIBUTES",
    "SealVerdict",
    "attribute_digest",
    "canonical_digest",
    "part_digests",
    "read_seal",
    "seal_dataset",
    "verify_dataset",
]

logger = logging.getLogger(__name__)

SEAL_VERSION = 2
SEAL_ALGORITHM = "Ed25519"
SEALED_ATTRIBUTES = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
    "PixelSpacing",
    "AcquisitionDate",
    "AcquisitionTime",
)
DISPLAY_ATTRIBUTES = (
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
    "ModalityLUTSequence",
    "RescaleType",
    "PresentationLUTShape",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "PlanarConfiguration",
)
_FRAME_DISPLAY = ("PixelValueTransformationSequence", "FrameVOILUTSequence", "PixelMeasuresSequence")
# What ``encrypt`` adds to a sealed file (with its own authenticated encryption), and the seal.
_UNSEALED_PRIVATE = (SEAL_ELEMENT, ENCRYPTED_ELEMENT, WRAPPED_KEY_ELEMENT)
_TEXT_PRIVATE = (RECORD_ELEMENT, SOURCE_UID_ELEMENT, WRAPPED_KEY_ELEMENT)
PART_NAMES_V1 = ("pixels", *SEALED_ATTRIBUTES)
PART_NAMES = (*PART_NAMES_V1, *DISPLAY_ATTRIBUTES, "frame_display", "medsec_private")
_PART_NAMES_BY_VERSION = {1: PART_NAMES_V1, 2: PART_NAMES}
_DOMAIN = b"medsec-edge seal v1"
_MISSING = b"M"  # the attribute is absent: differs from every encoded value (which start P)


def _lp(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + data


def _canonical(value: Any) -> bytes:
    """A type-tagged, padding-free encoding of a pydicom value."""
    if isinstance(value, Dataset):  # a sequence item: its public elements, by tag
        parts = [
            _lp(int(e.tag).to_bytes(4, "big")) + _lp(_canonical(e.value))
            for e in (value[t] for t in sorted(value.keys()))
            if not e.tag.is_private
        ]
        return b"D" + len(parts).to_bytes(4, "big") + b"".join(parts)
    if value is None or (isinstance(value, (str, bytes, list, tuple, MultiValue)) and not value):
        return b"E"
    if isinstance(value, (list, tuple, MultiValue)):
        return b"L" + len(value).to_bytes(4, "big") + b"".join(_lp(_canonical(v)) for v in value)
    if isinstance(value, int):
        return b"I" + str(int(value)).encode()
    if isinstance(value, (float, Decimal)):
        return b"F" + repr(float(value)).encode()
    if isinstance(value, bytes):  # an element read as UN (implicit VR, unknown to the dictionary)
        text = value.rstrip(b"\x00 ")
        return b"S" + text if text else b"E"
    text = str(value).rstrip("\x00 ")
    return b"S" + text.encode("utf-8", "surrogateescape") if text else b"E"


def attribute_digest(ds: Dataset, keyword: str) -> bytes:
    """SHA-256 of one attribute of ``ds`` as sealed (missing: an explicit marker)."""
    h = hashlib.sha256(_lp(_DOMAIN + b"/attribute") + _lp(keyword.encode("ascii")))
    elem = ds.data_element(keyword) if keyword in ds else None
    h.update(_lp(_MISSING if elem is None else b"P" + _canonical(elem.value)))
    return h.digest()


def _frame_display_digest(ds: Dataset) -> bytes:
    """The functional groups that say how to read each frame's pixels (missing: a marker)."""
    h = hashlib.sha256(_lp(_DOMAIN + b"/frame_display"))
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(keyword)
        if items is None:
            h.update(_lp(_MISSING))
            continue
        h.update(len(items).to_bytes(8, "big"))
        for item in items:
            for sub in _FRAME_DISPLAY:
                value = item.get(sub)
                h.update(_lp(_MISSING if value is None else b"P" + _canonical(value)))
    return h.digest()


def _private_value(offset: int, value: Any) -> bytes:
    if isinstance(value, bytes) and offset not in _TEXT_PRIVATE:
        return b"B" + value + (b"\x00" if len(value) % 2 else b"")  # OB pads to even length
    if isinstance(value, bytes):  # text read from an Implicit VR copy as UN
        value = value.decode("utf-8", errors="surrogateescape")
    return _canonical(value)


def _private_digest(ds: Dataset) -> bytes:
    """Our private block but the seal (and what ``encrypt`` adds later), element by element."""
    h = hashlib.sha256(_lp(_DOMAIN + b"/medsec_private"))
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:  # as a block holding only the seal: sealing creates the block
        return h.digest()
    for offset in range(0x100):
        if offset in _UNSEALED_PRIVATE or offset not in block:
            continue
        h.update(_lp(offset.to_bytes(1, "big")) + _lp(_private_value(offset, block[offset].value)))
    return h.digest()


def native_pixels(ds: Dataset) -> np.ndarray | None:
    """The values ``ds.pixel_array`` gives, read straight from an uncompressed little-endian grey
    buffer (unused high bits masked, signed values sign-extended from BitsStored, as pydicom
    does); None for anything else, which pydicom then decodes. Skipping pydicom's decoder
    machinery halves the cost of sealing and verifying a 512x512 image."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None or uid.is_compressed or not uid.is_little_endian or "PixelData" not in ds:
        return None
    try:
        samples, allocated = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
        stored, signed = int(ds.BitsStored), bool(int(ds.get("PixelRepresentation", 0)))
        rows, cols, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or allocated not in (8, 16, 32) or not 1 <= stored <= allocated:
        return None
    unsigned = np.dtype(f"<u{allocated // 8}")
    count = rows * cols * frames
    buffer = ds.PixelData
    if count <= 0 or len(buffer) < count * unsigned.itemsize:
        return None
    arr = np.frombuffer(buffer, unsigned, count=count)
    if stored < allocated:
        arr = arr & unsigned.type((1 << stored) - 1)
        if signed:
            sign = 1 << (stored - 1)
            arr = ((arr.astype(np.int64) ^ sign) - sign).astype(f"<i{allocated // 8}")
    elif signed:
        arr = arr.view(f"<i{allocated // 8}")
    return arr.reshape((frames, rows, cols) if frames > 1 else (rows, cols))


def _pixel_digest(ds: Dataset) -> bytes:
    h = hashlib.sha256(_lp(_DOMAIN + b"/pixels"))
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        h.update(_lp(_MISSING))
        return h.digest()
    arr = native_pixels(ds)
    if arr is None:
        try:
            arr = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - any decoder failure: we cannot seal what we cannot read
            raise _Undecodable(type(exc).__name__) from None
    arr = np.ascontiguousarray(arr, dtype=np.asarray(arr).dtype.newbyteorder("<"))
    shape = ",".join(str(n) for n in arr.shape).encode("ascii")
    h.update(_lp(b"P" + arr.dtype.str.encode("ascii")))
    h.update(_lp(shape))
    h.update(arr.nbytes.to_bytes(8, "big"))
    h.update(memoryview(arr).cast("B"))
    return h.digest()


class _Undecodable(Exception):
    """Internal: the pixel data does not decode with the dataset's attributes."""


def _decoder_missing(ds: Dataset) -> bool:
    """True if the pixels are compressed with a codec no installed plugin decodes."""
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid or not uid.is_compressed:
        return False
    try:
        from pydicom.pixels import get_decoder

        return not get_decoder(uid).is_available
    except (NotImplementedError, ValueError):
        return True


def _short_id(ds: Dataset) -> str:
    """PHI-free id for messages: hash of the SOP Instance UID."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else "(no SOP Instance UID)"


def part_digests(
    ds: Dataset, *, undecodable_ok: bool = False, version: int = SEAL_VERSION
) -> dict[str, bytes]:
    """SHA-256 of each sealed part of ``ds``, in the order of ``version``'s part names.

    Pixels that do not decode raise ``InputError``; with ``undecodable_ok`` (verification of an
    uncompressed or decodable syntax) their digest is empty instead, which matches no seal.
    """
    try:
        pixels = _pixel_digest(ds)
    except _Undecodable as exc:
        if not undecodable_ok or _decoder_missing(ds):
            raise InputError(
                f"image {_short_id(ds)}: cannot decode pixel data to seal or verify it ({exc}); "
                "if it is compressed, install the decoder for its transfer syntax "
                "(pylibjpeg plugins)"
            ) from None
        pixels = b""
    parts = {"pixels": pixels}
    for keyword in SEALED_ATTRIBUTES:
        parts[keyword] = attribute_digest(ds, keyword)
    if version >= 2:
        for keyword in DISPLAY_ATTRIBUTES:
            parts[keyword] = attribute_digest(ds, keyword)
        parts["frame_display"] = _frame_display_digest(ds)
        parts["medsec_private"] = _private_digest(ds)
    return parts


def canonical_digest(parts: Mapping[str, bytes]) -> bytes:
    """SHA-256 over the length-prefixed (name, digest) list of the parts, in their order."""
    h = hashlib.sha256(_lp(_DOMAIN + b"/canonical"))
    h.update(len(parts).to_bytes(8, "big"))
    for name, digest in parts.items():
        h.update(_lp(name.encode("ascii")) + _lp(digest))
    return h.digest()


def _signed_message(key_id: str, digest: bytes) -> bytes:
    return _lp(_DOMAIN) + _lp(key_id.encode("ascii")) + _lp(digest)


def seal_dataset(ds: Dataset, signer: SealSigner) -> Dataset:
    """Seal ``ds`` in place (replacing an earlier seal) and return it."""
    parts = part_digests(ds)
    digest = canonical_digest(parts)
    record = {
        "version": SEAL_VERSION,
        "algorithm": SEAL_ALGORITHM,
        "key_id": signer.key_id,
        "digest": digest.hex(),
        "parts": {name: value.hex() for name, value in parts.items()},
        "signature": base64.b64encode(signer.sign(_signed_message(signer.key_id, digest))).decode(),
    }
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(SEAL_ELEMENT, "UT", json.dumps(record, sort_keys=True, separators=(",", ":")))
    logger.debug("sealed image %s with key %s", _short_id(ds), signer.key_id)
    return ds


def read_seal(ds: Dataset) -> dict | None:
    """The seal record of ``ds`` as stored (unchecked), or None if it has none or it is not JSON."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return None
    if SEAL_ELEMENT not in block:
        return None
    value = block[SEAL_ELEMENT].value
    if isinstance(value, bytes):  # read from an Implicit VR file as UN
        value = value.decode("utf-8", errors="replace")
    try:
        record = json.loads(str(value).rstrip("\x00 "))
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


@dataclass(frozen=True)
class SealVerdict:
    """Outcome of ``verify_dataset``; ``changed`` names the parts that differ from the seal."""

    valid: bool
    status: str  # 'valid' | 'invalid' | 'unsigned' | 'unknown_key'
    reason: str
    changed: list[str] = field(default_factory=list)
    key_id: str = ""


def _invalid(reason: str, key_id: str = "", changed: list[str] | None = None) -> SealVerdict:
    return SealVerdict(False, "invalid", reason, list(changed or []), key_id)


def _as_verifiers(verifiers) -> dict[str, SealVerifier]:
    if isinstance(verifiers, SealVerifier):
        return {verifiers.key_id: verifiers}
    if isinstance(verifiers, Mapping):
        return dict(verifiers)
    if hasattr(verifiers, "verifiers"):  # a KeyRing
        return dict(verifiers.verifiers)
    if isinstance(verifiers, Iterable):
        return {v.key_id: v for v in verifiers}
    raise TypeError("verifiers: a KeyRing, a SealVerifier, or a mapping/iterable of SealVerifier")


def _recorded_parts(record: dict, names: tuple[str, ...]) -> dict[str, bytes] | None:
    parts = record.get("parts")
    if not isinstance(parts, dict) or set(parts) != set(names):
        return None
    try:
        decoded = {name: bytes.fromhex(parts[name]) for name in names}
    except (TypeError, ValueError):
        return None
    return decoded if all(len(v) == 32 for v in decoded.values()) else None


def verify_dataset(ds: Dataset, verifiers) -> SealVerdict:
    """Check the seal of ``ds`` against ``verifiers`` (KeyRing, SealVerifier, or id -> verifier)."""
    by_id = _as_verifiers(verifiers)
    record = read_seal(ds)
    if record is None:
        return SealVerdict(False, "unsigned", "no medsec-edge seal in this file")
    if not record:
        return _invalid("the seal record is not readable JSON: it was damaged")
    version = record.get("version")
    if version not in _PART_NAMES_BY_VERSION or isinstance(version, bool):
        return _invalid(
            f"seal format version {version!r} is not supported (this reads "
            f"{', '.join(map(str, _PART_NAMES_BY_VERSION))})"
        )
    names = _PART_NAMES_BY_VERSION[version]
    key_id = record.get("key_id")
    if not isinstance(key_id, str) or record.get("algorithm") != SEAL_ALGORITHM:
        return _invalid("the seal record lacks its key id or names another algorithm")
    verifier = by_id.get(key_id)
    if verifier is None:
        return SealVerdict(
            False,
            "unknown_key",
            f"sealed with key {key_id}, which is not among the {len(by_id)} trusted key(s): "
            "add its public key to the key ring",
            [],
            key_id,
        )
    recorded = _recorded_parts(record, names)
    if recorded is None:
        return _invalid("the seal record's part list is damaged", key_id)
    digest = canonical_digest(recorded)
    try:
        signature = base64.b64decode(str(record.get("signature", "")), validate=True)
    except (binascii.Error, ValueError):
        return _invalid("the seal's signature is not valid base64", key_id)
    if record.get("digest") != digest.hex() or not verifier.verify(
        signature, _signed_message(key_id, digest)
    ):
        return _invalid(
            "the seal's signature does not verify: the seal record was altered or forged", key_id
        )
    current = part_digests(ds, undecodable_ok=True, version=version)
    changed = [name for name in names if current[name] != recorded[name]]
    if changed:
        note = "" if current["pixels"] else " (the pixel data no longer decodes)"
        return _invalid(f"changed since sealing: {', '.join(changed)}{note}", key_id, changed)
    return SealVerdict(True, "valid", f"seal valid (key {key_id})", [], key_id)
