"""The tamper evaluation in its three settings (issue 9): header kept, header stripped, never protected.

Layer: evaluation. ``medsec-edge eval tamper`` reports each setting on its own, on held-out images
(pydicom-data, deduplicated by :func:`.held_out.read_held_out`; never trained on, never used for a
threshold: every decision comes from the bundle and the runtime):

- **header kept** (the PACS path): each image is protected as ``run`` protects it
  (:func:`runtime.pipeline.run_batch` with a fresh key ring and a fresh registry in a temporary
  folder), read back, and checked with :func:`runtime.tamper.evidence.check_image`. Negatives:
  the protected file untouched, and benign steps applied to its pixels with the header kept
  (``KEPT_STEPS``). Positives: local edits of the protected pixels, every family of
  :mod:`.manipulations` at each size of ``EvalSize.sizes`` (the side of the edit's bounding
  square), a share laundered by one benign step. Changed pixels are written back into the
  dataset (uncompressed Pixel Data, Rows/Columns and, for an 8-bit export, a window 0..255), the
  file is written and read back as a reader would, so the seal breaks exactly as for a real edit.
- **header stripped**: the display exported as 8-bit PNG or JPEG q 80-95, optionally resized
  0.5-2x and/or cropped keeping >= 50% of the area, read back with ``read_image``. Negatives: such
  exports of the untouched image; positives: the same exports of edited images.
- **never protected**: the blind evaluation of :mod:`.tamper_eval` on the original images, run
  as it is (its own ``tamper_eval.*`` files); only its headline numbers are repeated here.

Each edit's contrast is ``|mean displayed change inside the edit|`` as a share of the window
(0..255 display), binned ``<3%``, ``3-5%``, ``5-10%``, ``>=10%``. Per setting: per family, per size
and contrast bin, ROC of the check's continuous ``score`` (threshold-free: the best TPR at FPR
1%/0.1% measured on this very set, which a device could not know in advance) and the device's own
decision (``tampered``) at each operating point of the bundle, rates with Wilson 95% intervals;
pixel IoU of the check's ``mask`` against the true mask; FPR per benign step; study-level FPR;
latency beside SHA-256 of the pixels, the seal alone and the classical noise-residual baseline;
which evidence decided. Outputs ``evidence_eval.json``, ``evidence_eval.md`` and
``evidence_eval.png``. Images are named by file name and PHI-free image id only.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import logging
import math
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from medsec_edge.evaluation import attacks
from medsec_edge.evaluation import detection_metrics as dm
from medsec_edge.evaluation.benign import _mask_resize as mask_resize
from medsec_edge.evaluation.benign import benign
from medsec_edge.evaluation.forensic_baselines import (
    HashBaseline,
    NoiseResidualBaseline,
)
from medsec_edge.evaluation.held_out import read_held_out
from medsec_edge.evaluation.manipulations import MANIPULATIONS, manipulate
from medsec_edge.evaluation.tamper_eval import (
    HELD_OUT_FAMILY,
    LAUNDER_SHARE,
    STUDY_FRAMES,
    grey_frame,
)
from medsec_edge.evaluation.tamper_eval import _json_default as json_default
from medsec_edge.evaluation.tamper_eval import _pct
from medsec_edge.evaluation.tamper_eval import _rng as seeded_rng
from medsec_edge.runtime.errors import InputError, MedsecError, UsageError
from medsec_edge.runtime.io.image import (
    MedicalImage,
    display_window,
    luminance,
    stored_range,
)
from medsec_edge.runtime.io.readers import read_image

log = logging.getLogger(__name__)

JSON_NAME, MARKDOWN_NAME, PLOT_NAME = "evidence_eval.json", "evidence_eval.md", "evidence_eval.png"
SETTINGS = ("header_kept", "header_stripped", "never_protected")
KEPT_STEPS = ("lossless", "jpeg", "j2k", "resize", "crop", "noise", "blur", "export8")
LAUNDER_STEPS = tuple(s for s in KEPT_STEPS if s != "lossless")
CONTRAST_BINS = ("<3%", "3-5%", "5-10%", ">=10%")
MAX_FRAMES = 3
SITE_TRIES = 8  # draws of an edit's site until it lies mostly inside the display window  # a multi-frame image is cut to its middle frames before it is protected
MIN_SIDE = 64
TARGETS = {
    "header_kept": "TPR >= 99% at FPR <= 0.1% for edits >= 16x16 px changing the displayed mean by >= 3% "
                   "of the window; pixel IoU >= 0.7 for edits >= 32 px; benign steps flagged <= 0.1%",
    "header_stripped": "TPR >= 95% at FPR <= 1% (display export PNG or JPEG q >= 80, resize 0.5-2x, "
                       "crop keeping >= 50%)",
    "never_protected": "AUC >= 0.90 on trained families; reported for the held-out family",
}


@dataclass(frozen=True)
class EvalSize:
    """How much to generate per image (``default`` must finish in < 15 min on 2 cores)."""

    name: str
    sizes: tuple[int, ...]  # edit sizes (side of the bounding square, px), header kept
    benign_trials: int  # draws per header-kept benign step
    exports: int  # header-stripped exports of the untouched image (negatives)
    stripped_sizes: tuple[int, ...]  # edit sizes also exported header-stripped (positives)
    blind_trials: int  # never protected: tamper_eval --trials
    blind_benign_trials: int  # never protected: tamper_eval --benign-trials
    large: EvalSize | None = None  # fewer draws for images of over LARGE_PIXELS (a check costs ~1 s at 2k)

    def for_pixels(self, pixels: int) -> EvalSize:
        return self.large if (self.large is not None and pixels > LARGE_PIXELS) else self


LARGE_PIXELS = 640 * 640  # all frames together
NOISE_MAX_SIDE = 1024  # the noise-residual baseline (~1 s a frame at 2k) is measured up to this side
SIZES = {
    "default": EvalSize("default", (16, 24, 32, 48, 64), 2, 4, (16, 32, 64), 3, 3,
                        large=EvalSize("default-large", (16, 32, 64), 1, 2, (32,), 3, 3)),
    "quick": EvalSize("quick", (16, 32), 1, 2, (32,), 1, 1),
}


def size_bin(size: int) -> str:
    return "64+" if size >= 64 else str(int(size))


def contrast_bin(pct: float) -> str:
    if pct < 3.0:
        return "<3%"
    if pct < 5.0:
        return "3-5%"
    if pct < 10.0:
        return "5-10%"
    return ">=10%"


SIZE_BINS = ("16", "24", "32", "48", "64+")
# Evidence whose verdict the operating point does not change (it picks the blind detector's
# thresholds only; the fingerprint has its own, from the runtime): checked once, not per point.
OP_FREE_EVIDENCE = ("seal", "fingerprint", "registry")
EXPORT_KINDS = {  # header-stripped exports, by what was done to the display
    "png": lambda e: e["format"] == "png", "jpeg": lambda e: e["format"] == "jpeg",
    "resized": lambda e: e["scale"] != 1.0, "cropped": lambda e: e["area"] < 1.0,
    "neither resized nor cropped": lambda e: e["scale"] == 1.0 and e["area"] == 1.0,
}
EXAMPLES = {"header_kept": 5, "header_stripped": 3}  # edits shown in the PNG, one per family


# --- protecting an image as `run` does ----------------------------------------------------


@dataclass
class Tools:
    watermarker: Any
    bundle: Any
    checker: Any
    ring: Any
    registry: Any
    work: Path
    ops: tuple[str, ...]
    noise: NoiseResidualBaseline = field(default_factory=NoiseResidualBaseline)
    errors: list[dict] = field(default_factory=list)  # cases the runtime failed on (reported, not hidden)


def _few_frames(src: Path, image: MedicalImage, work: Path) -> Path:
    """``src`` itself, or a copy holding its middle ``MAX_FRAMES`` frames (uncompressed)."""
    frames = image.frames()
    if len(frames) <= MAX_FRAMES or image.dataset is None:
        return src
    import pydicom

    ds = pydicom.dcmread(src)
    start = (len(frames) - MAX_FRAMES) // 2
    keep = np.stack(frames[start:start + MAX_FRAMES])
    photometric = "RGB" if image.meta.is_colour else str(ds.PhotometricInterpretation)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    ds.set_pixel_data(np.ascontiguousarray(keep), photometric, int(image.meta.bits_stored),
                      generate_instance_uid=False)
    if per_frame is not None and len(per_frame) == len(frames):
        ds.PerFrameFunctionalGroupsSequence = per_frame[start:start + MAX_FRAMES]
    out = work / "src" / src.name
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out)
    return out


def protect(src: Path, image: MedicalImage, tools: Tools) -> MedicalImage:
    """``run``'s job on one file (watermark, seal, sign, record), read back from what it wrote."""
    from medsec_edge.runtime.pipeline import run_batch

    source = _few_frames(src, image, tools.work)
    out = tools.work / "protected"
    _, records = run_batch([source], [Path(src.name)], out, tools.watermarker, tools.bundle, tools.ring.watermark,
                           None, checker=None, operating_point=None,
                           check_note="evaluation: held-out images are genuine, not checked before protection",
                           ring=tools.ring, registry=tools.registry)
    record = records[0]
    if record.status != "ok" or not record.sealed or record.output is None:
        raise InputError(f"{src.name}: not protected ({record.status}: {record.reason or record.seal_reason})")
    return read_image(Path(record.output))


