"""The device's own key set: where it lives and its creation on first use.

Layer: runtime (crypto). ``$MEDSEC_EDGE_KEYS`` or ``~/.config/medsec-edge/keys`` unless a command
is given ``--keys DIR``; created as by ``medsec-edge keys new`` when nothing is there.
"""

from __future__ import annotations

import os
from pathlib import Path

from medsec_edge.runtime.crypto.keyset import KeyRing, new_key_dir
from medsec_edge.runtime.errors import KeyFileError

__all__ = ["KEYS_ENV", "default_keys_path", "load_or_create_ring"]

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
