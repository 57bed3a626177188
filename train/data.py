"""Training images: synthetic phantoms and pydicom's own small test files, as display values.

Layer: train. pydicom-data images are the held-out evaluation set and are never read here; of
pydicom's own files, those that are copies or crops of pydicom-data images are excluded too
(shared/notes: examples_overlay.dcm is a crop of MR-SIEMENS-DICOM-WithOverlays.dcm; 693_J2KI and
J2K_pixelrep_mismatch are the 693 CT; JPEG2000 and JPGExtended are the NM in JPEG2000_UNC).
"""

from __future__ import annotations

import warnings

import numpy as np

TRAIN_DICOM_FILES = ("CT_small.dcm", "MR_small.dcm", "image_dfl.dcm")
HELD_OUT_LOOKALIKES = (
    "examples_overlay.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
)


def _smooth_noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """1/f^beta noise, zero mean, unit std: texture from fine grain to smooth anatomy."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    radius[0, 0] = 1.0
    spectrum = (rng.standard_normal(radius.shape) + 1j * rng.standard_normal(radius.shape)) / radius ** (beta / 2)
    spectrum[0, 0] = 0
    field = np.fft.irfft2(spectrum, s=(size, size))
    return (field / (field.std() + 1e-9)).astype(np.float32)


def _ellipse(size: int, cy: float, cx: float, ry: float, rx: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c, s = np.cos(angle), np.sin(angle)
    u = ((xx - cx) * c + (yy - cy) * s) / rx
    v = (-(xx - cx) * s + (yy - cy) * c) / ry
    return (u * u + v * v) <= 1.0


def phantom(rng: np.random.Generator, size: int = 192) -> np.ndarray:
    """One synthetic display image in 0..1, from a random family of medical-looking scenes."""
    kind = rng.integers(0, 5)
    img = np.zeros((size, size), np.float32)
    if kind in (0, 1):  # CT / MR slice: body ellipse, organs, dark saturated background
        body = _ellipse(size, size / 2 + rng.normal(0, 10), size / 2 + rng.normal(0, 10),
                        rng.uniform(0.3, 0.6) * size, rng.uniform(0.3, 0.6) * size, rng.uniform(0, np.pi))
        img[body] = rng.uniform(0.3, 0.6)
        for _ in range(rng.integers(2, 9)):
            organ = _ellipse(size, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(4, size / 4),
                             rng.uniform(4, size / 4), rng.uniform(0, np.pi)) & body
            img[organ] = rng.uniform(0.1, 1.1)
        img += rng.uniform(0.0, 0.15) * _smooth_noise(rng, size, rng.uniform(1.5, 3.0)) * body
        img += rng.uniform(0.0, 0.04) * _smooth_noise(rng, size, rng.uniform(0.0, 1.0))
    elif kind == 2:  # radiograph: smooth gradients, bright structures, collimation edges
        img = 0.5 + 0.25 * _smooth_noise(rng, size, 3.5)
        for _ in range(rng.integers(1, 5)):
            bone = _ellipse(size, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(5, 20),
                            rng.uniform(20, size), rng.uniform(0, np.pi))
            img[bone] += rng.uniform(0.1, 0.4)
        img += rng.uniform(0.0, 0.03) * _smooth_noise(rng, size, rng.uniform(0.5, 1.5))
        if rng.random() < 0.5:
            edge = int(rng.uniform(0, size / 3))
            img[:, :edge] = rng.choice([0.0, 1.0])
    elif kind == 3:  # ultrasound: speckle inside a sector, black outside
        speckle = np.abs(_smooth_noise(rng, size, rng.uniform(0.5, 1.5)))
        tissue = 0.3 + 0.2 * _smooth_noise(rng, size, 3.0)
        img = tissue * speckle * rng.uniform(0.5, 1.0)
        yy, xx = np.mgrid[0:size, 0:size]
        angle = np.arctan2(xx - size / 2, yy + size * rng.uniform(0.0, 0.3))
        img[np.abs(angle) > rng.uniform(0.4, 0.9)] = 0.0
    else:  # plain texture, any contrast
        img = 0.5 + rng.uniform(0.02, 0.3) * _smooth_noise(rng, size, rng.uniform(0.5, 3.5))
    # A random window: sometimes narrow (clipping a lot), sometimes wide (low contrast).
    lo, hi = np.percentile(img, [rng.uniform(0, 20), rng.uniform(80, 100)])
    if hi - lo < 1e-3:
        hi = lo + 1.0
    img = (img - lo) / (hi - lo) * rng.uniform(0.5, 1.0) + rng.uniform(-0.1, 0.2)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _display_of_dicom(name: str) -> np.ndarray:
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = dcmread(path).pixel_array.astype(np.float32)
    lo, hi = np.percentile(arr, [0.5, 99.5])
    return np.clip((arr - lo) / max(hi - lo, 1e-6), 0, 1)


def real_images() -> list[np.ndarray]:
    """pydicom's own training-safe files as display images (small ones upscaled 2-4x)."""
    out = []
    for name in TRAIN_DICOM_FILES:
        img = _display_of_dicom(name)
        while min(img.shape) < 192:
            img = np.kron(img, np.ones((2, 2), np.float32))
        out.append(img)
    return out


