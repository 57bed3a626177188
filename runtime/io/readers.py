"""Read medical images at native bit depth: DICOM, PNG, TIFF, JPEG, NPY.

Layer: runtime (io: numpy, pydicom, pillow, tifffile). DESIGN.md, Images: pixels keep their dtype
and sign, never scaled to 8 bits; colour is RGB in memory, frames first. Inputs we cannot process
faithfully (palette colour, 1-bit, RT Dose, no or float pixel data, truncated files, tiny images)
are refused with a one-line ``InputError`` naming the file (basename only) and the reason; no
message carries patient data.

Hostile files: only regular files are read, with a bounded read (``inputs.read_input_bytes``);
every header (DICOM group 0028, PNG IHDR, TIFF tags, NPY header, Pillow's size) is checked against
``limits.ReadLimits`` and against the bytes actually present before pixels are decoded, so a file
never decides how much memory we take. RescaleSlope/Intercept that are not finite, or that map the
stored range beyond +/-1e15, are refused (they change every modality value the stages compute on);
a VOI window that is not finite or beyond +/-1e15 is ignored (it only chooses the display window,
which then falls back to the percentile range). pydicom's logs and warnings during a read are kept
in the read (they quote element values); refusal messages never quote element values.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import re
import threading
import warnings
from pathlib import Path

import numpy as np
from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.formats import FORMAT_BY_SUFFIX
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage
from medsec_edge.runtime.io.inputs import read_input_bytes
from medsec_edge.runtime.io.limits import ReadLimits, read_limits
from medsec_edge.runtime.io.png16 import PngError, png16_decode

__all__ = ["read_dataset", "read_image"]

logger = logging.getLogger(__name__)

MIN_SIDE = 16
# 32-bit integers are accepted only when every value is exact in float32, the precision the
# watermark and check stages compute in; larger values would change when mapped back.
MAX_EXACT_FLOAT32 = 2**24
# Modality values (stored * slope + intercept) and window bounds beyond this are not medical
# measurements; float32 arithmetic on them (squares, windows) would overflow to inf/NaN.
MAX_MODALITY = 1e15
# An exception's own text is kept to this many characters after our reason (which is never cut).
DETAIL_CHARS = 200

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
    limits = read_limits()
    data = read_input_bytes(path, limits)
    try:
        fmt = _detect_format(path, data)
        reader = {
            "dicom": _read_dicom,
            "png": _read_pillow,
            "jpeg": _read_pillow,
            "tiff": _read_tiff,
            "npy": _read_npy,
        }[fmt]
        image = reader(path, data, limits)
        _check_size(image.pixels, image.meta.is_colour)
    except _Refused as exc:
        raise InputError(f"{name}: {_one_line(str(exc), path)}") from None
    except InputError:
        raise
    except MemoryError:
        raise InputError(f"{name}: not enough memory to decode this image (lower the "
                         "MEDSEC_EDGE_MAX_IMAGE_BYTES limit to refuse such files up front)") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a file we cannot read
        raise InputError(f"{name}: unreadable or corrupt file ({_detail(exc, path)})") from None
    logger.debug(
        "read %s image %s %s %s", fmt, image.meta.image_id, image.pixels.shape, image.pixels.dtype
    )
    return image


_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"|b'[^'\n]*'")


def _one_line(text: str, path: Path | None = None) -> str:
    """Our own reason on one line, paths reduced to the basename; never cut (we wrote it)."""
    text = text.replace(" in file <no filename>", "")
    if path is not None:
        text = text.replace(str(path.resolve()), path.name).replace(str(path), path.name)
    return " ".join(text.split())


def _detail(exc: BaseException | str, path: Path | None = None) -> str:
    """A third-party message as a short, value-free detail: quoted strings (pydicom quotes element
    values, which may be patient data) become '...', and the text is cut at a word boundary."""
    text = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    text = _QUOTED.sub("'...'", _one_line(text, path))
    if len(text) > DETAIL_CHARS:
        text = text[:DETAIL_CHARS].rsplit(" ", 1)[0] + " ..."
    return text


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
    if pixels.size == 0:
        raise _Refused(f"image holds no pixels (array shape {pixels.shape})")
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


def _check_expansion(what: str, decoded: int, encoded: int, limits: ReadLimits) -> None:
    if decoded > limits.max_expansion * max(encoded, 1) + 2**20:
        raise _Refused(f"{what} claims {decoded} decoded bytes from {encoded} encoded bytes, more than "
                       f"{limits.max_expansion}:1 (a decompression bomb or a corrupt header; "
                       "MEDSEC_EDGE_MAX_EXPANSION)")


def _limited(what: str, limits: ReadLimits, *args: int) -> int:
    try:
        return limits.check_image(what, *args)
    except ValueError as exc:
        raise _Refused(str(exc)) from None


def _check_int32(arr: np.ndarray) -> None:
    if arr.dtype.kind in "iu" and arr.dtype.itemsize > 2 and arr.size:
        low, high = int(arr.min()), int(arr.max())
        if low < -MAX_EXACT_FLOAT32 or high > MAX_EXACT_FLOAT32:
            raise _Refused(
                f"{arr.dtype} values [{low}, {high}] do not fit the +/-2^24 range that is "
                "processed exactly"
            )


# DICOM ----------------------------------------------------------------------------------------

# Defined terms we may name in a refusal; any other value is not echoed (it could be anything).
_KNOWN_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
                      "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "HSV", "ARGB", "CMYK")


def _first(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
            value = value[0] if len(value) else None
        return None if value is None else float(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _whole(ds, keyword: str, default: int) -> int:
    """An integer attribute of the image pixel module, refusing what is not a whole number."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        if not isinstance(value, (str, bytes, int)) and hasattr(value, "__len__"):
            value = value[0]
        number = float(value)
        if not math.isfinite(number) or number != int(number):
            raise ValueError
        return int(number)
    except (TypeError, ValueError, IndexError, OverflowError):
        raise _Refused(f"{keyword} is not a whole number") from None


