"""The node's audit trail: one JSON line per event, appended, synced to disk, free of patient data.

Layer: runtime, standard library only. This log answers HIPAA 164.312(b) (audit controls): it
records who (calling and called AE titles, peer address), what (SOP class, hashed identifiers),
when (UTC time to the millisecond) and what was done (received, sealed, forwarded, quarantined,
refused, with status and reason) for every image and association the node handles, and nothing
that identifies a patient. Two guards keep it so:

- ``AuditLog.write`` accepts only the keys in ``ALLOWED_FIELDS``; any other key (``PatientName``,
  a free-form ``note``) is a ``ValueError``, a programming error a test is meant to catch.
- DICOM identifiers (SOP Instance, Study, Series UIDs) are logged only as ``uid_hash`` values,
  the first 16 hex digits of their SHA-256, enough to match a record to an image one holds,
  not to read an identifier from the log.

Each record is flushed and ``fsync``-ed before ``write`` returns, so a record the node has acted
on survives a crash or power cut. The file is created ``0600`` (its folders ``0700``) and only
ever opened for appending.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Self

from medsec_edge.runtime.errors import InputError

_log = logging.getLogger(__name__)

ALLOWED_FIELDS: frozenset[str] = frozenset(
    {
        "calling_ae", "called_ae", "peer", "association", "sop_class", "image_id",
        "source_uid_sha256", "uid_sha256", "derived_uid_sha256", "status", "status_code",
        "reason", "action", "stage", "latency_ms", "bytes", "attempt", "destination", "policy",
        "flags", "worker", "spool_id", "transfer_syntax", "count", "pid", "version", "config",
        "tls",
    }
)


def uid_hash(uid: str) -> str:
    """First 16 hex digits of the SHA-256 of a DICOM UID (trailing NUL and space padding dropped).

    The only form in which identifiers reach the audit log. A UID is ASCII by definition; one
    that is not raises ``UnicodeEncodeError`` (a ``ValueError``).
    """
    return hashlib.sha256(str(uid).rstrip("\x00 ").encode("ascii")).hexdigest()[:16]


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _make_private_dirs(folder: Path) -> None:
    """Create ``folder`` and its missing parents as 0700; existing folders are left as they are."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # the umask may have taken bits mkdir was asked for


class AuditLog:
    """An append-only JSON-lines audit file; ``write`` is thread-safe and durable on return."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _make_private_dirs(self.path.parent)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            mode = os.fstat(fd).st_mode & 0o777
            if mode != 0o600:
                if mode & 0o077:
                    _log.warning("audit log %s was mode %o; set to 600", self.path, mode)
                os.fchmod(fd, 0o600)
            # Held open for the node's life and closed by close(), not a with-block.
            self._file = open(fd, "a", buffering=1, encoding="utf-8", closefd=True)  # noqa: SIM115
        except BaseException:
            os.close(fd)
            raise
        self._lock = threading.Lock()

    def write(self, event: str, **fields) -> None:
        """Append ``{"time", "event", **fields}`` as one line, flushed and fsync-ed."""
        unknown = set(fields) - ALLOWED_FIELDS
        if unknown:
            raise ValueError(
                f"audit field(s) {sorted(unknown)} not allowed: the audit log takes only "
                "ALLOWED_FIELDS, so no patient data can reach it; hash identifiers with uid_hash "
                "into *_sha256 fields, or add a non-identifying key to ALLOWED_FIELDS"
            )
        if not event or not isinstance(event, str):
            raise ValueError(f"audit event must be a non-empty string, got {event!r}")
        # ensure_ascii escapes every newline and control character: one record, one line.
        line = json.dumps({"time": _utc_now(), "event": event, **fields}, ensure_ascii=True)
        with self._lock:
            if self._file.closed:
                raise ValueError(f"audit log {self.path} is closed")
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        """Close the file; further writes raise ``ValueError``."""
        with self._lock:
            if not self._file.closed:
                self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_audit(path: Path) -> list[dict]:
    """The records of an audit file, oldest first.

    A last line without its newline that does not parse is a write cut short by a crash and is
    skipped; a bad line anywhere else raises ``InputError``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read audit log {path}: {exc.strerror or exc}") from exc
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            if number == len(lines):  # no newline after it: torn by a crash mid-write
                _log.warning("audit log %s ends in an incomplete record; skipped", path)
                continue
            raise InputError(f"audit log {path} line {number} is not JSON: {exc}") from exc
    return records
