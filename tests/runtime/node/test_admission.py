"""Admission: what a C-STORE handler accepts, and the PS3.4 status for what it refuses."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from medsec_edge.runtime.node.admission import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH,
    SOP_CLASS_NOT_SUPPORTED,
    accepted_transfer_syntaxes,
    admit,
)

REPO = Path(__file__).resolve().parents[3]
CT = REPO / "samples" / "CT_small.dcm"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _bytes(ds) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def test_a_real_ct_is_accepted_with_its_identity():
    data = CT.read_bytes()
    result = admit(data, CT_STORAGE)
    assert result.accepted and result.status == 0
    assert result.sop_class == CT_STORAGE
    assert result.sop_uid == str(pydicom.dcmread(CT).SOPInstanceUID)


def test_pixel_data_shorter_than_its_attributes_is_cannot_understand():
    ds = pydicom.dcmread(CT)
    ds.PixelData = ds.PixelData[:-200]
    result = admit(_bytes(ds), CT_STORAGE)
    assert result.status == CANNOT_UNDERSTAND and "Pixel Data has" in result.reason


def test_a_file_cut_in_the_middle_is_cannot_understand():
    data = CT.read_bytes()
    result = admit(data[: len(data) // 2], CT_STORAGE)
    assert result.status == CANNOT_UNDERSTAND


def test_garbage_is_cannot_understand():
    assert admit(b"\x00" * 10, CT_STORAGE).status == CANNOT_UNDERSTAND
    assert admit(b"DICM" * 100).status == CANNOT_UNDERSTAND


def test_a_data_set_of_another_sop_class_than_the_request_is_does_not_match():
    result = admit(CT.read_bytes(), "1.2.840.10008.5.1.4.1.1.4")  # the request said MR
    assert result.status == DOES_NOT_MATCH


def test_an_unknown_sop_class_is_not_supported():
    ds = pydicom.dcmread(CT)
    ds.SOPClassUID = "1.2.3.4.5.6"
    ds.file_meta.MediaStorageSOPClassUID = "1.2.3.4.5.6"
    assert admit(_bytes(ds)).status == SOP_CLASS_NOT_SUPPORTED


def test_no_pixel_data_or_no_uid_is_refused_naming_what_is_missing():
    ds = pydicom.dcmread(CT)
    del ds.PixelData
    result = admit(_bytes(ds))
    assert result.status == CANNOT_UNDERSTAND and "no Pixel Data" in result.reason
    ds = pydicom.dcmread(CT)
    del ds.Rows
    assert admit(_bytes(ds)).status == CANNOT_UNDERSTAND


def test_reasons_never_quote_values():
    ds = pydicom.dcmread(CT)
    ds.PixelData = ds.PixelData[:-2]
    result = admit(_bytes(ds), CT_STORAGE)
    for value in (str(ds.PatientName), str(ds.SOPInstanceUID), str(ds.PatientID)):
        assert value not in result.reason


def test_compressed_syntaxes_are_offered_only_with_their_decoder():
    syntaxes = accepted_transfer_syntaxes()
    assert ExplicitVRLittleEndian in syntaxes
    # RLE is decoded by pydicom itself (numpy): always available here
    assert RLELossless in syntaxes


@pytest.mark.parametrize("uid", ["", "1.2..3"])
def test_an_invalid_sop_instance_uid_is_refused(uid):
    ds = pydicom.dcmread(CT)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid or "1.2.3"
    assert admit(_bytes(ds)).status == CANNOT_UNDERSTAND


def _no_pixels() -> bytes:
    ds = pydicom.dcmread(CT)
    del ds.PixelData
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    return _bytes(ds)


def test_an_object_without_pixels_passes_only_when_allowed():
    assert admit(_no_pixels()).status == CANNOT_UNDERSTAND
    passing = admit(_no_pixels(), images_only=False)
    assert passing.accepted and passing.has_pixels is False
    assert admit(CT.read_bytes(), images_only=False).has_pixels is True
