"""Which evidence decides a tamper verdict, strongest first (DESIGN.md, "Evidence and verdicts").

Layer: runtime (tamper). In order:

1. **seal**: valid under the key set -> untouched, decided in milliseconds, nothing else runs.
2. **fingerprint**: the signed content fingerprint in our private block, verified with the key
   set, compared with the pixels under test (``scoring.py``: benign processing is explained
   away, a local edit is not) -> tampered or not, a mask and regions.
3. **registry**: no usable fingerprint in the file (an export without a header, a stripped
   private block): the entry found by SOP Instance UID, else by the watermark payload read from
   the pixels, its fingerprint verified, the image aligned with it (scale, crop) and compared.
4. **blind**: no evidence at all: the blind detector decides, labelled as such.

A broken seal alone never says "tampered": a lossy re-encode breaks it too. Every step that was
tried and could not decide leaves a reason a person can read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from medsec_edge.runtime.crypto.seal import _as_verifiers, verify_dataset
from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.dicom_writer import read_fingerprint
from medsec_edge.runtime.io.image import MedicalImage, display_window
from medsec_edge.runtime.tamper.checker import MAX_REGIONS, Region, TamperChecker, TamperVerdict
from medsec_edge.runtime.tamper.fingerprint import (
    Fingerprint,
    FrameWindow,
    display_frames,
    signed_key_id,
    verify_fingerprint,
)
from medsec_edge.runtime.tamper.scoring import (
    DEFAULT_PARAMS,
    FingerprintScore,
    ScoringParams,
    align,
    cell_means_at,
    pixel_mask,
    score_displays,
)

__all__ = ["CheckVerdict", "SealEvidence", "check_image", "seal_evidence"]

_IDENTITY_8BIT = FrameWindow(0.0, 255.0, 1.0, 0.0, False)
MAX_REGISTRY_CANDIDATES = 16
MAX_FRAMES_SEARCHED = 32  # a single exported frame is matched against at most this many recorded ones  # entries sharing one payload (a batch run with --payload) compared at most


@dataclass(frozen=True)
class SealEvidence:
    """What the seal says: ``valid``, ``invalid`` (``changed`` names the parts), ``unsigned`` or
    ``unknown_key``."""

    status: str
    changed: tuple[str, ...] = ()
    key_id: str | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "changed": list(self.changed), "key_id": self.key_id}


@dataclass(frozen=True)
class CheckVerdict:
    """One image's verdict and the evidence that decided it (``seal``, ``fingerprint``,
    ``registry`` or ``blind``).

    ``score`` is continuous, higher is more suspicious: the fingerprint's largest normalised
    residual (its threshold is ``fingerprint.threshold`` in the row), or the blind detector's
    probability; None for the seal. ``mask`` is bool, frames x H x W, in the pixels of the image
    under test (None when nothing can say where).
    """

    tampered: bool
    evidence: str
    reasons: tuple[str, ...]
    seal: SealEvidence | None
    blind: TamperVerdict | None = None  # the detector's verdict, when it ran
    timings_ms: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    regions: tuple[Region, ...] = ()
    fingerprint: dict | None = None  # what the fingerprint comparison found (JSON-ready)

    @property
    def mask_frame(self) -> int:
        """The frame with the most flagged pixels (0 when none)."""
        if self.mask is None or not self.mask.any():
            return 0
        return int(np.argmax(self.mask.reshape(self.mask.shape[0], -1).sum(axis=1)))

    def to_dict(self) -> dict:
        row = {"tampered": self.tampered, "evidence": self.evidence}
        if self.blind is not None:
            row.update(self.blind.to_dict())
        else:
            row.update({"score": None, "operating_point": None, "watermark": None, "payload_kind": None,
                        "watermark_deficit": None, "regions": []})
        if self.evidence in ("fingerprint", "registry"):
            row["score"] = None if self.score is None else round(self.score, 4)
            row["regions"] = [r.to_dict() for r in self.regions]
        row["tampered"] = self.tampered
        row["reasons"] = list(self.reasons)
        row["seal"] = None if self.seal is None else self.seal.to_dict()
        row["fingerprint"] = self.fingerprint
        return row


def seal_evidence(image: MedicalImage, verifiers) -> SealEvidence | None:
    """The seal's verdict on a DICOM image, or None when it cannot be asked (not DICOM, no keys)."""
    if image.dataset is None or verifiers is None:
        return None
    verdict = verify_dataset(image.dataset, verifiers)
    return SealEvidence(verdict.status, tuple(verdict.changed), verdict.key_id or None)


def _seal_reason(seal: SealEvidence) -> str:
    if seal.status == "invalid":
        changed = ", ".join(seal.changed) or "its record"
        return f"seal broken ({changed} changed since sealing): it cannot tell benign processing from an edit"
    return "sealed by a key this key set does not hold"


# --------------------------------------------------------------------------------------------
# the displays to compare