# --- pixels back into the file --------------------------------------------------------------


_DISPLAY_LUTS = ("VOILUTSequence", "ModalityLUTSequence", "WindowCenterWidthExplanation", "VOILUTFunction")


def with_pixels(protected: MedicalImage, pixels: np.ndarray, *, display8: bool, path: Path) -> MedicalImage:
    """The protected file with ``pixels`` (frames first for a multi-frame file) in place of its
    own, every other attribute kept, written uncompressed to ``path`` and read back.

    ``display8``: the pixels are an 8-bit windowed display (a windowed export put back into DICOM):
    8 bits stored, MONOCHROME2 (the display is already inverted) or RGB, a window 0..255 and an
    identity rescale, so a reader shows them as they are.
    """
    ds = copy.deepcopy(protected.dataset)
    had_frames = "NumberOfFrames" in ds
    colour = protected.meta.is_colour
    if display8:
        photometric, bits = ("RGB" if colour else "MONOCHROME2"), 8
        pixels = pixels.astype(np.uint8)
    else:
        photometric, bits = ("RGB" if colour else str(ds.PhotometricInterpretation)), int(ds.BitsStored)
    ds.set_pixel_data(np.ascontiguousarray(pixels), photometric, bits, generate_instance_uid=False)
    if had_frames and "NumberOfFrames" not in ds:
        ds.NumberOfFrames = 1
    if display8:
        ds.WindowCenter, ds.WindowWidth = 128, 256  # lower 0, upper 255 under DICOM's linear VOI
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        for keyword in _DISPLAY_LUTS:
            if keyword in ds:
                delattr(ds, keyword)
    ds.save_as(path)
    return read_image(path)


def _stack(frames: list[np.ndarray], like: MedicalImage) -> np.ndarray:
    """Frames back into the image's pixel layout (no frame axis for a single-frame image)."""
    return frames[0] if like.pixels.ndim == frames[0].ndim else np.stack(frames)


def apply_step(frames: list[np.ndarray], meta, step: str, rng_parts: tuple, *, seed: int, name: str,
               mask: np.ndarray | None = None, edit_index: int = 0
               ) -> tuple[list[np.ndarray], bool, np.ndarray | None, dict]:
    """One benign step on every frame (the same draws for each), the mask following on the edited
    frame. Returns (frames, display8, mask, params)."""
    out, display8, new_mask, params = [], False, mask, {}
    for i, frame in enumerate(frames):
        rng = seeded_rng(seed, name, *rng_parts)  # same parameters (scale, crop box) on every frame
        window = display_window(meta, frame)
        value_range = stored_range(meta, frame.dtype)
        if step == "export8":
            pixels, kind = attacks.export8(frame, window, rng).pixels, "display8"
            m = mask if i == edit_index else None
        else:
            b = benign(frame, window, rng, value_range=value_range, name=step,
                       mask=mask if i == edit_index else None)
            pixels, kind, m, params = b.pixels, b.kind, b.mask, b.params
        out.append(pixels)
        display8 = kind == "display8"
        if i == edit_index:
            new_mask = m
    return out, display8, new_mask, params


# --- edits ---------------------------------------------------------------------------------------


