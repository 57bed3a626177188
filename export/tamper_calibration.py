"""Freeze the tamper check's thresholds on validation images the evaluation never sees.

Layer: export (runs the exported ONNX detector through the runtime's own code path, so the
thresholds hold for what the device computes). Validation frames come from the training
generator under a seed no training run uses, from the VALIDATION split of the real frames
(:mod:`train.real_data`: patients/volumes training never saw; never pydicom-data nor a file that
shares a study with it), windows of 256 and 512 px (smaller frames whole), genuine or after one
benign step, a third of them watermarked as in training: these fix the blind threshold per target
false-positive rate. The watermark threshold is fixed on the same kind of
frames, watermarked and then put through the watermark core's moderate tier, so that on a
watermarked image the OR of both rules still stays within the target. The pixel threshold is the
mask logit that gives the best mean IoU on manipulated validation frames (trained families only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from medsec_edge.evaluation.attacks import ATTACKS
from medsec_edge.evaluation.detection_metrics import threshold_at_fpr
from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.image import MedicalImage, display_window, stored_range
from medsec_edge.runtime.tamper.checker import TamperChecker, upsample_mask
from medsec_edge.train.tamper_data import TRAIN_FAMILIES, TamperSamples

log = logging.getLogger(__name__)

VALIDATION_SEED = 970_001  # training uses its config seed (4321 by default) and seed + 1_000_003
TARGETS = {"fpr1": 0.01, "fpr0.1": 0.001}
SIDES = (256, 512)
# The watermark core's moderate tier: what a watermarked image may go through and stay genuine.
MODERATE_TIER = ("none", "jpeg90", "jpeg75", "j2k10", "noise1", "blur1", "export8", "resize0.75", "crop50")
WATERMARKED_SHARE = 0.35  # as in training: our own outputs come back to be checked
PIXEL_LOGITS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
# Real frames of the validation split only (other patients than training), as the trainer's
# checkpoint choice: a synthetic share would make thresholds for images no device sees.
VALIDATION_SOURCE = {"split": "val", "p_real": 1.0}


def validation_origin() -> str:
    """Where the validation frames come from (``real_data`` or the pydicom fallback), for the manifest."""
    gen = TamperSamples(VALIDATION_SEED, crop=64, side=SIDES[0], **VALIDATION_SOURCE)
    gen.real
    groups = len(gen._groups)
    if gen.real_origin == "real_data":
        return (f"train.real_data validation split: {len(gen.real)} real frames of {groups} patients/volumes "
                "never trained on (never pydicom-data nor files sharing a study with it)")
    return f"pydicom test files {', '.join(sorted({s.group for s in gen.real}))} (real-data packages absent)"


@dataclass(frozen=True)
class CalibrationSizes:
    genuine: int = 1200
    tampered: int = 240
    watermarked: int = 300


def _image(frame: np.ndarray, meta) -> MedicalImage:
    return MedicalImage(np.ascontiguousarray(frame), meta)


def blind_negatives(checker: TamperChecker, n: int, progress: bool = True) -> tuple[np.ndarray, list[str]]:
    """Blind logits of ``n`` genuine validation frames (60% after one benign step, a third of
    them carrying our watermark, as in training)."""
    from tqdm import tqdm

    logits, kinds = [], []
    gens = {side: TamperSamples(VALIDATION_SEED, crop=64, p_tampered=0.0, side=side, p_watermark=WATERMARKED_SHARE,
                                **VALIDATION_SOURCE) for side in SIDES}
    for i in tqdm(range(n), desc="calibrate: genuine + benign", disable=not progress, mininterval=5):
        frame, meta, _, info = gens[SIDES[i % len(SIDES)]].make(i)
        logits.append(checker.blind(frame, meta).logit)
        kinds.append(info["benign"] or "none")
    return np.asarray(logits), kinds


def pixel_threshold(checker: TamperChecker, n: int, progress: bool = True) -> tuple[float, dict[float, float]]:
    """The mask logit with the best mean IoU on manipulated validation frames."""
    from tqdm import tqdm

    ious: dict[float, list[float]] = {t: [] for t in PIXEL_LOGITS}
    gens = {side: TamperSamples(VALIDATION_SEED + 1, crop=64, p_tampered=1.0, families=TRAIN_FAMILIES, side=side,
                                **VALIDATION_SOURCE) for side in SIDES}
    for i in tqdm(range(n), desc="calibrate: pixel threshold", disable=not progress, mininterval=5):
        frame, meta, mask, _ = gens[SIDES[i % len(SIDES)]].make(i)
        if not mask.any():
            continue
        blind = checker.blind(frame, meta)
        for t in PIXEL_LOGITS:
            pred = upsample_mask(blind.mask_logits >= t, blind.stride, mask.shape)
            union = np.logical_or(pred, mask).sum()
            ious[t].append(float(np.logical_and(pred, mask).sum() / union) if union else 1.0)
    means = {t: float(np.mean(v)) if v else 0.0 for t, v in ious.items()}
    return max(means, key=means.get), means


def watermark_negatives(checker: TamperChecker, n: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(blind logits, watermark deficits) of watermarked genuine frames after a moderate-tier step;
    the deficit is NaN where the watermark was not read (then only the blind rule applies)."""
    from tqdm import tqdm

    from medsec_edge.evaluation.attacks import attacked_image

    rng = np.random.default_rng(VALIDATION_SEED + 2)
    blind, deficits = [], []
    gens = {side: TamperSamples(VALIDATION_SEED + 2, crop=64, p_tampered=0.0, p_benign=0.0, side=side,
                                **VALIDATION_SOURCE) for side in SIDES}
    for i in tqdm(range(n), desc="calibrate: watermarked + moderate tier", disable=not progress, mininterval=5):
        frame, meta, _, _ = gens[SIDES[i % len(SIDES)]].make(i)
        image = _image(frame, meta)
        payload = rng.integers(0, 256, 8, dtype=np.uint8).tobytes()
        try:
            marked = checker.watermarker.embed(image, payload).pixels
        except InputError:
            continue  # nothing visible to carry a mark
        attack = ATTACKS[MODERATE_TIER[i % len(MODERATE_TIER)]]
        out = attack(marked, display_window(meta, marked), rng, value_range=stored_range(meta, marked.dtype))
        attacked = attacked_image([out], meta)
        verdict = checker.check(attacked, operating_point="fpr1")  # the provisional point (calibrate)
        blind.append(verdict.blind_logit)
        deficits.append(np.nan if verdict.watermark_deficit is None else verdict.watermark_deficit)
    return np.asarray(blind), np.asarray(deficits)


