"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Layer: runtime (io, standard library). Shared by every command that writes a file it built in
memory (run, embed, seal, encrypt, decrypt, restore): the bytes go to a temporary file in the
target's folder, are flushed to disk, get their final permissions, and only then are renamed over
the target. A process killed at any moment (kill -9) leaves either nothing or the complete file
under the final name, plus at worst a temporary of ours, which ``remove_stale_temporaries``
recognises by name and removes on the next start.

Temporaries are named ``.medsec-<host>-<pid>-<random>.tmp`` (host: a short hash of the host
name): hidden, with a suffix no image reader takes and a prefix no input of ours has; host and
pid say whether the writer may still be alive (a pid means nothing on another machine or in
another container sharing the folder).
``mkstemp`` creates them 0600; a final file gets ``0o666 & ~umask`` like any file a program
creates (a forwarder running as another user must be able to read it). Key files are written
elsewhere and stay 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from medsec_edge.runtime.errors import UsageError

__all__ = [
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "atomic_output",
    "fsync_dir",
    "is_our_temporary",
    "output_mode",
    "remove_stale_temporaries",
    "temporary_prefix",
    "write_bytes_atomic",
]

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".medsec-"
TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\.medsec-([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]+\.tmp")
# A temporary lives for the seconds one write takes; one this old is stale whoever made it
# (its pid may have been reused by an unrelated process).
STALE_AFTER_S = 24 * 3600


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def temporary_prefix(pid: int | None = None) -> str:
    """How the names of this process's temporaries (or process ``pid``'s, on this host) begin."""
    return f"{TEMP_PREFIX}{_host()}-{os.getpid() if pid is None else pid}-"


def _umask() -> int:
    """The process umask, read without changing it where the kernel says it (Linux >= 4.7).

    ``os.umask`` can only be read by setting it, which races with threads creating files.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fp:
            for line in fp:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode() -> int:
    """Permissions of a new output file: what ``open(path, 'w')`` would give it."""
    return 0o666 & ~_umask()


def _same_file(path: Path, source: Path) -> bool:
    try:
        if path.resolve() == source.resolve():
            return True
        return path.exists() and source.exists() and os.path.samefile(path, source)
    except OSError:
        return False


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable (power loss, not kill -9: that needs no fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | Path, source: str | Path | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` when the block ends without an exception.

    The file object has a real name (``fp.name``, some encoders want one). On an exception the
    temporary is removed and nothing appears under ``path``. Never writes over ``source``.
    """
    path = Path(path)
    if source is not None and _same_file(path, Path(source)):
        raise UsageError(f"output {path.name} is the input file: inputs are never modified, choose another path")
    if not path.parent.is_dir():
        raise UsageError(f"output folder for {path.name} does not exist: create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=temporary_prefix(), suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)  # reopened by name: some encoders (tifffile) want a file object with a real name
    try:
        with open(tmp_name, "wb") as fp:
            yield fp
            fp.flush()
            os.fsync(fp.fileno())
            os.fchmod(fp.fileno(), output_mode())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, content: bytes, source: str | Path | None = None) -> Path:
    """Write ``content`` to ``path`` via a temporary file and a rename; never over ``source``."""
    with atomic_output(path, source) as fp:
        fp.write(content)
    return Path(path)


def is_our_temporary(name: str) -> bool:
    """True for a file name ``atomic_output`` makes (and nothing else)."""
    return _TEMP_NAME.fullmatch(name) is not None


def _writer_gone(host: str, pid: int) -> bool:
    if host != _host():
        return False  # another machine's or container's: only its age can tell
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    except OSError:
        return True
    return False


def remove_stale_temporaries(root: str | Path) -> int:
    """Remove temporaries of ours left under ``root`` by a killed writer; return how many.

    Only names ``atomic_output`` makes, only regular files (never through a link), and only when
    the process that made them is gone (same host, pid not running) or the file is a day old,
    so a second job writing to the same folder keeps its work in progress.
    """
    root = Path(root)
    if not root.is_dir():
        return 0
    removed = 0
    now = time.time()
    for folder, dirs, files in os.walk(root):  # os.walk does not follow links to folders
        for name in files:
            match = _TEMP_NAME.fullmatch(name)
            if match is None:
                continue
            path = Path(folder) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if not (path.is_file() and not path.is_symlink()):
                continue
            if not (_writer_gone(match.group(1), int(match.group(2))) or now - st.st_mtime > STALE_AFTER_S):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    if removed:
        logger.info("removed %d stale temporary file(s) of an interrupted run", removed)
    return removed
