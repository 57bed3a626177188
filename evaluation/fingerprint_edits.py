"""Content-fingerprint test material: benign steps on the original grid, and local edits with a
chosen size and displayed-mean change (issue 9). Shared by the learned fingerprint's training
(train/fingerprint_trainer.py) and the side-by-side measurement
(benchmarks/experiments/fingerprint_compare).

Layer: evaluation (numpy, PIL and OpenJPEG through :mod:`evaluation.attacks`).

A fingerprint is compared on the recorded geometry, so every benign step here returns the display
on the ORIGINAL grid (float32 0..255) plus a boolean ``valid`` map of the pixels that still carry
the original content:

- ``jpeg`` q70-95 of the 8-bit display, ``j2k`` 5:1-20:1 at native depth, ``lossless``;
- ``resize``: scale log-uniform 0.5-2x (antialiased bilinear) and back to the original size;
- ``noise``: Gaussian, sigma 0.2-0.8% of the whole frame's stored max - min;
- ``blur``: Gaussian sigma 0.5-1 px;
- ``crop``: 40-90% of the area kept, put back at its place (the watermark's sync or the record
  gives the offset); outside it ``valid`` is False and the pixels are the crop's edge replicated.

Edits (``local_edit``) work on the display (what the fingerprint sees): a region of equivalent
diameter ``size`` px (square for copy-move and splice, disc for an injected blob and removal,
ellipse for local contrast; a 1-2 px feather) whose new content is shifted so that the mean over
the region of (edited - original) display is exactly ``delta`` display levels (up to clipping at
0/255, reported as ``realised``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from medsec_edge.evaluation import attacks
from medsec_edge.runtime.io.image import DisplayWindow
from PIL import Image
from scipy import ndimage

BENIGN_STEPS = ("jpeg", "j2k", "lossless", "resize", "noise", "blur", "crop")
EDIT_KINDS = ("copy_move", "splice", "inject", "remove", "local_contrast")


def _resize_plane(plane: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size_hw[1], size_hw[0]), resample=Image.Resampling.BILINEAR), np.float32)


def _display_of(out: attacks.AttackedFrame, window: DisplayWindow) -> np.ndarray:
    if out.kind == "display8":
        return out.pixels.astype(np.float32)
    return window.to_display(out.pixels)


def benign_display(frame: np.ndarray, window: DisplayWindow, rng: np.random.Generator, step: str, *,
                   value_range: tuple[float, float] | None, frame_span: float | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(display float32 on the original grid, valid bool map, params) after benign ``step``.

    ``frame`` is one grey frame in stored units; ``frame_span`` the whole frame's max - min (the
    noise unit; default: this frame's)."""
    h, w = frame.shape
    valid = np.ones((h, w), bool)
    if step == "jpeg":
        q = int(rng.integers(70, 96))
        return _display_of(attacks.jpeg(frame, window, rng, quality=q), window), valid, {"quality": q}
    if step == "j2k":
        ratio = float(rng.uniform(5.0, 20.0))
        out = attacks.j2k(frame, window, rng, ratio=ratio, value_range=value_range)
        return _display_of(out, window), valid, {"ratio": round(ratio, 2)}
    if step == "lossless":
        return window.to_display(frame), valid, {}
    if step == "resize":
        scale = float(math.exp(rng.uniform(math.log(0.5), math.log(2.0))))
        small = attacks.resize(frame, window, rng, scale=scale, value_range=value_range).pixels
        back = _resize_plane(small.astype(np.float32), (h, w))
        back = attacks._to_stored(back, frame, value_range)
        return window.to_display(back), valid, {"scale": round(scale, 3)}
    if step == "noise":
        fraction = float(rng.uniform(0.002, 0.008))
        span = float(frame.max()) - float(frame.min()) if frame_span is None else float(frame_span)
        noisy = frame.astype(np.float64) + rng.normal(0.0, fraction * (span if span > 0 else 1.0), frame.shape)
        return window.to_display(attacks._to_stored(noisy, frame, value_range)), valid, {"fraction": round(fraction, 4)}
    if step == "blur":
        sigma = float(rng.uniform(0.5, 1.0))
        out = attacks.gaussian_blur(frame, window, rng, sigma=sigma, value_range=value_range)
        return window.to_display(out.pixels), valid, {"sigma": round(sigma, 3)}
    if step == "crop":
        area = float(rng.uniform(0.4, 0.9))
        y, x, ch, cw = attacks._crop_box((h, w), area, rng)
        disp = window.to_display(frame[y:y + ch, x:x + cw])
        full = np.pad(disp, ((y, h - y - ch), (x, w - x - cw)), mode="edge")
        valid[:] = False
        valid[y:y + ch, x:x + cw] = True
        return full.astype(np.float32), valid, {"area": round(area, 3), "box": (y, x, ch, cw)}
    raise ValueError(f"unknown benign step {step!r}: one of {', '.join(BENIGN_STEPS)}")