def _own_window_differs(image: MedicalImage, frame: np.ndarray, recorded: FrameWindow) -> bool:
    """True when the file under test states a window of its own that is not the recorded one
    (a windowed 8-bit export kept in DICOM): its pixels are then shown with that window."""
    if image.meta.window is None:
        return False
    own = display_window(image.meta, frame)
    width = max(abs(recorded.upper - recorded.lower), 1e-6)
    return (abs(own.lower - recorded.lower) > 0.01 * width or abs(own.upper - recorded.upper) > 0.01 * width)


def displays_under_test(image: MedicalImage, fp: Fingerprint) -> list[np.ndarray]:
    """The frames under test as display levels: with the recorded windows where the pixels are
    in the recorded units (same kind of file), else as the file itself displays them."""
    frames = image.frames()
    same_units = (image.dataset is not None and image.meta.is_colour == fp.colour
                  and len(frames) == fp.n_frames
                  and not any(_own_window_differs(image, f, w) for f, w in zip(frames, fp.windows)))
    if same_units:
        windows = fp.windows
    elif image.dataset is None and frames[0].dtype == np.uint8:
        # an 8-bit export is a display already: shown as it is, not stretched to its percentiles
        windows = [_IDENTITY_8BIT] * len(frames)
    else:
        windows = None
    displays, _ = display_frames(image, windows)
    return displays


def _one_frame_of(fp: Fingerprint, display: np.ndarray) -> Fingerprint | None:
    """The recorded frame a single exported frame matches best (a frame saved out of a
    multi-frame image), as a one-frame fingerprint; None if none aligns."""
    best, best_match = None, -2.0
    for k in range(fp.n_frames):
        alignment = align(fp.values[k], fp.cell, fp.shape_hw, display)
        if alignment is None:
            continue
        match = alignment.match
        if alignment.exact:  # the identity is not searched: measure how well this frame fits
            means, _ = cell_means_at(display, fp.cell, fp.shape_hw, alignment)
            match = -float(np.mean(np.abs(means - fp.values[k])))
        if match > best_match:
            best, best_match = k, match
    if best is None:
        return None
    return Fingerprint(fp.shape_hw, fp.cell, (fp.windows[best],), fp.codes[best:best + 1], fp.colour, fp.version)


# --------------------------------------------------------------------------------------------
# evidence steps


@dataclass(frozen=True)
class _Compared:
    fp: Fingerprint
    result: FingerprintScore
    displays: list[np.ndarray]
    key_id: str = ""


def _compare(fp: Fingerprint, image: MedicalImage, params: ScoringParams, key_id: str) -> _Compared | str:
    displays = displays_under_test(image, fp)
    if len(displays) == 1 and 1 < fp.n_frames <= MAX_FRAMES_SEARCHED:
        fp = _one_frame_of(fp, displays[0]) or fp
    if len(displays) != fp.n_frames:
        return (f"the image has {len(displays)} frame(s), the fingerprint {fp.n_frames}: only the same "
                f"frames, or one frame out of at most {MAX_FRAMES_SEARCHED}, are compared")
    result = score_displays(fp, displays, params=params)
    if not np.isfinite(result.score):
        return result.reason or "not comparable with the recorded fingerprint"
    return _Compared(fp, result, displays, key_id)


def _verdict_from(compared: _Compared, evidence: str, seal: SealEvidence | None, reasons: list[str],
                  params: ScoringParams, timings: dict[str, float]) -> CheckVerdict:
    result, fp = compared.result, compared.fp
    masks, regions = None, []
    if result.tampered:
        masks = np.stack([pixel_mask(result, i, fp.cell, d.shape[:2], params, result.alignments[i])
                          for i, d in enumerate(compared.displays)])
        for r in result.regions[:MAX_REGIONS]:
            a = result.alignments[r.frame]
            x0 = int(max(0, (r.x0 - a.offset_x) * a.scale))
            y0 = int(max(0, (r.y0 - a.offset_y) * a.scale))
            x1 = int(min(compared.displays[r.frame].shape[1], (r.x1 - a.offset_x) * a.scale))
            y1 = int(min(compared.displays[r.frame].shape[0], (r.y1 - a.offset_y) * a.scale))
            if x1 > x0 and y1 > y0:
                regions.append(Region(x0, y0, x1 - x0, y1 - y0, r.frame, evidence))
        reasons.append(f"{len(result.regions)} region(s) changed beyond benign processing "
                       f"(score {result.score:.1f} > {params.threshold:g})")
    else:
        reasons.append(f"matches the recorded fingerprint up to benign processing "
                       f"(score {result.score:.1f} <= {params.threshold:g})")
    detail = {"key_id": compared.key_id or None, "score": round(result.score, 3), "threshold": params.threshold,
              "alignment": result.alignment.to_dict(), "covered": round(result.covered_share, 4),
              "noise_levels": round(result.noise_scale, 3)}
    return CheckVerdict(result.tampered, evidence, tuple(reasons), seal, None, timings, float(result.score),
                        masks, tuple(regions), detail)


