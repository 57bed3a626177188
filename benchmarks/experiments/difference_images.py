"""Side-by-side display-window difference images of held-out images, two bundles (issue 11).

    python benchmarks/experiments/difference_images.py BEFORE_BUNDLE AFTER_BUNDLE OUT.png NAME...

Each row: the image in its display window, then |marked - original| in display levels for each
bundle on one shared colour scale (0..8 levels), with that bundle's PSNR/SSIM in the window.
A fixed payload, so both rows carry the same bits.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np


def main(argv: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pydicom.data import get_testdata_file

    from medsec_edge.evaluation.measures import quality_row
    from medsec_edge.runtime.bundle import open_bundle
    from medsec_edge.runtime.io.image import MedicalImage, display_window, luminance
    from medsec_edge.runtime.io.readers import read_image
    from medsec_edge.runtime.watermark.models import BundleWatermarkModels
    from medsec_edge.runtime.watermark.watermarker import Watermarker

    before, after, out, names = Path(argv[0]), Path(argv[1]), Path(argv[2]), argv[3:]
    marks = {label: Watermarker(BundleWatermarkModels(open_bundle(path)))
             for label, path in (("before", before), ("after", after))}
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 4.2 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = read_image(get_testdata_file(name, download=False))
        frame = image.frames()[0]
        window = display_window(image.meta, frame)

        def display(pixels: np.ndarray) -> np.ndarray:
            grey = luminance(pixels) if image.meta.is_colour else pixels
            return np.clip(window.to_display(grey.astype(np.float64)), 0, 255)

        row[0].imshow(display(frame), cmap="gray", vmin=0, vmax=255)
        row[0].set_title(f"{name}\n{frame.shape[1]}x{frame.shape[0]}, display window", fontsize=10)
        for ax, (label, wm) in zip(row[1:], marks.items()):
            marked = wm.embed(image, b"issue-11").pixels
            q = quality_row(image, marked)
            first = MedicalImage(marked, image.meta).frames()[0]
            diff = np.abs(display(first) - display(frame))
            im = ax.imshow(diff, cmap="magma", vmin=0, vmax=8)
            ax.set_title(f"{label}: |difference|\nPSNR_w {q['psnr_window']:.2f} dB, SSIM_w {q['ssim_window']:.4f}",
                         fontsize=10)
        fig.colorbar(im, ax=row[2], fraction=0.046, label="display levels (of 255)")
        for ax in row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
