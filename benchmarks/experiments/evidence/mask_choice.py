"""How the fingerprint mask's constants were chosen (issue 9): validation frames only.

Real frames of the validation split (``train/real_data.py``, >= 128 px, grey), five manipulation
families of ``evaluation/manipulations.py`` at 32, 48 and 64 px; for the edits the check flags, the
mean IoU of ``pixel_mask`` against the true mask for each setting of ``mask_z`` (a pixel whose
interpolated z reaches it), ``mask_low`` (hysteresis share of the threshold) and ``mask_fraction``
(share of the region's peak residual). Run:

    OPENBLAS_NUM_THREADS=1 python benchmarks/experiments/evidence/mask_choice.py

Output of the run behind the defaults (558 flagged edits): the half-height rule alone (no z, no
hysteresis, 0.5) 0.413; mask_z 5, mask_low 0.4, mask_fraction 0.3: 0.760 (the best of the grid).
"""

import itertools
from dataclasses import replace

import numpy as np

from medsec_edge.evaluation.manipulations import manipulate
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import stored_range
from medsec_edge.runtime.tamper.fingerprint import compute_fingerprint
from medsec_edge.runtime.tamper.scoring import DEFAULT_PARAMS, pixel_mask, score_displays
from medsec_edge.train.real_data import real_frames


def main() -> None:
    rng = np.random.default_rng(11)
    frames = [f for f in real_frames("val", per_group=12) if not f.image.meta.is_colour
              and min(f.image.shape_hw) >= 128]
    cases = []
    for f in frames:
        image = f.image
        frame = image.frames()[0]
        value_range = stored_range(image.meta, frame.dtype)
        fp = compute_fingerprint(image)
        to_display = fp.windows[0].to_display_window().to_display
        for kind in ("inject_lesion", "remove_lesion", "copy_move", "local_contrast", "grow_structure"):
            for size in (32, 48, 64):
                try:
                    edit = manipulate(frame, kind, rng, value_range=value_range, size=size)
                except UsageError:  # no site for this family on this frame
                    continue
                result = score_displays(fp, [to_display(edit.pixels)])
                if result.tampered:
                    cases.append((fp, result, edit.mask))
    print(f"{len(cases)} flagged edits")
    for mask_z, mask_low, fraction in itertools.product((3, 5, 8, 1e9), (0.4, 1.0), (0.3, 0.5)):
        params = replace(DEFAULT_PARAMS, mask_z=mask_z, mask_low=mask_low, mask_fraction=fraction)
        ious = []
        for fp, result, truth in cases:
            mask = pixel_mask(result, 0, fp.cell, truth.shape, params)
            ious.append((mask & truth).sum() / max((mask | truth).sum(), 1))
        print(f"mask_z {mask_z:g} mask_low {mask_low} mask_fraction {fraction}: mean IoU {np.mean(ious):.3f}")


if __name__ == "__main__":
    main()
