"""Write a modified image back as DICOM without losing anything the source said.

Layer: runtime (numpy, pydicom). DESIGN.md, Images: every attribute of the source is kept; the
output is a new instance (new SOP Instance UID, ``ImageType`` DERIVED, a ``DerivationDescription``,
a ``SourceImageSequence`` pointing at the source) and carries our record in a private block with
its own private creator. The identity a payload is bound to (``identity_of``) must survive this
write, so the block also remembers the first source's SOP Instance UID.

Pixel data is always written uncompressed, Explicit VR Little Endian: re-encoding a watermarked
image with a lossy codec would damage the mark, and a lossless re-encoder is not available
everywhere the runtime runs. ``LossyImageCompression`` attributes stay as the source had them
(the pixels did go through that lossy step).
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any, BinaryIO

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import MedicalImage

logger = logging.getLogger(__name__)

PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "MEDSEC_EDGE 1"
RECORD_ELEMENT = 0x01  # UT: json.dumps(record, sort_keys=True)
SOURCE_UID_ELEMENT = 0x02  # UI: SOP Instance UID of the first source (survives repeated writes)
# Elements of the same block owned by the cryptographic layer (one allocation, kept here):
SEAL_ELEMENT = 0x10  # UT: seal record JSON (seal.py)
ENCRYPTED_ELEMENT = 0x20  # OB: AES-256-GCM blob of the original file (encryption.py)
WRAPPED_KEY_ELEMENT = 0x21  # UT: JSON of the study data key wrapped for a recipient
REVERSIBLE_ELEMENT = 0x30  # OB: encrypted watermark residual for bit-exact restore (reversible.py)
FINGERPRINT_ELEMENT = 0x40  # OB: signed content fingerprint of these pixels (tamper/fingerprint.py)
DEFAULT_DESCRIPTION = "Processed by medsec-edge"
# PS3.7 D.3.3.2: the file meta names the application that wrote the file, not the source's.
# 2.25.<int of uuid5(NAMESPACE_URL, "https://medsec-edge/dicom/implementation")>: fixed forever.
IMPLEMENTATION_CLASS_UID = "2.25.196645917468107597991738322312644589062"
IMPLEMENTATION_VERSION_NAME = "MEDSEC_EDGE_0_1"  # SH, at most 16 characters
# MR Pulse Sequence module (PS3.3 C.8.13.4): Type 1C "required if Image Type Value 1 is ORIGINAL
# or MIXED"; dciodvfy reads the condition as "absent otherwise", so a DERIVED Enhanced MR drops
# them (they describe the acquisition of the source, which the Source Image Sequence names).
_MR_PULSE_SEQUENCE = (
    "PulseSequenceName", "MRAcquisitionType", "EchoPulseSequence", "MultipleSpinEcho",
    "MultiPlanarExcitation", "PhaseContrast", "VelocityEncodingAcquisitionSequence",
    "TimeOfFlightContrast", "ArterialSpinLabelingContrast", "SteadyStatePulseSequence",
    "EchoPlanarPulseSequence", "SaturationRecovery", "SpectrallySelectedSuppression",
    "OversamplingPhase", "GeometryOfKSpaceTraversal", "RectilinearPhaseEncodeReordering",
    "SegmentedKSpaceTraversal", "CoverageOfKSpace", "NumberOfKSpaceTrajectories",
    "BulkMotionCompensationTechnique",
)
_ENHANCED_MR_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.3",  # Enhanced MR Color Image Storage
)
_DIGITAL_SIGNATURES_SEQUENCE = 0xFFFAFFFA  # PS3.15 signatures of the source (dicom_signature.py)
_MAC_PARAMETERS_SEQUENCE = 0x4FFE0001
_MAX_DERIVATION = 1024  # ST value length limit

# Photometric interpretations pydicom's set_pixel_data accepts as they are; YBR_ICT/YBR_RCT are
# codec-internal and the pixels are RGB in memory, so they (and YBR_FULL*) are written as RGB.
_GREY = ("MONOCHROME1", "MONOCHROME2")


def _private_block(ds: Dataset, create: bool):
    try:
        return ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=create)
    except KeyError:
        return None


def _text(value: Any) -> str:
    if isinstance(value, bytes):  # read from Implicit VR files as UN
        return value.decode("utf-8", errors="replace").rstrip("\x00 ")
    return str(value).rstrip("\x00 ")


def read_record(ds: Dataset) -> dict | None:
    """The record we wrote into ``ds`` (``json`` object), or None if there is none."""
    block = _private_block(ds, create=False)
    if block is None or RECORD_ELEMENT not in block:
        return None
    text = _text(block[RECORD_ELEMENT].value)
    try:
        record = json.loads(text)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def identity_of(image: MedicalImage) -> dict[str, str]:
    """The DICOM identity a payload is bound to: study, series, patient and source SOP UID.

    ``sop_uid`` is the SOP Instance UID of the image as it came from the modality: for a file we
    wrote ourselves it is taken from our private block (or the Source Image Sequence), so the
    identity of our output equals the identity of its source. Empty strings for non-DICOM inputs.
    """
    ds = image.dataset
    if ds is None:
        return {"study_uid": "", "series_uid": "", "patient_id": "", "sop_uid": ""}
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    block = _private_block(ds, create=False)
    if block is not None:
        if SOURCE_UID_ELEMENT in block and _text(block[SOURCE_UID_ELEMENT].value):
            sop_uid = _text(block[SOURCE_UID_ELEMENT].value)
        elif ds.get("SourceImageSequence"):  # ours is the last item (earlier ones come first)
            sop_uid = str(ds.SourceImageSequence[-1].get("ReferencedSOPInstanceUID", sop_uid))
    return {
        "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
        "series_uid": str(ds.get("SeriesInstanceUID", "") or ""),
        "patient_id": str(ds.get("PatientID", "") or ""),
        "sop_uid": sop_uid,
    }


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, frames_tag: bool) -> None:
    """Replace Pixel Data with ``pixels`` (little endian, native), keeping BitsStored and sign."""
    bits_stored = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if pixels.dtype.kind != ("i" if signed else "u"):
        raise UsageError(
            f"pixels are {pixels.dtype} but the source's PixelRepresentation is "
            f"{int(signed)}: cast to the dtype of image.pixels"
        )
    colour = photometric == "RGB"
    single = pixels.ndim == (3 if colour else 2)
    # A source with NumberOfFrames (multi-frame IODs require it, even for one frame) keeps it.
    arr = pixels[np.newaxis] if (single and frames_tag) else pixels
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    if pixels.dtype.itemsize in (1, 2):
        try:
            ds.set_pixel_data(arr, photometric, bits_stored, generate_instance_uid=False)
        except ValueError as exc:
            raise UsageError(f"pixels do not fit the source's pixel format: {exc}") from None
    else:
        low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (
            0,
            2**bits_stored - 1,
        )
        if arr.size and (int(arr.min()) < low or int(arr.max()) > high):
            raise UsageError(
                f"pixel values [{arr.min()}, {arr.max()}] exceed BitsStored {bits_stored} "
                f"range [{low}, {high}]: clip before writing"
            )
        rows, cols = (arr.shape[-3], arr.shape[-2]) if colour else (arr.shape[-2], arr.shape[-1])
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 3 if colour else 1
        ds.PhotometricInterpretation = photometric
        if colour:
            ds.PlanarConfiguration = 0
        elif "PlanarConfiguration" in ds:
            del ds.PlanarConfiguration
        if arr.ndim == (4 if colour else 3):
            ds.NumberOfFrames = arr.shape[0]
        elif "NumberOfFrames" in ds:
            del ds.NumberOfFrames
        ds.BitsAllocated = arr.dtype.itemsize * 8
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"
        ds["PixelData"].is_undefined_length = False
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_words_to_little_endian(ds: Dataset) -> None:
    """Byte-swap the word-typed binary values of a (retired) big endian dataset, in place.

    pydicom converts numbers it decodes but leaves OW/OF/OL/OD/OV bytes in the source's order;
    Pixel Data is replaced afterwards, so it is skipped.
    """
    for elem in ds.iterall():
        size = _WORD_SIZE.get(str(elem.VR))
        if size and isinstance(elem.value, bytes) and elem.tag != 0x7FE00010:
            usable = len(elem.value) - len(elem.value) % size
            words = np.frombuffer(elem.value[:usable], dtype=f">u{size}")
            elem.value = words.astype(f"<u{size}").tobytes() + elem.value[usable:]


def _our_file_meta(sop_class: str | None, sop_uid: str) -> FileMetaDataset:
    """A new file meta group: the source's names the source's application (and its AE titles,
    private meta information), none of which describe the file we write."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    if sop_class:
        meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _source_references(src: Dataset, sop_class: str, sop_uid: str) -> Sequence:
    """The source's Source Image Sequence (what it was derived from) followed by the source."""
    items = [copy.deepcopy(item) for item in (src.get("SourceImageSequence") or [])]
    if not any(str(i.get("ReferencedSOPInstanceUID", "")) == sop_uid for i in items):
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_uid
        items.append(item)
    return Sequence(items)