def _verified(blob: bytes, verifiers) -> tuple[Fingerprint | None, str]:
    """(the fingerprint if a key of ``verifiers`` signed it, else None; the key id it names)."""
    key_id = signed_key_id(blob)
    return verify_fingerprint(blob, _as_verifiers(verifiers)), key_id


def _header_fingerprint(image: MedicalImage, verifiers, reasons: list[str]) -> tuple[Fingerprint | None, str]:
    if image.dataset is None or verifiers is None:
        return None, ""
    blob = read_fingerprint(image.dataset)
    if blob is None:
        return None, ""
    try:
        fp, key_id = _verified(blob, verifiers)
    except InputError as exc:
        reasons.append(f"fingerprint in the file is unreadable ({exc})")
        return None, ""
    if fp is None:
        reasons.append(f"fingerprint in the file is signed by key {key_id}, which this key set does not "
                       "hold, or does not verify: not used")
    return fp, key_id


def _registry_candidates(image: MedicalImage, checker: TamperChecker, registry, reasons: list[str]):
    """Entries for this image: by SOP Instance UID, else by the watermark payload in the pixels."""
    entries = []
    if image.dataset is not None:
        sop = str(image.dataset.get("SOPInstanceUID", "") or "")
        if sop:
            entries = registry.find_by_sop(sop)
    if not entries and checker is not None and checker.watermarker is not None:
        extraction = checker.watermarker.extract(image, search=True)
        if not extraction.found:
            reasons.append("no watermark found: the registry cannot be asked")
            return []
        entries = registry.find_by_payload(extraction.payload)
        if not entries:
            reasons.append("watermark found, but the registry has no entry for its payload")
    return entries[:MAX_REGISTRY_CANDIDATES]


def _from_registry(image, checker, registry, verifiers, params, reasons) -> _Compared | None:
    best = None
    for entry in _registry_candidates(image, checker, registry, reasons):
        try:
            fp, key_id = _verified(entry.fingerprint, verifiers) if verifiers is not None else (None, "")
        except InputError:
            fp, key_id = None, ""
        if fp is None:
            reasons.append("a registry entry's fingerprint is not signed by this key set: not used")
            continue
        compared = _compare(fp, image, params, key_id)
        if isinstance(compared, str):
            reasons.append(f"registry entry not comparable: {compared}")
            continue
        if best is None or compared.result.alignment.match > best.result.alignment.match:
            best = compared
    return best


def check_image(image: MedicalImage, checker: TamperChecker, verifiers=None,
                operating_point: str | None = None, *, registry=None,
                params: ScoringParams = DEFAULT_PARAMS) -> CheckVerdict:
    """The verdict for ``image`` from the strongest evidence available (module docstring).

    ``verifiers``: a KeyRing (or seal verifiers) for the seal and the fingerprint signatures;
    ``registry``: an open ``registry.Registry`` to look images up in, or None.
    """
    t0 = time.perf_counter()
    seal = seal_evidence(image, verifiers)
    timings = {"seal_ms": (time.perf_counter() - t0) * 1e3}
    if seal is not None and seal.status == "valid":
        reason = f"seal valid (key {seal.key_id}): pixels and identity unchanged since sealing"
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        return CheckVerdict(False, "seal", (reason,), seal, timings_ms=timings)
    reasons: list[str] = []
    if seal is not None and seal.status != "unsigned":
        reasons.append(_seal_reason(seal))

    t1 = time.perf_counter()
    fp, key_id = _header_fingerprint(image, verifiers, reasons)
    if fp is not None:
        compared = _compare(fp, image, params, key_id)
        if isinstance(compared, _Compared):
            timings["fingerprint_ms"] = (time.perf_counter() - t1) * 1e3
            timings["total_ms"] = (time.perf_counter() - t0) * 1e3
            return _verdict_from(compared, "fingerprint", seal, reasons, params, timings)
        reasons.append(f"fingerprint in the file not comparable: {compared}")

    if registry is not None:
        t2 = time.perf_counter()
        exported = replace(params, threshold=params.registry_threshold)  # calibrated for exports
        compared = _from_registry(image, checker, registry, verifiers, exported, reasons)
        timings["registry_ms"] = (time.perf_counter() - t2) * 1e3
        if compared is not None:
            timings["total_ms"] = (time.perf_counter() - t0) * 1e3
            return _verdict_from(compared, "registry", seal, reasons, exported, timings)

    blind = checker.check(image, operating_point)
    reasons = list(blind.reasons) + reasons
    reasons.append("no recorded evidence for this image: the blind detector decided (a prior, not proof)")
    timings = {**blind.timings_ms, **timings, "total_ms": (time.perf_counter() - t0) * 1e3}
    mask = None
    if blind.tampered:
        mask = np.zeros((image.n_frames, *image.shape_hw), dtype=bool)
        mask[blind.mask_frame] = blind.mask
    return CheckVerdict(blind.tampered, "blind", tuple(reasons), seal, blind, timings, float(blind.score), mask,
                        tuple(blind.regions))
