"""Which files a command reads: files as given, and the image files inside folders.

Layer: runtime (io). Every command that reads images expands its arguments here, so files and
folders mean the same everywhere.
"""

from __future__ import annotations

from pathlib import Path

from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.formats import FORMAT_BY_SUFFIX


def collect_inputs(inputs: list[Path]) -> list[Path]:
    """Files as given, and the image files inside folders (recursively, sorted)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            for path in sorted(item.rglob("*")):
                if path.is_file() and not path.name.startswith(".") and (
                    path.suffix.lower() in FORMAT_BY_SUFFIX or path.suffix == ""
                ):
                    files.append(path)
        elif item.exists():
            files.append(item)
        else:
            raise InputError(f"{item.name}: no such file or folder")
    return files
