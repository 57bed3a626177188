"""Verifying a file: our seal and the PS3.15 signatures, combined into one verdict row.

Layer: runtime (crypto). ``verify`` prints these rows; the tamper check and the node use the same
function, so "valid" means one thing everywhere. Rows name images by a hash, never by UIDs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["read_dicom", "short_id", "verify_file"]


def short_id(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else "(no SOP Instance UID)"


def read_dicom(path: Path):
    """The dataset of ``path``, or ``InputError`` (exit 4) if it is not a readable DICOM file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medsec_edge.runtime.errors import InputError

    try:
        ds = pydicom.dcmread(path)
        for _elem in ds.iterall():  # dcmread is lazy: fail here on corrupt values
            pass
    except (OSError, InvalidDicomError) as exc:
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise InputError(f"{path.name}: not a readable DICOM file ({reason})") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure is a corrupt file
        raise InputError(f"{path.name}: corrupt DICOM file ({type(exc).__name__})") from None
    return ds


def verify_file(path: Path, ring) -> tuple[dict, int]:
    """One ``verify`` JSON object and its exit code (0 valid, 1 not valid, 4 unreadable)."""
    from medsec_edge.runtime.crypto.dicom_signature import verify_signatures
    from medsec_edge.runtime.errors import MedsecError
    from medsec_edge.runtime.crypto.seal import verify_dataset

    try:
        ds = read_dicom(path)
        verdict = verify_dataset(ds, ring)
        report = verify_signatures(ds, trusted=ring.certificates, profile="creator")
    except MedsecError as exc:
        row = {
            "path": str(path),
            "valid": False,
            "reason": str(exc),
            "seal": None,
            "dicom_signature": None,
            "error": type(exc).__name__,
        }
        return row, exc.exit_code
    valid = verdict.valid and report.valid
    if valid:
        reason = f"seal valid (key {verdict.key_id}); {report.reason}"
    else:
        failed = []
        if not verdict.valid:
            failed.append(f"seal {verdict.status}: {verdict.reason}")
        if not report.valid:
            failed.append(f"DICOM signature {report.status}: {report.reason}")
        reason = "; ".join(failed)
    row = {
        "path": str(path),
        "valid": valid,
        "reason": reason,
        "image_id": short_id(str(ds.get("SOPInstanceUID", "") or "")),
        "seal": {
            "status": verdict.status,
            "changed": list(verdict.changed),
            "key_id": verdict.key_id or None,
        },
        "dicom_signature": {
            "status": report.status,
            "signatures": len(report.signatures),
            "reason": report.reason,
        },
    }
    return row, 0 if valid else 1
