"""The accuracy gate: a lower-precision bundle against its FP32 reference, on validation images.

Layer: calibration (runtime; ``evaluation``'s attacks, manipulations, fingerprint edits and ROC
code, so an attack means the same thing here as in ``eval``). Both bundles run through the runtime
exactly as a device runs them. Limits (issue 12): exact payload recovery per attack may drop by at
most 0.5 point, the tamper detector's and the fingerprint encoder's AUC by at most 0.005, and the
candidate may make no false detection.

Measured per validation image and trial (a seeded random payload):
- **watermark**: each bundle embeds the payload; every evaluation attack is applied to both
  marked images with the same seed; each bundle reads its own marks, and each reads the other's
  (``cross``: a mark made by an INT8 device must read where FP32 runs, and the reverse).
- **false detections**: the unmarked image under every attack, read by the candidate (trial 0).
- **tamper AUC**: the blind detector's image logit on genuine frames (the image, and after JPEG 90
  and a 0.75 resize) against four local manipulations of each (grey frames only).
- **fingerprint AUC**: each encoder's own recorded int8 codes against its codes after benign steps
  (negatives: every valid cell) and after local edits of 24-48 px changing the display by 5-10
  levels (positives: the covered cells); cell-level, as issue 9 measured it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from medsec_edge.runtime.errors import MedsecError
from medsec_edge.runtime.io.image import MedicalImage, display_window, stored_range
from medsec_edge.runtime.io.readers import read_image

log = logging.getLogger(__name__)

RECOVERY_DROP_PP = 0.5
AUC_DROP = 0.005
MANIPULATIONS = ("inject_lesion", "remove_lesion", "copy_move", "splice")
BENIGN_FOR_TAMPER = ("jpeg90", "resize0.75")
FP_BENIGN = ("jpeg", "resize", "noise", "blur")
FP_EDITS = ("copy_move", "inject", "remove", "local_contrast")


@dataclass
class Side:
    """One bundle's runtime objects for the gate."""

    name: str
    watermarker: object
    checker: object | None
    encoder: object | None


@dataclass
class GateReport:
    """Every figure the gate decided on, JSON-ready through ``to_dict``."""

    images: int
    trials: int
    recovery: dict[str, dict[str, float]]  # attack -> {reference, candidate, cross_*: %, n}
    false_detections: dict[str, int]  # {"candidate": k, "reference": k, "n": n}
    tamper_auc: dict[str, float | int]
    fingerprint_auc: dict[str, float | int]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failures": list(self.failures), "images": self.images,
                "trials": self.trials, "limits": {"recovery_drop_pp": RECOVERY_DROP_PP, "auc_drop": AUC_DROP,
                                                  "false_detections": 0},
                "recovery_pct": self.recovery, "false_detections": self.false_detections,
                "tamper_auc": self.tamper_auc, "fingerprint_auc": self.fingerprint_auc}


def open_side(bundle, name: str) -> Side:
    from medsec_edge.runtime.tamper.checker import TamperChecker
    from medsec_edge.runtime.tamper.learned_fingerprint import FingerprintEncoder
    from medsec_edge.runtime.watermark.models import BundleWatermarkModels
    from medsec_edge.runtime.watermark.payload import PayloadCodec
    from medsec_edge.runtime.watermark.watermarker import Watermarker

    target = float(bundle.manifest.payload.get("target_psnr_db", 42.5))
    watermarker = Watermarker(BundleWatermarkModels(bundle), PayloadCodec(), target_psnr_db=target)
    checker = (TamperChecker.from_bundle(bundle, watermarker=watermarker)
               if "tamper_detector" in bundle.manifest.models else None)
    encoder = FingerprintEncoder.from_bundle(bundle) if "fp_encoder" in bundle.manifest.models else None
    return Side(name, watermarker, checker, encoder)


def _rng(seed: int, *parts: int) -> np.random.Generator:
    return np.random.default_rng([seed, *parts])


def _reads(watermarker, image: MedicalImage, payload: bytes) -> tuple[bool, bool]:
    """(found, exact payload) of one extraction; a refused input reads as nothing."""
    try:
        extraction = watermarker.extract(image)
    except MedsecError:
        return False, False
    return bool(extraction.found), bool(extraction.found and extraction.payload == payload.hex())