def _mark_frames_derived(ds: Dataset) -> None:
    """Frame Type Value 1 follows Image Type Value 1 (PS3.3 C.8.16.1): every frame is derived."""
    groups = []
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups.extend(ds.get(keyword) or [])
    for group in groups:
        for elem in group:
            if elem.VR != "SQ" or not str(elem.keyword).endswith("FrameTypeSequence"):
                continue
            for item in elem.value:
                frame_type = list(item.get("FrameType", None) or [])
                if frame_type:
                    frame_type[0] = "DERIVED"
                    item.FrameType = frame_type


def build_derived_dataset(
    image: MedicalImage,
    pixels: np.ndarray,
    *,
    record: dict | None = None,
    description: str = "",
    fingerprint: bytes | None = None,
    sop_uid: str | None = None,
) -> Dataset:
    """A copy of ``image.dataset`` holding ``pixels`` and marked as derived from the source.

    ``sop_uid`` is the new SOP Instance UID (the node derives it from the source's, so a redo gives
    the same instance); by default a fresh one.

    ``pixels`` must already have the shape and dtype of ``image.pixels`` (``imageio.write_image``
    checks and casts). ``fingerprint`` is the signed content fingerprint of ``pixels``; any
    fingerprint the source carried described the source's pixels and is dropped.
    """
    src = image.dataset
    if src is None:
        raise UsageError("image has no DICOM dataset: write it as PNG, TIFF or NPY instead")
    ds = copy.deepcopy(src)
    if not hasattr(ds, "file_meta") or ds.file_meta is None:
        ds.file_meta = FileMetaDataset()
    source_ts = ds.file_meta.get("TransferSyntaxUID")
    was_compressed = bool(source_ts) and source_ts.is_compressed
    if source_ts and not source_ts.is_little_endian:
        _swap_words_to_little_endian(ds)
        # Every element is decoded now (the swap visited them all): the dataset is little endian
        # in memory, so it can be sealed, signed and written in memory without a round trip.
        ds.set_original_encoding(False, True, ds.original_character_set)

    # Write little endian, explicit VR, uncompressed, whatever the source used.
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    for tag in (0x7FE00001, 0x7FE00002):  # Extended Offset Table (encapsulated data only)
        if tag in ds:
            del ds[tag]
    if was_compressed and "IconImageSequence" in ds:
        # The icon's pixel data is encapsulated with the source's codec and cannot stay as it is.
        del ds.IconImageSequence
    photometric = "RGB" if image.meta.is_colour else str(src.PhotometricInterpretation)
    if photometric not in _GREY and photometric != "RGB":
        raise UsageError(f"cannot write photometric interpretation {photometric!r}")
    _set_pixels(ds, pixels, photometric, frames_tag="NumberOfFrames" in src)

    source_sop_class = str(src.get("SOPClassUID", ""))
    source_sop_uid = str(src.get("SOPInstanceUID", ""))
    first_source_uid = identity_of(image)["sop_uid"]
    new_uid = sop_uid or generate_uid()
    ds.SOPInstanceUID = new_uid
    ds.file_meta = _our_file_meta(source_sop_class or ds.file_meta.get("MediaStorageSOPClassUID"), new_uid)

    image_type = list(src.get("ImageType", None) or [])
    if image_type:
        image_type[0] = "DERIVED"
        if len(image_type) == 1:
            image_type.append("SECONDARY")
    else:
        image_type = ["DERIVED", "SECONDARY"]
    ds.ImageType = image_type
    _mark_frames_derived(ds)
    if source_sop_class in _ENHANCED_MR_CLASSES:
        for keyword in _MR_PULSE_SEQUENCE:
            if keyword in ds:
                delattr(ds, keyword)

    ours = description or DEFAULT_DESCRIPTION
    previous = str(src.get("DerivationDescription", "") or "")
    derivation = f"{previous}; {ours}" if previous else ours
    ds.DerivationDescription = derivation[:_MAX_DERIVATION]

    ds.SourceImageSequence = _source_references(src, source_sop_class, source_sop_uid)

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    if record is not None:
        block.add_new(RECORD_ELEMENT, "UT", json.dumps(record, sort_keys=True))
    elif RECORD_ELEMENT in block:
        del ds[block.get_tag(RECORD_ELEMENT)]  # it described the source's pixels, not these
    block.add_new(SOURCE_UID_ELEMENT, "UI", first_source_uid)
    # Seals, signatures and restore records vouch for the source's bytes, not these: a copy
    # would make the output fail verification (the new file is sealed again by whoever writes it).
    for element in (SEAL_ELEMENT, ENCRYPTED_ELEMENT, WRAPPED_KEY_ELEMENT, REVERSIBLE_ELEMENT,
                    FINGERPRINT_ELEMENT):
        if element in block:
            del ds[block.get_tag(element)]
    for tag in (_DIGITAL_SIGNATURES_SEQUENCE, _MAC_PARAMETERS_SEQUENCE):
        if tag in ds:
            del ds[tag]
    if fingerprint is not None:
        attach_fingerprint(ds, fingerprint)
    return ds


def attach_fingerprint(ds: Dataset, fingerprint: bytes) -> None:
    """Put the signed fingerprint into our private block (before sealing: the seal covers it)."""
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(FINGERPRINT_ELEMENT, "OB", bytes(fingerprint))


def read_fingerprint(ds: Dataset) -> bytes | None:
    """The signed fingerprint blob in our private block, or None (verified by the caller)."""
    block = _private_block(ds, create=False)
    if block is None or FINGERPRINT_ELEMENT not in block:
        return None
    value = block[FINGERPRINT_ELEMENT].value
    return bytes(value) if value else None


def write_dicom(
    image: MedicalImage,
    pixels: np.ndarray,
    fp: BinaryIO,
    *,
    record: dict | None = None,
    description: str = "",
    fingerprint: bytes | None = None,
) -> Dataset:
    """Write the derived dataset (see ``build_derived_dataset``) to an open binary file."""
    ds = build_derived_dataset(image, pixels, record=record, description=description, fingerprint=fingerprint)
    # dcmwrite encodes as the (new) Transfer Syntax says, also for a big endian source.
    dcmwrite(fp, ds, enforce_file_format=True)
    logger.debug("wrote derived DICOM for image %s", image.meta.image_id)
    return ds
