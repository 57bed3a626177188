"""Which evidence decides a tamper verdict, strongest first (DESIGN.md, "Evidence and verdicts").

Layer: runtime (tamper). A valid seal proves the pixels and identity unchanged since acquisition:
the image is untouched, decided in milliseconds, and the detector does not run. A broken or
absent seal cannot say whether the change was benign (a lossy re-encode breaks it too), so today
the blind detector decides, labelled as such, and the seal's finding is one of the reasons. The
content fingerprint and the registry (issue 9) go between the two.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from medsec_edge.runtime.crypto.seal import verify_dataset
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.tamper.checker import TamperChecker, TamperVerdict

__all__ = ["CheckVerdict", "SealEvidence", "check_image", "seal_evidence"]


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
    """One image's verdict and the evidence that decided it (``seal`` or ``blind``)."""

    tampered: bool
    evidence: str
    reasons: tuple[str, ...]
    seal: SealEvidence | None
    blind: TamperVerdict | None = None  # the detector's verdict, when it ran
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        row = {"tampered": self.tampered, "evidence": self.evidence}
        if self.blind is not None:
            row.update(self.blind.to_dict())
        else:
            row.update({"score": None, "operating_point": None, "watermark": None, "payload_kind": None,
                        "watermark_deficit": None, "regions": []})
        row["tampered"] = self.tampered
        row["reasons"] = list(self.reasons)
        row["seal"] = None if self.seal is None else self.seal.to_dict()
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


def check_image(image: MedicalImage, checker: TamperChecker, verifiers=None,
                operating_point: str | None = None) -> CheckVerdict:
    """The verdict for ``image``: a valid seal under ``verifiers`` (a KeyRing) decides at once;
    otherwise the blind detector decides."""
    t0 = time.perf_counter()
    seal = seal_evidence(image, verifiers)
    seal_ms = (time.perf_counter() - t0) * 1e3
    if seal is not None and seal.status == "valid":
        reason = f"seal valid (key {seal.key_id}): pixels and identity unchanged since sealing"
        return CheckVerdict(False, "seal", (reason,), seal,
                            timings_ms={"seal_ms": seal_ms, "total_ms": (time.perf_counter() - t0) * 1e3})
    blind = checker.check(image, operating_point)
    reasons = list(blind.reasons)
    if seal is not None and seal.status != "unsigned":
        reasons.append(_seal_reason(seal))
    timings = {**blind.timings_ms, "seal_ms": seal_ms, "total_ms": (time.perf_counter() - t0) * 1e3}
    return CheckVerdict(blind.tampered, "blind", tuple(reasons), seal, blind, timings)