def _watermark(ref: Side, cand: Side, images, attacks: Sequence[str], trials: int, seed: int, tick):
    from medsec_edge.evaluation.attacks import attack_image

    keys = ("reference", "candidate", "cross_reference_reads_candidate", "cross_candidate_reads_reference")
    counts = {a: dict.fromkeys(keys, 0) | {"n": 0} for a in attacks}
    false = {"reference": 0, "candidate": 0, "n": 0}
    for i, image in enumerate(images):
        for trial in range(trials):
            payload = _rng(seed, i, trial).bytes(8)
            marked = {}
            for side in (ref, cand):
                try:
                    marked[side.name] = replace(image, pixels=side.watermarker.embed(image, payload).pixels)
                except MedsecError as exc:
                    log.info("validation image %d not marked by %s: %s", i, side.name, exc)
            if "reference" not in marked:
                continue  # the image cannot carry a mark at all (its size): nothing to compare
            for j, attack in enumerate(attacks):
                att = {name: attack_image(m, attack, _rng(seed, i, trial, j)) for name, m in marked.items()}
                row = counts[attack]
                row["n"] += 1
                row["reference"] += _reads(ref.watermarker, att["reference"], payload)[1]
                row["cross_candidate_reads_reference"] += _reads(cand.watermarker, att["reference"], payload)[1]
                if "candidate" in att:  # a candidate that refused to mark reads nothing
                    row["candidate"] += _reads(cand.watermarker, att["candidate"], payload)[1]
                    row["cross_reference_reads_candidate"] += _reads(ref.watermarker, att["candidate"], payload)[1]
        for j, attack in enumerate(attacks):  # the unmarked image, marked or not
            clean = attack_image(image, attack, _rng(seed, i, 0, j))
            false["n"] += 1
            false["reference"] += _reads(ref.watermarker, clean, b"")[0]
            false["candidate"] += _reads(cand.watermarker, clean, b"")[0]
        tick()
    recovery = {a: {k: round(100.0 * c[k] / c["n"], 3) if c["n"] else float("nan") for k in keys} | {"n": c["n"]}
                for a, c in counts.items()}
    return recovery, false


def _tamper_auc(ref: Side, cand: Side, images, seed: int, tick) -> dict:
    from medsec_edge.evaluation import manipulations
    from medsec_edge.evaluation.attacks import attack_image
    from medsec_edge.evaluation.detection_metrics import roc_auc

    if ref.checker is None or cand.checker is None:
        return {"skipped": "a bundle has no tamper_detector"}
    scores = {ref.name: [], cand.name: []}
    labels: list[bool] = []
    for i, image in enumerate(images):
        if image.meta.is_colour:
            continue
        genuine = [image] + [attack_image(image, a, _rng(seed, 7, i, k)) for k, a in enumerate(BENIGN_FOR_TAMPER)]
        frame = image.frames()[0]
        value_range = stored_range(image.meta, frame.dtype)
        tampered = []
        for k, kind in enumerate(MANIPULATIONS):
            fn = getattr(manipulations, kind)
            rng = _rng(seed, 8, i, k)
            try:
                kwargs = {"donor": images[(i + 1) % len(images)].frames()[0]} if kind == "splice" else {}
                edit = fn(frame, rng, value_range=value_range, **kwargs)
            except (MedsecError, ValueError) as exc:
                log.info("manipulation %s of validation image %d skipped: %s", kind, i, exc)
                continue
            tampered.append(edit.pixels)
        for frames, label in (([g.frames()[0] for g in genuine], False), (tampered, True)):
            for f in frames:
                meta = image.meta
                for side in (ref, cand):
                    scores[side.name].append(side.checker.blind(f, meta).logit)
                labels.append(label)
        tick()
    y = np.asarray(labels, bool)
    if y.all() or not y.any():
        return {"skipped": "no grey validation frame could be manipulated"}
    return {"reference": round(roc_auc(np.asarray(scores[ref.name]), y), 5),
            "candidate": round(roc_auc(np.asarray(scores[cand.name]), y), 5),
            "genuine": int((~y).sum()), "tampered": int(y.sum())}


