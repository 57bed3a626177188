"""The seal stage of ``run``: every DICOM file the job writes leaves sealed and signed.

Layer: runtime (pydicom, cryptography). The stage works on the file as written, not on the
dataset in memory: it re-reads the output, seals it (``seal.py``: Ed25519 over the decoded pixels
and identity) and then signs it (``dicom_signature.py``: PS3.15 Creator RSA over every signable
element, the seal included, so signing comes last), and replaces the file atomically. Sealing what
was read back means the seal vouches for exactly the bytes a reader will get.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medsec_edge.runtime.crypto.keyset import KeyRing
from medsec_edge.runtime.crypto.dicom_signature import remove_signatures, sign_dataset
from medsec_edge.runtime.errors import InputError, KeyFileError
from medsec_edge.runtime.io.atomic import write_bytes_atomic
from medsec_edge.runtime.crypto.seal import seal_dataset

__all__ = ["SealResult", "seal_file"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SealResult:
    """What sealing one file produced: key ids and the signature's UID (no patient data)."""

    seal_key_id: str
    dicom_key_id: str
    signature_uid: str


def seal_file(path: str | Path, ring: KeyRing) -> SealResult:
    """Seal then sign the DICOM file at ``path`` in place, atomically (a derived output of ours).

    Earlier PS3.15 signatures are removed: the seal changes the data they signed. Raises
    ``InputError`` if ``path`` is not a readable DICOM file and ``UsageError`` if the Creator RSA
    profile cannot sign it (no SOP Class, SOP Instance, Study or Series Instance UID).
    """
    path = Path(path)
    signer, dicom_signer = ring.signer, ring.dicom_signer
    if signer is None or dicom_signer is None:
        raise KeyFileError("the key ring cannot sign: its newest key set has no private keys")
    try:
        ds = pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise InputError(f"{path.name}: cannot re-read the written file to seal it ({type(exc).__name__})") from None
    remove_signatures(ds)
    seal_dataset(ds, signer)
    signature_uid = sign_dataset(ds, dicom_signer)  # last: it signs the seal too
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    write_bytes_atomic(path, buf.getvalue(), None)
    logger.debug("sealed a written file (seal key %s, DICOM key %s)", signer.key_id, dicom_signer.key_id)
    return SealResult(signer.key_id, dicom_signer.key_id, signature_uid)
