"""How often a mark on the smallest sample needs the job's stronger retries (pipeline.verified_embedding).

Run: python benchmarks/experiments/verify_retry/ladder.py [N]
Embeds N random identity payloads (seeded) into samples/MR_small.dcm (64x64) and counts how much
stronger than the bundle's target each had to be to read back (0, 1.5, 3, 4.5 dB) or that it failed.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np

from medsec_edge.runtime.io.readers import read_image
from medsec_edge.runtime.pipeline import load_watermarker, verified_embedding

REPO = Path(__file__).resolve().parents[3]


def main(n: int = 3000) -> dict:
    watermarker, _ = load_watermarker(threads=1)
    image = read_image(REPO / "samples" / "MR_small.dcm")
    rng = np.random.default_rng(7)
    counts: collections.Counter = collections.Counter()
    for _ in range(n):
        payload = rng.bytes(8)
        first = watermarker.embed(image, payload, kind="identity")
        embedded, _, ok = verified_embedding(watermarker, image, payload, "identity", first)
        counts[round(watermarker.target_psnr_db - embedded.target_psnr_db, 1) if ok else "failed"] += 1
    return dict(counts)


if __name__ == "__main__":
    print(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000))
