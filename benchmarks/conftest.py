"""Shared fixtures for the benchmarks: the default bundle and realistic 16-bit images."""

from __future__ import annotations

import os

# As the command line does (runtime/cli/__init__.py): one BLAS thread, so the timings are the
# device's. Effective only if numpy is not loaded yet when pytest reads this file.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS; not OMP (torch and ORT read that)

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from medsec_edge.runtime.io.image import ImageMeta, MedicalImage  # noqa: E402


def _held_out_frame(name: str) -> np.ndarray:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom-data file {name} is not installed (pip install pydicom-data)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path).pixel_array


def _image(pixels: np.ndarray, bits: int, window: tuple[float, float]) -> MedicalImage:
    meta = ImageMeta(bits_stored=bits, signed=pixels.dtype.kind == "i", window=window, modality="MR",
                     image_id="bench", source_format="dicom")
    return MedicalImage(pixels=pixels, meta=meta)


@pytest.fixture(scope="session")
def image_512() -> MedicalImage:
    """A real 512x512 16-bit CT (held-out pydicom-data; timing only, never training)."""
    return _image(_held_out_frame("693_UNCR.dcm").astype(np.int16), 16, (40.0, 400.0))


@pytest.fixture(scope="session")
def image_2048() -> MedicalImage:
    """A real 1024x1024 12-bit MR upsampled to 2048x2048 (uint16)."""
    mr = _held_out_frame("MR2_UNCR.dcm").astype(np.uint16)
    return _image(np.kron(mr, np.ones((2, 2), np.uint16)), 12, (600.0, 1200.0))


@pytest.fixture(scope="session")
def watermarker():
    from medsec_edge.runtime.pipeline import load_watermarker

    wm, _ = load_watermarker(threads=2)
    return wm
