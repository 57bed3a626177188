"""How a tamper verdict is shown: the JSON line of `check` and the mask PNG.

Layer: runtime. Rows name the image by its hash (``image_id``) besides the path the user gave;
mask files are named by the hash too, so nothing written carries patient data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medsec_edge.runtime.io.image import MedicalImage
from medsec_edge.runtime.tamper.checker import TamperVerdict


def check_row(path: Path, image: MedicalImage, verdict: TamperVerdict) -> dict:
    """One JSON-ready object: path, image_id, tampered, score, operating_point, watermark, regions."""
    row = {"path": str(path), "image_id": image.meta.image_id}
    row.update(verdict.to_dict())
    row["latency_ms"] = round(verdict.timings_ms.get("total_ms", 0.0), 2)
    return row


def write_mask_png(verdict: TamperVerdict, mask_dir: Path, path: Path, image_id: str) -> Path:
    """8-bit PNG (255 = manipulated) at the frame's native size, written atomically."""
    from PIL import Image

    mask_dir = Path(mask_dir)
    mask_dir.mkdir(parents=True, exist_ok=True)
    name = f"{image_id or Path(path).stem}.frame{verdict.mask_frame}.mask.png"
    target = mask_dir / name
    tmp = target.with_suffix(".tmp")
    Image.fromarray((verdict.mask.astype(np.uint8) * 255)).save(tmp, format="PNG")
    tmp.replace(target)
    return target
