"""The seal stage of ``run``: every DICOM file the job writes leaves sealed and signed.

Layer: runtime (pydicom, cryptography). The stage works on the file as written, not on the
dataset in memory: it re-reads the output, seals it (``seal.py``: Ed25519 over the decoded pixels
and identity) and then signs it (``dicom_signature.py``: PS3.15 Creator RSA over every signable
element, the seal included, so signing comes last), and replaces the file atomically. Sealing what
was read back means the seal vouches for exactly the bytes a reader will get.

The key ring is ``$MEDSEC_EDGE_KEYS`` or ``~/.config/medsec-edge/keys`` unless given; like the
watermark key (``keys.py``), it is created on first use (``crypto_keys.new_key_dir``).
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medsec_edge.runtime.crypto.keyset import KeyRing, new_key_dir
from medsec_edge.runtime.crypto.dicom_signature import remove_signatures, sign_dataset
from medsec_edge.runtime.errors import InputError, KeyFileError
from medsec_edge.runtime.io.atomic import write_bytes_atomic
from medsec_edge.runtime.crypto.seal import seal_dataset

__all__ = ["KEYS_ENV", "SealResult", "default_keys_path", "load_or_create_ring", "seal_file"]

logger = logging.getLogger(__name__)

KEYS_ENV = "MEDSEC_EDGE_KEYS"


def default_keys_path() -> Path:
    """``$MEDSEC_EDGE_KEYS`` if set and non-empty, else ``~/.config/medsec-edge/keys``."""
    env = os.environ.get(KEYS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "medsec-edge" / "keys"


def load_or_create_ring(path: Path | None = None) -> KeyRing:
    """The key ring at ``path`` (default: ``default_keys_path``), created if nothing is there.

    Refused (``KeyFileError``) when its newest key set cannot sign: a public export seals nothing.
    """
    path = Path(path).expanduser() if path is not None else default_keys_path()
    if not os.path.lexists(path):
        new_key_dir(path)  # logs the new key ids (never key material)
    ring = KeyRing.load(path)
    if ring.signer is None or ring.dicom_signer is None:
        raise KeyFileError(
            f"the newest key set in {path} has no private seal or DICOM signature key: pass the "
            "key set made by 'medsec-edge keys new' (not a public export) with --keys"
        )
    return ring


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
