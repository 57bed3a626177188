"""Which payload an image carries and whether a found one is this image's own: the identity MAC
over its DICOM identity under the device's watermark key.

Layer: runtime (watermark). Shared by the job, ``extract`` and the tamper check, so none of them
reaches into another for it.
"""

from __future__ import annotations

from medsec_edge.runtime.crypto.watermark_key import WatermarkKey
from medsec_edge.runtime.errors import MedsecError
from medsec_edge.runtime.io.dicom_writer import identity_of
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.watermark.payload import identity_payload
from medsec_edge.runtime.watermark.watermarker import Extraction


def payload_for(image: MedicalImage, key: WatermarkKey | None, explicit: bytes | None) -> tuple[bytes, str]:
    """The 8 payload bytes and how they were chosen ('explicit' or 'identity-hmac').

    Embed an 'explicit' payload with ``kind="user"`` (``Watermarker.embed``): only then does a
    reader know it is not this image's identity MAC.
    """
    if explicit is not None:
        return explicit, "explicit"
    if key is None:
        raise MedsecError("no watermark key: pass --keys DIR (a key set with its watermark key) or --payload")
    return identity_payload(identity_of(image), key.secret, key.key_id), "identity-hmac"


def identity_match(image: MedicalImage, extraction: Extraction, key: WatermarkKey | None) -> bool | None:
    """Does the found payload equal this image's identity MAC? None when it cannot be told, and
    for a user-set payload (it names no image, so it cannot name another one)."""
    if not extraction.found or extraction.payload_kind == "user":
        return None
    if key is None or image.meta.source_format != "dicom":
        return None
    expected = identity_payload(identity_of(image), key.secret, key.key_id)
    return extraction.payload == expected.hex()