def edit_frame(frame: np.ndarray, meta, family: str, rng: np.random.Generator, size: int, donor: np.ndarray):
    """(edited frame, mask, equivalent diameter) of an edit a reader can see: the site is drawn
    again (up to ``SITE_TRIES`` times, same seeded stream) until at least half of the edit lies
    inside the display window (a narrow CT window shows air and bone as flat black and white,
    where an edit of stored values changes nothing on screen)."""
    shown = display_of(frame, meta)
    inside = (shown > 1.0) & (shown < 254.0)
    for _ in range(SITE_TRIES):
        edited, mask, size_px = _edit_once(frame, meta, family, rng, size, donor)
        if inside[mask].mean() >= 0.5:
            break
    return edited, mask, size_px


def _edit_once(frame: np.ndarray, meta, family: str, rng: np.random.Generator, size: int, donor: np.ndarray):
    """One edit: a grey frame as it is, a colour frame through its luma (the same change added to
    each channel inside the mask)."""
    value_range = stored_range(meta, frame.dtype)
    if frame.ndim == 2:
        m = manipulate(frame, family, rng, value_range=value_range, donor=donor, size=size)
        return m.pixels, m.mask, m.size_px
    grey = np.clip(np.rint(luminance(frame)), *value_range).astype(frame.dtype)
    m = manipulate(grey, family, rng, value_range=value_range, donor=donor, size=size)
    delta = m.pixels.astype(np.float64) - grey.astype(np.float64)
    edited = frame.astype(np.float64) + (delta * m.mask)[..., None]
    edited = np.clip(np.rint(edited), *value_range).astype(frame.dtype)
    return edited, m.mask, m.size_px


def display_of(frame: np.ndarray, meta, window=None) -> np.ndarray:
    """What a reader shows, 0..255 float (colour: luma)."""
    if frame.ndim == 3:
        top = 255.0 if frame.dtype == np.uint8 else float(2 ** min(meta.bits_stored, 16) - 1)
        return luminance(frame).astype(np.float64) * (255.0 / top)
    return (window or display_window(meta, frame)).to_display(frame).astype(np.float64)


def contrast_pct(before: np.ndarray, after: np.ndarray, mask: np.ndarray, meta) -> float:
    """|mean displayed change inside the edit| as a percentage of the window (0..255)."""
    window = None if before.ndim == 3 else display_window(meta, before)
    d0, d1 = display_of(before, meta, window), display_of(after, meta, window)
    return float(abs(d1[mask].mean() - d0[mask].mean()) / 255.0 * 100.0) if mask.any() else 0.0


# --- exports (header stripped) ----------------------------------------------------------------


def export_params(rng: np.random.Generator) -> dict:
    fmt = "png" if rng.random() < 0.5 else "jpeg"
    quality = int(rng.integers(80, 96))
    scale = float(math.exp(rng.uniform(math.log(0.5), math.log(2.0)))) if rng.random() < 0.5 else 1.0
    area = float(rng.uniform(0.5, 0.95)) if rng.random() < 0.5 else 1.0
    return {"format": fmt, "quality": quality if fmt == "jpeg" else None, "scale": round(scale, 3),
            "area": round(area, 3), "crop_seed": int(rng.integers(2**31))}


def export_display(frame: np.ndarray, meta, params: dict, mask: np.ndarray | None, path: Path
                   ) -> tuple[MedicalImage, np.ndarray | None]:
    """The frame's display as a user exports it (8-bit, maybe resized and cropped, PNG or JPEG),
    read back from the file; the mask follows the geometry."""
    from PIL import Image

    window = display_window(meta, frame)
    disp = attacks.export8(frame, window, None).pixels
    if params["scale"] != 1.0:
        disp = attacks.resize(disp, window, None, scale=params["scale"], value_range=(0, 255)).pixels
        if mask is not None:
            mask = mask_resize(mask, disp.shape[:2])
    if params["area"] < 1.0:
        y, x, ch, cw = attacks._crop_box(disp.shape[:2], params["area"], np.random.default_rng(params["crop_seed"]))
        disp = disp[y:y + ch, x:x + cw]
        if mask is not None:
            mask = mask[y:y + ch, x:x + cw]
    img = Image.fromarray(np.ascontiguousarray(disp), "RGB" if disp.ndim == 3 else "L")
    if params["format"] == "png":
        path = path.with_suffix(".png")
        img.save(path, "PNG")
    else:
        path = path.with_suffix(".jpg")
        img.save(path, "JPEG", quality=params["quality"])
    return read_image(path), mask


# --- checking one case ------------------------------------------------------------------------------


def _verdict_mask(verdict, image: MedicalImage) -> np.ndarray:
    """The check's mask (frames x H x W); nothing flagged where it gives none."""
    if verdict.mask is None:
        frames = image.frames()
        return np.zeros((len(frames), *frames[0].shape[:2]), bool)
    mask = np.asarray(verdict.mask, bool)
    return mask[None] if mask.ndim == 2 else mask


def _score_of(verdict) -> float:
    """The check's continuous score; a valid seal has none (-inf: surely untouched)."""
    return -math.inf if verdict.score is None else float(verdict.score)


def watermark_found(evidence: str, reasons: Sequence[str], has_header: bool) -> bool | None:
    """Whether the registry lookup read the watermark: None when it was not asked (the seal or the
    fingerprint in the file decided, or the file's SOP UID found the entry)."""
    if any(r.startswith("no watermark found") for r in reasons):
        return False
    if any(r.startswith("watermark found") for r in reasons):
        return True
    if evidence == "registry" and not has_header:
        return True
    return None


