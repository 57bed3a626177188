"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Layer: runtime (standard library). Shared by every command that writes a DICOM file it built in
memory (seal, encrypt, decrypt, restore, reversible embed): a temporary file in the target's
folder, fsync, then a rename over the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medsec_edge.runtime.errors import UsageError


def write_bytes_atomic(path: Path, content: bytes, source: Path | None = None) -> Path:
    """Write ``content`` to ``path`` via a temporary file and a rename; never over ``source``."""
    path = Path(path)
    if source is not None and path.resolve() == Path(source).resolve():
        raise UsageError(f"output {path.name} is the input file: inputs are never modified")
    if not path.parent.is_dir():
        raise UsageError(f"output folder for {path.name} does not exist: create it first")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(content)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