def real_working_images(split: str = "train", min_side: int = 160) -> list[np.ndarray]:
    """The real frames of ``train.real_data`` (never held out) as the runtime's watermark models see
    them: display window, luminance of colour, box-downsampled to the working resolution; frames
    smaller than ``min_side`` are upscaled 2x (nearest) until they are not, as ``real_images``."""
    from medsec_edge.runtime.io.image import display_window, luminance
    from medsec_edge.runtime.watermark.spec import working_factor
    from medsec_edge.runtime.watermark.sync import box_downsample
    from medsec_edge.train.real_data import real_frames

    out = []
    for frame in real_frames(split, max_side=2048):
        image = frame.image
        pixels = image.frames()[0]
        window = display_window(image.meta, pixels)
        grey = luminance(pixels) if image.meta.is_colour else pixels
        small = box_downsample(grey, working_factor(*pixels.shape[:2]))
        work = np.clip(window.to_display(small) / 255.0, 0.0, 1.0).astype(np.float32)
        while min(work.shape) < min_side:
            work = np.kron(work, np.ones((2, 2), np.float32))
        out.append(work)
    return out


class ImagePool:
    """A pool of training images refreshed as training goes, cropped to the training size.

    ``real_share`` of each batch comes from real images: pydicom's three training-safe files, plus
    the real frames of ``train.real_data`` when ``real_frames`` is set (the second release)."""

    def __init__(self, seed: int, size: int = 192, n_synthetic: int = 1500, real_share: float = 0.25,
                 real_frames: bool = False):
        self.rng = np.random.default_rng(seed)
        self.size = size
        self.real_share = real_share
        self.synthetic = [phantom(self.rng, size) for _ in range(n_synthetic)]
        self.real = real_images() + (real_working_images() if real_frames else [])

    def refresh(self, fraction: float = 0.1) -> None:
        for i in self.rng.choice(len(self.synthetic), int(len(self.synthetic) * fraction), replace=False):
            self.synthetic[i] = phantom(self.rng, self.size)

    def batch(self, n: int, crop: int) -> np.ndarray:
        out = np.empty((n, 1, crop, crop), np.float32)
        for i in range(n):
            if self.rng.random() < self.real_share:
                src = self.real[self.rng.integers(len(self.real))]
            else:
                src = self.synthetic[self.rng.integers(len(self.synthetic))]
            y = self.rng.integers(0, src.shape[0] - crop + 1)
            x = self.rng.integers(0, src.shape[1] - crop + 1)
            patch = src[y : y + crop, x : x + crop]
            if self.rng.random() < 0.5:
                patch = patch[:, ::-1]
            if self.rng.random() < 0.5:
                patch = patch.T
            out[i, 0] = patch
        return out