def check_case(image: MedicalImage, tools: Tools, reference_hex: str, truth: np.ndarray | None,
               grey_index: int) -> dict:
    """Check one image at every operating point; the baselines beside; IoU against ``truth``
    (frames x H x W, or None for a negative)."""
    from medsec_edge.runtime.crypto.seal import verify_dataset
    from medsec_edge.runtime.tamper.evidence import check_image

    row: dict[str, Any] = {}
    for i, op in enumerate(tools.ops):
        if i and row["evidence"] in OP_FREE_EVIDENCE:  # decided before any operating point applies
            row[f"tampered_{op}"] = row[f"tampered_{tools.ops[0]}"]
            continue
        t0 = time.perf_counter()
        verdict = check_image(image, tools.checker, tools.ring, op, registry=tools.registry)
        ms = (time.perf_counter() - t0) * 1e3
        row[f"tampered_{op}"] = bool(verdict.tampered)
        if i == 0:  # the default operating point: score, evidence, mask, latency
            row["check_ms"] = ms
            row["evidence"] = verdict.evidence
            row["score"] = _score_of(verdict)
            row["reasons"] = list(verdict.reasons)
            row["watermark"] = getattr(verdict.blind, "watermark", None) if verdict.blind is not None else None
            pred = _verdict_mask(verdict, image)
            if truth is not None:
                if pred.shape == truth.shape:
                    row["pixel_f1"], row["pixel_iou"] = dm.pixel_scores(pred, truth)
                else:
                    row["mask_shape_mismatch"] = [list(pred.shape), list(truth.shape)]
            row["_pred"] = pred
    row["wm_found"] = watermark_found(row["evidence"], row["reasons"], image.dataset is not None)
    t0 = time.perf_counter()
    row["sha256_flag"] = HashBaseline.verdict(reference_hex, image.pixels)
    row["sha256_ms"] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    status = verify_dataset(image.dataset, tools.ring).status if image.dataset is not None else "unsigned"
    row["seal_ms"] = (time.perf_counter() - t0) * 1e3
    row["seal_status"] = status
    row["seal_flag"] = status != "valid"  # the seal alone vouches or cannot: anything else is "changed"
    frame = image.frames()[min(grey_index, len(image.frames()) - 1)]
    if max(frame.shape[:2]) <= NOISE_MAX_SIDE:
        grey = luminance(frame) if frame.ndim == 3 else frame
        t0 = time.perf_counter()
        row["noise_score"] = float(tools.noise.score(np.asarray(grey, np.float64)))
        row["noise_ms"] = (time.perf_counter() - t0) * 1e3
    return row


# --- one image, both protected settings ------------------------------------------------------


@dataclass
class Example:
    setting: str
    title: str
    display: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    image: str = ""


def evaluate_image(name: str, src: Path, image: MedicalImage, donor: np.ndarray, tools: Tools, size: EvalSize, *,
                   seed: int, settings: Sequence[str], examples: list[Example]) -> list[dict]:
    """Protect one image and check its header-kept and header-stripped cases; one row per case."""
    protected = protect(src, image, tools)
    frames = protected.frames()
    size = size.for_pixels(int(np.prod(frames[0].shape[:2])) * len(frames))
    meta = protected.meta
    edit_index = len(frames) // 2
    ref = HashBaseline.reference(protected.pixels)
    case_dir = tools.work / "cases"
    case_dir.mkdir(exist_ok=True)
    n_frames = len(frames)
    base = {"image": name, "image_id": protected.meta.image_id, "frames": n_frames,
            "side": int(max(frames[0].shape[:2]))}
    rows: list[dict] = []
    counter = iter(range(10**9))

    def path() -> Path:
        return case_dir / f"case{next(counter)}.dcm"

    def checked(setting: str, kind: str, image_: MedicalImage, truth: np.ndarray | None, index: int) -> dict | None:
        try:
            return check_case(image_, tools, ref, truth, index)
        except Exception as exc:  # noqa: BLE001 - a runtime failure is a finding: counted, the run goes on
            text = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            tools.errors.append({"setting": setting, "image": name, "kind": kind, "error": text})
            log.warning("%s: check failed on a %s %s case: %s", name, setting, kind, text)
            return None

    def truth_stack(mask: np.ndarray) -> np.ndarray:
        out = np.zeros((n_frames, *mask.shape), bool)
        out[edit_index] = mask
        return out

    def finish(row: dict, setting: str, shown: np.ndarray | None = None, truth2d: np.ndarray | None = None,
               title: str = "") -> None:
        pred = row.pop("_pred", None)
        same = [e for e in examples if e.setting == setting]
        if (shown is not None and truth2d is not None and pred is not None and row.get("size", 0) >= 32
                and row.get("contrast_pct", 0.0) >= 3.0
                and row.get("step") is None and len(same) < EXAMPLES[setting]
                and not any(e.title.split(",")[0] == row["family"] or e.image == name for e in same)):
            p2 = pred[min(edit_index, len(pred) - 1)] if setting == "header_kept" else pred[0]
            if p2.shape == truth2d.shape:
                examples.append(Example(setting, title, shown, truth2d, p2, name))
        rows.append({**base, "setting": setting, **row})

    # Edits of the protected middle frame, shared by both settings.
    edits = []
    for f_index, family in enumerate(MANIPULATIONS):
        for s in size.sizes:
            rng = seeded_rng(seed, name, 20, f_index, s)
            try:
                edited, mask, size_px = edit_frame(frames[edit_index], meta, family, rng, s, donor)
            except UsageError as exc:
                log.info("%s: %s at %d px skipped (%s)", name, family, s, exc)
                continue
            pct = contrast_pct(frames[edit_index], edited, mask, meta)
            launder = LAUNDER_STEPS[int(rng.integers(len(LAUNDER_STEPS)))] if rng.random() < LAUNDER_SHARE else None
            edits.append((family, s, size_px, pct, edited, mask, launder))

    if "header_kept" in settings:
        untouched = checked("header_kept", "untouched", protected, None, edit_index)
        if untouched is not None:
            finish({"kind": "untouched", "label": False, "step": None, **untouched}, "header_kept")
        for s_index, step in enumerate(KEPT_STEPS):
            for t in range(size.benign_trials if step != "lossless" else 1):
                out, display8, _, params = apply_step(frames, meta, step, (21, s_index, t), seed=seed, name=name)
                try:
                    variant = with_pixels(protected, _stack(out, protected), display8=display8, path=path())
                except (MedsecError, ValueError) as exc:
                    log.info("%s: benign %s not written (%s)", name, step, exc)
                    continue
                row = checked("header_kept", "benign", variant, None, edit_index)
                if row is not None:
                    finish({"kind": "benign", "label": False, "step": step, "params": params, **row}, "header_kept")
        for e_index, (family, s, size_px, pct, edited, mask, launder) in enumerate(edits):
            new_frames = list(frames)
            new_frames[edit_index] = edited
            display8, truth = False, mask
            if launder is not None:
                new_frames, display8, truth, _ = apply_step(new_frames, meta, launder, (22, e_index), seed=seed,
                                                            name=name, mask=mask, edit_index=edit_index)
                if truth is None or not truth.any():
                    continue  # the crop cut the edit away
            try:
                variant = with_pixels(protected, _stack(new_frames, protected), display8=display8, path=path())
            except (MedsecError, ValueError) as exc:
                log.info("%s: edit %s not written (%s)", name, family, exc)
                continue
            row = checked("header_kept", "edit", variant, truth_stack(truth), edit_index)
            if row is None:
                continue
            shown = display_of(new_frames[edit_index], variant.meta)
            finish({"kind": "edit", "label": True, "family": family, "size": s, "size_bin": size_bin(s),
                    "size_px": size_px, "contrast_pct": pct, "contrast_bin": contrast_bin(pct), "step": launder,
                    **row}, "header_kept", shown, truth, f"{family}, {s} px, {pct:.1f}%")

    if "header_stripped" in settings:
        for e in range(size.exports):
            params = export_params(seeded_rng(seed, name, 23, e))
            exported, _ = export_display(frames[edit_index], meta, params, None, path())
            row = checked("header_stripped", "untouched", exported, None, 0)
            if row is not None:
                finish({"kind": "untouched", "label": False, "step": None, "export": params, **row}, "header_stripped")
        for e_index, (family, s, size_px, pct, edited, mask, _) in enumerate(edits):
            if s not in size.stripped_sizes:
                continue
            params = export_params(seeded_rng(seed, name, 24, e_index))
            exported, truth = export_display(edited, meta, params, mask, path())
            if truth is None or not truth.any():
                continue
            row = checked("header_stripped", "edit", exported, truth[None], 0)
            if row is None:
                continue
            shown = display_of(exported.frames()[0], exported.meta)
            finish({"kind": "edit", "label": True, "family": family, "size": s, "size_bin": size_bin(s),
                    "size_px": size_px, "contrast_pct": pct, "contrast_bin": contrast_bin(pct), "step": None,
                    "export": params, **row}, "header_stripped", shown, truth, f"{family}, {s} px, {pct:.1f}%")
    for leftover in case_dir.iterdir():
        leftover.unlink()
    return rows


