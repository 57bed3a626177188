"""Which files a command reads (files as given, the image files inside folders), and reading one
such file safely: only regular files, never blocking, never more bytes than the limit.

Layer: runtime (io). Every command that reads images expands its arguments here, so files and
folders mean the same everywhere. A FIFO named ``*.dcm`` would block ``open`` and ``read``
forever and a link to ``/dev/zero`` never ends; both are refused before a byte is read.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.formats import FORMAT_BY_SUFFIX
from medsec_edge.runtime.io.limits import ReadLimits, read_limits

__all__ = ["collect_inputs", "read_input_bytes"]

logger = logging.getLogger(__name__)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _wanted(name: str) -> bool:
    suffix = os.path.splitext(name)[1].lower()
    return not name.startswith(".") and (suffix in FORMAT_BY_SUFFIX or suffix == "")


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted).

    Inside folders, anything but a regular file (FIFOs, devices, sockets, links to them) is
    skipped with a warning; links to folders are not followed (no loops). A named argument that
    is neither a folder nor a regular file is refused with ``InputError``, like a missing one.
    """
    files: list[Path] = []
    for item in inputs:
        try:
            mode = os.stat(item).st_mode
        except FileNotFoundError:
            raise InputError(f"{item.name}: no such file or folder") from None
        except OSError as exc:
            raise InputError(f"{item.name}: cannot read ({exc.strerror or type(exc).__name__})") from None
        if stat.S_ISDIR(mode):
            files.extend(_walk(item))
        elif stat.S_ISREG(mode):
            files.append(item)
        else:
            raise InputError(f"{item.name}: {_kind(mode)}, not a regular file: only regular files are read")
    return files


def _walk(root: Path) -> list[Path]:
    found: list[Path] = []
    skipped = 0
    for folder, dirs, names in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if not _wanted(name):
                continue
            path = Path(folder) / name
            try:
                regular = stat.S_ISREG(os.stat(path).st_mode)
            except OSError:  # a dangling link or a file removed while we walk
                regular = False
            if regular:
                found.append(path)
            else:
                skipped += 1
                logger.warning("skipped %s: not a regular file", name)
    if skipped:
        logger.debug("skipped %d non-regular entries under %s", skipped, root.name)
    return sorted(found)


def read_input_bytes(path: Path, limits: ReadLimits | None = None) -> bytes:
    """The bytes of a regular file no larger than ``limits.max_file_bytes``.

    Checked before and after opening (``O_NONBLOCK`` so a FIFO swapped in between cannot block
    the open), and the read itself is bounded, so a file that grows while we read cannot make it
    unbounded either. Raises ``InputError`` naming the file (basename only).
    """
    path = Path(path)
    limits = limits or read_limits()
    name = path.name
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise InputError(f"{name}: {_kind(mode)}, not a regular file: only regular files are read")
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
        fd = os.open(path, flags)
    except InputError:
        raise
    except OSError as exc:
        raise InputError(f"{name}: cannot read file ({exc.strerror or type(exc).__name__})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{name}: {_kind(info.st_mode)}, not a regular file: only regular files are read")
        if info.st_size > limits.max_file_bytes:
            raise InputError(_too_big(name, info.st_size, limits))
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 24, limits.max_file_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limits.max_file_bytes:
                raise InputError(_too_big(name, total, limits))
        return b"".join(chunks)
    except OSError as exc:
        raise InputError(f"{name}: cannot read file ({exc.strerror or type(exc).__name__})") from None
    finally:
        os.close(fd)


def _too_big(name: str, size: int, limits: ReadLimits) -> str:
    return (f"{name}: file is {size} bytes or more, larger than the limit of {limits.max_file_bytes} "
            "(raise MEDSEC_EDGE_MAX_FILE_BYTES for larger images)")
