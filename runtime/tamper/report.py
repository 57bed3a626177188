"""How a tamper verdict is shown: the JSON line of `check` and the mask PNG.

Layer: runtime. Rows name the image by its hash (``image_id``) besides the path the user gave;
mask files are named by hashes too, so nothing written carries patient data.
"""

from __future__ import annotations

import hashlib
import io
import os
import secrets
from pathlib import Path

import numpy as np

from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.tamper.checker import TamperVerdict
from medsec_edge.runtime.tamper.evidence import CheckVerdict

# Enough names for every input of a batch that shares an image id and a path hash; past it a
# folder is being filled by something else, and refusing beats looping.
MAX_NAME_TRIES = 1000


def check_row(path: Path, image: MedicalImage, verdict: TamperVerdict | CheckVerdict) -> dict:
    """One JSON-ready object: path, image_id, tampered, score, operating_point, watermark, regions
    (and, for a ``CheckVerdict``, the evidence that decided and the seal's finding)."""
    row = {"path": str(path), "image_id": image.meta.image_id}
    row.update(verdict.to_dict())
    row["latency_ms"] = round(verdict.timings_ms.get("total_ms", 0.0), 2)
    return row


def path_tag(path: Path) -> str:
    """8 hex digits of SHA-256 over the input's absolute path: two files with the same SOP
    Instance UID (a copy, an edited export) share an image id, never a path."""
    return hashlib.sha256(os.fsencode(os.path.abspath(path))).hexdigest()[:8]


def mask_name(image_id: str, path: Path, frame: int, attempt: int = 1) -> str:
    """``<image id>.<path tag>.frame<n>.mask.png``, with ``.<attempt>`` before ``.mask.png`` after
    the first try. No file name or UID of the input appears (a file name can be a patient's)."""
    suffix = "" if attempt == 1 else f".{attempt}"
    return f"{image_id or 'image'}.{path_tag(path)}.frame{frame}{suffix}.mask.png"


def write_mask_png(verdict: TamperVerdict | CheckVerdict, mask_dir: Path, path: Path, image_id: str) -> Path:
    """8-bit PNG (255 = manipulated) of the verdict's mask frame at the size of the image under
    test; returns where it went.

    A mask never replaces another file: the complete PNG is written to a temporary file and then
    linked to the first free name (a hard link fails if the name exists, atomically, so two
    writers cannot take the same name either). A re-run writes beside its earlier masks.
    Raises ``UsageError`` when the folder cannot take the mask.
    """
    try:
        return _write_mask_png(verdict, Path(mask_dir), path, image_id)
    except OSError as exc:
        raise UsageError(f"cannot write a mask into the mask folder: {exc.strerror or exc}") from None


def _write_mask_png(verdict: TamperVerdict | CheckVerdict, mask_dir: Path, path: Path, image_id: str) -> Path:
    from PIL import Image

    mask_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    mask = verdict.mask if verdict.mask.ndim == 2 else verdict.mask[verdict.mask_frame]
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, format="PNG")
    tmp = mask_dir / f".mask.{secrets.token_hex(6)}.tmp"
    # 0o666 and the umask decide the mode, as for any other output (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fp:
            fp.write(buffer.getvalue())
            fp.flush()
            os.fsync(fp.fileno())
        for attempt in range(1, MAX_NAME_TRIES + 1):
            target = mask_dir / mask_name(image_id, path, verdict.mask_frame, attempt)
            try:
                _place_new(tmp, target)
            except FileExistsError:
                continue
            return target
        raise UsageError(f"the mask folder holds {MAX_NAME_TRIES} masks of image {image_id} from this path: "
                         "clear it")
    finally:
        tmp.unlink(missing_ok=True)


def _place_new(tmp: Path, target: Path) -> None:
    """Give ``tmp``'s content the name ``target`` if, and only if, that name is free."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links: reserve the name exclusively, then rename over our
        # own empty reservation (still never over someone else's file).
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        os.replace(tmp, target)
