"""The held-out images every evaluation reads: files and folders, deduplicated, decoded.

Layer: evaluation. One place decides which pydicom-data files count (the copies in
``watermark_eval.PYDICOM_DATA_DEDUP`` are dropped) and how an unreadable one is reported, so the
watermark, tamper and crypto evaluations all run on the same set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from medsec_edge.runtime.errors import InputError
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.io.inputs import collect_inputs


def read_held_out(images: Sequence[Path], *, dedup: bool = True
                  ) -> tuple[list[tuple[Path, MedicalImage]], list[dict[str, str]], list[dict[str, Any]]]:
    """(readable (path, image) pairs in input order, skipped {name, reason}, dropped copies)."""
    from medsec_edge.evaluation.watermark_eval import deduplicate

    paths = collect_inputs([Path(p) for p in images])
    dropped: list[dict[str, Any]] = []
    if dedup:
        paths, dropped = deduplicate(paths)
    loaded, skipped = [], []
    for path in paths:
        try:
            loaded.append((path, read_image(path)))
        except InputError as exc:
            skipped.append({"name": path.name, "reason": str(exc).removeprefix(f"{path.name}: ")})
    return loaded, skipped, dropped