def _functional(ds, sequence: str):
    """First item of ``sequence`` in the shared functional groups (enhanced multi-frame)."""
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group)
        if items:
            inner = items[0].get(sequence)
            if inner:
                return inner[0]
    return None


_quiet_lock = threading.Lock()
_quiet_depth: dict[str, int] = {}
_quiet_saved: dict[str, bool] = {}


@contextlib.contextmanager
def _quiet_log(name: str):
    """Keep a library's log records (its child loggers' too) out of every handler while a read
    runs: pydicom's and tifffile's quote element and tag values (possibly patient data), and
    pydicom's decoders log errors with tracebacks.

    A filter on the ``pydicom`` logger does not see records of its children
    (``pydicom.pixels...``), so propagation is switched off at the top of the tree instead; a
    counter makes nested and concurrent reads restore it once, at the end of the last one.
    """
    logger_ = logging.getLogger(name)
    with _quiet_lock:
        if not any(isinstance(h, logging.NullHandler) for h in logger_.handlers):
            # Without a handler of its own, a logger that does not propagate falls back to
            # logging.lastResort, which prints to stderr: the opposite of what we want.
            logger_.addHandler(logging.NullHandler())
        if _quiet_depth.get(name, 0) == 0:
            _quiet_saved[name] = logger_.propagate
            logger_.propagate = False
        _quiet_depth[name] = _quiet_depth.get(name, 0) + 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth[name] -= 1
            if _quiet_depth[name] == 0:
                logger_.propagate = _quiet_saved.pop(name)


def _quiet_pydicom_log():
    """Silence pydicom's logger tree while we read (the same messages arrive as Python warnings,
    which the readers capture and inspect)."""
    return _quiet_log("pydicom")


