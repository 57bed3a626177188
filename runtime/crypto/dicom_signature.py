"""DICOM PS3.15 digital signatures (Digital Signatures Sequence), readable by any DICOM toolkit.

Layer: runtime (pydicom, cryptography). Our seal (``seal.py``) is compact and says what changed,
but only medsec-edge reads it; a PACS or a reading workstation checks the standard signature
instead. This module writes and verifies it as PS3.3 C.12.1 and PS3.15 Annex C define it, and
as DCMTK's ``dcmsign`` does (the tests round-trip with the real tool both ways):

- (4FFE,0001) MAC Parameters Sequence, one item per signature: MAC ID Number, MAC Calculation
  Transfer Syntax UID (Explicit VR Little Endian), MAC Algorithm ("SHA256"), Data Elements Signed.
- (FFFA,FFFA) Digital Signatures Sequence, one item: MAC ID Number, Digital Signature UID,
  Digital Signature DateTime, Certificate Type "X509_1993_SIG", Certificate of Signer (DER),
  Signature; optionally Certified Timestamp Type "CMS_TSP" and an RFC 3161 Certified Timestamp
  obtained from a time-stamping authority over the signature (we do not make one).

The MAC is the hash of a byte stream: every signed element of the dataset, in dataset order,
in Explicit VR Little Endian, followed by the signature item's own MAC ID Number, Digital
Signature UID, Digital Signature DateTime and Certificate Type (not the certificate, the
signature or the timestamp). Sequences and encapsulated Pixel Data are encoded without their
value lengths and items without theirs: tag, VR and reserved bytes, then per item the item tag
and its content, then the Sequence Delimitation tag; lengths differ between explicit and
undefined-length encodings of the same data, so they must not enter the MAC. Elements that
cannot be signed are skipped: group lengths, groups below 0008, Length to End, (FFFA,xxxx),
(4FFE,0001), Data Set Trailing Padding, and elements (or sequences containing elements) of
VR UN. The signature is RSA PKCS#1 v1.5 over the MAC (the MAC is the DigestInfo digest).

What we sign must stay signable through a PACS: a file stored as Implicit VR (``storescu -xi``,
``dcmconv +ti``) loses the VR of every element the reader's dictionary does not know, and an
element of VR UN cannot be signed, so a signature over it can never verify again
(``dcmsign``: "signature contains attribute that is not signable"). ``sign_dataset`` therefore
signs only *stable* elements: public, known to the data dictionary, with the dictionary's VR,
and sequences made only of such elements. Private elements (our own block included) are left
out; the seal (``seal.py``) covers our block instead.

A lossless re-encode by a PACS (JPEG-LS, RLE) changes the encoded Pixel Data bytes the MAC
covers. When the MAC does not match, the dataset's Pixel Data is now encapsulated and the
signature was computed over native pixels, the MAC is computed once more over the decoded
pixels written natively: if the signature verifies over that, every signed element is unchanged
except for the encoding of the pixels, and the signature is reported ``re-encoded``, not
``invalid``.

Profile: "Creator RSA" (PS3.15 C.2): signed by the instance's creator, in the main dataset, with
an RSA key; the Data Elements Signed must include the SOP Class/Instance and Study/Series
Instance UIDs and, when present and stable, the modules the profile lists. Sign after sealing
and after every other change: any later change to a signed element invalidates the signature.

Trust is separate from validity: ``verify_signatures(trusted=...)`` also requires the signer's
certificate to be one of ``trusted`` or issued by one of them, and valid when it signed.
Signatures nested in sequence items (``dcmsign --sign-item``) are not verified here.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import struct
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.serialization import Encoding
from pydicom.datadict import get_entry
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid

from medsec_edge.runtime.crypto.keyset import DicomSigningKey
from medsec_edge.runtime.errors import InputError, UsageError

__all__ = [
    "CERTIFICATE_TYPE",
    "MAC_ALGORITHMS",
    "DicomSignatureReport",
    "SignatureResult",
    "add_certified_timestamp",
    "mac_stream",
    "remove_signatures",
    "sign_dataset",
    "verify_signatures",
]

logger = logging.getLogger(__name__)

CERTIFICATE_TYPE = "X509_1993_SIG"
TIMESTAMP_TYPE = "CMS_TSP"
MAC_ALGORITHMS = {"SHA256": hashes.SHA256, "SHA384": hashes.SHA384, "SHA512": hashes.SHA512}
DIGITAL_SIGNATURES_SEQUENCE = 0xFFFAFFFA
MAC_PARAMETERS_SEQUENCE = 0x4FFE0001
_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SEQUENCE_DELIMITER = struct.pack("<HH", 0xFFFE, 0xE0DD)
# Elements of the signature item that are not part of the MAC (PS3.3 C.12.1.1.3).
_NOT_MACED_IN_ITEM = (0x04000115, 0x04000120, 0x04000305, 0x04000310)
# Creator RSA profile (PS3.15 C.2): always required, and required when present (the image-related
# part of the profile's list, which is what medsec-edge writes; other IODs: all signable elements
# are signed by ``sign_dataset`` anyway).
_CREATOR_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_CREATOR_IF_PRESENT = (
    "InstanceCreationDate",
    "InstanceCreationTime",
    "Manufacturer",
    "InstitutionName",
    "StationName",
    "ManufacturerModelName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "ImageType",
    "AcquisitionNumber",
    "AcquisitionDate",
    "AcquisitionTime",
    "AcquisitionDateTime",
    "BurnedInAnnotation",
    "LossyImageCompression",
    "LossyImageCompressionRatio",
    "LossyImageCompressionMethod",
    "PresentationLUTShape",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PlanarConfiguration",
    "PixelAspectRatio",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "ICCProfile",
    "PixelData",
    "NumberOfFrames",
    "SharedFunctionalGroupsSequence",
    "PerFrameFunctionalGroupsSequence",
    "PixelPaddingValue",
)


# --------------------------------------------------------------------------------------------
# the MAC byte stream


def _tag_bytes(tag: int) -> bytes:
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF)


def _signable_tag(tag: int) -> bool:
    group, elem = tag >> 16, tag & 0xFFFF
    return not (
        elem == 0
        or group < 0x0008
        or (group, elem) == (0x0008, 0x0001)
        or group == 0xFFFA
        or tag == MAC_PARAMETERS_SEQUENCE
        or tag == 0xFFFCFFFC
        or (group == 0xFFFE and elem in (0xE00D, 0xE0DD))
    )


def _element(ds: Dataset, tag: BaseTag) -> DataElement | RawDataElement:
    """The element as it will be written: raw bytes if untouched Explicit VR LE, else decoded."""
    item = ds.get_item(tag)
    if isinstance(item, RawDataElement):
        explicit_le = ds.original_encoding == (False, True)
        if item.VR and item.VR != "SQ" and explicit_le:
            return item
        item = ds[tag]
    return item


def _vr(elem) -> str:
    return str(elem.VR) if elem.VR else ""


def _contains_un(value: Sequence) -> bool:
    for item in value:
        for tag in sorted(item.keys()):
            elem = _element(item, tag)
            vr = _vr(elem)
            if vr in ("", "UN"):
                return True
            if vr == "SQ" and _contains_un(item[tag].value):
                return True
    return False


def _signable(ds: Dataset, tag: BaseTag) -> bool:
    if not _signable_tag(int(tag)):
        return False
    elem = _element(ds, tag)
    vr = _vr(elem)
    if vr in ("", "UN"):
        return False
    if vr == "SQ":
        return not _contains_un(ds[tag].value)
    return True


def _dictionary_vrs(tag: int) -> tuple[str, ...]:
    """The VRs the public data dictionary allows for ``tag``; () if it does not know the tag."""
    try:
        vr = get_entry(tag)[0]
    except KeyError:
        return ()
    return tuple(v.strip() for v in vr.split(" or "))


def _stable(ds: Dataset, tag: BaseTag) -> bool:
    """Signable now and after any transfer syntax change: a reader of an Implicit VR copy finds
    the same VR in its dictionary, so the element never becomes UN."""
    if not _signable(ds, tag) or (int(tag) >> 16) % 2:  # odd group: private (and its creators)
        return False
    allowed = _dictionary_vrs(int(tag))
    if not allowed or "UN" in allowed:
        return False
    vr = _vr(_element(ds, tag))
    if "or" in vr:  # still ambiguous in memory: resolved by the encoder, as the reader will
        return True
    if vr not in allowed:
        return False
    if vr == "SQ":
        return all(_stable(item, t) for item in ds[tag].value for t in item.keys())
    return True


def _encapsulated_items(value: bytes):
    """The item values of encapsulated Pixel Data (Basic Offset Table first)."""
    pos, end = 0, len(value)
    while pos + 8 <= end:
        group, elem, length = struct.unpack_from("<HHL", value, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):
            return
        if (group, elem) != (0xFFFE, 0xE000) or pos + length > end:
            raise UsageError("encapsulated Pixel Data is malformed: cannot sign or verify it")
        yield value[pos : pos + length]
        pos += length


def _encode(ds: Dataset, tag: BaseTag, encodings, sink, elem=None) -> None:
    elem = _element(ds, tag) if elem is None else elem
    vr = _vr(elem)
    if vr == "SQ":
        sink(_tag_bytes(int(tag)) + b"SQ\x00\x00")
        for item in ds[tag].value:
            sink(_ITEM)
            item_encodings = item.get("SpecificCharacterSet", encodings)
            for item_tag in sorted(item.keys()):
                if _signable(item, item_tag):
                    _encode(item, item_tag, item_encodings, sink)
        sink(_SEQUENCE_DELIMITER)
        return
    undefined = elem.length == 0xFFFFFFFF if elem.is_raw else elem.is_undefined_length
    if undefined:  # encapsulated (compressed) Pixel Data
        sink(_tag_bytes(int(tag)) + vr.encode("ascii") + b"\x00\x00")
        for fragment in _encapsulated_items(elem.value):
            sink(_ITEM)
            sink(fragment)
        sink(_SEQUENCE_DELIMITER)
        return
    if not elem.is_raw and ("or" in vr):
        elem = correct_ambiguous_vr_element(elem, ds, True)
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_data_element(fp, elem, encodings)
    sink(fp.getvalue())


def _encode_dataset(
    ds: Dataset, tags: set[int] | None, sink, replace: dict[int, DataElement] | None = None
) -> list[BaseTag]:
    """Encode the signable elements of ``ds`` (those in ``tags`` if given); return their tags.

    ``replace``: elements encoded instead of the dataset's own (the re-encode check)."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if ds.original_encoding[1] is False or syntax == ExplicitVRBigEndian:
        raise UsageError(
            "dataset is big endian: convert it to Explicit VR Little Endian before signing"
        )
    encodings = ds.get("SpecificCharacterSet")
    done: list[BaseTag] = []
    for tag in sorted(ds.keys()):
        if tags is not None and int(tag) not in tags:
            continue
        if replace and int(tag) in replace:
            _encode(ds, tag, encodings, sink, replace[int(tag)])
            done.append(tag)
        elif _signable(ds, tag):
            _encode(ds, tag, encodings, sink)
            done.append(tag)
    return done


