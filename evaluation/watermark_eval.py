"""The watermark evaluation: quality, robustness per attack, false detections and latency, ours
beside the classical baselines, on held-out images (``medsec-edge eval watermark``).

Layer: evaluation. Every number follows DESIGN.md, Measures: quality from :mod:`.measures`, the
attacks of :mod:`.attacks` (same names as the differentiable ones in ``train/``), the baselines of
:mod:`.baselines`. Outputs: ``watermark_eval.json`` (everything, per-record rows included),
``watermark_eval.md`` (the tables) and ``watermark_eval.png`` (:mod:`.plots`). No patient data
is written: images are named by file name and their PHI-free ``image_id``; the pydicom Dataset
a DICOM image carries is never serialised.

Decisions the numbers depend on:

- Trials: each (image, trial) draws its own payload (8 bytes, ours) and 64 bits (baselines) from
  ``numpy.random.default_rng([seed, crc32(file name), trial])``; each attack gets its own
  generator from the same key plus the attack's index in ``ATTACKS``, so the marked image, the
  unmarked image (false detections) and every baseline see the same crop offset and noise.
- Exact recovery: ours, ``found`` and the 8 decoded bytes equal the embedded ones; baselines,
  all 64 bits right (they have no code word nor presence decision, so no false-detection row).
  Bit accuracy: ours, raw code bits before error correction; baselines, the 64 payload bits.
- Baselines take the 8-bit display of the FIRST frame (the window of DESIGN.md rounded to uint8;
  colour stays RGB). Their attacks see that display as an 8-bit image whose window is the
  identity (centre 128, width 256 maps 0..255 onto itself): with no window the attacks would use
  the 0.5-99.5 percentile range and stretch the contrast of an image that already is a display.
  Their quality is PSNR/SSIM between the two displays; PSNR_full does not apply to them.
- An extraction a baseline refuses on an attacked image (too small after a crop or resize) counts
  as not recovered and is listed under ``refused``; its bit accuracy is left out of the mean.
  A baseline refusing the image itself (too small to embed) is 'n/a' for that image.
- Latency: wall time (``time.perf_counter``) of one call, after one untimed embed and extract per
  image (ONNX Runtime allocates per input shape on first use; a device sees the same shapes over
  and over) and one untimed call per baseline. Grouped by image size. The host's load average is
  recorded beside them: numbers measured on a busy machine are upper bounds.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from medsec_edge.runtime.errors import MedsecError, UsageError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage, display_window, stored_range
from medsec_edge.runtime.pipeline import load_watermarker, percentiles
from medsec_edge.runtime.watermark.watermarker import Watermarker

from .attacks import ATTACK_SERIES, ATTACKS, apply_series, attack_image, attacked_image, get_attack
from .baselines import BASELINES, PAYLOAD_BITS, Baseline, available_baselines
from .measures import mse, psnr_window, quality_row, ssim_window

log = logging.getLogger(__name__)

OURS = "ours"
JSON_NAME = "watermark_eval.json"
MARKDOWN_NAME = "watermark_eval.md"
PLOT_NAME = "watermark_eval.png"
QUALITY_KEYS = ("psnr_window", "ssim_window", "mse_window", "psnr_full", "mse_full")
# Larger is better for PSNR/SSIM, smaller for MSE: "worst" is the min of the first, max of the second.
_WORST = {"psnr_window": min, "ssim_window": min, "psnr_full": min, "mse_window": max, "mse_full": max}

# A window that maps 8-bit display values onto themselves (DICOM linear VOI: lower = c - 0.5 -
# (w - 1) / 2 = 0, upper = c - 0.5 + (w - 1) / 2 = 255).
IDENTITY_WINDOW_8BIT = (128.0, 256.0)

PEER_CLAIMS: dict[str, Any] = {
    "label": "claimed in notes, not measured here",
    "source": "shared/notes/watermark-findings.md, table 'The peers'",
    "conditions": "8-bit grey 512x512 real DICOM, 32-bit payload; robustness figures are BIT ACCURACY "
    "(50% is chance), not exact payload recovery",
    "peers": {
        "blind-watermark (DWT-DCT-SVD)": {
            "psnr_db": 41.6,
            "bit_accuracy_pct": {"jpeg50": 100, "noise2": 100, "resize0.5": 100, "crop50": 50, "rot5": 57},
            "approximate": ["crop50"],
            "embed_ms": 937,
            "extract_ms": 674,
        }
    },
}


# --- which files ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupRule:
    """Files whose names match ``pattern`` are copies of one image; keep the preferred one(s).

    ``pattern`` is a full-match regex on the file name; its named group ``stem``, if any, splits
    the matches into separate families (``MR2_*`` and ``RG1_*``). ``keep`` lists the names to keep
    in order of preference (``{stem}`` is filled in): the first present is kept, or every present
    one with ``keep_all``. A family none of whose preferred names is present keeps its first
    member by name, so deduplication never drops an image entirely.
    """

    pattern: str
    keep: tuple[str, ...]
    why: str
    keep_all: bool = False


# The pydicom-data test files hold several encodings of the same pixels; evaluating each would
# count one image several times (and lossy copies would be a different image). Checked on
# pydicom-data 1.x by decoding every file: the kept file is the uncompressed original where there
# is one.
PYDICOM_DATA_DEDUP: tuple[DedupRule, ...] = (
    DedupRule(r"(?P<stem>.+)_(UNCR|UNCI|J2KR|J2KI)\.dcm",
              ("{stem}_UNCR.dcm", "{stem}_UNCI.dcm", "{stem}_J2KR.dcm", "{stem}_J2KI.dcm"),
              "same image in another transfer syntax (uncompressed/JPEG 2000, lossless/lossy)"),
    DedupRule(r"emri_small.*\.dcm", ("emri_small.dcm",),
              "same 10-frame MR in another transfer syntax"),
    DedupRule(r"SC_(rgb|ybr_full).*\.dcm", ("SC_rgb.dcm", "SC_rgb_16bit.dcm"),
              "same 100x100 colour test pattern (other encoding, frame count or lossy copy)", keep_all=True),
    DedupRule(r"(JPEG-LL|JPEG2000_UNC)\.dcm", ("JPEG2000_UNC.dcm",),
              "same NM acquisition"),
    DedupRule(r"OBXXXX1A.*\.dcm", ("OBXXXX1A.dcm",),
              "same palette-colour image in another encoding"),
    DedupRule(r"color-p[lx]\.dcm", ("color-px.dcm",),
              "same pixels, planar instead of interleaved colour"),
    DedupRule(r"(?P<stem>liver|gdcm-US-ALOKA-16)(_expb|_big)?\.dcm", ("{stem}.dcm",),
              "same image in explicit VR big endian"),
)


def deduplicate(paths: Sequence[Path], rules: Sequence[DedupRule] = PYDICOM_DATA_DEDUP
                ) -> tuple[list[Path], list[dict[str, Any]]]:
    """Drop the copies ``rules`` describe (per folder); return (kept in input order, dropped).

    Each dropped entry is ``{"name", "kept_instead": [names], "why"}``. A name matches the first
    rule whose pattern it fully matches; names no rule matches are always kept.
    """
    families: dict[tuple[Path, int, str], list[Path]] = {}
    for path in paths:
        for index, rule in enumerate(rules):
            match = re.fullmatch(rule.pattern, path.name)
            if match:
                stem = match.groupdict().get("stem") or ""
                families.setdefault((path.parent, index, stem), []).append(path)
                break
    dropped: dict[Path, dict[str, Any]] = {}
    for (_parent, index, stem), members in families.items():
        rule = rules[index]
        present = {p.name for p in members}
        preferred = [name.format(stem=stem) for name in rule.keep]
        wanted = [name for name in preferred if name in present]
        if not wanted:
            keep = [min(present)]
        else:
            keep = wanted if rule.keep_all else wanted[:1]
        for path in members:
            if path.name not in keep:
                dropped[path] = {"name": path.name, "kept_instead": keep, "why": rule.why}
    kept = [p for p in paths if p not in dropped]
    return kept, [dropped[p] for p in paths if p in dropped]


# --- small helpers ----------------------------------------------------------------------------


def _file_key(name: str) -> int:
    # Python's hash() of a str changes between processes; crc32 makes trials reproducible.
    return zlib.crc32(name.encode("utf-8"))


def _trial_rng(seed: int, name: str, trial: int) -> np.random.Generator:
    return np.random.default_rng([seed, _file_key(name), trial])


def _attack_rng(seed: int, name: str, trial: int, attack: str) -> np.random.Generator:
    return np.random.default_rng([seed, _file_key(name), trial, 1000 + list(ATTACKS).index(attack)])


def _series_rng(seed: int, name: str, family: str, strength: float) -> np.random.Generator:
    return np.random.default_rng(
        [seed, _file_key(name), 0, 2000 + list(ATTACK_SERIES).index(family), int(round(strength * 1000))]
    )


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


def size_key(image: MedicalImage) -> str:
    """Latency group of an image: frame size, colour and frame count (e.g. ``512x512``)."""
    h, w = image.shape_hw
    key = f"{h}x{w}"
    if image.meta.is_colour:
        key += " RGB"
    if image.n_frames > 1:
        key += f" x{image.n_frames} frames"
    return key


def display8_of(image: MedicalImage) -> np.ndarray:
    """The 8-bit display of the first frame, what the baselines are given (colour stays RGB)."""
    frame = image.frames()[0]
    return np.rint(display_window(image.meta, frame).to_display(frame)).astype(np.uint8)


def display_as_image(display_u8: np.ndarray, image_id: str = "") -> MedicalImage:
    """An 8-bit display as an image the attacks can take, with an identity display window."""
    colour = display_u8.ndim == 3
    meta = ImageMeta(
        bits_stored=8,
        signed=False,
        photometric="RGB" if colour else "MONOCHROME2",
        window=None if colour else IDENTITY_WINDOW_8BIT,
        image_id=image_id,
        source_format="png",
    )
    return MedicalImage(np.ascontiguousarray(display_u8), meta)


def _as_u8(image: MedicalImage) -> np.ndarray:
    frame = image.frames()[0]
    if frame.dtype == np.uint8:
        return np.ascontiguousarray(frame)
    return np.clip(np.rint(frame.astype(np.float64)), 0, 255).astype(np.uint8)


def series_image(image: MedicalImage, family: str, strength: float, rng: np.random.Generator) -> MedicalImage:
    """One point of an ``ATTACK_SERIES`` family applied to every frame (as ``attack_image`` does)."""
    frames = []
    for frame in image.frames():
        window = display_window(image.meta, frame)
        lo, hi = stored_range(image.meta, frame.dtype)
        value_range = None if math.isinf(lo) else (lo, hi)
        frames.append(apply_series(family, strength, frame, window, rng, value_range=value_range))
    return attacked_image(frames, image.meta)


def _image_info(path: Path, image: MedicalImage) -> dict[str, Any]:
    return {
        "name": path.name,
        "image_id": image.meta.image_id,
        "shape": [int(s) for s in image.pixels.shape],
        "dtype": str(image.pixels.dtype),
        "bits_stored": image.meta.bits_stored,
        "photometric": image.meta.photometric,
        "modality": image.meta.modality,
        "frames": image.n_frames,
        "size": size_key(image),
    }


def _jsonable(obj: Any) -> Any:
    """Plain JSON types; infinite floats become the strings "inf"/"-inf" (strict JSON has none)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    return obj


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the measurements -------------------------------------------------------------------------


