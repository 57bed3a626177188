"""The watermark key: a 32-byte HMAC secret in an owner-only file.

Layer: runtime (standard library only). The device keeps it in its key set (``keyset.py``,
file ``watermark.key``); a file at ``default_key_path`` is where earlier versions kept it, and
``device_keys`` imports it from there once. The key makes the payload a MAC over the image's
identity (payload.identity_payload), so whoever holds it can forge watermarks: the file is
created with mode 0600 in one step, and a file that group or others can access is refused
rather than used. Nothing here logs, raises or prints the secret; ``WatermarkKey``'s repr hides it.

File format (JSON)::

    {"kind": "medsec-edge-watermark-key", "version": 1, "key": "<base64 of 32 bytes>"}
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from medsec_edge.runtime.errors import KeyFileError

__all__ = [
    "KEY_BYTES",
    "KEY_FILE_KIND",
    "KEY_FILE_VERSION",
    "WatermarkKey",
    "create_key",
    "default_key_path",
    "key_id_of",
    "load_key",
    "load_or_create_key",
    "store_key",
]

logger = logging.getLogger(__name__)

KEY_BYTES = 32
KEY_FILE_KIND = "medsec-edge-watermark-key"
KEY_FILE_VERSION = 1
KEY_ENV = "MEDSEC_EDGE_KEY"
_MAX_FILE_BYTES = 4096  # a key file is ~120 bytes; refuse to read anything large


def key_id_of(secret: bytes) -> str:
    """Public id of a key: first 8 bytes of sha256(secret), as 16 hex characters."""
    return hashlib.sha256(secret).digest()[:8].hex()


@dataclass(frozen=True)
class WatermarkKey:
    """A watermark secret and its public id. ``repr`` shows the id only."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_BYTES:
            raise KeyFileError(f"a watermark key is {KEY_BYTES} bytes")
        if self.key_id != key_id_of(self.secret):
            raise KeyFileError("key_id does not match the key")

    @classmethod
    def from_secret(cls, secret: bytes) -> WatermarkKey:
        return cls(key_id=key_id_of(secret), secret=bytes(secret))


