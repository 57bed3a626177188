"""The DICOM writer: file meta of ours, the source's references kept, and dciodvfy finds nothing
new in what ``run`` writes (derived, sealed, signed) that was not already in the input."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, generate_uid

from medsec_edge.runtime.crypto.dicom_signature import sign_dataset
from medsec_edge.runtime.crypto.keyset import SealSigner
from medsec_edge.runtime.crypto.seal import seal_dataset
from medsec_edge.runtime.io.dicom_writer import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    build_derived_dataset,
    identity_of,
)
from medsec_edge.runtime.io.readers import read_image

DCIODVFY = Path("/usr/bin/dciodvfy")
REQUIRE_DCIODVFY_ENV = "MEDSEC_EDGE_REQUIRE_DCIODVFY"
# pydicom's test files (and pydicom-data's emri_small, an Enhanced MR) that dciodvfy can read:
# native, implicit, big endian, RLE, JPEG-LS, JPEG 2000, JPEG, colour, overlay, multi-frame.
DCIODVFY_FILES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "ExplVR_BigEnd.dcm",
    "JPEG2000.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_rle_2frame.dcm",
    "examples_overlay.dcm",
    "emri_small.dcm",
)


def _data(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(path)


def _output(path: Path, keyset) -> Dataset:
    """What ``run`` writes: derived, sealed, signed; read back from its bytes."""
    image = read_image(path)
    ds = build_derived_dataset(image, image.pixels, record={"payload": "00ff"}, description="t")
    seal_dataset(ds, SealSigner.generate())
    sign_dataset(ds, keyset.dicom_signer)
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def test_file_meta_names_us_not_the_source(crypto_keyset):
    src = pydicom.dcmread(_data("CT_small.dcm"))
    out = _output(_data("CT_small.dcm"), crypto_keyset)
    meta = out.file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationClassUID != src.file_meta.ImplementationClassUID
    assert UID(IMPLEMENTATION_CLASS_UID).is_valid and len(IMPLEMENTATION_CLASS_UID) <= 64
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert len(IMPLEMENTATION_VERSION_NAME) <= 16
    assert meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != src.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == src.SOPClassUID
    assert "SourceApplicationEntityTitle" not in meta


def test_source_image_sequence_keeps_earlier_references_and_adds_ours(tmp_path, crypto_keyset):
    ds = pydicom.dcmread(_data("CT_small.dcm"))
    earlier = []
    for _ in range(2):
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = generate_uid()
        earlier.append(item)
    ds.SourceImageSequence = Sequence(earlier)
    src = tmp_path / "with_sources.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = _output(src, crypto_keyset)
    refs = [str(i.ReferencedSOPInstanceUID) for i in out.SourceImageSequence]
    assert refs == [str(i.ReferencedSOPInstanceUID) for i in earlier] + [str(ds.SOPInstanceUID)]
    assert out.SourceImageSequence[-1].ReferencedSOPClassUID == ds.SOPClassUID
    # the identity a payload binds to is still the first source's
    path = tmp_path / "out.dcm"
    out.save_as(path, enforce_file_format=True)
    assert identity_of(read_image(path))["sop_uid"] == str(ds.SOPInstanceUID)


def test_enhanced_mr_frames_are_marked_derived(tmp_path, crypto_keyset):
    ds = pydicom.dcmread(_data("emri_small.dcm"))  # Enhanced MR, without functional groups
    assert "PulseSequenceName" in ds or "MRAcquisitionType" in ds

    def group() -> Dataset:
        frame_type = Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        item = Dataset()
        item.MRImageFrameTypeSequence = Sequence([frame_type])
        return item

    ds.SharedFunctionalGroupsSequence = Sequence([group()])
    ds.PerFrameFunctionalGroupsSequence = Sequence([group() for _ in range(ds.NumberOfFrames)])
    src = tmp_path / "emri_groups.dcm"
    ds.save_as(src, enforce_file_format=True)
    out = _output(src, crypto_keyset)
    assert out.ImageType[0] == "DERIVED"
    groups = [*out.SharedFunctionalGroupsSequence, *out.PerFrameFunctionalGroupsSequence]
    types = [i.FrameType[0] for g in groups for i in g.MRImageFrameTypeSequence]
    assert len(types) == 1 + ds.NumberOfFrames and set(types) == {"DERIVED"}
    # Type 1C "if ORIGINAL": a derived image must not carry them (dciodvfy: an error)
    assert "PulseSequenceName" not in out and "MRAcquisitionType" not in out


def _dciodvfy_errors(path: Path) -> set[str]:
    result = subprocess.run([str(DCIODVFY), str(path)], capture_output=True, text=True, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    # one message per error kind: values and positions vary, the kind does not
    return {
        re.sub(r"\d+", "#", " ".join(line.split()))
        for line in lines
        if line.strip().startswith("Error")
    }


@pytest.fixture
def require_dciodvfy():
    if DCIODVFY.exists():
        return
    reason = "dicom3tools' dciodvfy is not installed at /usr/bin/dciodvfy (apt-get install dicom3tools)"
    if os.environ.get(REQUIRE_DCIODVFY_ENV, "").strip() == "1":
        pytest.fail(f"{reason}; {REQUIRE_DCIODVFY_ENV}=1 requires it", pytrace=False)
    pytest.skip(reason)


@pytest.mark.usefixtures("require_dciodvfy")
@pytest.mark.parametrize("name", DCIODVFY_FILES)
def test_dciodvfy_finds_no_error_in_our_output_that_was_not_in_the_input(
    tmp_path, name, crypto_keyset
):
    src = _data(name)
    before = _dciodvfy_errors(src)
    assert not any("read failed" in e for e in before), f"dciodvfy cannot read {name}"
    out = tmp_path / "out.dcm"
    _output(src, crypto_keyset).save_as(out, enforce_file_format=True)
    after = _dciodvfy_errors(out)
    assert not any("read failed" in e for e in after)
    assert after - before == set(), f"{name}: new dciodvfy errors {sorted(after - before)}"
