"""The seal stage: a DICOM dataset leaves the job sealed and signed, in one encoding.

Layer: runtime (crypto; pydicom, cryptography). The job builds its output dataset in memory;
this module seals it (``seal.py``: Ed25519 over the decoded pixels and identity), then signs it
(``dicom_signature.py``: PS3.15 Creator RSA over every signable element, the seal included, so
signing comes last) and encodes it once. The caller writes those bytes atomically, so a file only
ever appears under its final name already sealed and signed.

The seal must vouch for exactly what a reader will decode from the written bytes, not for the
dataset in memory: ``sealed_bytes`` parses the encoded bytes (in memory, no file) and refuses
them if their sealed parts differ from what was sealed (a value pydicom cannot encode as it
holds it, for example under an unsupported character set). ``seal_file`` does the same for a
file on disk (the ``seal`` command's job: seal a copy of a file).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.uid import ExplicitVRLittleEndian

from medsec_edge.runtime.crypto.dicom_signature import remove_signatures, sign_dataset
from medsec_edge.runtime.crypto.keyset import KeyRing
from medsec_edge.runtime.crypto.verification import read_dicom, short_id
from medsec_edge.runtime.crypto.seal import canonical_digest, part_digests, read_seal, seal_dataset
from medsec_edge.runtime.errors import InputError, KeyFileError, UsageError
from medsec_edge.runtime.io.atomic import write_bytes_atomic

__all__ = ["SealResult", "seal_and_sign", "seal_file", "sealed_bytes"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SealResult:
    """What sealing one dataset produced: key ids and the signature's UID (no patient data)."""

    seal_key_id: str
    dicom_key_id: str
    signature_uid: str
    replaced_signatures: int = 0  # earlier PS3.15 signatures removed (the seal changed what they signed)
    image_id: str = ""  # short hash of the SOP Instance UID


def _signers(ring: KeyRing):
    signer, dicom_signer = ring.signer, ring.dicom_signer
    if signer is None or dicom_signer is None:
        raise KeyFileError("the key ring cannot sign: its newest key set has no private keys")
    return signer, dicom_signer


def _decode_all(ds: Dataset) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]  # __getitem__ turns a raw element into a decoded one
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_all(item)


def _as_written(ds: Dataset) -> None:
    """Make ``ds`` hold its elements as an Explicit VR Little Endian file will.

    A dataset read from an Implicit VR or big endian file keeps raw elements in that encoding;
    the signature is computed over Explicit VR Little Endian, so they are decoded first (and
    ambiguous VRs resolved), after which the dataset is what its new transfer syntax says.
    """
    if ds.original_encoding == (False, True):
        return
    _decode_all(ds)
    correct_ambiguous_vr(ds, True)
    ds.set_original_encoding(False, True, ds.original_character_set)


def seal_and_sign(ds: Dataset, ring: KeyRing) -> SealResult:
    """Seal then sign ``ds`` in place; earlier PS3.15 signatures are removed (the seal changes
    the data they signed). ``ds`` must declare Explicit VR Little Endian (our outputs do) or a
    compressed syntax, whose encapsulated pixels are signed as they are.

    Raises ``KeyFileError`` if the ring cannot sign, and ``InputError`` if the Creator RSA profile
    cannot sign ``ds`` (no SOP Class, SOP Instance, Study or Series Instance UID) or its pixels
    cannot be decoded.
    """
    signer, dicom_signer = _signers(ring)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None or not syntax.is_little_endian or syntax.is_implicit_VR:
        raise UsageError("only an Explicit VR Little Endian dataset (or a compressed one) is sealed: "
                         "set its transfer syntax first")
    _as_written(ds)
    replaced = remove_signatures(ds)
    seal_dataset(ds, signer)
    signature_uid = sign_dataset(ds, dicom_signer)  # last: it signs the seal too
    image_id = short_id(str(ds.get("SOPInstanceUID", "") or ""))
    return SealResult(signer.key_id, dicom_signer.key_id, signature_uid, replaced, image_id)


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _check_decodes_as_sealed(data: bytes) -> None:
    """Refuse ``data`` unless a reader decodes from it the parts the seal vouches for."""
    try:
        written = pydicom.dcmread(io.BytesIO(data))
        record = read_seal(written) or {}
        parts = part_digests(written)
    except (InvalidDicomError, ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"the sealed dataset does not read back ({type(exc).__name__}): not written") from None
    sealed = record.get("parts", {})
    changed = [name for name, digest in parts.items() if sealed.get(name) != digest.hex()]
    if changed or record.get("digest") != canonical_digest(parts).hex():
        raise InputError(
            f"the encoded file would read back differently from what was sealed ({', '.join(changed) or 'digest'}):"
            " not written"
        )


def sealed_bytes(ds: Dataset, ring: KeyRing) -> tuple[bytes, SealResult]:
    """Seal and sign ``ds`` (in place) and encode it: the bytes to write, once, atomically."""
    result = seal_and_sign(ds, ring)
    data = _encode(ds)
    _check_decodes_as_sealed(data)
    logger.debug("sealed a dataset (seal key %s, DICOM key %s)", result.seal_key_id, result.dicom_key_id)
    return data, result


def seal_file(path: str | Path, ring: KeyRing, out: str | Path | None = None) -> SealResult:
    """Seal and sign the DICOM file at ``path``, written atomically to ``out`` (default: in place).

    An Implicit VR file is written as Explicit VR Little Endian (the signature's encoding); a big
    endian one is refused. Raises ``InputError`` if ``path`` is not a readable DICOM file (read as
    the image readers read: a regular file within the size limits, a known transfer syntax).
    """
    path = Path(path)
    _signers(ring)  # before reading: a public-only ring fails first
    ds = read_dicom(path)  # as verify reads: also refuses an unknown transfer syntax
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is None:
        raise InputError(f"{path.name}: no transfer syntax in the file meta information")
    if not syntax.is_little_endian:
        raise InputError(
            f"{path.name}: Explicit VR Big Endian (retired) cannot be signed as it is; "
            "convert it first (dcmconv +te IN OUT)"
        )
    if syntax.is_implicit_VR:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    data, result = sealed_bytes(ds, ring)
    write_bytes_atomic(Path(out) if out is not None else path, data, path if out is not None else None)
    return result