def _parse_dicom(data: bytes):
    """The dataset in ``data``, every element converted (dcmread is lazy), or ``_Refused``.

    Call inside ``_quiet_pydicom_log`` and a ``warnings.catch_warnings(record=True)`` block.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

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
    # Converting every element now makes corrupt values fail here, and keeps pydicom's validation
    # warnings (which quote values, possibly patient data) inside the caller's capture.
    for _elem in ds.iterall():
        pass
    meta = getattr(ds, "file_meta", None)
    has_class = "SOPClassUID" in ds or (meta is not None and "MediaStorageSOPClassUID" in meta)
    if not has_class:
        # Random bytes after a 'DICM' preamble parse as a few elements with random tags.
        raise _Refused("not a DICOM object: no SOP Class UID in the dataset or file meta "
                       "(random or foreign data after a 'DICM' preamble?)")
    return ds


def _transfer_syntax(ds):
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts is None:
        raise _Refused("no transfer syntax in the file meta information")
    return ts


def _ts_label(ts) -> str:
    # A standard transfer syntax has a name; anything else is a value from the file, not echoed.
    return ts.name if ts.name != str(ts) else "an unknown transfer syntax UID"


def _check_dicom_pixels(ds, limits: ReadLimits) -> None:
    """The pixel size the header claims, against the limits and the Pixel Data present."""
    bits_allocated = _whole(ds, "BitsAllocated", 0)
    rows, columns = _whole(ds, "Rows", 0), _whole(ds, "Columns", 0)
    frames = _whole(ds, "NumberOfFrames", 1) or 1  # 0 means one frame, as pydicom reads it
    samples = _whole(ds, "SamplesPerPixel", 1)
    size = _limited("DICOM", limits, rows, columns, frames, samples, max(bits_allocated // 8, 1))
    value = ds["PixelData"].value
    present = len(value) if value is not None else 0
    if present == 0:
        raise _Refused("Pixel Data is empty")
    if _transfer_syntax(ds).is_encapsulated:
        _check_expansion("compressed DICOM Pixel Data", size, present, limits)
        return
    if str(ds.get("PhotometricInterpretation", "")).strip() == "YBR_FULL_422" and samples == 3:
        size = size // 3 * 2  # stored subsampled: two luma samples share one chroma pair
    if present < size:
        raise _Refused(f"Pixel Data holds {present} bytes, the header (Rows, Columns, frames, samples, "
                       f"BitsAllocated) describes {size}: truncated file or corrupt header")


def _rescale(slope, intercept, bits_stored: int) -> tuple[float, float]:
    slope_f, intercept_f = _first(slope), _first(intercept)
    for label, raw, value in (("RescaleSlope", slope, slope_f), ("RescaleIntercept", intercept, intercept_f)):
        if value is None and raw not in (None, "") and not (hasattr(raw, "__len__") and len(raw) == 0):
            raise _Refused(f"{label} is not a number")
        if value is not None and not math.isfinite(value):
            raise _Refused(f"{label} is not a finite number (NaN or infinity)")
    slope_f = 1.0 if slope_f is None or slope_f == 0 else slope_f
    intercept_f = 0.0 if intercept_f is None else intercept_f
    reach = abs(slope_f) * 2.0 ** min(max(bits_stored, 1), 32) + abs(intercept_f)
    if reach > MAX_MODALITY:
        raise _Refused(f"RescaleSlope/RescaleIntercept map stored values beyond +/-{MAX_MODALITY:g}, "
                       "which is no physical quantity (corrupt header?)")
    return slope_f, intercept_f


def _window(center, width) -> tuple[float, float] | None:
    center_f, width_f = _first(center), _first(width)
    if center_f is None or width_f is None:
        return None
    if not (math.isfinite(center_f) and math.isfinite(width_f)) or max(abs(center_f), abs(width_f)) > MAX_MODALITY:
        # Only the display window depends on it: ignore it, the percentile window takes over.
        logger.debug("ignored a VOI window that is not finite or beyond +/-%g", MAX_MODALITY)
        return None
    return center_f, width_f


def _read_dicom(path: Path, data: bytes, limits: ReadLimits) -> MedicalImage:
    from pydicom.pixels import get_decoder

    with warnings.catch_warnings(record=True) as caught, _quiet_pydicom_log():
        warnings.simplefilter("always")
        ds = _parse_dicom(data)
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
        bits_allocated = _whole(ds, "BitsAllocated", 0)
        if bits_allocated == 1:
            raise _Refused("1-bit images (e.g. segmentations) are refused")
        if bits_allocated not in (8, 16, 32):
            raise _Refused(f"BitsAllocated {bits_allocated} is not supported (8, 16 or 32)")
        if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL",
                               "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
            shown = repr(photometric) if photometric in _KNOWN_PHOTOMETRIC else "(a value that is not a defined term)"
            raise _Refused(f"photometric interpretation {shown} is not supported")
        samples = _whole(ds, "SamplesPerPixel", 1)
        if samples not in (1, 3):
            raise _Refused(f"SamplesPerPixel {samples} is not supported (1 or 3)")
        bits_stored = _whole(ds, "BitsStored", bits_allocated) or bits_allocated
        if not 1 <= bits_stored <= bits_allocated:
            raise _Refused(f"BitsStored {bits_stored} does not fit BitsAllocated {bits_allocated}")

        ts = _transfer_syntax(ds)
        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise _Refused(f"transfer syntax {_ts_label(ts)} is not supported") from None
        if not decoder.is_available:
            raise _Refused(
                f"no decoder installed for {ts.name}: pip install pylibjpeg "
                "pylibjpeg-libjpeg pylibjpeg-openjpeg"
            )
        _check_dicom_pixels(ds, limits)
        try:
            arr, info = decoder.as_array(ds, as_rgb=True)
        except Exception as exc:  # noqa: BLE001 - a codec failure is a corrupt or truncated file
            raise _Refused(f"truncated or corrupt {ts.name} pixel data ({_detail(exc, path)})") from None
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
        raise _Refused("decoded photometric interpretation is not MONOCHROME1, MONOCHROME2 or RGB")

    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if slope is None and (pvt := _functional(ds, "PixelValueTransformationSequence")) is not None:
        slope, intercept = pvt.get("RescaleSlope"), pvt.get("RescaleIntercept")
    if center is None and (voi := _functional(ds, "FrameVOILUTSequence")) is not None:
        center, width = voi.get("WindowCenter"), voi.get("WindowWidth")
    slope_f, intercept_f = _rescale(slope, intercept, bits_stored)

    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    meta = ImageMeta(
        bits_stored=bits_stored,
        signed=_whole(ds, "PixelRepresentation", 0) == 1,
        photometric=out_photometric,
        slope=slope_f,
        intercept=intercept_f,
        window=_window(center, width),
        modality=modality,
        image_id=_short_hash(sop_uid.encode() if sop_uid else data),
        source_format="dicom",
    )
    return MedicalImage(pixels=arr, meta=meta, path=path, dataset=ds)


def read_dataset(path: str | Path, *, check_pixels: bool = True):
    """The pydicom Dataset of a DICOM file, read as safely as ``read_image`` reads it.

    For the commands that need the dataset rather than the pixels (seal, verify, encrypt): only a
    regular file within the size limit, pydicom's logs and warnings kept inside, every element
    converted, and a dataset without a SOP Class UID (random bytes after ``DICM``) refused. With
    ``check_pixels`` the Pixel Data's claimed size is checked against the limits and the bytes
    present. Raises ``InputError`` (exit 4) with a one-line, value-free reason.
    """
    path = Path(path)
    limits = read_limits()
    data = read_input_bytes(path, limits)
    try:
        with warnings.catch_warnings(record=True) as caught, _quiet_pydicom_log():
            warnings.simplefilter("always")
            ds = _parse_dicom(data)
            _raise_on_truncation(caught)
            if check_pixels and "PixelData" in ds:
                _check_dicom_pixels(ds, limits)
    except _Refused as exc:
        raise InputError(f"{path.name}: {_one_line(str(exc), path)}") from None
    except MemoryError:
        raise InputError(f"{path.name}: not enough memory to parse this file") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a corrupt file
        raise InputError(f"{path.name}: unreadable or corrupt DICOM file ({_detail(exc, path)})") from None
    return ds


def _raise_on_truncation(caught: list) -> None:
    for item in caught:
        text = str(item.message)
        if any(hint in text.lower() for hint in _TRUNCATION_HINTS):
            raise _Refused(f"truncated or corrupt file ({_detail(text)})")


# PNG / JPEG -----------------------------------------------------------------------------------


def _drop_opaque_alpha(arr: np.ndarray, what: str) -> np.ndarray:
    alpha = arr[..., -1]
    top = np.iinfo(arr.dtype).max
    if not np.all(alpha == top):
        raise _Refused(f"{what} with a transparent alpha channel is not supported")
    return arr[..., :-1]


def _read_pillow(path: Path, data: bytes, limits: ReadLimits) -> MedicalImage:
    from PIL import Image

    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        bit_depth, colour_type = data[24], data[25]
        if bit_depth == 16 and colour_type in (2, 4, 6):
            try:
                arr = png16_decode(data, limits)
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
        im = Image.open(io.BytesIO(data))  # reads the header only
        width, height = im.size
        bands = len(im.getbands())
        depth = 2 if im.mode.startswith("I;16") else (4 if im.mode in ("I", "F") else 1)
        size = _limited(im.format or "image", limits, height, width, 1, bands, depth)
        _check_expansion(f"{im.format or 'image'} data", size, len(data), limits)
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


def _read_tiff(path: Path, data: bytes, limits: ReadLimits) -> MedicalImage:
    import tifffile

    with _quiet_log("tifffile"), warnings.catch_warnings(), tifffile.TiffFile(io.BytesIO(data)) as tif:
        warnings.simplefilter("ignore")
        if not tif.series:
            raise _Refused("TIFF file holds no image")
        series = tif.series[0]
        page = series.keyframe
        photometric = page.photometric
        _check_tiff_size(series, page, len(data), limits)
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


def _check_tiff_size(series, page, encoded: int, limits: ReadLimits) -> None:
    shape = tuple(int(n) for n in series.shape)
    itemsize = np.dtype(series.dtype).itemsize if series.dtype is not None else 1
    rows, columns = int(page.imagelength), int(page.imagewidth)
    samples = int(page.samplesperpixel or 1)
    frames = math.prod(shape) // max(rows * columns * samples, 1) if rows and columns else 0
    size = _limited("TIFF", limits, rows, columns, max(frames, 1), samples, itemsize)
    if math.prod(shape) * itemsize > size:
        raise _Refused("TIFF series shape does not match its pages (corrupt tags)")
    if page.compression != 1:
        _check_expansion("compressed TIFF data", size, encoded, limits)
    elif size > encoded:
        raise _Refused(f"TIFF pixels need {size} bytes, the file has {encoded}: truncated file or corrupt tags")


# NPY ------------------------------------------------------------------------------------------


def _check_npy_header(data: bytes, limits: ReadLimits) -> None:
    """Shape and dtype from the NPY header, against the limits and the bytes present, before
    ``np.load`` allocates the array the header describes."""
    from numpy.lib import format as npy_format

    fp = io.BytesIO(data)
    try:
        version = npy_format.read_magic(fp)
        read_header = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
        shape, _fortran, dtype = read_header(fp)
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, TypeError...
        raise _Refused(f"not a plain numeric NPY array ({_detail(exc)})") from None
    if dtype.hasobject or dtype.kind not in "biuf":
        raise _Refused(f"dtype {dtype.str} is not supported (integer or float)")
    colour = len(shape) in (3, 4) and shape[-1] == 3
    if not (len(shape) in (2, 3) or (len(shape) == 4 and colour)):
        raise _Refused(f"array shape {shape} is not (H,W), (F,H,W), (H,W,3) or (F,H,W,3)")
    rows, columns = (shape[-3], shape[-2]) if colour else (shape[-2], shape[-1])
    frames = shape[0] if len(shape) == (4 if colour else 3) else 1
    size = _limited("NPY", limits, rows, columns, frames, 3 if colour else 1, dtype.itemsize)
    if size > len(data) - fp.tell():
        raise _Refused(f"NPY header describes {size} bytes of data, the file has {len(data) - fp.tell()}: truncated")


def _read_npy(path: Path, data: bytes, limits: ReadLimits) -> MedicalImage:
    _check_npy_header(data, limits)
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
    if arr.dtype.kind == "f" and arr.size and float(np.max(np.abs(arr))) > MAX_MODALITY:
        raise _Refused(f"array holds values beyond +/-{MAX_MODALITY:g}, which no stage computes on exactly")
    colour = arr.ndim in (3, 4) and arr.shape[-1] == 3
    if not (arr.ndim in (2, 3) or (arr.ndim == 4 and colour)):
        raise _Refused(f"array shape {arr.shape} is not (H,W), (F,H,W), (H,W,3) or (F,H,W,3)")
    arr = _native(arr)
    meta = _plain_meta(arr, "RGB" if colour else "MONOCHROME2", "npy", data)
    return MedicalImage(pixels=arr, meta=meta, path=path)