@dataclass(frozen=True)
class Edit:
    display: np.ndarray  # float32 0..255, the edited display
    mask: np.ndarray  # bool, where the display changed (alpha > 0)
    kind: str
    size: int
    delta: float  # the requested mean change, display levels (signed)
    realised: float  # mean over mask of (edited - original)


def _alpha(shape_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Alpha (0..1) on a (n, n) box of side n = size + 4 with a 1-2 px feather."""
    n = size + 4
    c = (n - 1) / 2.0
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    dy, dx = yy - c, xx - c
    feather = 1.5
    if shape_name == "square":
        half = size * math.sqrt(math.pi) / 4.0  # same area as a disc of diameter ``size``
        dist = half - np.maximum(np.abs(dy), np.abs(dx))
    elif shape_name == "disc":
        dist = size / 2.0 - np.hypot(dy, dx)
    else:  # ellipse of the same area, axis ratio 1-2, random angle
        ratio = float(rng.uniform(1.0, 2.0))
        a, b = size / 2.0 * math.sqrt(ratio), size / 2.0 / math.sqrt(ratio)
        a = min(a, c)
        t = float(rng.uniform(0, math.pi))
        u = dx * math.cos(t) + dy * math.sin(t)
        v = -dx * math.sin(t) + dy * math.cos(t)
        dist = (1.0 - np.sqrt((u / a) ** 2 + (v / b) ** 2)) * b
    return np.clip(dist / feather + 0.5, 0.0, 1.0)


def _site(display: np.ndarray, n: int, rng: np.random.Generator, avoid: tuple[int, int] | None = None
          ) -> tuple[int, int]:
    """Top-left of an n x n box away from saturated background (best of a few random draws)."""
    h, w = display.shape
    best, best_score = None, -1.0
    for _ in range(24):
        y, x = int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1))
        if avoid is not None and abs(y - avoid[0]) < n and abs(x - avoid[1]) < n:
            continue
        box = display[y:y + n, x:x + n]
        score = float(np.mean((box > 4) & (box < 251))) + 0.01 * min(float(box.std()), 20.0)
        if score > best_score:
            best, best_score = (y, x), score
        if score >= 1.0:
            break
    if best is None:
        best = (int(rng.integers(0, h - n + 1)), int(rng.integers(0, w - n + 1)))
    return best


def _texture_std(box: np.ndarray) -> float:
    high = box - ndimage.gaussian_filter(box, 1.5, mode="reflect")
    return float(1.4826 * np.median(np.abs(high - np.median(high))))


def local_edit(display: np.ndarray, rng: np.random.Generator, *, size: int, delta: float, kind: str,
               donor: np.ndarray | None = None) -> Edit:
    """Edit ``display`` (float 0..255) at a random site: ``kind`` of equivalent diameter ``size``
    whose mean over its mask changes the display by ``delta`` levels (signed)."""
    d = np.asarray(display, dtype=np.float64)
    h, w = d.shape
    shape_name = {"copy_move": "square", "splice": "square", "inject": "disc", "remove": "disc"}.get(kind, "ellipse")
    alpha = _alpha(shape_name, size, rng)
    n = alpha.shape[0]
    if n > min(h, w):
        raise ValueError(f"an edit of {size} px does not fit a {h}x{w} frame")
    y, x = _site(d, n, rng)
    region = d[y:y + n, x:x + n]
    if kind == "copy_move":
        sy, sx = _site(d, n, rng, avoid=(y, x))
        content = d[sy:sy + n, sx:sx + n]
    elif kind == "splice":
        src = d if donor is None else np.asarray(donor, dtype=np.float64)
        if min(src.shape) < n:
            src = d
        sy, sx = _site(src, n, rng)
        content = src[sy:sy + n, sx:sx + n]
        s_std, t_std = content.std(), region.std()
        content = (content - content.mean()) / (s_std if s_std > 0 else 1.0) * max(t_std, 1.0)
    elif kind == "inject":
        content = region.mean() + rng.standard_normal(region.shape) * _texture_std(region)
    elif kind == "remove":
        hole = alpha > 0
        u = region.copy()
        u[hole] = region[~hole].mean() if (~hole).any() else region.mean()
        for _ in range(200):
            avg = 0.25 * (np.roll(u, 1, 0) + np.roll(u, -1, 0) + np.roll(u, 1, 1) + np.roll(u, -1, 1))
            u[hole] = avg[hole]
        content = u + rng.standard_normal(u.shape) * _texture_std(region)
    elif kind == "local_contrast":
        pad = 8
        y0, x0 = max(y - pad, 0), max(x - pad, 0)
        big = d[y0:min(y + n + pad, h), x0:min(x + n + pad, w)]
        mean = ndimage.gaussian_filter(big, 4.0, mode="reflect")[y - y0:y - y0 + n, x - x0:x - x0 + n]
        k = float(rng.uniform(0.6, 0.85)) if rng.random() < 0.5 else float(rng.uniform(1.2, 1.6))
        content = mean + k * (region - mean)
    else:
        raise ValueError(f"unknown edit kind {kind!r}: one of {', '.join(EDIT_KINDS)}")
    inside = alpha > 0
    a_mean = float(alpha[inside].mean())
    # content shifted by o: mean over the mask of alpha * (content + o - region) == delta
    base = content - float((alpha * content)[inside].sum() / alpha[inside].sum()) + float(
        (alpha * region)[inside].sum() / alpha[inside].sum())
    offset = delta / a_mean
    for _ in range(4):  # clipping at 0/255 eats part of the shift: correct a few times
        new = np.clip(region * (1 - alpha) + (base + offset) * alpha, 0.0, 255.0)
        realised = float((new - region)[inside].mean())
        if abs(realised - delta) < 0.05 or abs(realised) < 1e-6:
            break
        offset *= delta / realised if realised * delta > 0 else 1.5
    out = d.copy()
    out[y:y + n, x:x + n] = new
    mask = np.zeros((h, w), bool)
    mask[y:y + n, x:x + n] = inside
    return Edit(out.astype(np.float32), mask, kind, int(size), float(delta), realised)


def covered_cells(mask: np.ndarray, cell: int, grid_hw: tuple[int, int]) -> np.ndarray:
    """Cells an edit covers: overlap with the mask >= min(half a cell, a quarter of the mask).

    The rule is the same for every cell size, so a 16 px edit counts 1-4 cells at 8 px cells and
    1-4 cells at 16 px cells (those holding at least a quarter of it)."""
    gh, gw = grid_hw
    h, w = mask.shape
    padded = np.zeros((gh * cell, gw * cell), np.float64)
    padded[:h, :w] = mask
    overlap = padded.reshape(gh, cell, gw, cell).sum(axis=(1, 3))
    need = min(0.5 * cell * cell, 0.25 * float(mask.sum()))
    return overlap >= max(need, 1.0)


def untouched_cells(mask: np.ndarray, cell: int, grid_hw: tuple[int, int], margin: int) -> np.ndarray:
    """Cells whose box grown by ``margin`` px holds no masked pixel (true negatives of an edit)."""
    grown = ndimage.binary_dilation(mask, iterations=margin) if margin > 0 else mask
    gh, gw = grid_hw
    h, w = mask.shape
    padded = np.zeros((gh * cell, gw * cell), bool)
    padded[:h, :w] = grown
    return ~padded.reshape(gh, cell, gw, cell).any(axis=(1, 3))


def valid_cells(valid: np.ndarray, cell: int, grid_hw: tuple[int, int], margin: int) -> np.ndarray:
    """Cells whose box grown by ``margin`` px lies entirely in ``valid`` (a crop's kept part)."""
    if valid.all():
        return np.ones(grid_hw, bool)
    return untouched_cells(~valid, cell, grid_hw, margin)