# --- aggregation ----------------------------------------------------------------------------------


def _rate(k: int, n: int) -> dict:
    lo, hi = dm.wilson_interval(k, n)
    return {"k": int(k), "n": int(n), "rate": (k / n) if n else None, "ci95": [lo, hi]}


def _count(rows: list[dict], key: str) -> dict:
    return _rate(sum(bool(r[key]) for r in rows), len(rows))


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def roc_block(pos: list[dict], neg: list[dict], key: str = "score") -> dict:
    """Threshold-free: AUC and, at the threshold that keeps FPR <= 1% / 0.1% on these negatives,
    the TPR (Wilson) and the FPR reached."""
    # a valid seal has no score (-inf: surely untouched); a finite floor keeps ties tied
    pos, neg = [r for r in pos if key in r], [r for r in neg if key in r]
    scores = np.nan_to_num(np.asarray([r[key] for r in pos + neg], float), neginf=-1e300)
    labels = np.asarray([True] * len(pos) + [False] * len(neg))
    out: dict[str, Any] = {"n_pos": len(pos), "n_neg": len(neg), "auc": None}
    if not pos or not neg:
        return out
    out["auc"] = dm.roc_auc(scores, labels)
    for name, fpr in (("fpr1", 0.01), ("fpr0.1", 0.001)):
        thr = dm.threshold_at_fpr(scores[~labels], fpr)
        out[f"tpr_at_{name}"] = _rate(int((scores[labels] >= thr).sum()), len(pos))
        out[f"fpr_reached_{name}"] = _rate(int((scores[~labels] >= thr).sum()), len(neg))
    return out


def _latency(rows: list[dict], key: str) -> dict:
    by: dict[str, list[float]] = {}
    for r in rows:
        if key in r:
            by.setdefault("all", []).append(r[key])
            by.setdefault("<=640" if r["side"] <= 640 else ">640", []).append(r[key])
    return {k: {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "n": len(v)}
            for k, v in sorted(by.items())}