def _encode_signature_item(item: Dataset, sink) -> None:
    for tag in sorted(item.keys()):
        if int(tag) not in _NOT_MACED_IN_ITEM and _signable(item, tag):
            _encode(item, tag, None, sink)


def mac_stream(ds: Dataset, signature_item: Dataset, tags: Iterable[int] | None = None) -> bytes:
    """The bytes the MAC is computed over (what ``dcmsign --dump`` writes), for inspection."""
    parts: list[bytes] = []
    _encode_dataset(ds, None if tags is None else {int(t) for t in tags}, parts.append)
    _encode_signature_item(signature_item, parts.append)
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# signing


def _explicit_le(uid) -> bool:
    """Explicit VR Little Endian, or a compressed syntax encoded like it (PS3.5 A.4)."""
    uid = UID(str(uid or ""))
    return uid.is_transfer_syntax and uid.is_little_endian and not uid.is_implicit_VR


def _mac_transfer_syntax(ds: Dataset) -> str:
    # As dcmsign: the dataset's own syntax when it is Explicit VR LE or encapsulated (the
    # encapsulated Pixel Data is MACed as is), else Explicit VR Little Endian.
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(uid) if uid and _explicit_le(uid) else ExplicitVRLittleEndian


def _mac_id(ds: Dataset) -> int:
    used = set()
    for tag in (DIGITAL_SIGNATURES_SEQUENCE, MAC_PARAMETERS_SEQUENCE):
        if tag in ds:
            used.update(int(i.MACIDNumber) for i in ds[tag].value if "MACIDNumber" in i)
    free = next((n for n in range(0x10000) if n not in used), None)
    if free is None:
        raise UsageError("dataset already holds 65536 MAC IDs: remove old signatures first")
    return free


