"""What the tamper detector sees: one frame as normalised display values, padded to its stride.

Layer: runtime (numpy only). Training builds its inputs with these same functions, so the
detector sees at run time exactly what it was trained on. Values are the frame's display window
mapped to 0..1 but NOT clipped to it (only to -0.5..1.5): the noise in over- and under-exposed
parts is evidence too. MONOCHROME1 is not inverted (forensics does not care which way is bright).
Colour frames are reduced to their luma.
"""

from __future__ import annotations

import math

import numpy as np

from medsec_edge.runtime.io.image import ImageMeta, display_window, luminance
from medsec_edge.runtime.watermark.sync import box_downsample

STRIDE = 8  # the detector's total downsampling: inputs are padded to a multiple of it
MASK_STRIDE = 4  # the mask comes out at 1/4 of the input resolution
MAX_NATIVE_SIDE = 2048  # larger frames are box-averaged by an integer factor to about this side
CLIP = (-0.5, 1.5)


def detector_factor(shape_hw: tuple[int, int]) -> int:
    """Integer box-averaging factor that brings the longer side to at most MAX_NATIVE_SIDE."""
    return max(1, math.ceil(max(shape_hw) / MAX_NATIVE_SIDE))


def normalise(frame: np.ndarray, meta: ImageMeta) -> np.ndarray:
    """One frame (stored units) -> float32 (H, W): window lower -> 0, upper -> 1, clipped to CLIP."""
    window = display_window(meta, frame)
    grey = luminance(frame) if meta.is_colour else frame
    scale = np.float32(window.slope / (window.upper - window.lower))
    offset = np.float32((window.intercept - window.lower) / (window.upper - window.lower))
    x = grey.astype(np.float32) * scale + offset
    np.clip(x, CLIP[0], CLIP[1], out=x)
    return x


def detector_input(frame: np.ndarray, meta: ImageMeta) -> tuple[np.ndarray, int]:
    """(1, 1, H', W') float32 ready for the detector, and the box factor used (H' = ceil(H/f/8)*8).

    Padding is by edge replication, which the net sees as flat (no noise) and so as genuine.
    """
    x = normalise(frame, meta)
    factor = detector_factor(x.shape)
    if factor > 1:
        x = box_downsample(x, factor)
    h, w = x.shape
    pad_h, pad_w = (-h) % STRIDE, (-w) % STRIDE
    if pad_h or pad_w:
        x = np.pad(x, ((0, pad_h), (0, pad_w)), mode="edge")
    return np.ascontiguousarray(x[None, None], dtype=np.float32), factor