def summarise_setting(rows: list[dict], ops: Sequence[str]) -> dict:
    pos = [r for r in rows if r["label"]]
    neg = [r for r in rows if not r["label"]]
    plain = [r for r in pos if r.get("step") is None]
    laundered = [r for r in pos if r.get("step") is not None]
    target = [r for r in plain if r["size"] >= 16 and r["contrast_pct"] >= 3.0]
    out: dict[str, Any] = {
        "counts": {"positives": len(pos), "negatives": len(neg), "laundered": len(laundered),
                   "images": len({r["image"] for r in rows})},
        "evidence": {"positives": dict(Counter(r["evidence"] for r in pos)),
                     "negatives": dict(Counter(r["evidence"] for r in neg))},
        "roc": {"all": roc_block(pos, neg), "target": roc_block(target, neg),
                "not_laundered": roc_block(plain, neg), "laundered": roc_block(laundered, neg)},
        "per_family_auc": {f: roc_block([r for r in pos if r["family"] == f], neg)["auc"] for f in MANIPULATIONS},
        "operating_points": {},
    }
    for op in ops:
        key = f"tampered_{op}"
        flagged_images = {r["image"] for r in neg if r[key]}
        fpr = _count(neg, key)
        out["operating_points"][op] = {
            "tpr_all": _count(pos, key), "tpr_not_laundered": _count(plain, key),
            "tpr_laundered": _count(laundered, key), "tpr_target": _count(target, key), "fpr": fpr,
            "fpr_untouched": _count([r for r in neg if r["kind"] == "untouched"], key),
            "per_benign_step": {s: _count([r for r in neg if r.get("step") == s], key)
                                for s in dict.fromkeys(r.get("step") for r in neg if r.get("step"))},
            "per_family": {f: _count([r for r in plain if r["family"] == f], key) for f in MANIPULATIONS},
            "per_size_bin": {b: _count([r for r in plain if r["size_bin"] == b], key) for b in SIZE_BINS},
            "per_contrast_bin": {b: _count([r for r in plain if r["contrast_bin"] == b], key) for b in CONTRAST_BINS},
            "per_laundering_step": {s: _count([r for r in laundered if r["step"] == s], key) for s in LAUNDER_STEPS},
            "per_export": {k: {"tpr": _count([r for r in plain if test(r["export"])], key),
                               "fpr": _count([r for r in neg if test(r["export"])], key)}
                           for k, test in EXPORT_KINDS.items()} if any("export" in r for r in rows) else {},
            "study": {"images_with_a_false_flag": _rate(len(flagged_images), len({r["image"] for r in neg})),
                      f"study_fpr_{STUDY_FRAMES}_frames": dm.study_fpr(fpr["rate"], STUDY_FRAMES)
                      if fpr["rate"] is not None else None,
                      f"study_fpr_{STUDY_FRAMES}_frames_upper95": dm.study_fpr(fpr["ci95"][1], STUDY_FRAMES)
                      if fpr["n"] else None},
        }
    ious = {b: [r["pixel_iou"] for r in plain if r["size_bin"] == b and "pixel_iou" in r] for b in SIZE_BINS}
    big = [r["pixel_iou"] for r in plain if r["size"] >= 32 and "pixel_iou" in r]
    big_flagged = [r["pixel_iou"] for r in plain if r["size"] >= 32 and "pixel_iou" in r and r[f"tampered_{ops[0]}"]]
    out["pixel_iou"] = {"per_size_bin": {b: {"mean": _mean(v), "n": len(v)} for b, v in ious.items()},
                        "ge32": {"mean": _mean(big), "n": len(big)},
                        "ge32_flagged_only": {"mean": _mean(big_flagged), "n": len(big_flagged)},
                        "laundered": {"mean": _mean([r["pixel_iou"] for r in laundered if "pixel_iou" in r])},
                        "mask_shape_mismatch": sum("mask_shape_mismatch" in r for r in pos)}
    asked = [r for r in rows if r["wm_found"] is not None]
    found = [r for r in asked if r["wm_found"]]
    lost = [r for r in asked if not r["wm_found"]]
    out["watermark_found"] = {
        "not_asked": len(rows) - len(asked), "all": _count(asked, "wm_found"),
        "positives": _count([r for r in asked if r["label"]], "wm_found"),
        "negatives": _count([r for r in asked if not r["label"]], "wm_found"),
        "tpr_if_found": _count([r for r in found if r["label"]], f"tampered_{ops[0]}"),
        "fpr_if_found": _count([r for r in found if not r["label"]], f"tampered_{ops[0]}"),
        "tpr_if_not_found": _count([r for r in lost if r["label"]], f"tampered_{ops[0]}"),
        "fpr_if_not_found": _count([r for r in lost if not r["label"]], f"tampered_{ops[0]}"),
    }
    out["baselines"] = {
        "sha256": {"tpr": _count(pos, "sha256_flag"), "fpr": _count(neg, "sha256_flag"),
                   "per_benign_step": {s: _count([r for r in neg if r.get("step") == s], "sha256_flag")
                                       for s in dict.fromkeys(r.get("step") for r in neg if r.get("step"))}},
        "seal_alone": {"tpr": _count(pos, "seal_flag"), "fpr": _count(neg, "seal_flag"),
                       "per_benign_step": {s: _count([r for r in neg if r.get("step") == s], "seal_flag")
                                           for s in dict.fromkeys(r.get("step") for r in neg if r.get("step"))}},
        "noise_residual": {"roc": {"all": roc_block(pos, neg, "noise_score"),
                                   "target": roc_block(target, neg, "noise_score")}},
    }
    out["latency_ms"] = {"check": _latency(rows, "check_ms"), "sha256": _latency(rows, "sha256_ms"),
                         "seal_alone": _latency(rows, "seal_ms"), "noise_residual": _latency(rows, "noise_ms")}
    return out


def never_protected_headline(blind: dict) -> dict:
    """The numbers of tamper_eval's summary that this report repeats (the rest is in its files)."""
    b = blind["blind"]
    return {"auc_trained": b["roc_trained"]["auc"], "auc_held_out": b["roc_held_out"]["auc"],
            "held_out_family": HELD_OUT_FAMILY,
            "roc_trained": b["roc_trained"], "roc_held_out": b["roc_held_out"],
            "operating_points": {op: {k: row[k] for k in ("tpr_trained", "tpr_held_out", "fpr_genuine", "fpr_benign",
                                                           "study_fpr_300", "per_family", "per_size_bin",
                                                           "per_benign_step")}
                                 for op, row in b["operating_points"].items()},
            "pixel": b["pixel"], "latency_ms": b["latency_ms"],
            "baselines": {"noise_residual_auc_trained": blind["baselines"]["noise_residual"]["roc_trained"]["auc"],
                          "sha256_tpr": blind["baselines"]["sha256"]["tpr"],
                          "sha256_fpr_benign": blind["baselines"]["sha256"]["fpr_benign"]},
            "counts": blind["counts"], "files": ["tamper_eval.json", "tamper_eval.md", "tamper_eval.png"]}


