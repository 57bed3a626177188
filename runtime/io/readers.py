"""Read medical images at native bit depth: DICOM, PNG, TIFF, JPEG, NPY.

Layer: runtime (io: numpy, pydicom, pillow, tifffile). DESIGN.md, Images: pixels keep their dtype
and sign, never scaled to 8 bits; colour is RGB in memory, frames first. Inputs we cannot process
faithfully (palette colour, 1-bit, RT Dose, no or float pixel data, truncated files, tiny images)
are refused with a one-line ``InputError`` naming the file (basename only) and the reason; no
message carries patient data.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np

from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage

from medsec_edge.runtime.io.formats import FORMAT_BY_SUFFIX
from medsec_edge.runtime.io.png16 import PngError, png16_decode

__all__ = ["read_image"]

logger = logging.getLogger(__name__)

MIN_SIDE = 16
# 32-bit integers are accepted only when every value is exact in float32, the precision the
# watermark and check stages compute in; larger values would change when mapped back.
MAX_EXACT_FLOAT32 = 2**24

_TRUNCATION_HINTS = (
    "end of file",
    "truncat",
    "too short",
    "less than expected",
    "not enough",
    "fewer",
    "missing",
    "incomplete",
    "premature",
    "unexpected end",
)


class _Refused(Exception):
    """Internal: a reason to refuse; read_image turns it into InputError with the file name."""


# --------------------------------------------------------------------------------------------
# reading


def read_image(path: str | Path) -> MedicalImage:
    """Read an image file at its native dtype and sign (see module docstring for the formats).

    Raises ``InputError`` (one line: file basename and reason) for files we refuse or cannot read.
    """
    path = Path(path)
    name = path.name
    try:
        data = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise InputError(f"{name}: cannot read file ({reason})") from None
    try:
        fmt = _detect_format(path, data)
        reader = {
            "dicom": _read_dicom,
            "png": _read_pillow,
            "jpeg": _read_pillow,
            "tiff": _read_tiff,
            "npy": _read_npy,
        }[fmt]
        image = reader(path, data)
        _check_size(image.pixels, image.meta.is_colour)
    except _Refused as exc:
        raise InputError(f"{name}: {_one_line(str(exc), path)}") from None
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a file we cannot read
        reason = _one_line(f"{type(exc).__name__}: {exc}", path)
        raise InputError(f"{name}: unreadable or corrupt file ({reason})") from None
    logger.debug(
        "read %s image %s %s %s", fmt, image.meta.image_id, image.pixels.shape, image.pixels.dtype
    )
    return image


def _one_line(text: str, path: Path) -> str:
    text = text.replace(" in file <no filename>", "")
    text = text.replace(str(path.resolve()), path.name).replace(str(path), path.name)
    text = " ".join(text.split())
    return text[:240]


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def _detect_format(path: Path, data: bytes) -> str:
    suffix = path.suffix.lower()
    if suffix in FORMAT_BY_SUFFIX:
        return FORMAT_BY_SUFFIX[suffix]
    if suffix:
        raise _Refused(
            f"unknown extension {suffix!r}: expected one of {', '.join(sorted(FORMAT_BY_SUFFIX))}"
        )
    # DICOM files often have no extension; sniff the content then.
    if data[128:132] == b"DICM":
        return "dicom"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:6] == b"\x93NUMPY":
        return "npy"
    raise _Refused("no extension and not a DICOM, PNG, TIFF, JPEG or NPY file")


def _check_size(pixels: np.ndarray, colour: bool) -> None:
    frame = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    if len(frame) < 2 or min(frame) < MIN_SIDE:
        raise _Refused(
            f"image is {'x'.join(map(str, frame))} pixels, smaller than {MIN_SIDE}x{MIN_SIDE}"
        )


def _native(arr: np.ndarray) -> np.ndarray:
    arr = np.asarray(arr)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def _check_int32(arr: np.ndarray) -> None:
    if arr.dtype.kind in "iu" and arr.dtype.itemsize > 2 and arr.size:
        low, high = int(arr.min()), int(arr.max())
        if low < -MAX_EXACT_FLOAT32 or high > MAX_EXACT_FLOAT32:
            raise _Refused(
                f"{arr.dtype} values [{low}, {high}] do not fit the +/-2^24 range that is "
                "processed exactly"
            )


# DICOM ----------------------------------------------------------------------------------------


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else None
        return None if value is None else float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _functional(ds, sequence: str):
    """First item of ``sequence`` in the shared functional groups (enhanced multi-frame)."""
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group)
        if items:
            inner = items[0].get(sequence)
            if inner:
                return inner[0]
    return None


def _read_dicom(path: Path, data: bytes) -> MedicalImage:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import get_decoder

    with warnings.catch_warnings(record=True) as caught, _quiet_pydicom_log():
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
        except InvalidDicomError:
            # Some writers omit the preamble; accept only what still parses as a dataset.
            try:
                ds = pydicom.dcmread(io.BytesIO(data), force=True)
                if "SOPClassUID" not in ds and "PixelData" not in ds:
                    raise InvalidDicomError("no SOP Class UID")
            except Exception:  # noqa: BLE001 - anything unparsable is "not DICOM"
                raise _Refused("not a DICOM file (no 'DICM' preamble, no dataset)") from None
        # dcmread is lazy: convert every element now, so corrupt values fail here and pydicom's
        # validation warnings (which quote values, possibly patient data) stay in this block.
        for _elem in ds.iterall():
            pass
        _raise_on_truncation(caught)

        modality = str(ds.get("Modality", "") or "") or None
        if modality == "RTDOSE":
            raise _Refused("RT Dose objects are refused (dose grid, not an image)")
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise _Refused("float pixel data is not supported")
        if "PixelData" not in ds:
            raise _Refused(
                "no pixel data (e.g. structured report, RT structure set, or truncated file)"
            )
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
        if photometric == "PALETTE COLOR":
            raise _Refused("PALETTE COLOR images are refused: convert to RGB first")
        bits_allocated = int(ds.get("BitsAllocated", 0) or 0)
        if bits_allocated == 1:
            raise _Refused("1-bit images (e.g. segmentations) are refused")
        if bits_allocated not in (8, 16, 32):
            raise _Refused(f"BitsAllocated {bits_allocated} is not supported (8, 16 or 32)")
        if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL",
                               "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
            raise _Refused(f"photometric interpretation {photometric!r} is not supported")
        if int(ds.get("SamplesPerPixel", 1) or 1) not in (1, 3):
            raise _Refused(f"SamplesPerPixel {ds.SamplesPerPixel} is not supported (1 or 3)")

        ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        if ts is None:
            raise _Refused("no transfer syntax in the file meta information")
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise _Refused(f"transfer syntax {ts.name} ({ts}) is not supported") from None
        if not decoder.is_available:
            raise _Refused(
                f"no decoder installed for {ts.name}: pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg"
            )
        try:
            arr, info = decoder.as_array(ds, as_rgb=True)
        except Exception as exc:  # noqa: BLE001 - a codec failure is a corrupt or truncated file
            raise _Refused(
                f"truncated or corrupt {ts.name} pixel data ({type(exc).__name__}: {exc})"
            ) from None
        _raise_on_truncation(caught)

    arr = _native(arr)
    if arr.dtype.kind == "f":
        raise _Refused("float pixel data is not supported")
    _check_int32(arr)
    out_photometric = str(info.get("photometric_interpretation", photometric))
    if out_photometric.startswith("YBR"):
        # The decoder left YBR data alone (e.g. a codec that reports YBR); convert here.
        from pydicom.pixels import convert_color_space

        arr = convert_color_space(arr, out_photometric, "RGB")
        out_photometric = "RGB"
    if out_photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB"):
        raise _Refused(f"decoded photometric interpretation {out_photometric!r} is not supported")

    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if slope is None and (pvt := _functional(ds, "PixelValueTransformationSequence")) is not None:
        slope, intercept = pvt.get("RescaleSlope"), pvt.get("RescaleIntercept")
    if center is None and (voi := _functional(ds, "FrameVOILUTSequence")) is not None:
        center, width = voi.get("WindowCenter"), voi.get("WindowWidth")
    slope_f, intercept_f = _first(slope), _first(intercept)
    center_f, width_f = _first(center), _first(width)
    window = (center_f, width_f) if center_f is not None and width_f is not None else None

    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    meta = ImageMeta(
        bits_stored=int(ds.get("BitsStored", bits_allocated) or bits_allocated),
        signed=int(ds.get("PixelRepresentation", 0) or 0) == 1,
        photometric=out_photometric,
        slope=1.0 if slope_f is None or slope_f == 0 else slope_f,
        intercept=0.0 if intercept_f is None else intercept_f,
        window=window,
        modality=modality,
        image_id=_short_hash(sop_uid.encode() if sop_uid else data),
        source_format="dicom",
    )
    return MedicalImage(pixels=arr, meta=meta, path=path, dataset=ds)


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextlib.contextmanager
def _quiet_pydicom_log():
    """Silence pydicom's logger while we read: its warnings can quote element values (PHI).

    The same messages arrive as Python warnings, which ``_read_dicom`` inspects.
    """
    pydicom_logger = logging.getLogger("pydicom")
    drop = _DropRecords()
    pydicom_logger.addFilter(drop)
    try:
        yield
    finally:
        pydicom_logger.removeFilter(drop)


def _raise_on_truncation(caught: list) -> None:
    for item in caught:
        text = str(item.message)
        if any(hint in text.lower() for hint in _TRUNCATION_HINTS):
            raise _Refused(f"truncated or corrupt file ({text})")


# PNG / JPEG -----------------------------------------------------------------------------------


def _drop_opaque_alpha(arr: np.ndarray, what: str) -> np.ndarray:
    alpha = arr[..., -1]
    top = np.iinfo(arr.dtype).max
    if not np.all(alpha == top):
        raise _Refused(f"{what} with a transparent alpha channel is not supported")
    return arr[..., :-1]


def _read_pillow(path: Path, data: bytes) -> MedicalImage:
    from PIL import Image

    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        bit_depth, colour_type = data[24], data[25]
        if bit_depth == 16 and colour_type in (2, 4, 6):
            try:
                arr = png16_decode(data)
            except PngError as exc:
                raise _Refused(str(exc)) from None
            if arr.shape[-1] in (2, 4):
                arr = _drop_opaque_alpha(arr, "16-bit PNG")
            photometric = "MONOCHROME2" if arr.shape[-1] == 1 else "RGB"
            arr = np.ascontiguousarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
            meta = _plain_meta(arr, photometric, "png", data)
            return MedicalImage(pixels=arr, meta=meta, path=path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
        im.load()
    fmt = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}.get(im.format or "")
    if fmt is None:
        raise _Refused(f"content is {im.format or 'unknown'}, not PNG or JPEG")
    mode = im.mode
    if mode in ("P", "PA"):
        raise _Refused("palette images are refused: convert to RGB first")
    if mode == "1":
        raise _Refused("1-bit images are refused")
    if mode == "CMYK" or mode == "YCbCr" and fmt != "jpeg":
        raise _Refused(f"{mode} images are not supported")
    if mode == "I;16B" or mode == "I;16L":
        mode = "I;16"
    if mode in ("L", "RGB", "I;16", "I", "LA", "RGBA"):
        arr = np.asarray(im)
    elif mode == "YCbCr":
        arr = np.asarray(im.convert("RGB"))
        mode = "RGB"
    else:
        raise _Refused(f"image mode {mode} is not supported")
    if mode in ("LA", "RGBA"):
        arr = _drop_opaque_alpha(arr, f"{mode} image")
        mode = mode[:-1]
    if mode == "I":
        # 16-bit grey PNGs may come as 32-bit 'I'; keep the PNG's own depth.
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise _Refused("32-bit integer PNG data is not supported")
        arr = arr.astype(np.uint16)
    arr = _native(arr)
    photometric = "RGB" if mode == "RGB" else "MONOCHROME2"
    meta = _plain_meta(arr, photometric, fmt, data)
    return MedicalImage(pixels=arr, meta=meta, path=path)


def _plain_meta(arr: np.ndarray, photometric: str, fmt: str, data: bytes) -> ImageMeta:
    return ImageMeta(
        bits_stored=arr.dtype.itemsize * 8,
        signed=arr.dtype.kind in "if",
        photometric=photometric,
        image_id=_short_hash(data),
        source_format=fmt,
    )


# TIFF -----------------------------------------------------------------------------------------


def _read_tiff(path: Path, data: bytes) -> MedicalImage:
    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        if not tif.series:
            raise _Refused("TIFF file holds no image")
        series = tif.series[0]
        page = series.keyframe
        photometric = page.photometric
        arr = series.asarray()
        axes = series.axes
        extrasamples = tuple(getattr(page, "extrasamples", ()) or ())
    name = getattr(photometric, "name", str(photometric))
    if name == "PALETTE":
        raise _Refused("palette images are refused: convert to RGB first")
    if arr.dtype == np.bool_ or page.bitspersample == 1:
        raise _Refused("1-bit images are refused")
    if arr.dtype.kind not in "iuf":
        raise _Refused(f"TIFF sample type {arr.dtype} is not supported")
    if name == "RGB":
        if "S" in axes and axes.index("S") != len(axes) - 1:
            arr = np.moveaxis(arr, axes.index("S"), -1)
        if arr.shape[-1] == 4:
            arr = _drop_opaque_alpha(arr, "RGBA TIFF")
        if arr.shape[-1] != 3:
            raise _Refused(f"RGB TIFF with {arr.shape[-1]} samples is not supported")
        out_photometric = "RGB"
    elif name in ("MINISBLACK", "MINISWHITE"):
        if extrasamples or "S" in axes:
            raise _Refused("grey TIFF with extra samples (alpha) is not supported")
        out_photometric = "MONOCHROME2" if name == "MINISBLACK" else "MONOCHROME1"
    else:
        raise _Refused(f"TIFF photometric {name} is not supported")
    colour = out_photometric == "RGB"
    arr = arr.reshape((-1,) + arr.shape[-3:]) if colour and arr.ndim > 4 else arr
    if not colour and arr.ndim > 3:
        arr = arr.reshape((-1,) + arr.shape[-2:])
    arr = _native(arr)
    _check_int32(arr)
    meta = _plain_meta(arr, out_photometric, "tiff", data)
    return MedicalImage(pixels=arr, meta=meta, path=path)


# NPY ------------------------------------------------------------------------------------------


def _read_npy(path: Path, data: bytes) -> MedicalImage:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as exc:
        raise _Refused(f"not a plain numeric NPY array ({exc})") from None
    if not isinstance(arr, np.ndarray):
        raise _Refused("NPZ archives are not supported: save one array with numpy.save")
    if arr.dtype == np.bool_:
        raise _Refused("1-bit (boolean) images are refused")
    if arr.dtype.kind not in "iuf":
        raise _Refused(f"dtype {arr.dtype} is not supported (integer or float)")
    if arr.dtype.kind == "f" and arr.size and not np.all(np.isfinite(arr)):
        raise _Refused("array holds NaN or infinite values")
    colour = arr.ndim in (3, 4) and arr.shape[-1] == 3
    if not (arr.ndim in (2, 3) or (arr.ndim == 4 and colour)):
        raise _Refused(f"array shape {arr.shape} is not (H,W), (F,H,W), (H,W,3) or (F,H,W,3)")
    arr = _native(arr)
    meta = _plain_meta(arr, "RGB" if colour else "MONOCHROME2", "npy", data)
    return MedicalImage(pixels=arr, meta=meta, path=path)