def _dicom_datetime(when: _dt.datetime) -> str:
    when = when.astimezone(_dt.timezone.utc)
    return when.strftime("%Y%m%d%H%M%S.%f") + "+0000"


def sign_dataset(
    ds: Dataset,
    key: DicomSigningKey,
    *,
    mac_algorithm: str = "SHA256",
    now: _dt.datetime | None = None,
) -> str:
    """Add a Creator RSA signature over every stable element of ``ds`` (in place).

    Returns the Digital Signature UID. Raises ``UsageError`` if ``ds`` lacks the UIDs the
    profile requires or is big endian. Write ``ds`` as Explicit VR Little Endian afterwards.
    """
    if mac_algorithm not in MAC_ALGORITHMS:
        raise UsageError(f"MAC algorithm {mac_algorithm!r}: use one of {', '.join(MAC_ALGORITHMS)}")
    missing = [k for k in _CREATOR_REQUIRED if not ds.get(k)]
    if missing:  # the input's fault, not the caller's: bad input (exit 4)
        raise InputError(
            f"the Creator RSA profile signs {', '.join(_CREATOR_REQUIRED)}; this dataset lacks "
            f"{', '.join(missing)}"
        )
    if not isinstance(key.private_key, rsa.RSAPrivateKey):
        raise UsageError("the Creator RSA profile needs an RSA key")
    pixels = ds.get_item(0x7FE00010) if 0x7FE00010 in ds else None
    if pixels is not None and not ds["PixelData"].is_undefined_length:
        # Native Pixel Data is OW in every Implicit VR copy (PS3.5 A.1), so a reader of one
        # MACs it as OW: sign it as OW (allowed for any Bits Allocated), never as OB.
        ds["PixelData"].VR = "OW"
    mac_id = _mac_id(ds)
    item = Dataset()
    item.MACIDNumber = mac_id
    item.DigitalSignatureUID = generate_uid()
    item.DigitalSignatureDateTime = _dicom_datetime(now or _dt.datetime.now(_dt.timezone.utc))
    item.CertificateType = CERTIFICATE_TYPE

    stable = {int(t) for t in ds.keys() if _stable(ds, t)}
    hasher = hashes.Hash(MAC_ALGORITHMS[mac_algorithm]())
    signed_tags = _encode_dataset(ds, stable, hasher.update)
    _encode_signature_item(item, hasher.update)
    digest = hasher.finalize()
    signature = key.private_key.sign(
        digest, padding.PKCS1v15(), Prehashed(MAC_ALGORITHMS[mac_algorithm]())
    )
    item.add_new(0x04000115, "OB", key.certificate.public_bytes(Encoding.DER))
    item.add_new(0x04000120, "OB", signature)

    mac_item = Dataset()
    mac_item.MACIDNumber = mac_id
    mac_item.MACCalculationTransferSyntaxUID = _mac_transfer_syntax(ds)
    mac_item.MACAlgorithm = mac_algorithm
    mac_item.add_new(0x04000020, "AT", list(signed_tags))
    if MAC_PARAMETERS_SEQUENCE not in ds:
        ds.add_new(MAC_PARAMETERS_SEQUENCE, "SQ", Sequence())
    if DIGITAL_SIGNATURES_SEQUENCE not in ds:
        ds.add_new(DIGITAL_SIGNATURES_SEQUENCE, "SQ", Sequence())
    ds[MAC_PARAMETERS_SEQUENCE].value.append(mac_item)
    ds[DIGITAL_SIGNATURES_SEQUENCE].value.append(item)
    logger.debug(
        "signed image %s: %d elements, MAC %s, key %s",
        _short_id(ds),
        len(signed_tags),
        mac_algorithm,
        key.key_id,
    )
    return str(item.DigitalSignatureUID)


