import numpy as np, time
from medsec_edge.runtime.pipeline import load_watermarker
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage
wm, _ = load_watermarker()
rng = np.random.default_rng(2026)
found = 0; n = 2000; t = time.time()
for i in range(n):
    h, w = int(rng.integers(64, 257)), int(rng.integers(64, 257))
    px = rng.integers(0, 4096, (h, w)).astype(np.uint16)
    if i % 2:
        px = np.cumsum(px, axis=int(rng.integers(0, 2))).astype(np.uint16)
    found += wm.extract(MedicalImage(px, ImageMeta(bits_stored=12, signed=False, source_format="npy"))).found
print(f"{n} random images (64-256 px, white and integrated noise) through the full extractor: {found} found, {time.time()-t:.0f} s")
