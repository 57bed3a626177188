"""Which received objects the node takes: a DICOM image it can process, or an error status now.

Layer: runtime (node: pydicom, pynetdicom's SOP class tables). The sender must learn at once that
an object will not be processed, while it can still do something about it, so the C-STORE handler
(and the folder watch) parse each object before it is spooled: a storage SOP class, the one the
request named, SOP Instance UID present, pixel data whose length matches its rows, columns,
frames, samples and bits, a transfer syntax this device decodes. Refusals use the PS3.4 C-STORE
statuses: 0xA900 data set does not match SOP class, 0xC000 cannot understand, 0x0122 SOP class
not supported. Reasons name elements, never their values.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache

from pydicom import dcmread
from pydicom.uid import UID

__all__ = ["Admission", "accepted_transfer_syntaxes", "admit", "storage_sop_classes"]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122

_UNCOMPRESSED = (
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)
_COMPRESSED = (
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline
    "1.2.840.10008.1.2.4.51",  # JPEG Extended
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
)


@lru_cache(maxsize=1)
def storage_sop_classes() -> frozenset[str]:
    """Every image (and other) storage SOP class pynetdicom knows."""
    from pynetdicom import AllStoragePresentationContexts

    return frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)


@lru_cache(maxsize=1)
def accepted_transfer_syntaxes() -> tuple[str, ...]:
    """The uncompressed syntaxes, and each compressed one whose pixel decoder is installed here."""
    from pydicom.pixels import get_decoder

    usable = []
    for uid in _COMPRESSED:
        try:
            if get_decoder(UID(uid)).is_available:
                usable.append(uid)
        except (NotImplementedError, ValueError, LookupError):
            continue
    return _UNCOMPRESSED + tuple(usable)


@dataclass(frozen=True)
class Admission:
    status: int
    reason: str = ""
    sop_class: str = ""
    sop_uid: str = ""
    transfer_syntax: str = ""
    has_pixels: bool = True

    @property
    def accepted(self) -> bool:
        return self.status == SUCCESS


def admit(data: bytes, requested_class: str | None = None, *, images_only: bool = True) -> Admission:
    """Parse ``data`` (a DICOM file, file meta included) and say whether the node takes it; with
    ``images_only`` False an object without pixel data is taken too (``has_pixels`` False)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(io.BytesIO(data), force=False)
            sop_class = str(ds.get("SOPClassUID", "") or "")
            sop_uid = str(ds.get("SOPInstanceUID", "") or "")
            meta = getattr(ds, "file_meta", None)
            ts = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
            problem = _problem(ds, sop_class, sop_uid, ts, requested_class, images_only)
    except Exception as exc:  # noqa: BLE001 - whatever a malformed object makes the parser raise
        return Admission(CANNOT_UNDERSTAND, f"the object cannot be parsed ({type(exc).__name__})")
    if problem is not None:
        status, reason = problem
        return Admission(status, reason, sop_class, sop_uid, ts)
    return Admission(SUCCESS, "", sop_class, sop_uid, ts, has_pixels="PixelData" in ds)


def _problem(ds, sop_class: str, sop_uid: str, ts: str, requested_class: str | None,
             images_only: bool = True) -> tuple[int, str] | None:
    if not sop_class or not sop_uid:
        return CANNOT_UNDERSTAND, "SOP Class UID or SOP Instance UID missing"
    if requested_class and sop_class != str(requested_class).rstrip("\x00"):
        return DOES_NOT_MATCH, "SOP Class UID of the data set differs from the one the request named"
    if sop_class not in storage_sop_classes():
        return SOP_CLASS_NOT_SUPPORTED, "not a storage SOP class"
    if not UID(sop_uid).is_valid:
        return CANNOT_UNDERSTAND, "SOP Instance UID is not a valid UID"
    if "PixelData" not in ds:
        if images_only:
            return CANNOT_UNDERSTAND, ("no Pixel Data: the node watermarks images (on-non-image = "
                                       "'forward-unchanged' lets such objects pass)")
        return None
    if ts not in accepted_transfer_syntaxes():
        return CANNOT_UNDERSTAND, "transfer syntax not decodable on this device"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return CANNOT_UNDERSTAND, "Rows, Columns, BitsAllocated, SamplesPerPixel or NumberOfFrames missing or not a number"
    if min(rows, cols, bits, samples, frames) <= 0 or bits % 8:
        return CANNOT_UNDERSTAND, "Rows, Columns, BitsAllocated, SamplesPerPixel or NumberOfFrames out of range"
    if UID(ts).is_compressed:
        return None  # fragments are checked by the decoder in the worker; a failure there is quarantined
    needed = rows * cols * frames * samples * (bits // 8)
    have = len(ds.PixelData)
    if have < needed or have > needed + 1:
        return CANNOT_UNDERSTAND, f"Pixel Data has {have} bytes, its image attributes need {needed}"
    return None
