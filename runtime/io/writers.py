"""Write medical images at native bit depth: DICOM, PNG, TIFF, JPEG, NPY.

Layer: runtime (io). Writing chooses the format from the output suffix when it is a known image
suffix, else the input's, and is atomic (``atomic``: a temporary of ours in the same folder,
flushed, given the umask's permissions, then renamed). A DICOM output that must be sealed is not
written here: the job builds its dataset (``dicom_writer.build_derived_dataset``), seals it in
memory and writes the bytes once (``pipeline``); ``output_format`` and ``checked_pixels`` are the
checks both paths share. JPEG is written at quality 100 without chroma subsampling: still lossy, so a
watermark may be weakened; write PNG, TIFF or DICOM where that matters. PNG cannot hold 16-bit
colour through Pillow, so that case uses ``png16``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.atomic import atomic_output
from medsec_edge.runtime.io.dicom_writer import write_dicom
from medsec_edge.runtime.io.formats import FORMAT_BY_SUFFIX
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.io.png16 import png16_encode

__all__ = ["checked_pixels", "output_format", "write_image"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# writing


def write_image(
    image: MedicalImage,
    pixels: np.ndarray,
    path: str | Path,
    *,
    record: dict | None = None,
    description: str = "",
) -> Path:
    """Write ``pixels`` (same shape as ``image.pixels``) as a new file, atomically.

    The format is the output suffix's when it is a known image suffix, else the input's.
    ``pixels`` is cast to ``image.pixels.dtype`` (the caller has rounded and clipped). DICOM
    outputs keep every source attribute and carry ``record`` (see ``dicom_out``); other formats
    have nowhere to keep it. Raises ``UsageError`` when the output would overwrite the input or
    the format cannot hold these pixels.
    """
    out = Path(path)
    fmt = output_format(image, out)
    pixels = checked_pixels(image, pixels, out)
    writer = {
        "dicom": _write_dicom,
        "png": _write_png,
        "tiff": _write_tiff,
        "jpeg": _write_jpeg,
        "npy": _write_npy,
    }[fmt]
    with atomic_output(out) as fp:
        writer(image, pixels, fp, record=record, description=description)
    logger.debug("wrote %s for image %s", fmt, image.meta.image_id)
    return out


def output_format(image: MedicalImage, path: str | Path) -> str:
    """The format written to ``path``: its suffix's when it is a known image suffix, else the input's."""
    return FORMAT_BY_SUFFIX.get(Path(path).suffix.lower(), image.meta.source_format)


def checked_pixels(image: MedicalImage, pixels: np.ndarray, path: str | Path) -> np.ndarray:
    """``pixels`` cast to the image's dtype, once it is sure they can be written to ``path``.

    Raises ``UsageError`` when the shape differs from the image's, the output would overwrite
    the input, its folder does not exist, or the format cannot hold these pixels.
    """
    out = Path(path)
    pixels = np.asarray(pixels)
    if pixels.shape != image.pixels.shape:
        raise UsageError(
            f"pixels have shape {pixels.shape}, the image has {image.pixels.shape}: pass an "
            "array of the image's shape"
        )
    pixels = np.ascontiguousarray(pixels.astype(image.pixels.dtype, copy=False))
    if image.path is not None and _same_file(out, image.path):
        raise UsageError(
            f"output {out.name} is the input file: inputs are never modified, choose another path"
        )
    if not out.parent.is_dir():
        raise UsageError(f"output folder for {out.name} does not exist: create it first")
    _check_writable(output_format(image, out), image, pixels, out.name)
    return pixels


def _same_file(out: Path, source: Path) -> bool:
    try:
        if out.resolve() == source.resolve():
            return True
        return out.exists() and source.exists() and os.path.samefile(out, source)
    except OSError:
        return False


def _check_writable(fmt: str, image: MedicalImage, pixels: np.ndarray, name: str) -> None:
    colour = image.meta.is_colour
    single = pixels.ndim == (3 if colour else 2)
    dtype = pixels.dtype
    if fmt == "dicom" and image.dataset is None:
        raise UsageError(f"{name}: the input was not DICOM, so there is no dataset to write")
    if fmt in ("png", "jpeg") and not single:
        raise UsageError(f"{name}: {fmt.upper()} holds one frame: write .tiff, .npy or .dcm")
    if fmt == "png" and dtype not in (np.uint8, np.uint16):
        raise UsageError(
            f"{name}: PNG holds uint8 or uint16, these pixels are {dtype}: write .tiff or .npy"
        )
    if fmt == "jpeg" and dtype != np.uint8:
        raise UsageError(f"{name}: JPEG holds uint8, these pixels are {dtype}: write .png or .tiff")


def _write_dicom(image, pixels, fp, *, record, description) -> None:
    write_dicom(image, pixels, fp, record=record, description=description)


def _write_png(image, pixels, fp, *, record, description) -> None:
    from PIL import Image

    if image.meta.is_colour and pixels.dtype == np.uint16:
        fp.write(png16_encode(pixels))
        return
    # Pillow infers L, I;16 or RGB from the dtype and shape.
    Image.fromarray(pixels).save(fp, format="PNG")


def _write_jpeg(image, pixels, fp, *, record, description) -> None:
    from PIL import Image

    # Quality 100 and 4:4:4: the least damage JPEG can do; still lossy (see module docstring).
    Image.fromarray(pixels).save(fp, format="JPEG", quality=100, subsampling=0)


def _write_tiff(image, pixels, fp, *, record, description) -> None:
    import tifffile

    if image.meta.is_colour:
        photometric = "rgb"
    else:
        photometric = "miniswhite" if image.meta.photometric == "MONOCHROME1" else "minisblack"
    planar = "contig" if image.meta.is_colour else None
    tifffile.imwrite(fp, pixels, photometric=photometric, planarconfig=planar)


def _write_npy(image, pixels, fp, *, record, description) -> None:
    np.save(fp, pixels, allow_pickle=False)


