"""The SOP Instance UID of a derived image, from its source's UID and a key: the same every time.

Layer: runtime (io, standard library). The node may process one received object twice (the
modality resends after a crash, or a restart redoes work that was not yet acknowledged); the PACS
must see one instance, so the new UID cannot be random. It is ``2.25.`` and the first 128 bits of
HMAC-SHA256 under the device's watermark key over the source UID (PS3.5 B.2: a UUID-sized integer
below the 2.25 root), so nobody without the key can link the output to its source by the UID,
and nobody can predict or collide with it.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["derived_instance_uid"]

_DOMAIN = b"medsec-edge derived SOP Instance UID v1\x00"


def derived_instance_uid(source_uid: str, secret: bytes) -> str:
    """``2.25.<decimal of 128 bits of HMAC-SHA256(secret, domain + source UID)>`` (at most 44 characters)."""
    uid = source_uid.strip().rstrip("\x00").strip()
    if not uid:
        raise ValueError("a derived UID needs the source's SOP Instance UID")
    if len(secret) < 16:
        raise ValueError("a derived UID needs a key of at least 16 bytes")
    mac = hmac.new(secret, _DOMAIN + uid.encode("ascii", "strict"), hashlib.sha256).digest()
    return "2.25." + str(int.from_bytes(mac[:16], "big"))
