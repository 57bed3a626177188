"""The device's own key set: where it lives, its creation on first use, and the one-time import
of the watermark key from where earlier versions kept it.

Layer: runtime (crypto). ``$MEDSEC_EDGE_KEYS`` or ``~/.config/medsec-edge/keys`` unless a command
is given ``--keys DIR``; created as by ``medsec-edge keys new`` when nothing is there.

Migration: a set (or the newest set of a ring) with private keys but no ``watermark.key`` gets
the key file earlier versions used (``$MEDSEC_EDGE_KEY`` or ``~/.config/medsec-edge/watermark.key``)
imported as it is, same secret and so same key id, so every mark already made keeps matching its
image; without such a file a new key is made. A public export is never given a secret.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from medsec_edge.runtime.crypto.keyset import WATERMARK_KEY, KeyRing, add_watermark_key, new_key_dir
from medsec_edge.runtime.crypto.watermark_key import KEY_BYTES, WatermarkKey, default_key_path, load_key
from medsec_edge.runtime.errors import KeyFileError

__all__ = ["KEYS_ENV", "default_keys_path", "load_device_ring", "load_or_create_ring"]

logger = logging.getLogger(__name__)

KEYS_ENV = "MEDSEC_EDGE_KEYS"


def default_keys_path() -> Path:
    """``$MEDSEC_EDGE_KEYS`` if set and non-empty, else ``~/.config/medsec-edge/keys``."""
    env = os.environ.get(KEYS_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "medsec-edge" / "keys"


def load_device_ring(path: Path | None = None, *, create: bool) -> KeyRing | None:
    """The key ring at ``path`` (default: ``default_keys_path``) with its watermark key in place.

    ``create``: make the set when nothing is there (``run``, ``embed``); otherwise a missing
    default set is None (``extract`` and ``check`` then cannot tell identities), and a missing
    ``--keys DIR`` is refused.
    """
    given = path is not None
    path = Path(path).expanduser() if given else default_keys_path()
    if not os.path.lexists(path):
        if not create:
            if given:
                raise KeyFileError(f"no key set at {path}: create one with 'medsec-edge keys new'")
            return None
        new_key_dir(path, watermark=_new_set_watermark(path))  # logs the new key ids, never keys
    ring = KeyRing.load(path)
    if ring.watermark is None and ring.newest.has_private:
        _migrate(ring)
        ring = KeyRing.load(path)
    return ring


def load_or_create_ring(path: Path | None = None) -> KeyRing:
    """The device ring that seals ``run``'s outputs, created if nothing is there.

    Refused (``KeyFileError``) when its newest key set cannot sign: a public export seals nothing.
    """
    ring = load_device_ring(path, create=True)
    if ring.signer is None or ring.dicom_signer is None:
        shown = path if path is not None else default_keys_path()
        raise KeyFileError(
            f"the newest key set in {shown} has no private seal or DICOM signature key: pass the "
            "key set made by 'medsec-edge keys new' (not a public export) with --keys"
        )
    return ring


def _legacy_key() -> WatermarkKey | None:
    """The watermark key file of earlier versions, if there is one (refused if loose)."""
    legacy = default_key_path()
    return load_key(legacy) if os.path.lexists(legacy) else None


def _new_set_watermark(path: Path) -> WatermarkKey | bool:
    key = _legacy_key()
    if key is None:
        return True
    logger.warning("imported the watermark key %s into the new key set %s", key.key_id, path)
    return key


def _migrate(ring: KeyRing) -> None:
    target = ring.newest.path
    key = _legacy_key()
    imported = key is not None
    if key is None:
        key = WatermarkKey.from_secret(secrets.token_bytes(KEY_BYTES))
    try:
        add_watermark_key(target, key)
    except KeyFileError:
        # another process migrated at the same moment: use the key it stored
        if not (target / WATERMARK_KEY).exists():
            raise
        return
    # the key id only: the secret never reaches a log
    if imported:
        logger.warning("imported the watermark key %s into the key set %s", key.key_id, target)
    else:
        logger.info("created watermark key %s in the key set %s", key.key_id, target)
