"""Which key set a command uses: ``--keys DIR``, else the device set, and the old spellings.

Layer: runtime (cli). Commands call these before any work, so a refused key set (exit 2) never
leaves a half-done batch behind.
"""

from __future__ import annotations

from pathlib import Path

from medsec_edge.runtime.cli.output import note
from medsec_edge.runtime.errors import UsageError


def key_set_path(keys: Path | None, legacy: Path | None) -> Path | None:
    """``--keys DIR``, or the deprecated ``--key DIR`` of decrypt and restore."""
    if legacy is None:
        return keys
    if keys is not None:
        raise UsageError("give the key set once, with --keys DIR (--key is its old spelling)")
    note("--key DIR is deprecated: use --keys DIR (same key set)")
    return legacy


def load_ring(keys: Path | None, *, private: bool = True):
    """The ring at ``keys``, or the device set (which must exist: nothing is created here)."""
    from medsec_edge.runtime.crypto.device_keys import default_keys_path
    from medsec_edge.runtime.crypto.keyset import KeyRing

    return KeyRing.load(keys if keys is not None else default_keys_path(), private=private)


def legacy_watermark_key(path: Path, *, create: bool):
    """The watermark key *file* of ``--key FILE`` (earlier versions), used as it was then."""
    from medsec_edge.runtime.crypto.watermark_key import load_or_create_key

    note("--key FILE is deprecated: the watermark key now lives in the key set; use --keys DIR "
         "(a device set imports the file it finds at $MEDSEC_EDGE_KEY on first use)")
    if not create and not path.exists():
        return None
    return load_or_create_key(path, create=create)


def watermark_key(keys: Path | None, legacy: Path | None, *, create: bool):
    """The watermark key of the key set (created with the device set by run and embed; for
    extract and check only if it exists: None means identities cannot be told)."""
    from medsec_edge.runtime.crypto.device_keys import load_device_ring

    if legacy is not None:
        return legacy_watermark_key(legacy, create=create)
    ring = load_device_ring(keys, create=create)
    return ring.watermark if ring is not None else None