def wm_threshold(blind: np.ndarray, deficits: np.ndarray, blind_threshold: float, target: float) -> float:
    """Smallest watermark-deficit threshold keeping the OR rule's FPR on watermarked frames <= target."""
    read = np.isfinite(deficits)
    base = blind >= blind_threshold
    candidates = np.unique(np.concatenate([deficits[read], [np.inf]]))
    for t in candidates:  # ascending: the first that satisfies the target is the smallest
        flagged = base | (read & (np.nan_to_num(deficits, nan=-np.inf) >= t))
        if flagged.mean() <= target:
            return float(t)
    return float("inf")


def calibrate(checker: TamperChecker, sizes: CalibrationSizes = CalibrationSizes(), progress: bool = True) -> dict:
    """Thresholds per operating point plus what they were measured on (for the manifest)."""
    logits, kinds = blind_negatives(checker, sizes.genuine, progress)
    pixel_logit, pixel_ious = pixel_threshold(checker, sizes.tampered, progress)
    points: dict[str, dict] = {}
    blind_thresholds = {name: threshold_at_fpr(logits, fpr) for name, fpr in TARGETS.items()}
    wm = None
    if checker.watermarker is not None and sizes.watermarked:
        # The OR rule needs provisional operating points to run the check; the watermark rule is
        # switched off (infinite threshold) while its own statistics are collected.
        from medsec_edge.runtime.tamper.checker import OperatingPoint

        checker.operating_points = {"fpr1": OperatingPoint("fpr1", 0.01, blind_thresholds["fpr1"], np.inf)}
        wm = watermark_negatives(checker, sizes.watermarked, progress)
    for name, fpr in TARGETS.items():
        t_blind = blind_thresholds[name]
        t_wm = wm_threshold(wm[0], wm[1], t_blind, fpr) if wm is not None else float("inf")
        points[name] = {
            "target_fpr": fpr,
            "blind_logit": float(t_blind),
            "wm_deficit": float(t_wm) if np.isfinite(t_wm) else 1e9,
            "pixel_logit": float(pixel_logit),
            "measured_fpr_blind": float(np.mean(logits >= t_blind)),
        }
        if wm is not None:
            read = np.isfinite(wm[1])
            flagged = (wm[0] >= t_blind) | (read & (np.nan_to_num(wm[1], nan=-np.inf) >= t_wm))
            points[name]["measured_fpr_watermarked"] = float(np.mean(flagged))
    per_benign = {k: float(np.mean(logits[np.asarray(kinds) == k] >= blind_thresholds["fpr1"]))
                  for k in sorted(set(kinds))}
    return {
        "operating_points": points,
        "validation": {
            "seed": VALIDATION_SEED, "sides_px": list(SIDES), "genuine_frames": int(sizes.genuine),
            "tampered_frames": int(sizes.tampered), "watermarked_frames": int(sizes.watermarked),
            "sources": validation_origin(),
            "fpr1_by_benign_step": per_benign,
            "pixel_iou_by_logit": {str(k): round(v, 4) for k, v in pixel_ious.items()},
            "watermark_read_share": None if wm is None else float(np.mean(np.isfinite(wm[1]))),
            "moderate_tier": list(MODERATE_TIER),
        },
    }