def add_certified_timestamp(ds: Dataset, signature_uid: str, timestamp_token: bytes) -> None:
    """Attach an RFC 3161 timestamp token (from a TSA, over the signature) to a signature."""
    for item in ds.get(DIGITAL_SIGNATURES_SEQUENCE, DataElement(0, "SQ", [])).value:
        if str(item.get("DigitalSignatureUID", "")) == signature_uid:
            item.CertifiedTimestampType = TIMESTAMP_TYPE
            item.add_new(0x04000310, "OB", bytes(timestamp_token))
            return
    raise UsageError(f"no signature with UID {signature_uid} in this dataset")


def remove_signatures(ds: Dataset) -> int:
    """Remove the main dataset's signatures and MAC parameters; return how many there were."""
    count = len(ds[DIGITAL_SIGNATURES_SEQUENCE].value) if DIGITAL_SIGNATURES_SEQUENCE in ds else 0
    for tag in (DIGITAL_SIGNATURES_SEQUENCE, MAC_PARAMETERS_SEQUENCE):
        if tag in ds:
            del ds[tag]
    return count


# --------------------------------------------------------------------------------------------
# verification


@dataclass(frozen=True)
class SignatureResult:
    """One signature of the Digital Signatures Sequence, checked."""

    uid: str
    mac_id: int | None
    status: str  # 'valid' | 're-encoded' | 'invalid' | 'untrusted' | 'unsupported'
    reason: str
    mac_algorithm: str = ""
    signer: str = ""  # certificate subject (a device, not a person)
    signed_at: str = ""
    signed_tags: list[str] = field(default_factory=list)
    trusted: bool | None = None  # None: no trust anchors were given
    timestamp_present: bool = False
    re_encoded: str = ""  # status 're-encoded': how the Pixel Data was re-encoded


