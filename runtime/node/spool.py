"""The node's spool: every object it acknowledged stays on disk until the PACS has it.

Layer: runtime (node, standard library + io.atomic). An object moves through folders by renames,
each made durable (file fsync, rename, folder fsync) before the step it guards is reported:

    received/ID.dcm   acknowledged to the sender only after this exists on disk
    outgoing/ID.dcm   the watermarked, sealed output; received/ID.dcm is removed after it exists
    (gone)            after the PACS answered success for it
    quarantine/ID.dcm held with ID.dcm.reason.json (refused, tampered, unverified, rejected by the PACS)

A kill at any moment leaves each object in at least one of these places, so ``recover`` on the
next start finds all work that is not done: a received object is processed again (the output
is deterministic, so a redo gives the same object), an outgoing one is sent again (the PACS
keeps one instance per SOP Instance UID). IDs are ``<receive time, ns>-<random>``: they sort in
arrival order and carry the receive time for the receive-to-forward latency, and nothing else.
One node per spool: a lock file refuses a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from pathlib import Path

from medsec_edge.runtime.errors import ConfigError
from medsec_edge.runtime.io.atomic import fsync_dir, remove_stale_temporaries, write_bytes_atomic

__all__ = ["Spool"]

_ID = re.compile(r"(\d{19})-([0-9a-f]{8})")
SUFFIX = ".dcm"
REASON_SUFFIX = ".reason.json"


class Spool:
    """The folders of one node; thread-safe (every step is one rename or unlink)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.received = self.root / "received"
        self.outgoing = self.root / "outgoing"
        self.quarantine = self.root / "quarantine"
        self._lock_fd: int | None = None

    @classmethod
    def open(cls, root: Path) -> Spool:
        """Create the folders (owner-only), take the lock, remove temporaries a killed node left."""
        spool = cls(root)
        try:
            for folder in (spool.root, spool.received, spool.outgoing, spool.quarantine):
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(spool.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"spool {root} cannot be used: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"spool {root} is in use by another running node: give each node its own spool") from None
        spool._lock_fd = fd
        for folder in (spool.received, spool.outgoing, spool.quarantine):
            remove_stale_temporaries(folder)
        return spool

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    # -- names ---------------------------------------------------------------------------------
    @staticmethod
    def new_id() -> str:
        return f"{time.time_ns():019d}-{secrets.token_hex(4)}"

    @staticmethod
    def received_at(spool_id: str) -> float:
        """Wall-clock receive time (s since the epoch) an ID carries."""
        return int(spool_id.split("-", 1)[0]) / 1e9

    def received_path(self, spool_id: str) -> Path:
        return self.received / (spool_id + SUFFIX)

    def outgoing_path(self, spool_id: str) -> Path:
        return self.outgoing / (spool_id + SUFFIX)

    def quarantine_path(self, spool_id: str) -> Path:
        return self.quarantine / (spool_id + SUFFIX)

    # -- steps ---------------------------------------------------------------------------------
    def accept(self, data: bytes, *, ready: bool = False) -> str:
        """Store a received object durably; its ID once it is on disk (OSError: it is not).

        ``ready``: it needs no processing (an object forwarded unchanged) and goes to outgoing/.
        """
        spool_id = self.new_id()
        write_bytes_atomic(self.outgoing_path(spool_id) if ready else self.received_path(spool_id), data)
        return spool_id

    def processed(self, spool_id: str) -> None:
        """The output is in outgoing/ (or the input in quarantine/): forget the received copy."""
        _remove(self.received_path(spool_id))

    def forwarded(self, spool_id: str) -> None:
        _remove(self.outgoing_path(spool_id))

    def hold(self, spool_id: str, source: Path, reason: dict) -> Path:
        """Move ``source`` (the received or the outgoing file of ``spool_id``) to quarantine/ with
        ``reason`` beside it; the reason is on disk before the file moves."""
        target = self.quarantine_path(spool_id)
        write_bytes_atomic(target.with_name(target.name + REASON_SUFFIX),
                           json.dumps({"spool_id": spool_id, **reason}, indent=1, sort_keys=True).encode())
        os.replace(source, target)
        fsync_dir(self.quarantine)
        fsync_dir(source.parent)
        return target

    def recover(self) -> tuple[list[str], list[str]]:
        """What a previous run left to do: (IDs to process, IDs to forward), each in arrival order.

        A received object whose output is already in outgoing/ was processed; only its removal was
        lost, so it is removed now rather than processed twice.
        """
        outgoing = self._ids(self.outgoing)
        received = []
        for spool_id in sorted(self._ids(self.received)):
            if spool_id in outgoing:
                _remove(self.received_path(spool_id))
            else:
                received.append(spool_id)
        return received, sorted(outgoing)

    def count(self, folder: str) -> int:
        """Objects in one folder: ``received``, ``outgoing`` or ``quarantine``."""
        return len(self._ids(getattr(self, folder)))

    def depth(self) -> dict[str, int]:
        return {folder: self.count(folder) for folder in ("received", "outgoing", "quarantine")}

    @staticmethod
    def _ids(folder: Path) -> set[str]:
        ids = set()
        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.endswith(SUFFIX) and _ID.fullmatch(name[: -len(SUFFIX)]):
                    ids.add(name[: -len(SUFFIX)])
        return ids


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fsync_dir(path.parent)
