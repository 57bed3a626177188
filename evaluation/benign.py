"""Benign processing a genuine image legitimately goes through, and laundering of manipulations.

Layer: evaluation (numpy/PIL/OpenJPEG through :mod:`evaluation.attacks`). Issue 3: the tamper
check must not flag these, and the same chains applied to a manipulated frame "launder" it. Shared
by detector training and evaluation so both draw from one definition.

Interface: ``benign(frame, window, rng, *, value_range, mask=None, name=None) -> BenignResult``.
``mask`` (the manipulation's ground truth, if any) follows every geometric step, so a laundered
sample keeps an exact mask. Parameters are drawn from the ranges of the issue:

- ``jpeg``: window to 8 bits, JPEG quality 70-95 -> display8;
- ``j2k``: lossy JPEG 2000 5:1-20:1 at native depth (container ratio, as in attacks);
- ``resize``: antialiased bilinear, scale log-uniform 0.5-2x (not resized back);
- ``rot_flip``: a 90/180/270 degree rotation or a horizontal/vertical flip;
- ``crop``: keep 40-90% of the area;
- ``noise``: Gaussian, sigma 0.2-0.8% of the frame's max - min;
- ``blur``: a mild global Gaussian blur, sigma 0.5-1 px (the watermark core's moderate tier has
  blur1; a whole-image blur is a display or reconstruction choice, not a local edit);
- ``lossless``: a lossless re-encode, which gives back the same pixels (kept so that reports
  count it and a regression in our readers would show).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from medsec_edge.evaluation import attacks
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import DisplayWindow


@dataclass(frozen=True)
class BenignResult:
    """``pixels`` is stored units (``kind='stored'``) or an 8-bit display (``'display8'``)."""

    pixels: np.ndarray
    kind: str
    mask: np.ndarray | None
    name: str
    params: dict


def _mask_resize(mask: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.float32), mode="F")
    out = np.asarray(img.resize((shape_hw[1], shape_hw[0]), resample=Image.Resampling.BILINEAR))
    return out >= 0.5


def _jpeg(frame, window, rng, value_range, mask):
    q = int(rng.integers(70, 96))
    return attacks.jpeg(frame, window, rng, quality=q), mask, {"quality": q}


def _j2k(frame, window, rng, value_range, mask):
    ratio = float(rng.uniform(5.0, 20.0))
    return attacks.j2k(frame, window, rng, ratio=ratio, value_range=value_range), mask, {"ratio": round(ratio, 2)}


def _resize(frame, window, rng, value_range, mask):
    scale = float(math.exp(rng.uniform(math.log(0.5), math.log(2.0))))
    h, w = frame.shape[:2]
    if min(h, w) * scale < 32:
        scale = 32.0 / min(h, w)
    out = attacks.resize(frame, window, rng, scale=scale, value_range=value_range)
    new_mask = None if mask is None else _mask_resize(mask, out.pixels.shape[:2])
    return out, new_mask, {"scale": round(scale, 3)}


_ROT_FLIPS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "flip_lr": lambda a: a[:, ::-1],
    "flip_ud": lambda a: a[::-1],
}


def _rot_flip(frame, window, rng, value_range, mask):
    op = list(_ROT_FLIPS)[int(rng.integers(len(_ROT_FLIPS)))]
    fn = _ROT_FLIPS[op]
    out = attacks.AttackedFrame(np.ascontiguousarray(fn(frame)), "stored")
    return out, None if mask is None else np.ascontiguousarray(fn(mask)), {"op": op}


def _crop(frame, window, rng, value_range, mask):
    area = float(rng.uniform(0.4, 0.9))
    y, x, ch, cw = attacks._crop_box(frame.shape[:2], area, rng)
    out = attacks.AttackedFrame(frame[y : y + ch, x : x + cw].copy(), "stored")
    return out, None if mask is None else mask[y : y + ch, x : x + cw].copy(), {"area": round(area, 3)}


def _noise(frame, window, rng, value_range, mask):
    fraction = float(rng.uniform(0.002, 0.008))
    out = attacks.gaussian_noise(frame, window, rng, fraction=fraction, value_range=value_range)
    return out, mask, {"fraction": round(fraction, 4)}


def _blur(frame, window, rng, value_range, mask):
    sigma = float(rng.uniform(0.5, 1.0))
    out = attacks.gaussian_blur(frame, window, rng, sigma=sigma, value_range=value_range)
    return out, mask, {"sigma": round(sigma, 3)}


def _lossless(frame, window, rng, value_range, mask):
    return attacks.AttackedFrame(frame.copy(), "stored"), mask, {}


BENIGN: dict[str, Callable] = {
    "jpeg": _jpeg,
    "j2k": _j2k,
    "resize": _resize,
    "rot_flip": _rot_flip,
    "crop": _crop,
    "noise": _noise,
    "blur": _blur,
    "lossless": _lossless,
}


def benign(
    frame: np.ndarray,
    window: DisplayWindow,
    rng: np.random.Generator,
    *,
    value_range: tuple[float, float],
    mask: np.ndarray | None = None,
    name: str | None = None,
) -> BenignResult:
    """Apply the benign step ``name`` (or one drawn at random) to one frame; the mask follows."""
    if name is None:
        name = list(BENIGN)[int(rng.integers(len(BENIGN)))]
    fn = BENIGN.get(name)
    if fn is None:
        raise UsageError(f"unknown benign step {name!r}: expected one of {', '.join(BENIGN)}")
    if mask is not None and mask.shape != frame.shape[:2]:
        raise UsageError(f"mask shape {mask.shape} does not match the frame {frame.shape[:2]}")
    # A crop may cut the manipulated region away (an empty mask): the caller decides what then.
    out, new_mask, params = fn(frame, window, rng, value_range, mask)
    return BenignResult(out.pixels, out.kind, new_mask, name, params)
