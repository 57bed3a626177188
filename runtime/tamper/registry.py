"""The evidence registry: what `run` recorded about each image it protected, found again later.

Layer: runtime (standard library ``sqlite3``; payload constants from ``watermark.payload``).
The watermark is a soft binding: an image that lost its header (a PNG export, a screenshot, a
crop) still carries its payload, and the payload finds the fingerprint and geometry recorded at
acquisition (DESIGN.md, Evidence and verdicts). An image that kept its header is found by its
SOP Instance UID.

Nothing here stores or reports patient data: UIDs are kept only as SHA-256 hex digests
(``uid_sha256``), an image is named by its short ``image_id`` and errors never quote a UID.
The fingerprint is an opaque, signed blob; the registry does not interpret it.

One SQLite file per device, created owner-only (0600; folders it creates 0700), WAL journal so
a lookup never waits for a writer, and a busy timeout so processes take turns writing. The
schema is plain SQL (TEXT, INTEGER, BLOB, CHECK, indexes) so a site can create the same tables
on PostgreSQL, where BLOB is spelt BYTEA and ``?`` placeholders ``%s``.

Recording is idempotent: an entry's id is the SHA-256 of its content, time excluded, so a
device re-sending the same instance adds nothing and the first (acquisition) time stays.
Different evidence for the same image is kept beside the earlier row and logged, never written
over: evidence recorded at birth must not be replaceable by whatever comes later.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from medsec_edge.runtime.errors import ConfigError, PayloadError, UsageError
from medsec_edge.runtime.watermark.payload import DATA_BYTES, PAYLOAD_KINDS

__all__ = [
    "MAX_FINGERPRINT_BYTES",
    "REGISTRY_ENV",
    "SCHEMA_VERSION",
    "Entry",
    "Registry",
    "default_registry_path",
    "uid_sha256",
]

logger = logging.getLogger(__name__)

REGISTRY_ENV = "MEDSEC_EDGE_REGISTRY"
SCHEMA_VERSION = 1
APPLICATION = "medsec-edge evidence registry"
MAX_FINGERPRINT_BYTES = 1 << 20  # issue 9 budgets 64 kB at 4096x4096; 1 MiB leaves room, bounds abuse
MAX_GEOMETRY_JSON_BYTES = 16 << 10
MAX_UID_CHARS = 1024  # DICOM says 64; real files break that, but nothing sane comes near 1024
MAX_DIMENSION = 65535  # Rows and Columns are US in DICOM
MAX_FRAMES = 2**31 - 1  # Number of Frames is an IS; also PostgreSQL's INTEGER
BUSY_TIMEOUT_S = 30.0
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"  # fixed width, UTC: text order is time order (prune)

_EARLIEST = datetime(1970, 1, 1, tzinfo=timezone.utc)

_PAYLOAD_HEX = re.compile(rf"[0-9a-f]{{{2 * DATA_BYTES}}}")
_KEY_ID = re.compile(r"[0-9a-f]{16}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_IMAGE_ID = re.compile(r"[0-9a-f]{8,64}")

# Portable DDL: every statement runs unchanged on SQLite and PostgreSQL (BLOB -> BYTEA there).
# No AUTOINCREMENT or rowid: the key is the content hash, which is also what makes record()
# idempotent across processes without a read-then-write race.
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
        name  TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS entries (
        entry_id         TEXT PRIMARY KEY,
        payload_hex      TEXT NOT NULL,
        payload_kind     TEXT NOT NULL CHECK (payload_kind IN ('identity', 'user')),
        key_id           TEXT,
        sop_sha256       TEXT,
        study_sha256     TEXT,
        image_id         TEXT NOT NULL,
        frame_count      INTEGER NOT NULL CHECK (frame_count >= 1),
        row_count        INTEGER NOT NULL CHECK (row_count >= 1),
        column_count     INTEGER NOT NULL CHECK (column_count >= 1),
        working_geometry TEXT,
        fingerprint      BLOB NOT NULL,
        recorded_at      TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS entries_by_payload ON entries (payload_hex)",
    "CREATE INDEX IF NOT EXISTS entries_by_sop ON entries (sop_sha256)",
    "CREATE INDEX IF NOT EXISTS entries_by_time ON entries (recorded_at)",
)
_COLUMNS = (
    "entry_id, payload_hex, payload_kind, key_id, sop_sha256, study_sha256, image_id, frame_count,"
    " row_count, column_count, working_geometry, fingerprint, recorded_at"
)


def default_registry_path() -> Path:
    """``$MEDSEC_EDGE_REGISTRY``, else ``$XDG_DATA_HOME/medsec-edge/registry.sqlite3``, else
    ``~/.local/share/medsec-edge/registry.sqlite3`` (a relative XDG_DATA_HOME is ignored, as
    the XDG spec says)."""
    env = os.environ.get(REGISTRY_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "medsec-edge" / "registry.sqlite3"


def uid_sha256(uid: str, *, what: str = "UID") -> str:
    """SHA-256 hex of a DICOM UID, the only form in which the registry keeps one.

    DICOM pads UI values with NUL or space; both are stripped so the padded and the plain value
    hash alike. Errors describe the value, never quote it.
    """
    if not isinstance(uid, str):
        raise UsageError(f"a {what} must be a str, got {type(uid).__name__}")
    value = uid.strip("\0 ")
    if not value:
        raise UsageError(f"the {what} is empty")
    if len(value) > MAX_UID_CHARS:
        raise UsageError(f"the {what} is {len(value)} characters, at most {MAX_UID_CHARS} are accepted")
    if not value.isascii() or not value.isprintable():
        raise UsageError(f"the {what} holds characters that are not printable ASCII")
    return hashlib.sha256(value.encode("ascii")).hexdigest()


def _payload_hex(value: Any) -> str:
    if not isinstance(value, str):
        raise PayloadError(f"a payload is given as hex text, got {type(value).__name__}")
    text = value.strip().lower()
    if not _PAYLOAD_HEX.fullmatch(text):
        raise PayloadError(
            f"a registry payload is {2 * DATA_BYTES} hex digits, got {len(text)} characters"
            + ("" if len(text) != 2 * DATA_BYTES else " with a non-hex character")
        )
    return text


def _count(value: Any, name: str, limit: int) -> int:
    # bool is an int subclass; True frames is a bug, not one frame.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UsageError(f"{name} must be an integer from 1 to {limit}, got {value!r}")
    return value


def _geometry_json(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise UsageError("working_geometry must be a dict with str keys, or None")
    try:
        text = json.dumps(dict(value), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"working_geometry is not plain JSON (numbers, text, lists, dicts): {exc}") from None
    if len(text.encode()) > MAX_GEOMETRY_JSON_BYTES:
        raise UsageError(
            f"working_geometry is {len(text.encode())} bytes as JSON, at most {MAX_GEOMETRY_JSON_BYTES}"
        )
    return text


def _utc(value: Any) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise UsageError("recorded_at must be a timezone-aware datetime (naive times are ambiguous)")
    try:
        utc = value.astimezone(timezone.utc)
    except OverflowError:
        raise UsageError("recorded_at is out of range") from None
    if not _EARLIEST.year <= utc.year <= 9999:  # four-digit years keep the stored text in time order
        raise UsageError(f"recorded_at must lie in the years {_EARLIEST.year} to 9999, got {utc.year}")
    return utc


def _field_bytes(*parts: str | bytes | None) -> bytes:
    """Length-prefixed concatenation: no two different tuples give the same bytes."""
    out = bytearray()
    for part in parts:
        if part is None:
            out += b"\xff\xff\xff\xff"
            continue
        raw = part.encode() if isinstance(part, str) else part
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


@dataclass(frozen=True)
class Entry:
    """One image's evidence as recorded at acquisition; holds hashes, never a raw UID.

    Build one with ``Entry.from_uids`` (which hashes the UIDs) or directly from stored hashes.
    ``recorded_at`` is UTC; ``entry_id`` is derived from the content, time excluded.
    """

    payload_hex: str
    payload_kind: str
    image_id: str
    fingerprint: bytes = field(repr=False)
    frames: int
    rows: int
    columns: int
    recorded_at: datetime
    key_id: str | None = None
    sop_sha256: str | None = None
    study_sha256: str | None = None
    working_geometry: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalised copies; the dataclass stays frozen for callers
        set_(self, "payload_hex", _payload_hex(self.payload_hex))
        if self.payload_kind not in PAYLOAD_KINDS:
            raise UsageError(f"payload_kind must be one of {', '.join(PAYLOAD_KINDS)}, got {self.payload_kind!r}")
        if not isinstance(self.image_id, str) or not _IMAGE_ID.fullmatch(self.image_id):
            raise UsageError("image_id must be 8 to 64 lowercase hex digits (the image's short hash)")
        if self.key_id is not None and (not isinstance(self.key_id, str) or not _KEY_ID.fullmatch(self.key_id)):
            raise UsageError("key_id must be 16 lowercase hex digits, or None")
        for name in ("sop_sha256", "study_sha256"):
            digest = getattr(self, name)
            if digest is not None and (not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest)):
                raise UsageError(f"{name} must be 64 lowercase hex digits (use uid_sha256), or None")
        if not isinstance(self.fingerprint, (bytes, bytearray, memoryview)):
            raise UsageError(f"fingerprint must be bytes, got {type(self.fingerprint).__name__}")
        blob = bytes(self.fingerprint)
        if not 1 <= len(blob) <= MAX_FINGERPRINT_BYTES:
            raise UsageError(f"fingerprint is {len(blob)} bytes, expected 1 to {MAX_FINGERPRINT_BYTES}")
        set_(self, "fingerprint", blob)
        _count(self.frames, "frames", MAX_FRAMES)
        _count(self.rows, "rows", MAX_DIMENSION)
        _count(self.columns, "columns", MAX_DIMENSION)
        geometry = _geometry_json(self.working_geometry)
        set_(self, "working_geometry", None if geometry is None else json.loads(geometry))
        set_(self, "recorded_at", _utc(self.recorded_at))

    @classmethod
    def from_uids(
        cls,
        *,
        payload_hex: str,
        payload_kind: str,
        image_id: str,
        fingerprint: bytes,
        frames: int,
        rows: int,
        columns: int,
        sop_uid: str | None,
        study_uid: str | None = None,
        key_id: str | None = None,
        working_geometry: Mapping[str, Any] | None = None,
        recorded_at: datetime | None = None,
    ) -> Entry:
        """An entry from the image's UIDs, hashed here so that no raw UID is ever held."""
        return cls(
            payload_hex=payload_hex,
            payload_kind=payload_kind,
            image_id=image_id,
            fingerprint=fingerprint,
            frames=frames,
            rows=rows,
            columns=columns,
            recorded_at=recorded_at if recorded_at is not None else datetime.now(timezone.utc),
            key_id=key_id,
            sop_sha256=None if sop_uid is None else uid_sha256(sop_uid, what="SOP Instance UID"),
            study_sha256=None if study_uid is None else uid_sha256(study_uid, what="Study Instance UID"),
            working_geometry=working_geometry,
        )

    @property
    def geometry_json(self) -> str | None:
        return _geometry_json(self.working_geometry)

    @property
    def entry_id(self) -> str:
        """SHA-256 over everything but the time: equal evidence, equal id."""
        return hashlib.sha256(_field_bytes(
            b"medsec-edge registry entry v1", self.payload_hex, self.payload_kind, self.key_id,
            self.sop_sha256, self.study_sha256, self.image_id, str(self.frames), str(self.rows),
            str(self.columns), self.geometry_json, self.fingerprint,
        )).hexdigest()

    def _row(self) -> tuple:
        return (
            self.entry_id, self.payload_hex, self.payload_kind, self.key_id, self.sop_sha256,
            self.study_sha256, self.image_id, self.frames, self.rows, self.columns,
            self.geometry_json, self.fingerprint, self.recorded_at.strftime(_TIME_FORMAT),
        )

    @classmethod
    def _from_row(cls, row: tuple) -> Entry:
        (_, payload, kind, key_id, sop, study, image_id, frames, rows, columns, geometry,
         fingerprint, recorded_at) = row
        return cls(
            payload_hex=payload, payload_kind=kind, image_id=image_id, fingerprint=bytes(fingerprint),
            frames=frames, rows=rows, columns=columns,
            recorded_at=datetime.strptime(recorded_at, _TIME_FORMAT).replace(tzinfo=timezone.utc),
            key_id=key_id, sop_sha256=sop, study_sha256=study,
            working_geometry=None if geometry is None else json.loads(geometry),
        )