def _fingerprint_auc(ref: Side, cand: Side, images, seed: int, tick) -> dict:
    from medsec_edge.evaluation.detection_metrics import roc_auc
    from medsec_edge.evaluation.fingerprint_edits import benign_display, covered_cells, local_edit, valid_cells
    from medsec_edge.runtime.tamper.fingerprint import display_frames
    from medsec_edge.runtime.tamper.learned_fingerprint import learned_cell_size_for, quantise

    if ref.encoder is None or cand.encoder is None:
        return {"skipped": "a bundle has no fp_encoder"}
    dist = {ref.name: [], cand.name: []}
    labels: list[np.ndarray] = []
    for i, image in enumerate(images):
        if image.meta.is_colour:
            continue
        frame = image.frames()[0]
        window = display_window(image.meta, frame)
        value_range = stored_range(image.meta, frame.dtype)
        display = display_frames(image)[0][0]
        cell = learned_cell_size_for(image.shape_hw)
        tests = []
        for k, step in enumerate(FP_BENIGN):
            shown, valid, _ = benign_display(frame, window, _rng(seed, 9, i, k), step, value_range=value_range)
            tests.append((shown, None, valid))
        for k, kind in enumerate(FP_EDITS):
            rng = _rng(seed, 10, i, k)
            size = int(rng.choice([24, 32, 48]))
            if min(display.shape) < 2 * size:
                continue
            delta = float(rng.choice([-1, 1]) * rng.uniform(5.0, 10.0))
            try:
                edit = local_edit(display, rng, size=size, delta=delta, kind=kind,
                                  donor=display[::-1, ::-1] if kind == "splice" else None)
            except (MedsecError, ValueError) as exc:
                log.info("fingerprint edit %s of validation image %d skipped: %s", kind, i, exc)
                continue
            tests.append((edit.display, edit.mask, None))
        for side in (ref, cand):
            recorded = quantise(side.encoder.codes(display, cell)).astype(np.float32)
            for shown, mask, valid in tests:
                d = np.sqrt(np.sum((side.encoder.codes(shown, cell) - recorded) ** 2, axis=0))
                grid = d.shape
                keep = covered_cells(mask, cell, grid) if mask is not None else valid_cells(valid, cell, grid, 16)
                dist[side.name].append(d[keep])
                if side is ref:
                    labels.append(np.full(int(keep.sum()), mask is not None))
        tick()
    y = np.concatenate(labels) if labels else np.zeros(0, bool)
    if y.size == 0 or y.all() or not y.any():
        return {"skipped": "no grey validation frame could be edited"}
    return {"reference": round(roc_auc(np.concatenate(dist[ref.name]), y), 5),
            "candidate": round(roc_auc(np.concatenate(dist[cand.name]), y), 5),
            "negative_cells": int((~y).sum()), "positive_cells": int(y.sum())}


def run_gate(reference, candidate, image_paths: Sequence[Path], *, trials: int = 2, seed: int = 12,
             attacks: Sequence[str] | None = None,
             progress: Callable[[int, str], Callable[[], None]] | None = None) -> GateReport:
    """Measure ``candidate`` (an opened bundle) against ``reference`` on ``image_paths``."""
    from medsec_edge.evaluation.attacks import ATTACKS

    attacks = list(attacks or ATTACKS)
    images = []
    for path in image_paths:
        try:
            images.append(read_image(path))
        except MedsecError as exc:
            log.warning("validation image skipped (%s)", exc)
    ref, cand = open_side(reference, "reference"), open_side(candidate, "candidate")
    tick = (lambda n, what: progress(n, what)) if progress else (lambda n, what: (lambda: None))
    recovery, false = _watermark(ref, cand, images, attacks, trials, seed, tick(len(images), "watermark"))
    tamper = _tamper_auc(ref, cand, images, seed, tick(len(images), "tamper"))
    fingerprint = _fingerprint_auc(ref, cand, images, seed, tick(len(images), "fingerprint"))
    report = GateReport(len(images), trials, recovery, false, tamper, fingerprint)
    report.failures.extend(judge(report))
    return report


def judge(report: GateReport) -> list[str]:
    """Each limit the candidate misses, in words."""
    failures = []
    for attack, row in report.recovery.items():
        if not row["n"]:
            continue
        for key in ("candidate", "cross_reference_reads_candidate", "cross_candidate_reads_reference"):
            drop = row["reference"] - row[key]
            if drop > RECOVERY_DROP_PP:
                failures.append(f"{attack}: exact recovery {key} {row[key]:.1f}% vs FP32 {row['reference']:.1f}% "
                                f"(drop {drop:.1f} points > {RECOVERY_DROP_PP})")
    if report.false_detections.get("candidate", 0) > 0:
        failures.append(f"{report.false_detections['candidate']} false detection(s) on "
                        f"{report.false_detections['n']} unmarked attacked images (limit 0)")
    for what, auc in (("tamper", report.tamper_auc), ("fingerprint", report.fingerprint_auc)):
        if "candidate" in auc and auc["reference"] - auc["candidate"] > AUC_DROP:
            failures.append(f"{what} AUC {auc['candidate']:.4f} vs FP32 {auc['reference']:.4f} "
                            f"(drop > {AUC_DROP})")
    return failures