@dataclass(frozen=True)
class DicomSignatureReport:
    """All main-dataset signatures: ``status`` is 'valid' only if there is one and all are.

    're-encoded': every signature verifies, one of them only over the decoded pixels (the Pixel
    Data was re-encoded after signing); ``valid`` is False: whether the pixel values are the
    signed ones is for the seal to say (``verification.verify_file``)."""

    status: str  # 'valid' | 're-encoded' | 'invalid' | 'untrusted' | 'unsupported' | 'unsigned'
    reason: str
    signatures: list[SignatureResult] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return self.status == "valid"


def _short_id(ds: Dataset) -> str:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else "(no SOP Instance UID)"


def _der_trim(data: bytes) -> bytes:
    """Drop the pad byte an OB value of odd DER length gets."""
    if len(data) < 2 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        return data[: 2 + data[1]]
    n = data[1] & 0x7F
    return data[: 2 + n + int.from_bytes(data[2 : 2 + n], "big")]


def _tags_of(value) -> list[BaseTag]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or (
        isinstance(value, SequenceABC) and not isinstance(value, (str, bytes))
    ):
        return [Tag(v) for v in value]
    return [Tag(value)]


def _parse_dt(text: str) -> _dt.datetime | None:
    text = text.strip()
    for fmt in ("%Y%m%d%H%M%S.%f%z", "%Y%m%d%H%M%S%z", "%Y%m%d%H%M%S.%f", "%Y%m%d%H%M%S"):
        try:
            when = _dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
        return when if when.tzinfo else when.replace(tzinfo=_dt.timezone.utc)
    return None


def _is_trusted(cert: x509.Certificate, trusted: list[x509.Certificate], when: _dt.datetime) -> str:
    """'' if trusted at ``when``, else why not."""
    if not (cert.not_valid_before_utc <= when <= cert.not_valid_after_utc):
        return "the signer's certificate was not valid when it signed"
    fingerprint = cert.fingerprint(hashes.SHA256())
    for anchor in trusted:
        if anchor.fingerprint(hashes.SHA256()) == fingerprint:
            return ""
        try:
            cert.verify_directly_issued_by(anchor)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ""
    return "the signer's certificate is neither trusted nor issued by a trusted certificate"