@dataclass
class _Records:
    """Raw per-measurement rows; aggregated into the summary, written whole into the JSON."""

    quality: list[dict[str, Any]]
    robustness: list[dict[str, Any]]
    false_detection: list[dict[str, Any]]
    series: list[dict[str, Any]]
    not_applicable: list[dict[str, Any]]

    @classmethod
    def empty(cls) -> "_Records":
        return cls([], [], [], [], [])

    def as_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {"quality": self.quality, "robustness": self.robustness, "false_detection": self.false_detection,
                "series": self.series, "not_applicable": self.not_applicable}


def _extract_ours(watermarker: Watermarker, image: MedicalImage):
    """(extraction or None, latency ms, error text)."""
    t0 = time.perf_counter()
    try:
        extraction = watermarker.extract(image)
    except MedsecError as exc:
        return None, _ms_since(t0), str(exc)
    return extraction, _ms_since(t0), ""


def _ours_trial(watermarker: Watermarker, name: str, image: MedicalImage, info: dict, trial: int,
                attacks: Sequence[str], seed: int, records: _Records):
    """Embed once, measure quality, then every attack on the marked image (and, in trial 0, on
    the unmarked image: false detections).

    Returns (marked image, payload, code bits), or None when the image cannot be marked.
    """
    payload = _trial_rng(seed, name, trial).bytes(8)
    t0 = time.perf_counter()
    try:
        embedded = watermarker.embed(image, payload)
    except MedsecError as exc:
        records.not_applicable.append({"method": OURS, "image": name, "trial": trial, "reason": str(exc)})
        return None
    embed_ms = _ms_since(t0)
    row = quality_row(image, embedded.pixels)
    records.quality.append({"method": OURS, "image": name, "trial": trial, "size": info["size"],
                            "embed_ms": embed_ms, **row})
    marked = replace(image, pixels=embedded.pixels)
    for attack in attacks:
        attacked = attack_image(marked, attack, _attack_rng(seed, name, trial, attack))
        extraction, extract_ms, error = _extract_ours(watermarker, attacked)
        found = bool(extraction is not None and extraction.found)
        records.robustness.append({
            "method": OURS, "image": name, "trial": trial, "attack": attack, "size": info["size"],
            "exact": bool(found and extraction.payload == payload.hex()),
            "bit_accuracy": None if extraction is None else extraction.raw_bit_accuracy(embedded.code_bits),
            "found": found,
            "confidence": None if extraction is None else float(extraction.confidence),
            "extract_ms": extract_ms,
            "refused": bool(error),
            "error": error,
        })
        if trial > 0:
            continue  # false detections: once per (image, attack); the unmarked image is the same in every trial
        clean = attack_image(image, attack, _attack_rng(seed, name, trial, attack))
        extraction, extract_ms, error = _extract_ours(watermarker, clean)
        records.false_detection.append({
            "image": name, "trial": trial, "attack": attack, "size": info["size"],
            "found": bool(extraction is not None and extraction.found),
            "confidence": None if extraction is None else float(extraction.confidence),
            "extract_ms": extract_ms, "error": error,
        })
    return marked, payload, embedded.code_bits