def _make_private_dirs(folder: Path) -> None:
    """Create the missing folders down to ``folder`` with mode 0700; existing ones are left as
    they are (they are the user's)."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another process made it first
        if os.name == "posix":
            os.chmod(path, 0o700)  # the umask may have taken bits from 0o700


def _create_private_file(path: Path) -> bool:
    """Create an empty owner-only file before SQLite opens it, so it is never readable by others,
    not even for an instant. False when it already exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        return False
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return True


class Registry:
    """An open registry file. Use as a context manager; one instance per thread (sqlite3's rule).

    Every public method turns SQLite failures into ``ConfigError`` naming the file and the fix.
    """

    def __init__(self, path: Path, connection: sqlite3.Connection) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = connection

    # -- opening -----------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike | None = None, *, create: bool = True,
             busy_timeout_s: float = BUSY_TIMEOUT_S) -> Registry:
        """Open the registry at ``path`` (default: ``default_registry_path()``), creating it
        owner-only when ``create``; refuse a corrupt file, a foreign database or a newer schema."""
        path = Path(path).expanduser() if path is not None else default_registry_path()
        if path.exists() and not path.is_file():
            raise ConfigError(f"registry {path} is not a regular file: point --registry at a file")
        if not path.exists():
            if not create:
                raise ConfigError(f"no registry at {path}: images protected with 'run' create it")
            try:
                _make_private_dirs(path.parent)
                if _create_private_file(path):
                    logger.info("created evidence registry %s", path)
            except OSError as exc:
                raise ConfigError(
                    f"cannot create registry {path}: {exc.strerror}; choose a writable place with "
                    f"--registry PATH or ${REGISTRY_ENV}"
                ) from None
        elif os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            logger.warning("registry %s is accessible by group or others (mode %04o); fix: chmod 600 %s",
                           path, stat.S_IMODE(path.stat().st_mode), path)
        try:
            db = sqlite3.connect(os.fspath(path), timeout=busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise _config_error(path, exc) from None
        registry = cls(path, db)
        try:
            registry._prepare()
        except BaseException:
            registry.close()
            raise
        return registry

    def _prepare(self) -> None:
        db = self._conn()
        try:
            db.execute("PRAGMA foreign_keys = ON")
            tables = self._tables()
            if "meta" not in tables:
                if tables:
                    raise ConfigError(
                        f"{self.path} is an SQLite database but not a medsec-edge registry (no 'meta' "
                        f"table): point --registry or ${REGISTRY_ENV} at another file"
                    )
                self._create_schema()
            self._check_version()
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                logger.warning("registry %s runs in journal mode %s, not WAL (a network file "
                               "system?); readers may wait for writers", self.path, mode)
        except sqlite3.Error as exc:
            raise _config_error(self.path, exc) from None

    def _tables(self) -> set[str]:
        rows = self._conn().execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return {name for (name,) in rows}

    def _create_schema(self) -> None:
        """Create the tables in one write transaction; a second process racing to do the same
        waits on the lock and then finds them made (IF NOT EXISTS, ON CONFLICT DO NOTHING)."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                db.execute(statement)
            db.executemany(
                "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                [("application", APPLICATION), ("schema_version", str(SCHEMA_VERSION))],
            )
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise

    def _check_version(self) -> None:
        meta = dict(self._conn().execute("SELECT name, value FROM meta").fetchall())
        if meta.get("application") != APPLICATION:
            raise ConfigError(
                f"{self.path} has a 'meta' table but is not a medsec-edge registry: point "
                f"--registry or ${REGISTRY_ENV} at another file"
            )
        raw = meta.get("schema_version", "")
        version = int(raw) if raw.isdigit() else None
        if version is None or version < 1:
            raise ConfigError(
                f"registry {self.path} has an unreadable schema version {raw!r}: restore it from a "
                f"backup, or move it aside to start a new one"
            )
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"registry {self.path} has schema version {version}, this medsec-edge reads up to "
                f"version {SCHEMA_VERSION}: upgrade medsec-edge (pip install -U medsec-edge) on this "
                f"device, or point --registry at another file"
            )

    # -- using ---------------------------------------------------------------------------------

    def record(self, entry: Entry) -> bool:
        """Store ``entry``; True when it added a row, False when the same evidence was already
        there (a re-sent instance: the first time recorded is kept)."""
        return self.record_many([entry]) == 1

    def record_many(self, entries: Iterable[Entry]) -> int:
        """Store several entries in one transaction (one disk sync); returns how many were new."""
        entries = list(entries)
        for entry in entries:
            if not isinstance(entry, Entry):
                raise UsageError(f"record takes registry Entry objects, got {type(entry).__name__}")
        added = 0
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")  # take the write lock now: no read-to-write upgrade race
            try:
                for entry in entries:
                    cursor = db.execute(
                        f"INSERT INTO entries ({_COLUMNS}) VALUES ({', '.join('?' * 13)}) "
                        "ON CONFLICT (entry_id) DO NOTHING",
                        entry._row(),
                    )
                    if cursor.rowcount == 1:
                        added += 1
                        self._note_other_evidence(entry)
                    else:
                        logger.debug("image %s: same evidence already recorded, kept the first", entry.image_id)
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        except sqlite3.Error as exc:
            raise _config_error(self.path, exc) from None
        return added

    def _note_other_evidence(self, entry: Entry) -> None:
        if entry.sop_sha256 is None:
            return
        (others,) = self._conn().execute(
            "SELECT COUNT(*) FROM entries WHERE sop_sha256 = ? AND entry_id <> ?",
            (entry.sop_sha256, entry.entry_id),
        ).fetchone()
        if others:
            logger.warning("image %s recorded again with different evidence; the %d earlier "
                           "record(s) are kept beside it", entry.image_id, others)

    def find_by_payload(self, payload_hex: str) -> list[Entry]:
        """Entries whose watermark payload is ``payload_hex`` (16 hex digits), oldest first."""
        return self._select("payload_hex = ?", (_payload_hex(payload_hex),))

    def find_by_sop(self, sop_uid: str) -> list[Entry]:
        """Entries of the image with this SOP Instance UID (hashed here), oldest first."""
        return self._select("sop_sha256 = ?", (uid_sha256(sop_uid, what="SOP Instance UID"),))

    def count(self) -> int:
        try:
            (n,) = self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()
        except sqlite3.Error as exc:
            raise _config_error(self.path, exc) from None
        return int(n)

    def prune(self, older_than_days: float, *, now: datetime | None = None) -> int:
        """Delete entries recorded more than ``older_than_days`` days ago; returns how many.

        The retention period is the site's to choose; zero is refused because it would delete
        every record, which is never what a retention policy means.
        """
        if (isinstance(older_than_days, bool) or not isinstance(older_than_days, (int, float))
                or not math.isfinite(older_than_days) or older_than_days <= 0):
            raise UsageError(f"older_than_days must be a positive number of days, got {older_than_days!r}")
        now = _utc(now if now is not None else datetime.now(timezone.utc))
        try:
            cutoff = max(now - timedelta(days=older_than_days), _EARLIEST)
        except OverflowError:  # further back than year 1: nothing can be that old
            cutoff = _EARLIEST
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                cursor = db.execute("DELETE FROM entries WHERE recorded_at < ?", (cutoff.strftime(_TIME_FORMAT),))
                db.execute("COMMIT")
            except BaseException:
                _rollback(db)
                raise
        except sqlite3.Error as exc:
            raise _config_error(self.path, exc) from None
        logger.info("pruned %d registry entries recorded before %s", cursor.rowcount, cutoff.date())
        return cursor.rowcount

    def _select(self, where: str, args: tuple) -> list[Entry]:
        try:
            rows = self._conn().execute(
                f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY recorded_at, entry_id", args
            ).fetchall()
        except sqlite3.Error as exc:
            raise _config_error(self.path, exc) from None
        try:
            return [Entry._from_row(row) for row in rows]
        except (UsageError, ValueError, TypeError):
            raise ConfigError(
                f"registry {self.path} holds a row that does not read back as an entry (edited by "
                f"hand?): restore it from a backup, or move it aside to start a new one"
            ) from None

    # -- closing -------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise UsageError(f"registry {self.path} is closed")
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> Registry:  # noqa: PYI034 (typing.Self is 3.11+, we support 3.10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _rollback(db: sqlite3.Connection) -> None:
    # SQLite has already rolled back after some errors; a second ROLLBACK would hide the first error.
    if db.in_transaction:
        db.execute("ROLLBACK")


def _config_error(path: Path, exc: sqlite3.Error) -> ConfigError:
    """SQLite's reason (it never holds row content) with the file and what to do."""
    reason = str(exc)
    if "locked" in reason or "busy" in reason:
        fix = "another process held it too long; retry, or check what else writes to it"
    elif isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError):
        fix = "the file is damaged or not a registry; move it aside (a new one is created on the next run) or restore it from a backup"
    else:
        fix = f"check that the file and its folder are writable, or choose another with --registry PATH or ${REGISTRY_ENV}"
    return ConfigError(f"registry {path}: {reason}: {fix}")
