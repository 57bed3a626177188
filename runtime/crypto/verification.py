"""Verifying a file: our seal and the PS3.15 signatures, combined into one verdict row.

Layer: runtime (crypto). ``verify`` prints these rows; the tamper check and the node use the same
function, so "valid" means one thing everywhere. Rows name images by a hash, never by UIDs.

A file that went through a PACS may have had its pixels re-encoded losslessly (JPEG-LS, RLE):
the PS3.15 signature covers the encoded bytes, so its MAC no longer matches, but it still
verifies over the decoded pixels (``dicom_signature``: status ``re-encoded``) and the seal, which
digests decoded pixels, proves the values unchanged. Such a file is valid, and the row says why.

Whatever a file holds, ``verify_file`` answers with one row: an unreadable or undecodable file is
exit 4 with a one-line reason, never a traceback, so a batch goes on.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

__all__ = ["read_dicom", "short_id", "verify_file"]

logger = logging.getLogger(__name__)


def short_id(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:12] if uid else "(no SOP Instance UID)"


def read_dicom(path: Path):
    """The dataset of ``path``, or ``InputError`` (exit 4) if it is not a readable DICOM file."""
    from medsec_edge.runtime.io.readers import read_dataset

    # Only a regular file within the limits, its claimed pixel size checked before any decode.
    ds = read_dataset(path, check_pixels=True)
    _check_readable(ds, path)
    return ds


def _check_readable(ds, path: Path) -> None:
    """Refuse what cannot be verified at all: no SOP identity, an unknown Transfer Syntax."""
    from pydicom.uid import UID

    from medsec_edge.runtime.errors import InputError

    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and not UID(str(syntax)).is_transfer_syntax:
        raise InputError(
            f"{path.name}: unknown Transfer Syntax UID: not a DICOM encoding this reads"
        )
    if not ds.get("SOPClassUID") and not ds.get("PixelData"):
        raise InputError(f"{path.name}: not a DICOM image (no SOP Class UID, no Pixel Data)")
    if "PixelData" in ds and not ds.PixelData and ds.get("Rows") and ds.get("Columns"):
        raise InputError(
            f"{path.name}: Pixel Data is empty but the header declares "
            f"{int(ds.Rows)}x{int(ds.Columns)} pixels: nothing to verify"
        )


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error_row(path: Path, reason: str, error: str) -> dict:
    return {
        "path": str(path),
        "valid": False,
        "reason": _one_line(reason),
        "seal": None,
        "dicom_signature": None,
        "error": error,
    }


def verify_file(path: Path, ring) -> tuple[dict, int]:
    """One ``verify`` JSON object and its exit code (0 valid, 1 not valid, 4 unreadable)."""
    from medsec_edge.runtime.errors import InputError, MedsecError

    path = Path(path)
    try:
        return _verify(path, ring)
    except MedsecError as exc:
        return _error_row(path, str(exc), type(exc).__name__), exc.exit_code
    except Exception as exc:  # noqa: BLE001 - a hostile file must not end the batch
        logger.debug("verify: unexpected %s on a file", type(exc).__name__)
        error = InputError(f"{path.name}: cannot verify this file ({type(exc).__name__})")
        return _error_row(path, str(error), "InputError"), error.exit_code


def _verify(path: Path, ring) -> tuple[dict, int]:
    from medsec_edge.runtime.crypto.dicom_signature import verify_signatures
    from medsec_edge.runtime.crypto.seal import verify_dataset

    ds = read_dicom(path)
    verdict = verify_dataset(ds, ring)
    report = verify_signatures(ds, trusted=ring.certificates, profile="creator")
    # A re-encoded signature vouches for every signed element and the decoded pixels; the seal
    # confirms the pixel values and covers our private block, so together they are "valid".
    re_encoded = report.status == "re-encoded" and verdict.valid
    valid = verdict.valid and (report.valid or re_encoded)
    if re_encoded:
        reason = (
            f"seal valid (key {verdict.key_id}); DICOM signature re-encoded: {report.reason}; "
            "the seal proves the pixel values unchanged"
        )
    elif valid:
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
        "reason": _one_line(reason),
        "image_id": short_id(str(ds.get("SOPInstanceUID", "") or "")),
        "seal": {
            "status": verdict.status,
            "changed": list(verdict.changed),
            "key_id": verdict.key_id or None,
        },
        "dicom_signature": {
            "status": report.status,
            "signatures": len(report.signatures),
            "reason": _one_line(report.reason),
        },
    }
    return row, 0 if valid else 1