def _baseline_read(baseline: Baseline, display_u8: np.ndarray):
    """(bits or None, latency ms, error text). A baseline's own failure is a result here."""
    t0 = time.perf_counter()
    try:
        bits = baseline.extract(display_u8)
    # Third-party readers fail in their own ways (assertions, OpenCV and shape errors) on images
    # an attack made smaller or odd-sized; each such failure is a non-recovery, not a crash.
    except Exception as exc:  # noqa: BLE001
        return None, _ms_since(t0), f"{type(exc).__name__}: {exc}"[:200]
    return bits, _ms_since(t0), ""


def _baseline_trial(baseline: Baseline, name: str, image: MedicalImage, info: dict, trial: int,
                    attacks: Sequence[str], seed: int, records: _Records) -> np.ndarray | None:
    display = display8_of(image)
    rng = _trial_rng(seed, name, trial)
    rng.bytes(8)  # the payload of ours; the bits below come next in the same stream
    bits = rng.integers(0, 2, PAYLOAD_BITS).astype(bool)
    t0 = time.perf_counter()
    try:
        marked = baseline.embed(display, bits)
    except UsageError as exc:
        records.not_applicable.append({"method": baseline.name, "image": name, "trial": trial, "reason": str(exc)})
        return None
    embed_ms = _ms_since(t0)
    a, b = display.astype(np.float64), marked.astype(np.float64)
    records.quality.append({
        "method": baseline.name, "image": name, "trial": trial, "size": info["size"], "embed_ms": embed_ms,
        "psnr_window": psnr_window(a, b), "ssim_window": ssim_window(a, b), "mse_window": mse(a, b),
        "psnr_full": None, "mse_full": None,
    })
    marked_image = display_as_image(marked, image.meta.image_id)
    for attack in attacks:
        attacked = attack_image(marked_image, attack, _attack_rng(seed, name, trial, attack))
        read, extract_ms, error = _baseline_read(baseline, _as_u8(attacked))
        records.robustness.append({
            "method": baseline.name, "image": name, "trial": trial, "attack": attack, "size": info["size"],
            "exact": bool(read is not None and np.array_equal(read, bits)),
            "bit_accuracy": None if read is None else float(np.mean(read == bits)),
            "found": None, "confidence": None, "extract_ms": extract_ms,
            "refused": read is None, "error": error,
        })
    return marked