def _verify_one(ds: Dataset, item: Dataset, mac_items: dict, trusted, profile) -> SignatureResult:
    uid = str(item.get("DigitalSignatureUID", ""))
    mac_id = int(item.MACIDNumber) if "MACIDNumber" in item else None
    base = {"uid": uid, "mac_id": mac_id, "timestamp_present": "CertifiedTimestamp" in item}

    def result(status: str, reason: str, **extra) -> SignatureResult:
        return SignatureResult(status=status, reason=reason, **base, **extra)

    mac_item = mac_items.get(mac_id)
    if mac_item is None:
        return result("invalid", f"no MAC Parameters item with MAC ID {mac_id}")
    algorithm = str(mac_item.get("MACAlgorithm", ""))
    if algorithm not in MAC_ALGORITHMS:
        return result(
            "unsupported",
            f"MAC algorithm {algorithm!r} is not supported here "
            f"({', '.join(MAC_ALGORITHMS)}); re-sign with SHA256",
            mac_algorithm=algorithm,
        )
    if not _explicit_le(mac_item.get("MACCalculationTransferSyntaxUID", "")):
        return result(
            "unsupported",
            "MAC transfer syntax is not an Explicit VR Little Endian one",
            mac_algorithm=algorithm,
        )
    if str(item.get("CertificateType", "")) != CERTIFICATE_TYPE:
        return result(
            "unsupported",
            f"certificate type {item.get('CertificateType')!r} is not {CERTIFICATE_TYPE}",
            mac_algorithm=algorithm,
        )
    try:
        cert = x509.load_der_x509_certificate(_der_trim(bytes(item[0x04000115].value)))
    except (KeyError, ValueError):
        return result(
            "invalid",
            "the Certificate of Signer is missing or not an X.509 certificate",
            mac_algorithm=algorithm,
        )
    public = cert.public_key()
    signer = cert.subject.rfc4514_string()
    signed_at = str(item.get("DigitalSignatureDateTime", ""))
    tags = _tags_of(mac_item.get("DataElementsSigned"))
    names = [f"({int(t) >> 16:04X},{int(t) & 0xFFFF:04X})" for t in tags]
    info = {
        "mac_algorithm": algorithm,
        "signer": signer,
        "signed_at": signed_at,
        "signed_tags": names,
    }
    if not isinstance(public, rsa.RSAPublicKey):
        return result(
            "unsupported", "only RSA signatures are supported (Creator RSA profile)", **info
        )
    absent = [n for t, n in zip(tags, names, strict=True) if t not in ds]
    unsignable = [n for t, n in zip(tags, names, strict=True) if t in ds and not _signable(ds, t)]
    if unsignable:
        return result(
            "invalid", f"signed elements can no longer be signed: {', '.join(unsignable)}", **info
        )

    hasher = hashes.Hash(MAC_ALGORITHMS[algorithm]())
    try:
        _encode_dataset(ds, {int(t) for t in tags}, hasher.update)
        _encode_signature_item(item, hasher.update)
    except UsageError as exc:  # big endian dataset, malformed encapsulated pixel data
        return result("unsupported", str(exc), **info)
    digest = hasher.finalize()
    signature = bytes(item[0x04000120].value) if 0x04000120 in item else b""
    scheme = (padding.PKCS1v15(), Prehashed(MAC_ALGORITHMS[algorithm]()))
    re_encoded = ""
    try:
        public.verify(signature, digest, *scheme)
    except InvalidSignature:
        re_encoded = _verifies_over_decoded_pixels(ds, item, mac_item, tags, public, signature)
        if not re_encoded:
            why = (
                f"signed elements removed: {', '.join(absent)}"
                if absent
                else "the signed elements changed after signing (MAC mismatch)"
            )
            return result("invalid", why, **info)

    if profile == "creator":
        signed = {int(t) for t in tags}
        need = list(_CREATOR_REQUIRED)
        need += [k for k in _CREATOR_IF_PRESENT if k in ds and _stable(ds, Tag(k))]
        lacking = [k for k in need if int(Tag(k)) not in signed]
        if lacking:
            return result(
                "invalid",
                f"does not meet the Creator RSA profile: unsigned {', '.join(lacking)}",
                **info,
            )
    status, valid = (
        ("re-encoded", f"signature valid over the decoded pixels ({re_encoded})")
        if re_encoded
        else ("valid", "signature valid")
    )
    info["re_encoded"] = re_encoded
    if trusted is None:
        return result(status, f"{valid} (certificate trust not checked)", **info)
    when = _parse_dt(signed_at) or _dt.datetime.now(_dt.timezone.utc)
    why_not = _is_trusted(cert, trusted, when)
    if why_not:
        return result("untrusted", f"{valid} but {why_not}", trusted=False, **info)
    return result(status, f"{valid}, certificate trusted", trusted=True, **info)