def default_key_path() -> Path:
    """``$MEDSEC_EDGE_KEY`` if set and non-empty, else ``~/.config/medsec-edge/watermark.key``."""
    env = os.environ.get(KEY_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".config" / "medsec-edge" / "watermark.key"


def read_key_file(path: Path, *, what: str, missing: str, max_bytes: int,
                  private: str | None = None, consequence: str = "") -> bytes:
    """Read a small key file safely; shared by the watermark key and the crypto key sets.

    The file is opened once and checked through its descriptor (a regular file, not too large,
    and, when ``private`` names it, accessible by its owner only), so a path swapped between
    check and read cannot slip through. Messages name the file, never its content.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise KeyFileError(missing) from None
    except IsADirectoryError:
        raise KeyFileError(f"{what} {path} is a directory, expected a key file") from None
    except PermissionError:
        raise KeyFileError(f"cannot read {what} {path}: permission denied") from None
    try:
        st = os.fstat(fd)  # the file we opened, not whatever the path names now
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{what} {path} is not a regular file")
        # POSIX permission bits mean nothing on Windows; there the file's ACL is the user's job.
        if private and os.name == "posix" and st.st_mode & 0o077:
            raise KeyFileError(
                f"{private} {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); anyone who can read it can {consequence}. "
                f"Fix: chmod 600 {path}"
            )
        if st.st_size > max_bytes:
            raise KeyFileError(f"{what} {path} is {st.st_size} bytes, a key file is under {max_bytes}")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(max_bytes + 1)
    finally:
        os.close(fd)


def _parse(path: Path, raw: bytes) -> WatermarkKey:
    # Every failure below is raised "from None": a chained decoder error could quote key bytes.
    expected = (
        f'expected JSON {{"kind": "{KEY_FILE_KIND}", "version": {KEY_FILE_VERSION}, '
        '"key": base64}'
    )
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyFileError(f"watermark key {path} is not valid JSON; {expected}") from None
    if not isinstance(doc, dict):
        raise KeyFileError(f"watermark key {path} is not a JSON object; {expected}")
    if doc.get("kind") != KEY_FILE_KIND:
        raise KeyFileError(f"{path} is not a medsec-edge watermark key (wrong 'kind'); {expected}")
    version = doc.get("version")
    if version != KEY_FILE_VERSION or isinstance(version, bool):
        raise KeyFileError(
            f"watermark key {path} has format version {version!r}, this medsec-edge reads "
            f"version {KEY_FILE_VERSION}: upgrade medsec-edge or recreate the key"
        )
    encoded = doc.get("key")
    if not isinstance(encoded, str):
        raise KeyFileError(f"watermark key {path} lacks a base64 'key' string; {expected}")
    try:
        secret = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise KeyFileError(f"watermark key {path}: 'key' is not valid base64") from None
    if len(secret) != KEY_BYTES:
        raise KeyFileError(
            f"watermark key {path}: 'key' decodes to {len(secret)} bytes, expected {KEY_BYTES}"
        )
    return WatermarkKey.from_secret(secret)


def load_key(path: Path) -> WatermarkKey:
    """Read an existing key file; refuse one that is missing, malformed or not owner-only."""
    path = Path(path).expanduser()
    raw = read_key_file(
        path, what="watermark key", max_bytes=_MAX_FILE_BYTES, private="watermark key",
        consequence="forge watermarks",
        missing=f"no watermark key at {path}: create one with 'medsec-edge keys new', "
                f"or point ${KEY_ENV} at an existing key file",
    )
    return _parse(path, raw)


def _key_file_bytes(secret: bytes) -> bytes:
    doc = {
        "kind": KEY_FILE_KIND,
        "version": KEY_FILE_VERSION,
        "key": base64.b64encode(secret).decode("ascii"),
    }
    return (json.dumps(doc) + "\n").encode("ascii")


def _write_exclusive(path: Path, content: bytes) -> None:
    """Create ``path`` with mode 0600 and ``content``; FileExistsError if it exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        if os.name == "posix":
            os.fchmod(fd, 0o600)  # the umask may have removed owner bits from 0o600
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def create_key(path: Path) -> WatermarkKey:
    """Create a new random key file at ``path`` (mode 0600); refuse if one exists."""
    key = WatermarkKey.from_secret(secrets.token_bytes(KEY_BYTES))
    store_key(path, key)
    logger.info("created watermark key %s at %s", key.key_id, path)
    return key


def store_key(path: Path, key: WatermarkKey) -> None:
    """Write ``key`` to a new file ``path`` (mode 0600); refuse if one exists.

    The content is written to a private temporary file in the same directory and then hard-linked
    into place, so the key file appears complete or not at all, and a key created concurrently by
    another process is never overwritten. Where hard links are unsupported, the file is created
    directly with O_CREAT|O_EXCL.
    """
    path = Path(path).expanduser()
    parent = path.parent
    if not parent.exists():
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise KeyFileError(
                f"cannot create directory {parent} for the watermark key: {exc.strerror}"
            ) from None
    content = _key_file_bytes(key.secret)
    tmp = parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        _write_exclusive(tmp, content)
    except OSError as exc:
        raise KeyFileError(f"cannot write a watermark key in {parent}: {exc.strerror}") from None
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise KeyFileError(
                f"a watermark key already exists at {path}; refusing to overwrite it"
            ) from None
        except OSError:
            try:
                _write_exclusive(path, content)
            except FileExistsError:
                raise KeyFileError(
                    f"a watermark key already exists at {path}; refusing to overwrite it"
                ) from None
            except OSError as exc:
                raise KeyFileError(f"cannot write watermark key {path}: {exc.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    if hasattr(os, "O_DIRECTORY"):
        try:
            dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            pass
        else:
            try:
                os.fsync(dfd)
            except OSError:
                pass
            finally:
                os.close(dfd)


def load_or_create_key(path: Path, *, create: bool = True) -> WatermarkKey:
    """Load the key at ``path``; if there is none and ``create``, make one (mode 0600)."""
    path = Path(path).expanduser()
    if create and not os.path.lexists(path):
        try:
            return create_key(path)
        except KeyFileError:
            if not os.path.lexists(path):
                raise
            # Another process created it between our check and our link: use theirs.
    return load_key(path)
