"""Calibrate the watermark's fast "no mark here": the presence threshold a bundle's search obeys.

Layer: export. The extractor reads the nominal geometry first; when that fails it estimates lattice
candidates and, before decoding any, folds each coarsely and measures how strongly the readout
responds (``Extraction.presence``: about 1 with no mark). Below the bundle's threshold the search
stops there. The threshold must never turn away a mark the search would have found, so it is set
from marks that only the search found: real frames that are not held out (``train.real_data``),
marked, put through every attack of the evaluation, read with the gate off. It keeps 90% of the
weakest such mark's response above chance: ``threshold = 1 + 0.9 (min - 1)``. The same frames,
unmarked and attacked, say how often the gate answers at once (they never decode either way).

    python -m medsec_edge.export.presence_calibration BUNDLE [--per-group 2] [--seed 11]
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from medsec_edge.export.watermark_export import DEFAULT_SIGNING_KEY
from medsec_edge.runtime.bundle import open_bundle

log = logging.getLogger(__name__)

MARGIN = 0.9  # share of the weakest found mark's response above chance that the threshold keeps


def measure(bundle_dir: Path, *, per_group: int = 2, seed: int = 11, progress: bool = True) -> dict:
    """Presence responses of marked and unmarked attacked real frames, with the gate off."""
    from tqdm import tqdm

    from medsec_edge.evaluation.attacks import ATTACKS, attack_image
    from medsec_edge.runtime.watermark.models import BundleWatermarkModels
    from medsec_edge.runtime.watermark.watermarker import Watermarker
    from medsec_edge.train.real_data import real_frames

    frames = real_frames("all", per_group=per_group, max_side=2048, seed=seed)
    wm = Watermarker(BundleWatermarkModels(open_bundle(bundle_dir)), presence_threshold=0.0)
    rng = np.random.default_rng(seed)
    marked_found, marked_missed, unmarked, false_found, nominal = [], [], [], 0, 0
    for frame in tqdm(frames, desc="presence", disable=not progress):
        image = frame.image
        payload = rng.bytes(8)
        marked = replace(image, pixels=wm.embed(image, payload).pixels)
        for name in ATTACKS:
            ex = wm.extract(attack_image(marked, name, rng))
            if ex.presence is None:
                nominal += ex.found
            elif ex.found and ex.payload == payload.hex():
                marked_found.append((name, ex.presence, round(ex.period_px / image_factor(image), 2)))
            else:
                marked_missed.append((name, ex.presence))
            clean = wm.extract(attack_image(image, name, rng))
            false_found += clean.found
            if clean.presence is not None:
                unmarked.append((name, clean.presence))
    return {"frames": len(frames), "attacks": list(ATTACKS), "seed": seed, "per_group": per_group,
            "marked_read_nominal": nominal, "marked_found_by_search": marked_found,
            "marked_missed": marked_missed, "unmarked": unmarked, "unmarked_found": false_found}


def image_factor(image) -> int:
    """The working factor of the image's first frame (to state a found period in working pixels)."""
    from medsec_edge.runtime.watermark.spec import working_factor

    return working_factor(*image.frames()[0].shape[:2])


def summarise(raw: dict, margin: float = MARGIN) -> dict:
    """The manifest's ``calibration.watermark.presence`` from ``measure``'s responses."""
    found = np.asarray([row[1] for row in raw["marked_found_by_search"]], dtype=float)
    unmarked = np.asarray([row[1] for row in raw["unmarked"]], dtype=float)
    if found.size == 0:
        raise ValueError("no mark was found by the search alone: nothing to calibrate the presence gate on")
    threshold = 1.0 + margin * (float(found.min()) - 1.0)
    return {
        "threshold": round(threshold, 4),
        "rule": f"1 + {margin} x (weakest mark found only by the search - 1)",
        "marked_found_by_search": int(found.size),
        "marked_min": round(float(found.min()), 4),
        "marked_p5": round(float(np.percentile(found, 5)), 4),
        "marked_read_nominal": raw["marked_read_nominal"],
        "unmarked_searched": int(unmarked.size),
        "unmarked_max": round(float(unmarked.max()), 4) if unmarked.size else None,
        "unmarked_answered_at_once": round(float(np.mean(unmarked < threshold)), 4) if unmarked.size else None,
        "unmarked_found": raw["unmarked_found"],
        "frames": raw["frames"], "attacks": raw["attacks"], "seed": raw["seed"], "per_group": raw["per_group"],
        "data": "train.real_data, split all (never pydicom-data, never heldout_overlap.txt)",
    }


def record(bundle_dir: Path, presence: dict, *, signing_key: Path = DEFAULT_SIGNING_KEY,
           trusted_dir: Path | None = None) -> Path:
    """Write ``calibration.watermark.presence`` into the bundle's manifest and re-sign it in place."""
    from medsec_edge.export.tamper_export import resign_manifest

    command = shlex.join(["python", "-m", "medsec_edge.export.presence_calibration", *sys.argv[1:]])

    def update(data: dict) -> None:
        data.setdefault("calibration", {}).setdefault("watermark", {})["presence"] = {**presence, "command": command}

    return resign_manifest(Path(bundle_dir), update, signing_key=signing_key, trusted_dir=trusted_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medsec_edge.export.presence_calibration")
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--per-group", type=int, default=2, help="frames per volume or study")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--signing-key", type=Path, default=DEFAULT_SIGNING_KEY)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("openjpeg").setLevel(logging.WARNING)
    presence = summarise(measure(args.bundle, per_group=args.per_group, seed=args.seed))
    record(args.bundle, presence, signing_key=args.signing_key)
    print({k: v for k, v in presence.items() if k not in ("attacks",)})


if __name__ == "__main__":
    main()
