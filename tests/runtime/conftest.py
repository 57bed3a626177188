"""Fixtures shared by the cryptographic layer's tests: small real DICOM datasets and key sets."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medsec_edge.runtime.crypto.keyset import new_key_dir


def make_ct(
    rows: int = 64,
    cols: int = 64,
    *,
    bits_stored: int = 12,
    signed: bool = False,
    seed: int = 0,
    frames: int | None = None,
) -> Dataset:
    """A small but complete CT image dataset (file meta, UIDs, patient, geometry, pixels)."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "PID-4711"
    ds.PatientBirthDate = "19700101"
    ds.StudyDate = "20240102"
    ds.AcquisitionDate = "20240102"
    ds.AcquisitionTime = "101500.25"
    ds.InstitutionName = "Klinikum Müllerstraße"
    ds.ReferringPhysicianName = "Who^Doctor"
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.WindowCenter = 40
    ds.WindowWidth = 400
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedImageSequence = Sequence([item])
    high = 2 ** (bits_stored - 1) if signed else 2**bits_stored
    low = -high if signed else 0
    shape = (rows, cols) if frames is None else (frames, rows, cols)
    dtype = np.int16 if signed else np.uint16
    pixels = rng.integers(low, high, shape).astype(dtype)
    ds.set_pixel_data(pixels, "MONOCHROME2", bits_stored)
    return ds


@pytest.fixture
def ct_factory():
    """``make_ct`` itself, for tests that need several images or other parameters."""
    return make_ct


@pytest.fixture
def ct_ds():
    """A fresh 64x64 12-bit CT dataset per test."""
    return make_ct()


@pytest.fixture(scope="session")
def crypto_keyset(tmp_path_factory):
    """One complete key set for the session (RSA key generation is the slow part)."""
    return new_key_dir(tmp_path_factory.mktemp("keys") / "set")
