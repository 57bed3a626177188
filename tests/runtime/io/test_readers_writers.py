"""Image I/O: native dtypes in, faithful DICOM/PNG/TIFF/NPY out, refusals that name the file."""

from __future__ import annotations

import hashlib
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from medsec_edge.runtime.errors import InputError, UsageError
from medsec_edge.runtime.io import png16, writers
from medsec_edge.runtime.io.dicom_writer import (
    _ENHANCED_MR_CLASSES,
    _MR_PULSE_SEQUENCE,
    PRIVATE_CREATOR,
    PRIVATE_GROUP,
    identity_of,
    read_record,
)
from medsec_edge.runtime.io.image import MedicalImage, stored_range
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.writers import write_image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"


def data_file(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} not installed (pip install pydicom-data)")
    return Path(path)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def perturb(image: MedicalImage) -> np.ndarray:
    """A visibly different array that stays inside the stored range (what a stage hands back)."""
    low, high = stored_range(image.meta, image.pixels.dtype)
    step = np.where(np.indices(image.pixels.shape).sum(0) % 2, 1, -1)
    out = image.pixels.astype(np.float64) + step
    return np.clip(out, low, high).astype(image.pixels.dtype)


def make_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    bits_stored: int,
    photometric: str = "MONOCHROME2",
    implicit: bool = False,
    **attrs,
) -> Path:
    """A small but complete secondary-capture DICOM file with patient data in it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.Modality = "OT"
    ds.SeriesDescription = "synthetic"
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.set_pixel_data(pixels, photometric, bits_stored, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def signed12(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(-2048, 2048, size=(32, 40), dtype=np.int16)
    return make_dicom(
        tmp_path / "signed12.dcm",
        pixels,
        bits_stored=12,
        RescaleSlope="0.5",
        RescaleIntercept="-100",
        WindowCenter=["40", "300"],
        WindowWidth=["400", "1500"],
        ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
    )


@pytest.fixture
def mono1(tmp_path: Path) -> Path:
    pixels = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 7) % 1024
    return make_dicom(tmp_path / "mono1.dcm", pixels, bits_stored=10, photometric="MONOCHROME1")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


# ------------------------------------------------------------------------------- reading DICOM

READS = [
    # name, shape, dtype, photometric, bits_stored, signed
    ("CT_small.dcm", (128, 128), np.int16, "MONOCHROME2", 16, True),
    ("MR_small.dcm", (64, 64), np.int16, "MONOCHROME2", 16, True),
    ("emri_small.dcm", (10, 64, 64), np.uint16, "MONOCHROME2", 12, False),
    ("SC_rgb.dcm", (100, 100, 3), np.uint8, "RGB", 8, False),
    ("US1_J2KR.dcm", (480, 640, 3), np.uint8, "RGB", 8, False),  # YBR_RCT
    ("SC_ybr_full_uncompressed.dcm", (100, 100, 3), np.uint8, "RGB", 8, False),
    ("SC_ybr_full_422_uncompressed.dcm", (100, 100, 3), np.uint8, "RGB", 8, False),
    ("MR_small_RLE.dcm", (64, 64), np.int16, "MONOCHROME2", 16, True),
    ("MR_small_jpeg_ls_lossless.dcm", (64, 64), np.int16, "MONOCHROME2", 16, True),
    ("MR_small_jp2klossless.dcm", (64, 64), np.int16, "MONOCHROME2", 16, True),
    ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024), np.uint8, "MONOCHROME2", 8, False),
    ("SC_rgb_jpeg_lossy_gdcm.dcm", (100, 100, 3), np.uint8, "RGB", 8, False),  # baseline YBR
    ("SC_rgb_rle_16bit_2frame.dcm", (2, 100, 100, 3), np.uint16, "RGB", 16, False),
    ("SC_rgb_expb_2frame.dcm", (2, 100, 100, 3), np.uint8, "RGB", 8, False),  # big endian
    ("vlut_04.dcm", (512, 512), np.uint8, "MONOCHROME2", 8, False),
]


@pytest.mark.parametrize("name, shape, dtype, photometric, bits, signed", READS)
def test_read_dicom_keeps_native_dtype(name, shape, dtype, photometric, bits, signed):
    image = read_image(data_file(name))
    assert image.pixels.shape == shape
    assert image.pixels.dtype == dtype and image.pixels.dtype.isnative
    assert image.meta.photometric == photometric
    assert (image.meta.bits_stored, image.meta.signed) == (bits, signed)
    assert image.meta.source_format == "dicom"
    sop = str(image.dataset.SOPInstanceUID)
    assert image.meta.image_id == hashlib.sha256(sop.encode()).hexdigest()[:12]


def test_read_matches_pydicom_pixel_array():
    path = data_file("CT_small.dcm")
    image = read_image(path)
    ds = pydicom.dcmread(path)
    np.testing.assert_array_equal(image.pixels, ds.pixel_array)
    assert image.meta.intercept == float(ds.RescaleIntercept)
    assert image.meta.modality == "CT"


def test_synthetic_signed12_meta(signed12):
    image = read_image(signed12)
    assert image.pixels.dtype == np.int16
    assert image.meta.bits_stored == 12 and image.meta.signed
    assert (image.meta.slope, image.meta.intercept) == (0.5, -100.0)
    assert image.meta.window == (40.0, 400.0)  # first of the multi-valued window
    assert image.pixels.min() < 0


def test_monochrome1_is_kept(mono1, out_dir):
    image = read_image(mono1)
    assert image.meta.photometric == "MONOCHROME1"
    out = read_image(write_image(image, image.pixels, out_dir / "m1.dcm"))
    assert out.dataset.PhotometricInterpretation == "MONOCHROME1"
    tiff = read_image(write_image(image, image.pixels, out_dir / "m1.tiff"))
    assert tiff.meta.photometric == "MONOCHROME1"
    np.testing.assert_array_equal(tiff.pixels, image.pixels)


def test_dicom_without_extension_is_sniffed(tmp_path):
    target = tmp_path / "IM000001"
    target.write_bytes(data_file("MR_small.dcm").read_bytes())
    assert read_image(target).meta.source_format == "dicom"


# ------------------------------------------------------------------------------- writing DICOM

# Attributes a derived image is supposed to change; everything else must survive.
CHANGED = {
    "SOPInstanceUID", "ImageType", "DerivationDescription", "SourceImageSequence", "PixelData",
}
COLOUR_CHANGED = {"PhotometricInterpretation", "PlanarConfiguration"}

ROUND_TRIPS = [
    "CT_small.dcm",
    "emri_small.dcm",
    "SC_rgb.dcm",
    "US1_J2KR.dcm",
    "SC_ybr_full_uncompressed.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "vlut_04.dcm",
]


def assert_derived(src_path: Path, out_path: Path, record: dict, description: str) -> None:
    src = pydicom.dcmread(src_path)
    out = pydicom.dcmread(out_path)
    changed = set(CHANGED)
    if src.PhotometricInterpretation != "RGB" and src.get("SamplesPerPixel", 1) == 3:
        changed |= COLOUR_CHANGED
    if src.file_meta.TransferSyntaxUID.is_compressed:
        changed |= {"IconImageSequence"}
    if src.SOPClassUID in _ENHANCED_MR_CLASSES:
        # The MR Pulse Sequence module is absent from a DERIVED Enhanced MR (dicom_writer says why).
        changed |= set(_MR_PULSE_SEQUENCE)
    for elem in src:
        if elem.keyword in changed:
            continue
        assert elem.tag in out, f"{elem.keyword or elem.tag} lost"
        assert out[elem.tag].value == elem.value, f"{elem.keyword or elem.tag} changed"
    assert out.SOPInstanceUID != src.SOPInstanceUID
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert out.file_meta.TransferSyntaxUID == (
        src.file_meta.TransferSyntaxUID
        if not src.file_meta.TransferSyntaxUID.is_compressed
        and src.file_meta.TransferSyntaxUID != ImplicitVRLittleEndian
        else ExplicitVRLittleEndian
    )
    assert out.ImageType[0] == "DERIVED" and len(out.ImageType) >= 2
    assert description in out.DerivationDescription
    # The source's own references are kept, ours is added last.
    earlier = list(src.get("SourceImageSequence", []))
    assert len(out.SourceImageSequence) == len(earlier) + 1
    assert [i.ReferencedSOPInstanceUID for i in out.SourceImageSequence[:-1]] == [
        i.ReferencedSOPInstanceUID for i in earlier]
    item = out.SourceImageSequence[-1]
    assert item.ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert item.ReferencedSOPClassUID == src.SOPClassUID
    assert out.BitsStored == src.BitsStored
    assert out.PixelRepresentation == src.PixelRepresentation
    assert out.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)[0x01].VR == "UT"
    assert read_record(out) == record
    if out.get("SamplesPerPixel", 1) == 3:
        assert out.PhotometricInterpretation == "RGB" and out.PlanarConfiguration == 0
    assert out["PixelData"].VR == ("OB" if out.BitsAllocated == 8 else "OW")


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_dicom_round_trip(name, out_dir):
    src_path = data_file(name)
    before = sha(src_path)
    image = read_image(src_path)
    modified = perturb(image)
    assert not np.array_equal(modified, image.pixels)
    record = {"payload": "00ff", "bits": [1, 0, 1], "name": name}
    out_path = write_image(image, modified, out_dir / "out.dcm", record=record, description="wm v1")

    again = read_image(out_path)
    assert again.pixels.dtype == image.pixels.dtype
    np.testing.assert_array_equal(again.pixels, modified)
    assert again.meta.photometric == image.meta.photometric
    assert again.meta.bits_stored == image.meta.bits_stored
    assert again.meta.signed == image.meta.signed
    assert again.meta.image_id != image.meta.image_id
    assert identity_of(again) == identity_of(image)
    assert_derived(src_path, out_path, record, "wm v1")
    assert sha(src_path) == before
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.dcm"]


def test_synthetic_implicit_source_round_trip(tmp_path, out_dir):
    pixels = np.arange(20 * 30, dtype=np.uint16).reshape(20, 30)
    src = make_dicom(tmp_path / "impl.dcm", pixels, bits_stored=12, implicit=True)
    image = read_image(src)
    out = write_image(image, image.pixels, out_dir / "impl_out.dcm", record={"k": "v"})
    ds = pydicom.dcmread(out)
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert read_record(ds) == {"k": "v"}
    assert ds.ImageType == ["DERIVED", "SECONDARY"]  # created when absent
    assert ds.PatientName == PATIENT_NAME and ds.BitsStored == 12


def test_identity_survives_repeated_writes(signed12, out_dir):
    image = read_image(signed12)
    first = read_image(write_image(image, image.pixels, out_dir / "a.dcm", record={"n": 1}))
    second = read_image(write_image(first, first.pixels, out_dir / "b.dcm", record={"n": 2}))
    want = {
        "study_uid": str(image.dataset.StudyInstanceUID),
        "series_uid": str(image.dataset.SeriesInstanceUID),
        "patient_id": PATIENT_ID,
        "sop_uid": str(image.dataset.SOPInstanceUID),
    }
    assert identity_of(image) == identity_of(first) == identity_of(second) == want
    assert read_record(second.dataset) == {"n": 2}
    refs = [i.ReferencedSOPInstanceUID for i in second.dataset.SourceImageSequence]
    assert refs == [image.dataset.SOPInstanceUID, first.dataset.SOPInstanceUID]
    assert second.dataset.DerivationDescription.count("medsec-edge") == 2


def test_write_without_record_drops_stale_record(signed12, out_dir):
    image = read_image(signed12)
    first = read_image(write_image(image, image.pixels, out_dir / "a.dcm", record={"n": 1}))
    second = read_image(write_image(first, first.pixels, out_dir / "b.dcm"))
    assert read_record(first.dataset) == {"n": 1}
    assert read_record(second.dataset) is None
    assert identity_of(second)["sop_uid"] == str(image.dataset.SOPInstanceUID)


def test_record_is_sorted_json(signed12, out_dir):
    image = read_image(signed12)
    out = write_image(image, image.pixels, out_dir / "a.dcm", record={"b": 1, "a": [2]})
    ds = pydicom.dcmread(out)
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    assert block[0x01].VR == "UT"
    assert block[0x01].value == json.dumps({"a": [2], "b": 1}, sort_keys=True)


def test_identity_of_non_dicom_is_empty(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((16, 16), np.uint8))
    assert identity_of(read_image(tmp_path / "x.npy")) == {
        "study_uid": "", "series_uid": "", "patient_id": "", "sop_uid": ""
    }


def test_single_frame_multiframe_keeps_number_of_frames(tmp_path, out_dir):
    pixels = np.arange(1 * 20 * 20, dtype=np.uint8).reshape(1, 20, 20)
    src = make_dicom(tmp_path / "mf1.dcm", pixels, bits_stored=8)
    assert pydicom.dcmread(src).NumberOfFrames == 1
    image = read_image(src)
    out = pydicom.dcmread(write_image(image, image.pixels, out_dir / "mf1.dcm"))
    assert out.NumberOfFrames == 1


def test_values_outside_bits_stored_are_refused(signed12, out_dir):
    image = read_image(signed12)
    bad = image.pixels.copy()
    bad[0, 0] = 3000  # > 2047, the BitsStored 12 maximum
    with pytest.raises(UsageError, match="BitsStored|bits_stored"):
        write_image(image, bad, out_dir / "bad.dcm")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------- refusals


def cut_in_half(tmp_path: Path) -> Path:
    data = data_file("CT_small.dcm").read_bytes()
    path = tmp_path / "half.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


def random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "noise.dcm"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def float_pixels(tmp_path: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # parametric map
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 32
    ds.FloatPixelData = np.zeros((16, 16), np.float32).tobytes()
    path = tmp_path / "float.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def tiny_dicom(tmp_path: Path) -> Path:
    return make_dicom(tmp_path / "tiny.dcm", np.zeros((8, 8), np.uint16), bits_stored=16)


def no_pixels(tmp_path: Path) -> Path:
    return data_file("rtstruct.dcm")


def unknown_ext(tmp_path: Path) -> Path:
    path = tmp_path / "image.xyz"
    path.write_bytes(b"hello")
    return path


def bool_npy(tmp_path: Path) -> Path:
    path = tmp_path / "mask.npy"
    np.save(path, np.zeros((32, 32), bool))
    return path


def palette_png(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "pal.png"
    Image.fromarray(np.zeros((20, 20), np.uint8)).convert("P").save(path)
    return path


def truncated_png16(tmp_path: Path) -> Path:
    data = png16.png16_encode(np.zeros((20, 20, 3), np.uint16))
    path = tmp_path / "cut16.png"
    path.write_bytes(data[: len(data) - 30])
    return path


REFUSALS = [
    (lambda tmp: data_file("OBXXXX1A.dcm"), "PALETTE"),
    (lambda tmp: data_file("liver.dcm"), "1-bit"),
    (lambda tmp: data_file("rtdose.dcm"), "RT Dose"),
    (lambda tmp: data_file("emri_small_jpeg_2k_lossless_too_short.dcm"), "truncated"),
    (lambda tmp: data_file("SC_rgb_small_odd.dcm"), "smaller than 16x16"),
    (lambda tmp: data_file("SC_rgb_32bit.dcm"), "2^24"),
    (cut_in_half, "corrupt"),
    (random_bytes, "not a DICOM"),
    (float_pixels, "float pixel data"),
    (tiny_dicom, "smaller than 16x16"),
    (no_pixels, "no pixel data"),
    (unknown_ext, "unknown extension"),
    (bool_npy, "1-bit"),
    (palette_png, "palette"),
    (truncated_png16, "truncated"),
]


@pytest.mark.parametrize("make, reason", REFUSALS)
def test_refused_inputs(make, reason, tmp_path, out_dir):
    path = make(tmp_path)
    with pytest.raises(InputError) as info:
        image = read_image(path)
        write_image(image, image.pixels, out_dir / "never.dcm")
    message = str(info.value)
    assert message.startswith(f"{path.name}: ")
    assert reason in message
    assert "\n" not in message
    assert str(path.parent) not in message
    for secret in (PATIENT_NAME, PATIENT_ID, "Doe", "19700101"):
        assert secret not in message
    assert info.value.exit_code == 4
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------- other formats


def save_and_read(tmp_path: Path, name: str, arr: np.ndarray) -> MedicalImage:
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, arr)
    elif name.endswith((".tif", ".tiff")):
        import tifffile

        tifffile.imwrite(path, arr, photometric="rgb" if arr.shape[-1] == 3 else "minisblack")
    else:
        from PIL import Image

        Image.fromarray(arr).save(path)
    return read_image(path)


PLAIN = [
    ("g8.png", np.uint8, (40, 50)),
    ("g16.png", np.uint16, (40, 50)),
    ("rgb8.png", np.uint8, (40, 50, 3)),
    ("g8.tiff", np.uint8, (40, 50)),
    ("g16.tif", np.uint16, (40, 50)),
    ("s16.tiff", np.int16, (40, 50)),
    ("rgb16.tiff", np.uint16, (40, 50, 3)),
    ("f32.tiff", np.float32, (40, 50)),
    ("stack.tiff", np.uint16, (3, 40, 50)),
    ("g16.npy", np.uint16, (40, 50)),
    ("s16.npy", np.int16, (40, 50)),
    ("f64.npy", np.float64, (40, 50)),
    ("frames.npy", np.int32, (4, 20, 30)),
    ("rgb.npy", np.uint8, (20, 30, 3)),
    ("rgbframes.npy", np.uint16, (2, 20, 30, 3)),
]


@pytest.mark.parametrize("name, dtype, shape", PLAIN)
def test_plain_formats_round_trip(name, dtype, shape, tmp_path, out_dir):
    rng = np.random.default_rng(2)
    if np.dtype(dtype).kind == "f":
        arr = rng.normal(size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        low, high = max(info.min, -30000), min(info.max, 60000)
        arr = rng.integers(low, high, size=shape, endpoint=True).astype(dtype)
    image = save_and_read(tmp_path, name, arr)
    np.testing.assert_array_equal(image.pixels, arr)
    assert image.pixels.dtype == dtype
    assert image.meta.is_colour == (shape[-1] == 3)
    src = tmp_path / name
    before = sha(src)
    modified = perturb(image) if np.dtype(dtype).kind != "f" else arr * 2
    out = write_image(image, modified, out_dir / ("o_" + name))
    again = read_image(out)
    assert again.pixels.dtype == dtype
    np.testing.assert_array_equal(again.pixels, modified)
    assert again.meta.source_format == image.meta.source_format
    assert again.meta.image_id != image.meta.image_id
    assert sha(src) == before
    assert [p.name for p in out_dir.iterdir()] == ["o_" + name]


def test_big_endian_npy_becomes_native(tmp_path):
    arr = np.arange(20 * 20, dtype=">u2").reshape(20, 20)
    image = save_and_read(tmp_path, "be.npy", arr)
    assert image.pixels.dtype == np.uint16 and image.pixels.dtype.isnative
    np.testing.assert_array_equal(image.pixels, arr)


def test_rgb16_png_round_trip(tmp_path, out_dir):
    arr = np.random.default_rng(3).integers(0, 65536, size=(20, 24, 3)).astype(np.uint16)
    np.save(tmp_path / "rgb16.npy", arr)
    image = read_image(tmp_path / "rgb16.npy")
    out = write_image(image, arr, out_dir / "rgb16.png")
    again = read_image(out)
    assert again.meta.source_format == "png" and again.pixels.dtype == np.uint16
    np.testing.assert_array_equal(again.pixels, arr)


def test_jpeg_written_at_quality_100(tmp_path, out_dir):
    yy, xx = np.mgrid[0:64, 0:64]
    arr = np.stack([yy * 3, xx * 3, (yy + xx)], axis=-1).astype(np.uint8)
    image = save_and_read(tmp_path, "in.jpg", arr)
    assert image.meta.source_format == "jpeg" and image.pixels.shape == (64, 64, 3)
    out = read_image(write_image(image, image.pixels, out_dir / "out.jpg"))
    assert out.meta.source_format == "jpeg"
    diff = np.abs(out.pixels.astype(int) - image.pixels.astype(int))
    assert diff.max() <= 3  # q100, 4:4:4: only rounding-level changes
    png = read_image(write_image(image, image.pixels, out_dir / "out.png"))
    np.testing.assert_array_equal(png.pixels, image.pixels)  # lossless on request


def test_format_follows_known_output_suffix(out_dir):
    image = read_image(data_file("emri_small.dcm"))
    frame0 = MedicalImage(pixels=image.pixels[0], meta=image.meta, path=image.path)
    png = write_image(frame0, frame0.pixels, out_dir / "f0.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(read_image(png).pixels, image.pixels[0])
    npy = read_image(write_image(image, image.pixels, out_dir / "all.npy"))
    np.testing.assert_array_equal(npy.pixels, image.pixels)
    other = write_image(image, image.pixels, out_dir / "all.out")  # unknown suffix: input format
    assert other.read_bytes()[128:132] == b"DICM"


def test_format_that_cannot_hold_pixels_is_a_usage_error(out_dir):
    image = read_image(data_file("CT_small.dcm"))  # int16
    with pytest.raises(UsageError, match="PNG"):
        write_image(image, image.pixels, out_dir / "ct.png")
    multi = read_image(data_file("emri_small.dcm"))
    with pytest.raises(UsageError, match="one frame"):
        write_image(multi, multi.pixels, out_dir / "mf.png")
    assert list(out_dir.iterdir()) == []


# ------------------------------------------------------------------------------- write safety


def test_refuses_to_overwrite_input(tmp_path):
    src = tmp_path / "in.npy"
    np.save(src, np.zeros((16, 16), np.uint16))
    before = sha(src)
    image = read_image(src)
    link = tmp_path / "link.npy"
    link.symlink_to(src)
    for target in (src, tmp_path / "." / "in.npy", link):
        with pytest.raises(UsageError, match="input"):
            write_image(image, image.pixels + 1, target)
    assert sha(src) == before


def test_shape_mismatch_is_refused(tmp_path, out_dir):
    np.save(tmp_path / "a.npy", np.zeros((16, 16), np.uint16))
    image = read_image(tmp_path / "a.npy")
    with pytest.raises(UsageError, match="shape"):
        write_image(image, np.zeros((16, 17), np.uint16), out_dir / "b.npy")


def test_failed_write_leaves_no_temp_and_keeps_old_output(tmp_path, out_dir, monkeypatch):
    np.save(tmp_path / "a.npy", np.zeros((16, 16), np.uint16))
    image = read_image(tmp_path / "a.npy")
    target = out_dir / "b.npy"
    target.write_bytes(b"previous")

    def broken(image, pixels, fp, **kwargs):
        fp.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(writers, "_write_npy", broken)
    with pytest.raises(OSError):
        write_image(image, image.pixels, target)
    assert [p.name for p in out_dir.iterdir()] == ["b.npy"]
    assert target.read_bytes() == b"previous"


def test_write_leaves_no_temp_files(signed12, out_dir):
    image = read_image(signed12)
    for i in range(3):
        write_image(image, image.pixels, out_dir / "same.dcm", record={"i": i})
    assert [p.name for p in out_dir.iterdir()] == ["same.dcm"]
    assert read_record(pydicom.dcmread(out_dir / "same.dcm")) == {"i": 2}


# ------------------------------------------------------------------------------- 16-bit PNG codec


def png_with_filters(arr: np.ndarray, filters: list[int]) -> bytes:
    """Reference PNG filtering (PNG spec 9.2) to exercise every filter type the decoder handles."""
    height, width, channels = arr.shape
    bpp = 2 * channels
    rows = arr.astype(">u2").reshape(height, -1).view(np.uint8).astype(int)
    out = bytearray()
    prev = np.zeros(width * bpp, int)
    for y in range(height):
        cur, kind = rows[y], filters[y % len(filters)]
        left = np.concatenate([np.zeros(bpp, int), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, int), prev[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = prev
        elif kind == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - upleft
            pa, pb, pc = abs(p - left), abs(p - prev), abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        out.append(kind)
        out += ((cur - pred) % 256).astype(np.uint8).tobytes()
        prev = cur
    colour_type = {3: 2, 4: 6, 2: 4}[channels]
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b"")
    )


@settings(max_examples=25, deadline=None)
@given(
    arr=arrays(np.uint16, st.tuples(st.integers(1, 6), st.integers(1, 6), st.just(3))),
    filters=st.lists(st.integers(0, 4), min_size=1, max_size=5),
)
def test_png16_decoder_matches_reference_filters(arr, filters):
    decoded = png16.png16_decode(png_with_filters(arr, filters))
    np.testing.assert_array_equal(decoded, arr)


@settings(max_examples=25, deadline=None)
@given(arr=arrays(np.uint16, st.tuples(st.integers(1, 8), st.integers(1, 8), st.just(3))))
def test_png16_encoder_round_trip(arr):
    decoded = png16.png16_decode(png16.png16_encode(arr))
    np.testing.assert_array_equal(decoded, arr)


def test_png16_opaque_alpha_dropped_transparent_refused(tmp_path):
    rgba = np.full((16, 16, 4), 65535, np.uint16)
    rgba[..., :3] = 1234
    path = tmp_path / "rgba16.png"
    path.write_bytes(png_with_filters(rgba, [0, 4]))
    image = read_image(path)
    assert image.pixels.shape == (16, 16, 3) and image.pixels.dtype == np.uint16
    assert (image.pixels == 1234).all()
    rgba[0, 0, 3] = 0
    path.write_bytes(png_with_filters(rgba, [0]))
    with pytest.raises(InputError, match="rgba16.png: .*alpha"):
        read_image(path)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(min_size=0, max_size=600))
def test_fuzzed_bytes_raise_only_input_error(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("fuzz")
    for suffix in (".dcm", ".png", ".tiff", ".npy", ".jpg"):
        path = folder / f"f{suffix}"
        path.write_bytes(data)
        with pytest.raises(InputError):
            read_image(path)


def test_fuzzed_dicom_header_raises_only_input_error(tmp_path):
    data = bytearray(data_file("MR_small.dcm").read_bytes())
    rng = np.random.default_rng(4)
    for i in range(30):
        corrupt = bytearray(data)
        for pos in rng.integers(132, 1200, size=8):
            corrupt[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"c{i}.dcm"
        path.write_bytes(bytes(corrupt))
        try:
            image = read_image(path)
        except InputError as exc:
            assert str(exc).startswith(f"c{i}.dcm: ")
        else:
            assert image.pixels.ndim >= 2



# --------------------------------------------------------------------------------------------
# hostile headers: sizes checked before allocation, non-finite rescale, value-free messages


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_png16_bomb_refused_from_its_header_before_inflating(tmp_path):
    import tracemalloc

    width = height = 20000  # 2.4 GB of 16-bit RGB claimed by a ~2 MB file
    comp = zlib.compressobj(9)
    row = b"\x00" * (width * 6 + 1)
    idat = b"".join(comp.compress(row) for _ in range(2000)) + comp.flush()  # only 200 MB inflated
    data = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"bomb.png: PNG header claims 2.2 GiB .*MEDSEC_EDGE_MAX_IMAGE_BYTES"):
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The IDAT alone inflates to 240 MB; refusing from the IHDR takes no more than imports do.
    assert peak < 64 * 2**20, f"{peak} bytes allocated before refusing"


def test_png16_inflates_no_more_than_its_header_claims():
    rgb = np.arange(64 * 64 * 3, dtype=np.uint16).reshape(64, 64, 3)
    data = png16.png16_encode(rgb)
    # Same IHDR, but an IDAT that inflates to 100x what 64x64 needs: decoded, the excess ignored.
    row = b"\x00" + rgb.astype(">u2").tobytes()[: 64 * 6]
    idat = zlib.compress(b"".join(row for _ in range(6400)))
    bomb = data[:33] + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    out = png16.png16_decode(bomb)
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out[1], rgb[0])


@pytest.mark.parametrize("changes, reason", [
    ({"Rows": 65535, "Columns": 65535}, r"65535x65535 pixels per frame"),
    ({"NumberOfFrames": "1000000"}, r"1000000 frames"),
    ({"NumberOfFrames": "3"}, r"Pixel Data holds 32768 bytes, .* describes 98304"),
])
def test_dicom_header_sizes_checked_before_decoding(tmp_path, changes, reason):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    for key, value in changes.items():
        setattr(ds, key, value)
    path = tmp_path / "claims.dcm"
    ds.save_as(path)
    with pytest.raises(InputError, match=reason) as info:
        read_image(path)
    assert info.value.exit_code == 4


def test_compressed_dicom_claiming_a_huge_expansion_is_refused(tmp_path, monkeypatch):
    ds = pydicom.dcmread(data_file("MR_small_RLE.dcm"))
    ds.NumberOfFrames = "4000"  # 4000 x 64x64x2 = 32 MB from 6 KB of RLE data
    path = tmp_path / "rle.dcm"
    ds.save_as(path)
    with pytest.raises(InputError, match=r"rle.dcm: compressed DICOM Pixel Data claims .* 1024:1"):
        read_image(path)
    monkeypatch.setenv("MEDSEC_EDGE_MAX_FRAMES", "100")
    with pytest.raises(InputError, match=r"4000 frames, more than the limit of 100 \(MEDSEC_EDGE_MAX_FRAMES\)"):
        read_image(path)


@pytest.mark.parametrize("keyword, value, reason", [
    ("RescaleSlope", "NaN", "RescaleSlope is not a finite number"),
    ("RescaleSlope", "inf", "RescaleSlope is not a finite number"),
    ("RescaleIntercept", "-inf", "RescaleIntercept is not a finite number"),
    ("RescaleSlope", "1e308", r"map stored values beyond \+/-1e\+15"),
])
def test_non_finite_or_absurd_rescale_is_bad_input(tmp_path, keyword, value, reason):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    setattr(ds, keyword, value)
    path = tmp_path / "rescale.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path)
    with pytest.raises(InputError, match=reason) as info:
        read_image(path)
    assert info.value.exit_code == 4 and "\n" not in str(info.value)


@pytest.mark.parametrize("center, width", [("NaN", "400"), ("40", "inf"), ("1e300", "1e300")])
def test_non_finite_window_is_ignored_not_refused(tmp_path, center, width):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = center, width
    path = tmp_path / "window.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path)
    image = read_image(path)
    assert image.meta.window is None  # the percentile window is used instead
    ds.WindowCenter, ds.WindowWidth = "40", "400"
    ds.save_as(path)
    assert read_image(path).meta.window == (40.0, 400.0)


def test_random_bytes_after_dicm_are_bad_input(tmp_path):
    from medsec_edge.runtime.io.readers import read_dataset

    path = tmp_path / "random.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + np.random.default_rng(8).bytes(4000))
    for read in (read_image, read_dataset):
        with pytest.raises(InputError, match="random.dcm: not a DICOM object: no SOP Class UID") as info:
            read(path)
        assert info.value.exit_code == 4


def test_refusals_never_quote_element_values(tmp_path):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.PhotometricInterpretation = PATIENT_NAME.upper()
    path = tmp_path / "photometric.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path)
    with pytest.raises(InputError) as info:
        read_image(path)
    assert "photometric interpretation" in str(info.value)
    assert PATIENT_NAME.upper() not in str(info.value)


def test_third_party_details_lose_quoted_values_and_keep_our_reason():
    from medsec_edge.runtime.io.readers import _detail

    long = ValueError("Invalid value for VR PN: 'Doe^Jane' " + "and more words " * 40)
    detail = _detail(long)
    assert "Doe^Jane" not in detail and detail.startswith("ValueError: Invalid value for VR PN: '...'")
    assert len(detail) <= 204 and detail.endswith(" ...") and "\n" not in detail


def test_pydicom_child_logger_records_stay_inside_a_read(monkeypatch):
    import logging

    from medsec_edge.runtime.io.readers import _quiet_pydicom_log

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.DEBUG)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(self.format(record))

    # What reaches the root logger's handlers is what a program's stderr would show. (pytest's
    # caplog also hooks non-propagating loggers, so it cannot tell.) Start from the library's own
    # state: an in-process CLI test earlier in the session may have silenced the tree for good.
    root, collect = logging.getLogger(), Collect()
    monkeypatch.setattr(logging.getLogger("pydicom"), "propagate", True)
    monkeypatch.setattr(logging.getLogger("pydicom"), "level", logging.NOTSET)
    monkeypatch.setattr(root, "level", logging.DEBUG)
    root.addHandler(collect)
    try:
        child = logging.getLogger("pydicom.pixels.decoders.base")
        with _quiet_pydicom_log():
            with _quiet_pydicom_log():  # nested reads restore once, at the end of the outer one
                child.error("decoder failed for %s", PATIENT_NAME, exc_info=ValueError(PATIENT_NAME))
            child.error("still inside: %s", PATIENT_ID)
        text = "\n".join(collect.lines)
        assert PATIENT_NAME not in text and PATIENT_ID not in text
        child.error("after the read")
    finally:
        root.removeHandler(collect)
    assert "after the read" in "\n".join(collect.lines)  # propagation restored


def test_pydicom_warnings_during_a_read_do_not_escape(tmp_path, recwarn):
    ds = pydicom.dcmread(data_file("CT_small.dcm"))
    ds.add_new(0x00091010, "LO", "Doe^Jane")
    path = tmp_path / "warns.dcm"
    ds.save_as(path)
    data = path.read_bytes()
    # Retyped DS: an invalid value pydicom warns about while reading, quoting it.
    path.write_bytes(data.replace(b"\x09\x00\x10\x10LO", b"\x09\x00\x10\x10DS"))
    warnings.simplefilter("always")
    try:
        read_image(path)
    except InputError:
        pass
    assert not [w for w in recwarn if "Doe^Jane" in str(w.message)]