def _native_pixel_element(ds: Dataset) -> DataElement | None:
    """Pixel Data decoded and written natively (as ``sign_dataset`` saw it), or None."""
    try:
        arr = ds.pixel_array
    except Exception:  # noqa: BLE001 - no decoder, corrupt stream: the re-encode is unprovable
        return None
    import numpy as np

    arr = np.ascontiguousarray(arr)
    data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    if len(data) % 2:
        data += b"\x00"
    return DataElement(0x7FE00010, "OW", data)


def _verifies_over_decoded_pixels(ds, item, mac_item, tags, public, signature) -> str:
    """'' unless the MAC matches once the encapsulated Pixel Data is decoded to native form: then
    what changed since signing (the pixel encoding, from one transfer syntax to another)."""
    meta = getattr(ds, "file_meta", None)
    now = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else ""))
    signed_as = UID(str(mac_item.get("MACCalculationTransferSyntaxUID", "")))
    if not now.is_transfer_syntax or not now.is_encapsulated or signed_as.is_encapsulated:
        return ""
    if 0x7FE00010 not in {int(t) for t in tags} or "PixelData" not in ds:
        return ""
    native = _native_pixel_element(ds)
    if native is None:
        return ""
    algorithm = str(mac_item.MACAlgorithm)
    for vr in ("OW", "OB"):  # ours sign OW; another signer may have used OB for 8 bits
        native.VR = vr
        hasher = hashes.Hash(MAC_ALGORITHMS[algorithm]())
        try:
            _encode_dataset(ds, {int(t) for t in tags}, hasher.update, {0x7FE00010: native})
            _encode_signature_item(item, hasher.update)
            public.verify(
                signature,
                hasher.finalize(),
                padding.PKCS1v15(),
                Prehashed(MAC_ALGORITHMS[algorithm]()),
            )
        except (InvalidSignature, UsageError):
            continue
        return f"Pixel Data re-encoded losslessly from {signed_as.name} to {now.name}"
    return ""


def verify_signatures(
    ds: Dataset,
    *,
    trusted: Iterable[x509.Certificate] | None = None,
    profile: str | None = None,
) -> DicomSignatureReport:
    """Verify every signature in ``ds``'s Digital Signatures Sequence.

    ``trusted``: certificates to trust (pinned, or as direct issuers); None checks validity only.
    ``profile="creator"`` also requires the Creator RSA profile's attributes to be signed.
    """
    if profile not in (None, "creator"):
        raise UsageError(f"profile {profile!r}: use None or 'creator'")
    items = list(ds[DIGITAL_SIGNATURES_SEQUENCE].value) if DIGITAL_SIGNATURES_SEQUENCE in ds else []
    if not items:
        return DicomSignatureReport("unsigned", "no DICOM digital signature in the main dataset")
    mac_items = {}
    if MAC_PARAMETERS_SEQUENCE in ds:
        for mac_item in ds[MAC_PARAMETERS_SEQUENCE].value:
            if "MACIDNumber" in mac_item:
                mac_items[int(mac_item.MACIDNumber)] = mac_item
    anchors = None if trusted is None else list(trusted)
    results = [_verify_one(ds, item, mac_items, anchors, profile) for item in items]
    for status in ("invalid", "unsupported", "untrusted"):
        bad = [r for r in results if r.status == status]
        if bad:
            number = results.index(bad[0]) + 1  # by position: a report carries no UIDs
            return DicomSignatureReport(
                status, f"signature {number} of {len(results)}: {bad[0].reason}", results
            )
    re_encoded = [r for r in results if r.status == "re-encoded"]
    if re_encoded:
        why = re_encoded[0].re_encoded
        return DicomSignatureReport(
            "re-encoded", f"{len(results)} signature(s) valid over the decoded pixels: {why}", results
        )
    return DicomSignatureReport("valid", f"{len(results)} signature(s) valid", results)