# --- report ---------------------------------------------------------------------------------------


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def _setting_markdown(title: str, s: dict, ops: Sequence[str], target: str) -> list[str]:
    c = s["counts"]
    lines = [f"## {title}", "", f"Target: {target}.  ", f"{c['images']} images; {c['negatives']} negatives, "
             f"{c['positives']} edits ({c['laundered']} laundered by one benign step). Evidence that decided: "
             f"edits {s['evidence']['positives']}, negatives {s['evidence']['negatives']}.", "",
             "At the device's own decision (`tampered`, bundle operating points):", "",
             "| operating point | TPR target edits (>=16 px, >=3%) | TPR all edits | TPR laundered | FPR | "
             f"images with a false flag | study FPR ({STUDY_FRAMES} frames, from FPR; upper 95%) |",
             "|---|---|---|---|---|---|---|"]
    for op in ops:
        o = s["operating_points"][op]
        st = o["study"]
        lines.append(f"| {op} | {_pct(o['tpr_target'])} | {_pct(o['tpr_all'])} | {_pct(o['tpr_laundered'])} | "
                     f"{_pct(o['fpr'])} | {_pct(st['images_with_a_false_flag'])} | "
                     f"{_pct(st[f'study_fpr_{STUDY_FRAMES}_frames'])}; {_pct(st[f'study_fpr_{STUDY_FRAMES}_frames_upper95'])} |")
    lines += ["", "Threshold-free (ROC of `score` on this set; the threshold is chosen on these negatives, "
              "which a device cannot do):", "",
              "| edits | AUC | TPR @FPR 1% | TPR @FPR 0.1% | n pos / n neg |", "|---|---|---|---|---|"]
    for key, label in (("target", "target (>=16 px, >=3%)"), ("all", "all"), ("laundered", "laundered")):
        r = s["roc"][key]
        lines.append(f"| {label} | {_f(r['auc'], 4)} | {_pct(r.get('tpr_at_fpr1'))} | {_pct(r.get('tpr_at_fpr0.1'))} | "
                     f"{r['n_pos']} / {r['n_neg']} |")
    op = ops[0]
    o = s["operating_points"][op]
    lines += ["", f"Per family, size and contrast (not laundered; `{op}`):", "",
              "| family | TPR | AUC |", "|---|---|---|"]
    lines += [f"| {f}{' (held out of training)' if f == HELD_OUT_FAMILY else ''} | {_pct(v)} | "
              f"{_f(s['per_family_auc'][f], 4)} |" for f, v in o["per_family"].items()]
    iou = s["pixel_iou"]["per_size_bin"]
    lines += ["", "| size (px, side) | TPR | pixel IoU (mean; missed = 0) |", "|---|---|---|"]
    lines += [f"| {b} | {_pct(v)} | {_f(iou[b]['mean'])} (n {iou[b]['n']}) |" for b, v in o["per_size_bin"].items()]
    lines += ["", "| displayed contrast (% of window) | TPR |", "|---|---|"]
    lines += [f"| {b} | {_pct(v)} |" for b, v in o["per_contrast_bin"].items()]
    px = s["pixel_iou"]
    lines += ["", f"Pixel IoU, edits >= 32 px: {_f(px['ge32']['mean'])} (n {px['ge32']['n']}); flagged ones only: "
              f"{_f(px['ge32_flagged_only']['mean'])} (n {px['ge32_flagged_only']['n']}); laundered: "
              f"{_f(px['laundered']['mean'])}; mask shape mismatches: {px['mask_shape_mismatch']}.", ""]
    base = s["baselines"]
    if o["per_benign_step"]:
        lines += ["| benign step | FPR ours | FPR SHA-256 | FPR seal alone |", "|---|---|---|---|"]
        lines += [f"| {k} | {_pct(v)} | {_pct(base['sha256']['per_benign_step'].get(k))} | "
                  f"{_pct(base['seal_alone']['per_benign_step'].get(k))} |" for k, v in o["per_benign_step"].items()]
        lines.append("")
    if o["per_export"]:
        lines += ["| export | TPR | FPR |", "|---|---|---|"]
        lines += [f"| {k} | {_pct(v['tpr'])} | {_pct(v['fpr'])} |" for k, v in o["per_export"].items()]
        lines.append("")
    if any(v["n"] for v in o["per_laundering_step"].values()):
        lines += ["| laundering step | TPR |", "|---|---|"]
        lines += [f"| {k} | {_pct(v)} |" for k, v in o["per_laundering_step"].items() if v["n"]]
        lines.append("")
    wm = s["watermark_found"]
    lines += [f"Watermark (registry lookup): not asked on {wm['not_asked']} checks (seal, fingerprint in the file "
              f"or SOP UID decided); found on {_pct(wm['all'])} of the others (edits {_pct(wm['positives'])}, negatives "
              f"{_pct(wm['negatives'])}). Found: TPR {_pct(wm['tpr_if_found'])}, FPR {_pct(wm['fpr_if_found'])}; "
              f"not found: TPR {_pct(wm['tpr_if_not_found'])}, FPR {_pct(wm['fpr_if_not_found'])}.", "",
              "| method | TPR | FPR | AUC | localizes |", "|---|---|---|---|---|",
              f"| ours (check, {op}) | {_pct(o['tpr_all'])} | {_pct(o['fpr'])} | {_f(s['roc']['all']['auc'], 4)} | yes |",
              f"| SHA-256 of the pixels | {_pct(base['sha256']['tpr'])} | {_pct(base['sha256']['fpr'])} | | no |",
              f"| seal alone | {_pct(base['seal_alone']['tpr'])} | {_pct(base['seal_alone']['fpr'])} | | no |",
              f"| noise residual (classical) | | | {_f(base['noise_residual']['roc']['all']['auc'], 4)} | yes |", "",
              "| latency (ms per image) | size | p50 | p95 | n |", "|---|---|---|---|---|"]
    for label, key in (("check", "check"), ("SHA-256", "sha256"), ("seal alone", "seal_alone"),
                       ("noise residual", "noise_residual")):
        for size_class, v in s["latency_ms"][key].items():
            lines.append(f"| {label} | {size_class} | {v['p50']:.1f} | {v['p95']:.1f} | {v['n']} |")
    lines.append("")
    return lines


def render_markdown(summary: dict) -> str:
    m = summary["meta"]
    ops = m["operating_points"]
    lines = [f"# Tamper check in three settings ({m['created']})", "",
             f"Command: `{m['command']}`  ", f"Bundle: {m['bundle']}; size `{m['size']}`; seed {m['seed']}; "
             f"{m['seconds']} s.  ",
             f"Images: {len(summary['images'])} held-out (pydicom-data, deduplicated; multi-frame cut to "
             f"{MAX_FRAMES} frames); skipped {len(summary['skipped'])}. Rates with Wilson 95% intervals. "
             "Thresholds come from the bundle and the runtime, never from these images.", ""]
    titles = {"header_kept": "Header kept (the PACS path)", "header_stripped": "Header stripped (display exports)"}
    for key in ("header_kept", "header_stripped"):
        if key in summary["settings"]:
            lines += _setting_markdown(titles[key], summary["settings"][key], ops, TARGETS[key])
    blind = summary["settings"].get("never_protected")
    if blind:
        lines += ["## Never protected (blind detector; details in tamper_eval.md)", "",
                  f"Target: {TARGETS['never_protected']}.  ",
                  f"AUC trained families {_f(blind['auc_trained'], 4)}, held-out family `{HELD_OUT_FAMILY}` "
                  f"{_f(blind['auc_held_out'], 4)}; best TPR @FPR 1% (trained) {_pct(blind['roc_trained']['roc_tpr_at_fpr1'])}; "
                  f"pixel IoU >= 32 px {_f(blind['pixel']['iou_mean_ge32'])}.", "",
                  "| operating point | TPR trained | TPR held-out | FPR genuine | FPR benign | study FPR (300) |",
                  "|---|---|---|---|---|---|"]
        for op, o in blind["operating_points"].items():
            lines.append(f"| {op} | {_pct(o['tpr_trained'])} | {_pct(o['tpr_held_out'])} | {_pct(o['fpr_genuine'])} | "
                         f"{_pct(o['fpr_benign'])} | {_pct(o['study_fpr_300'])} |")
        lines.append("")
    if summary.get("errors"):
        lines += [f"**The runtime failed on {len(summary['errors'])} case(s)** (not counted above): "
                  + "; ".join(sorted({e['error'] for e in summary['errors']}))[:1500], ""]
    if summary["skipped"]:
        lines += ["Skipped: " + "; ".join(f"{s['name']} ({s['reason']})" for s in summary["skipped"]), ""]
    return "\n".join(lines)


