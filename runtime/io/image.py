"""The in-memory image every stage works on, and the display window that defines "visible".

Layer: runtime. Pixels stay at their native dtype and sign (DESIGN.md, Images); the display
window is the single definition used by the watermark, the measures and the evaluation, so the
number we report (PSNR_window) is the one the watermark was shaped for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

COLOUR_PHOTOMETRICS = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")


@dataclass(frozen=True)
class ImageMeta:
    """What gives the pixel values their meaning; contains no patient data."""

    bits_stored: int
    signed: bool
    photometric: str = "MONOCHROME2"
    slope: float = 1.0
    intercept: float = 0.0
    window: tuple[float, float] | None = None  # (center, width) in modality units
    modality: str | None = None
    image_id: str = ""  # short hash of the SOP Instance UID or of the file bytes
    source_format: str = "npy"  # dicom, png, tiff, jpeg, npy

    @property
    def is_colour(self) -> bool:
        return self.photometric in COLOUR_PHOTOMETRICS


@dataclass(frozen=True)
class MedicalImage:
    """Pixels at native depth plus metadata.

    ``pixels`` layout: (H, W) grey, (F, H, W) grey multi-frame, (H, W, 3) colour,
    (F, H, W, 3) colour multi-frame. Colour is RGB in memory (YBR is converted on read).
    ``dataset`` is the pydicom Dataset for DICOM inputs (kept to write every attribute back).
    """

    pixels: np.ndarray
    meta: ImageMeta
    path: Path | None = None
    dataset: Any = field(default=None, repr=False, compare=False)

    @property
    def n_frames(self) -> int:
        grey_2d = not self.meta.is_colour and self.pixels.ndim == 2
        colour_3d = self.meta.is_colour and self.pixels.ndim == 3
        return 1 if (grey_2d or colour_3d) else int(self.pixels.shape[0])

    def frames(self) -> list[np.ndarray]:
        """Every frame as its own array (views, not copies)."""
        if self.n_frames == 1 and self.pixels.ndim == (3 if self.meta.is_colour else 2):
            return [self.pixels]
        return [self.pixels[i] for i in range(self.pixels.shape[0])]

    @property
    def shape_hw(self) -> tuple[int, int]:
        frame = self.frames()[0]
        return int(frame.shape[0]), int(frame.shape[1])


def stored_range(meta: ImageMeta, dtype: np.dtype) -> tuple[float, float]:
    """The values a pixel may take: BitsStored and sign for integers, the data range is not used."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return (-np.inf, np.inf)
    bits = min(meta.bits_stored, dtype.itemsize * 8)
    if meta.signed:
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (0, 2**bits - 1)


@dataclass(frozen=True)
class DisplayWindow:
    """Linear map from stored values to display values 0..255 (DICOM linear VOI function).

    ``gain`` is display units per stored unit (negative for MONOCHROME1, which is shown inverted),
    so a residual computed in display units maps back to stored units by dividing by it.
    """

    lower: float  # modality value shown as 0 (before inversion)
    upper: float  # modality value shown as 255
    slope: float
    intercept: float
    inverted: bool

    @property
    def gain(self) -> float:
        g = self.slope * 255.0 / (self.upper - self.lower)
        return -g if self.inverted else g

    def to_display(self, stored: np.ndarray) -> np.ndarray:
        """Stored values -> display values (float32, 0..255, clipped)."""
        modality = stored.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)
        display = (modality - np.float32(self.lower)) * np.float32(255.0 / (self.upper - self.lower))
        np.clip(display, 0.0, 255.0, out=display)
        if self.inverted:
            display = 255.0 - display
        return display


def display_window(meta: ImageMeta, frame: np.ndarray) -> DisplayWindow:
    """The image's first VOI window or, if absent, its 0.5-99.5 percentile range (DESIGN.md)."""
    inverted = meta.photometric == "MONOCHROME1"
    if meta.is_colour:
        top = 255.0 if frame.dtype == np.uint8 else float(2 ** min(meta.bits_stored, 16) - 1)
        return DisplayWindow(0.0, top, 1.0, 0.0, False)
    if meta.window is not None and meta.window[1] >= 1:
        center, width = meta.window
        lower = center - 0.5 - (width - 1) / 2
        upper = center - 0.5 + (width - 1) / 2
        if upper - lower < 1e-6:
            upper = lower + 1.0
        return DisplayWindow(lower, upper, meta.slope, meta.intercept, inverted)
    sample = frame[:: max(1, frame.shape[0] // 512), :: max(1, frame.shape[1] // 512)]
    modality = sample.astype(np.float64) * meta.slope + meta.intercept
    lower, upper = np.percentile(modality, [0.5, 99.5])
    if upper - lower < 1e-6:
        upper = lower + max(abs(meta.slope), 1e-6)
    return DisplayWindow(float(lower), float(upper), meta.slope, meta.intercept, inverted)


def luminance(rgb: np.ndarray) -> np.ndarray:
    """BT.601 luma of an RGB frame, float32 in the frame's own units."""
    rgb = rgb.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