def _series_ours(watermarker: Watermarker, name: str, marked: MedicalImage, payload: bytes,
                 code_bits: np.ndarray, seed: int, records: _Records) -> None:
    for family, strengths in ATTACK_SERIES.items():
        for strength in strengths:
            attacked = series_image(marked, family, strength, _series_rng(seed, name, family, strength))
            extraction, _ms, _error = _extract_ours(watermarker, attacked)
            found = bool(extraction is not None and extraction.found)
            records.series.append({
                "method": OURS, "image": name, "family": family, "strength": float(strength),
                "exact": bool(found and extraction.payload == payload.hex()),
                "bit_accuracy": None if extraction is None else extraction.raw_bit_accuracy(code_bits),
            })


def _series_baseline(baseline: Baseline, name: str, marked_u8: np.ndarray, bits: np.ndarray, seed: int,
                     records: _Records) -> None:
    marked_image = display_as_image(marked_u8)
    for family, strengths in ATTACK_SERIES.items():
        for strength in strengths:
            attacked = series_image(marked_image, family, strength, _series_rng(seed, name, family, strength))
            read, _ms, _error = _baseline_read(baseline, _as_u8(attacked))
            records.series.append({
                "method": baseline.name, "image": name, "family": family, "strength": float(strength),
                "exact": bool(read is not None and np.array_equal(read, bits)),
                "bit_accuracy": None if read is None else float(np.mean(read == bits)),
            })


# --- aggregation (pure functions of the records) --------------------------------------------


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _method_order(methods: Iterable[str]) -> list[str]:
    seen = list(dict.fromkeys(methods))
    return ([OURS] if OURS in seen else []) + [m for m in seen if m != OURS]


def _attack_order(attacks: Iterable[str]) -> list[str]:
    seen = set(attacks)
    return [a for a in ATTACKS if a in seen] + sorted(seen - set(ATTACKS))