# --- the run --------------------------------------------------------------------------------------


def run_evidence_eval(images: list[Path], out: Path, *, bundle_path: Path | None = None, threads: int | None = None,
                      seed: int = 0, size: str = "default", settings: Sequence[str] = SETTINGS,
                      trials: int | None = None, benign_trials: int | None = None, watermark: bool = False,
                      dedup: bool = True, progress: bool = True, command: str = "") -> dict:
    """The three settings on ``images``; writes JSON, markdown and PNG into ``out`` (the never-protected
    setting also writes tamper_eval.*). ``trials``/``benign_trials`` override the size's blind draws."""
    from medsec_edge.evaluation.plots import plot_evidence_eval
    from medsec_edge.evaluation.tamper_eval import run_tamper_eval
    from rich.progress import Progress

    if size not in SIZES:
        raise UsageError(f"unknown size {size!r}: expected one of {', '.join(SIZES)}")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise UsageError(f"settings must be among {', '.join(SETTINGS)}, got {', '.join(settings) or 'none'}")
    cfg = SIZES[size]
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"settings": {}}
    blind_rows: list[dict] = []
    if "never_protected" in settings:
        blind = run_tamper_eval(images, out, bundle_path=bundle_path, threads=threads, seed=seed,
                                trials=trials or cfg.blind_trials, benign_trials=benign_trials or cfg.blind_benign_trials,
                                watermark=watermark, dedup=dedup, progress=progress, command=command)
        summary["settings"]["never_protected"] = never_protected_headline(blind)
        from medsec_edge.evaluation.tamper_eval import JSON_NAME as BLIND_JSON

        blind_rows = json.loads((out / BLIND_JSON).read_text())["rows"]
    rows: list[dict] = []
    examples: list[Example] = []
    images_used: list[dict] = []
    skipped: list[dict] = []
    ops: tuple[str, ...] = ()
    errors: list[dict] = []
    protected_settings = [s for s in settings if s != "never_protected"]
    if protected_settings:
        from medsec_edge.runtime.crypto.device_keys import load_or_create_ring
        from medsec_edge.runtime.pipeline import load_watermarker
        from medsec_edge.runtime.tamper.checker import TamperChecker
        from medsec_edge.runtime.tamper.registry import Registry

        loaded, skipped, _ = read_held_out(images, dedup=dedup)
        usable = []
        for path, image in loaded:
            side = min(image.frames()[0].shape[:2])
            if image.dataset is None:
                skipped.append({"name": path.name, "reason": "not DICOM: nothing to seal (header settings)"})
            elif side < MIN_SIDE:
                skipped.append({"name": path.name, "reason": f"shorter side {side} px is below {MIN_SIDE} px"})
            else:
                usable.append((path, image))
        if not usable:
            raise UsageError("no usable DICOM image (>= 64 px) among the inputs: nothing to evaluate")
        with tempfile.TemporaryDirectory(prefix="medsec-evidence-eval-") as tmp:
            work = Path(tmp)
            ring = load_or_create_ring(work / "keys")
            watermarker, bundle = load_watermarker(bundle_path, threads=threads)
            checker = TamperChecker.from_bundle(bundle, watermarker=watermarker, key=ring.watermark, threads=threads)
            ops = tuple(dict.fromkeys([checker.operating_point(None).name, *checker.operating_points]))
            with Registry.open(work / "registry.sqlite") as registry:
                tools = Tools(watermarker, bundle, checker, ring, registry, work, ops, errors=errors)
                with Progress(disable=not progress, transient=True) as bar:
                    task = bar.add_task("evidence eval", total=len(usable))
                    for i, (path, image) in enumerate(usable):
                        donor = grey_frame(usable[(i + 1) % len(usable)][1])[0].astype(np.float64)
                        try:
                            got = evaluate_image(path.name, path, image, donor, tools, cfg, seed=seed,
                                                 settings=protected_settings, examples=examples)
                        except (MedsecError, ValueError) as exc:
                            skipped.append({"name": path.name, "reason": str(exc).removeprefix(f"{path.name}: ")})
                            log.info("%s skipped: %s", path.name, exc)
                        else:
                            rows += got
                            images_used.append({"name": path.name, "image_id": image.meta.image_id,
                                                "shape": list(image.pixels.shape), "bits": image.meta.bits_stored,
                                                "cases": len(got)})
                        bar.advance(task)
        for key in protected_settings:
            part = [r for r in rows if r["setting"] == key]
            if part:
                summary["settings"][key] = summarise_setting(part, ops)
    summary["meta"] = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": command, "seed": seed, "size": size, "settings": list(settings),
                       "bundle": str(bundle_path or "default"), "operating_points": list(ops),
                       "seconds": round(time.perf_counter() - started, 1), "max_frames": MAX_FRAMES,
                       "config": asdict(cfg), "large_pixels": LARGE_PIXELS, "noise_max_side": NOISE_MAX_SIDE}
    summary["images"], summary["skipped"] = images_used, skipped
    summary["errors"] = errors
    summary["targets"] = TARGETS
    portable = [{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in r.items()} for r in rows]
    (out / JSON_NAME).write_text(json.dumps({**summary, "rows": portable}, indent=1, default=json_default))
    (out / MARKDOWN_NAME).write_text(render_markdown(summary))
    plot_evidence_eval(rows, blind_rows, examples, out / PLOT_NAME)
    return summary


__all__ = ["JSON_NAME", "MARKDOWN_NAME", "PLOT_NAME", "SETTINGS", "SIZES", "run_evidence_eval"]
