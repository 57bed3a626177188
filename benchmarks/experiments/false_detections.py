"""False detections of the default bundle: random code words and real unmarked reads (issue 11).

    python benchmarks/experiments/false_detections.py [--random 100000] [--passes 4]

1. ``--random`` vectors of 128 Gaussian logits through the payload codec (the decision the
   extractor makes for every lattice candidate it tries), and ``--lists`` more through the Chase
   list decoder (255 errors-only attempts each, made once per read that looks marked): how many
   decode as a watermark.
2. Every held-out pydicom-data image, unmarked, through every attack of the evaluation,
   ``--passes`` times with different random crops and noise, read by the full extractor (nominal
   read, presence gate, lattice search): how many report ``found``, and how fast the answer came.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random", type=int, default=100_000)
    parser.add_argument("--lists", type=int, default=2_000)
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from tqdm import tqdm

    from medsec_edge.evaluation.attacks import ATTACKS, attack_image
    from medsec_edge.evaluation.commands import held_out_images
    from medsec_edge.evaluation.held_out import read_held_out
    from medsec_edge.runtime.pipeline import load_watermarker

    wm, _ = load_watermarker(threads=2)
    rng = np.random.default_rng(args.seed)
    found_random = 0
    for _ in tqdm(range(args.random), desc="random code words", mininterval=5):
        found_random += wm.codec.decode(rng.standard_normal(128).astype(np.float32)).found
    found_lists = 0
    for _ in tqdm(range(args.lists), desc="random lists", mininterval=5):
        found_lists += wm.codec.decode_list(rng.standard_normal(128).astype(np.float32)).found
    loaded, _, _ = read_held_out([held_out_images([], True)[0]])
    reads, found_real, gated, times = 0, 0, 0, []
    for _ in range(args.passes):
        for path, image in tqdm(loaded, desc="real unmarked reads", mininterval=5):
            for name in ATTACKS:
                attacked = attack_image(image, name, rng)
                t0 = time.perf_counter()
                ex = wm.extract(attacked)
                times.append((time.perf_counter() - t0) * 1e3)
                reads += 1
                found_real += ex.found
                gated += ex.presence is not None and ex.presence < wm.presence_threshold
    print(json.dumps({
        "random_code_words": args.random, "random_found": int(found_random),
        "random_lists": args.lists, "random_list_attempts": args.lists * 255, "random_lists_found": int(found_lists),
        "real_unmarked_reads": reads, "real_found": int(found_real),
        "answered_by_presence_gate": int(gated), "presence_threshold": wm.presence_threshold,
        "read_ms_p50": round(float(np.percentile(times, 50)), 1),
        "read_ms_p90": round(float(np.percentile(times, 90)), 1),
        "read_ms_max": round(float(np.max(times)), 1),
    }, indent=1))


if __name__ == "__main__":
    main()