def aggregate_robustness(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {attack: {n, recovered, recovery_pct, bit_accuracy_mean, refused}}}``.

    ``n`` counts every (image, trial) pair, refusals included (a refusal is a non-recovery);
    the bit-accuracy mean is over the pairs that produced bits.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for method in _method_order(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        per_attack = {}
        for attack in _attack_order(r["attack"] for r in mine):
            cell = [r for r in mine if r["attack"] == attack]
            recovered = sum(1 for r in cell if r["exact"])
            per_attack[attack] = {
                "n": len(cell),
                "recovered": recovered,
                "recovery_pct": 100.0 * recovered / len(cell),
                "bit_accuracy_mean": _mean(r["bit_accuracy"] for r in cell),
                "refused": sum(1 for r in cell if r.get("refused")),
            }
        out[method] = per_attack
    return out


def aggregate_false_detections(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{"per_attack": {attack: {n, found, rate}}, "total": {n, found, rate}}`` (ours only)."""
    per_attack = {}
    for attack in _attack_order(r["attack"] for r in rows):
        cell = [r for r in rows if r["attack"] == attack]
        found = sum(1 for r in cell if r["found"])
        per_attack[attack] = {"n": len(cell), "found": found, "rate": found / len(cell)}
    found = sum(1 for r in rows if r["found"])
    total = {"n": len(rows), "found": found, "rate": (found / len(rows)) if rows else None}
    return {"per_attack": per_attack, "total": total}


def aggregate_quality(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{method: {"per_image": [...], "mean": {...}, "worst": {...}}}``.

    Per image: the mean over its trials. Mean and worst are over images (worst: lowest PSNR and
    SSIM, highest MSE). A measure a method does not have (PSNR_full of a baseline) is None.
    """
    out: dict[str, dict[str, Any]] = {}
    for method in _method_order(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        per_image = []
        for image in dict.fromkeys(r["image"] for r in mine):
            cell = [r for r in mine if r["image"] == image]
            entry: dict[str, Any] = {"image": image, "trials": len(cell)}
            for key in QUALITY_KEYS:
                entry[key] = _mean(r.get(key) for r in cell)
            per_image.append(entry)
        mean = {k: _mean(e[k] for e in per_image) for k in QUALITY_KEYS}
        worst = {}
        for key in QUALITY_KEYS:
            vals = [e[key] for e in per_image if e[key] is not None]
            worst[key] = _WORST[key](vals) if vals else None
        out[method] = {"per_image": per_image, "mean": mean, "worst": worst}
    return out


def aggregate_latency(quality_rows: Sequence[dict[str, Any]], robustness_rows: Sequence[dict[str, Any]],
                      false_rows: Sequence[dict[str, Any]] = ()) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {size: {"embed_ms", "extract_ms_clean", "extract_ms_attacked", "extract_ms_unmarked"}}}``.

    Each value is ``{p50, p99, n}`` in milliseconds. Clean: the marked image as embedded (attack
    'none'); attacked: every other attack; unmarked: ours on unwatermarked images (its slow path:
    nothing is found on the nominal grid, so it searches).
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    methods = _method_order([r["method"] for r in quality_rows] + [r["method"] for r in robustness_rows])
    for method in methods:
        q = [r for r in quality_rows if r["method"] == method]
        rb = [r for r in robustness_rows if r["method"] == method]
        sizes = list(dict.fromkeys([r["size"] for r in q] + [r["size"] for r in rb]))
        per_size = {}
        for size in sizes:
            entry = {
                "embed_ms": percentiles([r["embed_ms"] for r in q if r["size"] == size]),
                "extract_ms_clean": percentiles(
                    [r["extract_ms"] for r in rb if r["size"] == size and r["attack"] == "none"]),
                "extract_ms_attacked": percentiles(
                    [r["extract_ms"] for r in rb if r["size"] == size and r["attack"] != "none"]),
            }
            if method == OURS:
                entry["extract_ms_unmarked"] = percentiles(
                    [r["extract_ms"] for r in false_rows if r["size"] == size])
            per_size[size] = entry
        out[method] = per_size
    return out


def aggregate_series(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``{family: {method: [{strength, n, recovery_pct, bit_accuracy_mean}]}}`` in series order."""
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for family in [f for f in ATTACK_SERIES if any(r["family"] == f for r in rows)]:
        fam = [r for r in rows if r["family"] == family]
        out[family] = {}
        for method in _method_order(r["method"] for r in fam):
            points = []
            for strength in dict.fromkeys(r["strength"] for r in fam if r["method"] == method):
                cell = [r for r in fam if r["method"] == method and r["strength"] == strength]
                points.append({
                    "strength": strength,
                    "n": len(cell),
                    "recovery_pct": 100.0 * sum(1 for r in cell if r["exact"]) / len(cell),
                    "bit_accuracy_mean": _mean(r["bit_accuracy"] for r in cell),
                })
            out[family][method] = points
    return out


def summarise(records: dict[str, list[dict[str, Any]]], *, meta: dict[str, Any], images: list[dict[str, Any]],
              skipped: Sequence[dict[str, str]] = (), deduplicated: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The report's summary from the raw records (keys as ``_Records.as_dict``)."""
    not_applicable: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    for row in records.get("not_applicable", []):
        if (row["method"], row["image"]) not in seen:
            seen.add((row["method"], row["image"]))
            not_applicable.append({"method": row["method"], "image": row["image"], "reason": row["reason"]})
    return {
        "meta": meta,
        "images": list(images),
        "skipped": list(skipped),
        "deduplicated": list(deduplicated),
        "not_applicable": not_applicable,
        "robustness": aggregate_robustness(records.get("robustness", [])),
        "false_detections": aggregate_false_detections(records.get("false_detection", [])),
        "quality": aggregate_quality(records.get("quality", [])),
        "latency": aggregate_latency(records.get("quality", []), records.get("robustness", []),
                                     records.get("false_detection", [])),
        "series": aggregate_series(records.get("series", [])),
        "peer_claims": PEER_CLAIMS,
    }


# --- markdown -----------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if math.isinf(value):
        return "inf (lossless)" if value > 0 else "-inf"
    return f"{value:.{digits}f}{unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def robustness_markdown(summary: dict[str, Any]) -> str:
    """Exact recovery and mean bit accuracy per attack, ours and each baseline side by side."""
    robustness = summary["robustness"]
    methods = list(robustness)
    attacks = _attack_order(a for m in methods for a in robustness[m])
    header = ["attack"]
    for method in methods:
        header += [f"{method} recovery", f"{method} bit acc"]
    rows = []
    for attack in attacks:
        row = [attack]
        for method in methods:
            cell = robustness[method].get(attack)
            if cell is None:
                row += ["n/a", "n/a"]
                continue
            refused = f", {cell['refused']} refused" if cell["refused"] else ""
            row += [f"{cell['recovery_pct']:.1f}% ({cell['recovered']}/{cell['n']}{refused})",
                    _fmt(cell["bit_accuracy_mean"], 3)]
        rows.append(row)
    return _table(header, rows)


def render_markdown(summary: dict[str, Any]) -> str:
    """The whole report as markdown (the tables of ``watermark_eval.md``)."""
    meta = summary["meta"]
    host = meta.get("host", {})
    parts = [
        "# Watermark evaluation",
        "",
        f"- bundle: {meta.get('bundle') or 'n/a'}; payload: {meta.get('payload', 'n/a')}",
        f"- images evaluated: {len(summary['images'])}; trials per image: {meta.get('trials', 'n/a')} "
        f"(baselines: {meta.get('baseline_trials', 'n/a')}); seed {meta.get('seed', 'n/a')}; "
        f"attacks: {', '.join(meta.get('attacks', []))}",
        f"- baselines: {', '.join(meta.get('baselines', [])) or 'none'}",
        f"- host: {host.get('platform', 'n/a')}, {host.get('cpus', 'n/a')} CPUs, load average "
        f"{host.get('loadavg_start')} at start, {host.get('loadavg_end')} at end; "
        f"threads {meta.get('threads')}; wall time {_fmt(meta.get('wall_s'), 0)} s",
        "",
        "## Robustness per attack",
        "",
        "Recovery: share of (image, trial) pairs whose payload came back exactly (ours: the 8 data "
        "bytes, found and checked; baselines: all 64 bits). Bit accuracy: ours, the raw 128 code "
        "bits before error correction; baselines, the 64 payload bits (0.5 is chance). 'refused': "
        "the baseline could not read the attacked image (counted as not recovered).",
        "",
        robustness_markdown(summary),
        "",
        "## False detections (ours)",
        "",
        "Each unwatermarked image after each attack (once per image and attack, with trial 0's crop "
        "offset and noise), reported `found` (must be 0). The baselines have no presence decision.",
        "",
    ]
    false = summary["false_detections"]
    rows = [[attack, f"{c['found']}/{c['n']}"] for attack, c in false["per_attack"].items()]
    total = false["total"]
    rows.append(["**all**", f"{total['found']}/{total['n']}"])
    parts += [_table(["attack", "found / n"], rows), ""]

    quality = summary["quality"]
    methods = list(quality)
    parts += ["## Quality", "",
              "Ours: PSNR/SSIM in the image's display window (DESIGN.md, Measures), PSNR_full with "
              "peak = original max - min, over every frame. Baselines: between the 8-bit displays of "
              "the first frame (the only thing they can mark).", "", "### Per image", ""]
    header = ["image", "size", "ours PSNR_w", "ours SSIM_w", "ours PSNR_full", "ours MSE_full"]
    for method in methods[1:] if methods and methods[0] == OURS else methods:
        header += [f"{method} PSNR_w", f"{method} SSIM_w"]
    by_method = {m: {e["image"]: e for e in quality[m]["per_image"]} for m in methods}
    rows = []
    for info in summary["images"]:
        name = info["name"]
        ours = by_method.get(OURS, {}).get(name)
        row = [name, info["size"]]
        row += ([_fmt(ours["psnr_window"]), _fmt(ours["ssim_window"], 4), _fmt(ours["psnr_full"]),
                 _fmt(ours["mse_full"], 3)] if ours else ["n/a"] * 4)
        for method in methods:
            if method == OURS:
                continue
            entry = by_method[method].get(name)
            row += [_fmt(entry["psnr_window"]), _fmt(entry["ssim_window"], 4)] if entry else ["n/a", "n/a"]
        rows.append(row)
    parts += [_table(header, rows), "", "### Mean and worst over images", ""]
    rows = []
    for method in methods:
        mean, worst = quality[method]["mean"], quality[method]["worst"]
        rows.append([method, str(len(quality[method]["per_image"])),
                     _fmt(mean["psnr_window"]), _fmt(worst["psnr_window"]),
                     _fmt(mean["ssim_window"], 4), _fmt(worst["ssim_window"], 4),
                     _fmt(mean["psnr_full"]), _fmt(worst["psnr_full"]),
                     _fmt(mean["mse_window"], 3), _fmt(worst["mse_window"], 3)])
    parts += [_table(["method", "images", "PSNR_w mean", "PSNR_w worst", "SSIM_w mean", "SSIM_w worst",
                      "PSNR_full mean", "PSNR_full worst", "MSE_w mean", "MSE_w worst"], rows), ""]

    parts += ["## Latency (ms, p50 / p99, per image size)", "",
              "Wall time of one call on this host (see the load average above). Baselines: the "
              "first frame's 8-bit display only.", ""]
    rows = []

    def pc(entry: dict) -> str:
        return f"{entry['p50']:.1f} / {entry['p99']:.1f} (n={entry['n']})" if entry else "n/a"

    for method, per_size in summary["latency"].items():
        for size, entry in per_size.items():
            rows.append([method, size, pc(entry["embed_ms"]), pc(entry["extract_ms_clean"]),
                         pc(entry["extract_ms_attacked"]), pc(entry.get("extract_ms_unmarked", {}))])
    parts += [_table(["method", "image size", "embed", "extract (no attack)", "extract (attacked)",
                      "extract (unmarked)"], rows), ""]

    claims = summary["peer_claims"]
    parts += [f"## Peers: {claims['label']}", "", f"From {claims['source']}. {claims['conditions']}.", ""]
    rows = []
    for peer, c in claims["peers"].items():
        acc = c["bit_accuracy_pct"]
        cells = [f"{'~' if k in c.get('approximate', []) else ''}{v}%" for k, v in acc.items()]
        rows.append([peer, f"{c['psnr_db']} dB", *cells, f"{c['embed_ms']} / {c['extract_ms']}"])
    first = next(iter(claims["peers"].values()))
    parts += [_table(["peer (claimed)", "PSNR", *[f"{k} bit acc" for k in first["bit_accuracy_pct"]],
                      "embed / decode ms"], rows), ""]

    if summary["series"]:
        parts += ["## Recovery vs attack strength", "",
                  f"First {meta.get('series_images', 'n/a')} image(s), trial 0; see `{PLOT_NAME}`.", ""]
        for family, per_method in summary["series"].items():
            strengths = list(dict.fromkeys(p["strength"] for pts in per_method.values() for p in pts))
            rows = []
            for method, points in per_method.items():
                by = {p["strength"]: p for p in points}
                rows.append([method] + [f"{by[s]['recovery_pct']:.0f}%" if s in by else "n/a" for s in strengths])
            parts += [f"**{family}**", "", _table(["method", *[f"{s:g}" for s in strengths]], rows), ""]

    if summary["skipped"] or summary["not_applicable"]:
        parts += ["## Skipped and not applicable", ""]
        parts += [f"- {s['name']}: refused on read ({s['reason']})" for s in summary["skipped"]]
        parts += [f"- {n['image']} / {n['method']}: n/a ({n['reason']})" for n in summary["not_applicable"]]
        parts.append("")
    if summary["deduplicated"]:
        parts += ["## Copies left out", ""]
        parts += [f"- {d['name']} -> {', '.join(d['kept_instead'])}: {d['why']}" for d in summary["deduplicated"]]
        parts.append("")
    return "\n".join(parts)


# --- the run ---------------------------------------------------------------------------------------


def _select_baselines(with_baselines: bool, names: Sequence[str] | None) -> list[Baseline]:
    if not with_baselines:
        return []
    if names is None:
        return available_baselines()
    chosen = []
    for name in names:
        if name not in BASELINES:
            raise UsageError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
        cls = BASELINES[name]
        if cls.is_available():
            chosen.append(cls())
        else:
            log.warning("baseline %s is not installed, left out: pip install 'medsec-edge[baselines]'", name)
    return chosen


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled)


def run_watermark_eval(
    images: list[Path],
    out: Path,
    *,
    trials: int = 3,
    with_baselines: bool = True,
    bundle_path: Path | None = None,
    threads: int | None = None,
    seed: int = 0,
    attacks: list[str] | None = None,
    baselines: Sequence[str] | None = None,
    baseline_trials: int | None = None,
    series_images: int = 3,
    dedup: bool = True,
    watermarker: Watermarker | None = None,
    progress: bool = True,
    echo: bool = True,
) -> dict[str, Any]:
    """Evaluate the watermark on ``images`` (files or folders) and write the report into ``out``.

    ``attacks``: registry names to run (default: all of ``ATTACKS``). ``baselines``: names from
    ``BASELINES`` (default: every installed one; ``with_baselines=False`` runs none).
    ``baseline_trials``: trials for the baselines (default ``trials``; blind-watermark takes
    seconds per call on large radiographs). ``series_images``: how many images (the first ones)
    get the recovery-vs-strength series (0: none). ``dedup``: leave out the copies
    :data:`PYDICOM_DATA_DEDUP` describes. ``watermarker``: an already loaded one (else the bundle
    at ``bundle_path``, or the default bundle, is opened). ``echo``: write the robustness table to
    stdout at the end (the command's result); ``progress``: a progress bar on stderr.

    Returns the summary (what the JSON holds, less the per-record rows) with ``files`` added.
    """
    if trials < 1:
        raise UsageError(f"--trials must be at least 1, got {trials}")
    attack_names = list(ATTACKS) if attacks is None else list(attacks)
    for name in attack_names:
        get_attack(name)
    chosen = _select_baselines(with_baselines, baselines)
    b_trials = trials if baseline_trials is None else max(0, min(int(baseline_trials), trials))

    started = time.perf_counter()
    load_start = _loadavg()
    bundle_desc = None
    if watermarker is None:
        watermarker, bundle = load_watermarker(bundle_path, threads=threads)
        bundle_desc = f"{bundle.manifest.name} (created {bundle.manifest.created}, key {bundle.key_id})"

    from medsec_edge.evaluation.held_out import read_held_out

    loaded, skipped, dropped = read_held_out(images, dedup=dedup)
    if not loaded:
        raise UsageError(f"no readable image among {len(skipped)} file(s) given: nothing to evaluate")

    for baseline in chosen:  # the first call of each imports its package
        warm = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
        baseline.extract(baseline.embed(warm, np.arange(PAYLOAD_BITS) % 2))

    records = _Records.empty()
    infos: list[dict[str, Any]] = []
    with _progress(progress) as bar:
        task = bar.add_task("evaluating", total=len(loaded) * trials)
        for index, (path, image) in enumerate(loaded):
            name = path.name
            info = _image_info(path, image)
            infos.append(info)
            log.info("evaluating image %s (%s)", image.meta.image_id, info["size"])
            try:  # untimed: ONNX Runtime plans each new input shape on first use
                watermarker.extract(replace(image, pixels=watermarker.embed(image, b"\0" * 8).pixels))
            except MedsecError:
                pass  # the timed embed below records why
            for trial in range(trials):
                bar.update(task, description=f"{name[:32]} trial {trial + 1}/{trials}")
                ours = _ours_trial(watermarker, name, image, info, trial, attack_names, seed, records)
                want_series = index < series_images and trial == 0
                if want_series and ours is not None:
                    _series_ours(watermarker, name, *ours, seed, records)
                if trial < b_trials:
                    for baseline in chosen:
                        marked8 = _baseline_trial(baseline, name, image, info, trial, attack_names, seed, records)
                        if want_series and marked8 is not None:
                            rng = _trial_rng(seed, name, 0)
                            rng.bytes(8)
                            bits = rng.integers(0, 2, PAYLOAD_BITS).astype(bool)
                            _series_baseline(baseline, name, marked8, bits, seed, records)
                bar.advance(task)

    meta = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": bundle_desc,
        "payload": "8 random data bytes per (image, trial), PayloadCodec 128-bit code word",
        "trials": trials,
        "baseline_trials": b_trials if chosen else 0,
        "seed": seed,
        "attacks": attack_names,
        "baselines": [b.name for b in chosen],
        "series_images": min(series_images, len(loaded)),
        "threads": threads,
        "host": {"platform": platform.platform(terse=True), "cpus": os.cpu_count(),
                 "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "wall_s": time.perf_counter() - started,
    }
    summary = summarise(records.as_dict(), meta=meta, images=infos, skipped=skipped, deduplicated=dropped)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out / JSON_NAME, out / MARKDOWN_NAME, out / PLOT_NAME
    summary["files"] = {"json": str(json_path), "markdown": str(md_path), "plot": str(png_path)}
    _write_atomic(json_path, json.dumps(_jsonable({**summary, "records": records.as_dict()}), indent=1))
    _write_atomic(md_path, render_markdown(summary) + "\n")
    from .plots import plot_watermark_eval

    plot_watermark_eval(summary, png_path)
    if echo:
        sys.stdout.write(robustness_markdown(summary) + "\n")
        sys.stdout.flush()
    return summary


__all__ = [
    "PEER_CLAIMS",
    "PYDICOM_DATA_DEDUP",
    "DedupRule",
    "aggregate_false_detections",
    "aggregate_latency",
    "aggregate_quality",
    "aggregate_robustness",
    "aggregate_series",
    "deduplicate",
    "display8_of",
    "display_as_image",
    "render_markdown",
    "robustness_markdown",
    "run_watermark_eval",
    "series_image",
    "summarise",
]
