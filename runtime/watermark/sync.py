"""Geometry of the repeated tile on the device: working resolution, lattice estimate, fold, shift search.

Layer: runtime (numpy only). The watermark is one tile repeated over the image, so whatever crop,
rotation or rescale the image went through, its signal map is still periodic on a lattice. The
lattice shows as peaks of the map's autocorrelation; once it is known, every pixel maps to a
position inside one tile and the whole map folds into one averaged tile, whose unknown origin is
a cyclic shift found by correlating with every readout pattern at every shift (one FFT each).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from medsec_edge.runtime.watermark.spec import TILE


def box_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks (edge-padded to a multiple of factor), float32."""
    image = np.asarray(image, dtype=np.float32)
    if factor == 1:
        return image
    h, w = image.shape
    ph, pw = (-h) % factor, (-w) % factor
    if ph or pw:
        image = np.pad(image, ((0, ph), (0, pw)), mode="edge")
    hh, ww = image.shape
    return image.reshape(hh // factor, factor, ww // factor, factor).mean(axis=(1, 3), dtype=np.float32)


def upsample_bilinear(small: np.ndarray, factor: int, height: int, width: int) -> np.ndarray:
    """Inverse of box_downsample's geometry: each small pixel is the centre of its block."""
    small = np.asarray(small, dtype=np.float32)
    if factor == 1:
        return small[:height, :width]

    def along(arr: np.ndarray, n_out: int, axis: int) -> np.ndarray:
        n_in = arr.shape[axis]
        pos = (np.arange(n_out, dtype=np.float32) + 0.5) / factor - 0.5
        pos = np.clip(pos, 0, n_in - 1)
        i0 = np.floor(pos).astype(np.intp)
        i1 = np.minimum(i0 + 1, n_in - 1)
        w1 = (pos - i0).astype(np.float32)
        a0 = np.take(arr, i0, axis=axis)
        a1 = np.take(arr, i1, axis=axis)
        shape = [1, 1]
        shape[axis] = n_out
        w1 = w1.reshape(shape)
        return a0 + (a1 - a0) * w1

    return along(along(small, height, 0), width, 1)


@dataclass(frozen=True)
class Lattice:
    """Columns are the two tile vectors in map pixels (x, y); nominal is 32 * identity."""

    basis: np.ndarray  # 2x2
    strength: float  # normalised autocorrelation at the lattice points (0 for the nominal guess)

    @property
    def period(self) -> float:
        return float(np.sqrt(abs(np.linalg.det(self.basis))))

    @property
    def angle_deg(self) -> float:
        return float(np.degrees(np.arctan2(self.basis[1, 0], self.basis[0, 0])))


NOMINAL = Lattice(np.eye(2) * TILE, 0.0)


@lru_cache(maxsize=16)
def _overlap(h: int, w: int) -> np.ndarray:
    """Pixels that overlap at each lag of a (2h, 2w) centred autocorrelation (never 0)."""
    ys = np.abs(np.arange(2 * h) - h)
    xs = np.abs(np.arange(2 * w) - w)
    return (np.maximum(h - ys, 1)[:, None] * np.maximum(w - xs, 1)[None, :]).astype(np.float64)


@lru_cache(maxsize=16)
def _ring(h: int, w: int, min_period: float, max_period: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat indices, then y and x lags, of the centred autocorrelation's lags whose length lies
    in [min_period, min(max_period, half the map)], on the half plane x > 0 (each lattice vector
    once, up to sign). Cached: the extractor sees a handful of map sizes."""
    ys, xs = np.mgrid[-h:h, -w:w]
    radius = np.hypot(ys, xs)
    ring = (radius >= min_period) & (radius <= min(max_period, 0.5 * min(h, w))) & (xs >= 0)
    idx = np.flatnonzero(ring)
    return idx, ys.ravel()[idx], xs.ravel()[idx]


def _autocorrelation(signal: np.ndarray) -> np.ndarray:
    """Normalised linear autocorrelation (zero-padded FFT), centred, with the image's shape x2."""
    sig = signal - signal.mean()
    h, w = sig.shape
    spec = np.fft.rfft2(sig, s=(2 * h, 2 * w))
    ac = np.fft.irfft2(spec * np.conj(spec), s=(2 * h, 2 * w))
    # Each lag is averaged over the pixels that overlap at that lag (unbiased estimate).
    ac = np.fft.fftshift(ac) / _overlap(h, w)
    return ac / (ac[h, w] + 1e-12)


def _subpixel_peak(ac: np.ndarray, y: int, x: int) -> tuple[float, float, float]:
    """Local maximum near (y, x) within 2 px, refined by a parabola on each axis."""
    h, w = ac.shape
    y0, y1, x0, x1 = max(1, y - 2), min(h - 1, y + 3), max(1, x - 2), min(w - 1, x + 3)
    if y0 >= y1 or x0 >= x1:
        return float(y), float(x), 0.0
    win = ac[y0:y1, x0:x1]
    iy, ix = np.unravel_index(np.argmax(win), win.shape)
    py, px = y0 + iy, x0 + ix
    c = ac[py, px]
    dy = 0.5 * (ac[py - 1, px] - ac[py + 1, px]) / (ac[py - 1, px] - 2 * c + ac[py + 1, px] - 1e-12)
    dx = 0.5 * (ac[py, px - 1] - ac[py, px + 1]) / (ac[py, px - 1] - 2 * c + ac[py, px + 1] - 1e-12)
    return py + float(np.clip(dy, -0.5, 0.5)), px + float(np.clip(dx, -0.5, 0.5)), float(c)


def estimate_lattices(signal: np.ndarray, min_period: float, max_period: float,
                      max_candidates: int = 3) -> list[Lattice]:
    """Candidate tile lattices from the autocorrelation of a signal map, best first."""
    h, w = signal.shape
    if min(h, w) < 2 * min_period:
        return []
    ac = _autocorrelation(signal)
    cy, cx = h, w
    ring_idx, ring_y, ring_x = _ring(h, w, float(min_period), float(max_period))
    scores = ac.ravel()[ring_idx].copy()
    candidates: list[Lattice] = []
    taken: list[np.ndarray] = []
    for _ in range(max_candidates * 4):
        if scores.size == 0:
            break
        k = int(np.argmax(scores))
        best = scores[k]
        if not np.isfinite(best) or best <= 0:
            break
        py, px = int(ring_y[k]) + cy, int(ring_x[k]) + cx
        # suppress the 7x7 neighbourhood of this peak
        scores[(np.abs(ring_y - ring_y[k]) <= 3) & (np.abs(ring_x - ring_x[k]) <= 3)] = -np.inf
        sy, sx, _ = _subpixel_peak(ac, int(py), int(px))
        v = np.array([sx - cx, sy - cy])
        # Fold the vector's angle into [-45, 45) degrees: a square lattice looks the same
        # every 90 degrees, and our attacks rotate by a few degrees only.
        for _turn in range(4):
            ang = np.degrees(np.arctan2(v[1], v[0]))
            if -45 <= ang < 45:
                break
            v = np.array([v[1], -v[0]])
        if any(np.linalg.norm(v - t) < 2.5 or np.linalg.norm(v + t) < 2.5 for t in taken):
            continue
        taken.append(v)
        basis = np.array([[v[0], -v[1]], [v[1], v[0]]])
        lattice = _refine(ac, basis, cy, cx)
        if lattice is not None:
            candidates.append(lattice)
        if len(candidates) >= max_candidates:
            break
    # Strongest first. A lattice's multiples and diagonals peak too, and so can structure inside
    # the tile: callers try several candidates and let the payload's check value decide.
    candidates.sort(key=lambda lat: -lat.strength)
    return candidates


def _refine(ac: np.ndarray, basis: np.ndarray, cy: int, cx: int) -> Lattice | None:
    """Least-squares lattice through the sub-pixel peaks near each predicted lattice point."""
    h, w = ac.shape
    rows, targets, values = [], [], []
    for n in range(-3, 4):
        for m in range(-3, 4):
            if n == 0 and m == 0:
                continue
            pred = basis @ np.array([n, m])
            y, x = int(round(cy + pred[1])), int(round(cx + pred[0]))
            if not (2 <= y < h - 2 and 2 <= x < w - 2):
                continue
            sy, sx, val = _subpixel_peak(ac, y, x)
            if val <= 0:
                continue
            rows.append((n, m))
            targets.append((sx - cx, sy - cy))
            values.append(val)
    if len(rows) < 2:
        return None
    nm = np.asarray(rows, dtype=float)
    xy = np.asarray(targets, dtype=float)
    wts = np.sqrt(np.asarray(values))
    sol, *_ = np.linalg.lstsq(nm * wts[:, None], xy * wts[:, None], rcond=None)
    fitted = sol.T  # columns: basis vectors
    if abs(np.linalg.det(fitted)) < 1e-6:
        return None
    return Lattice(fitted, float(np.mean(values[: min(len(values), 8)])))


def _fold_nominal(signal: np.ndarray) -> np.ndarray:
    """The axis-aligned, unscaled case by reshaping: most images are read this way."""
    h, w = signal.shape
    padded = np.pad(signal.astype(np.float32), ((0, (-h) % TILE), (0, (-w) % TILE)))
    sums = padded.reshape(padded.shape[0] // TILE, TILE, padded.shape[1] // TILE, TILE).sum(axis=(0, 2))
    pos = np.arange(TILE)
    rows = np.maximum((h - pos - 1) // TILE + 1, 0)
    cols = np.maximum((w - pos - 1) // TILE + 1, 0)
    return sums / np.maximum(rows[:, None] * cols[None, :], 1)


def fold(signal: np.ndarray, lattice: Lattice) -> np.ndarray:
    """Average the map into one TILE x TILE tile along the lattice (bilinear splatting)."""
    h, w = signal.shape
    if np.array_equal(lattice.basis, NOMINAL.basis):
        return _fold_nominal(signal)
    inv = np.linalg.inv(lattice.basis) * TILE
    ys, xs = np.mgrid[0:h, 0:w]
    u = (inv[0, 0] * xs + inv[0, 1] * ys).ravel() % TILE
    v = (inv[1, 0] * xs + inv[1, 1] * ys).ravel() % TILE
    vals = signal.ravel().astype(np.float64)
    u0 = np.floor(u).astype(np.intp)
    v0 = np.floor(v).astype(np.intp)
    fu, fv = u - u0, v - v0
    acc = np.zeros(TILE * TILE)
    cnt = np.zeros(TILE * TILE)
    for du, dv, wt in ((0, 0, (1 - fu) * (1 - fv)), (1, 0, fu * (1 - fv)), (0, 1, (1 - fu) * fv), (1, 1, fu * fv)):
        idx = ((v0 + dv) % TILE) * TILE + (u0 + du) % TILE
        acc += np.bincount(idx, weights=vals * wt, minlength=TILE * TILE)
        cnt += np.bincount(idx, weights=wt, minlength=TILE * TILE)
    return (acc / np.maximum(cnt, 1e-9)).reshape(TILE, TILE).astype(np.float32)


def readout_spectrum(patterns: np.ndarray) -> np.ndarray:
    """conj(rFFT) of the readout patterns, each scaled to unit norm: what ``read_bits`` takes.

    Half spectra in single precision: the correlation at every shift of 128 patterns is the
    extractor's most repeated step, and this makes it about 4x cheaper than full double FFTs."""
    patterns = np.asarray(patterns, dtype=np.float64)
    unit = patterns / (np.linalg.norm(patterns.reshape(len(patterns), -1), axis=1)[:, None, None] + 1e-12)
    return np.conj(np.fft.rfft2(unit.astype(np.float32))).astype(np.complex64)


def read_bits(folded: np.ndarray, patterns_fft: np.ndarray, gain: float) -> tuple[np.ndarray, float]:
    """Logits at the cyclic shift where the readout patterns respond most, and that response
    (its energy over the mean energy of all shifts: about 1.4 for a tile with no mark in it, the
    largest of 1024 chance values).

    ``patterns_fft`` is ``readout_spectrum(patterns)``, shape (bits, TILE, TILE // 2 + 1).
    """
    tile = np.asarray(folded, dtype=np.float32)
    tile = tile - tile.mean()
    tile = tile / (np.sqrt(np.mean(tile * tile)) + 1e-9)
    corr = np.fft.irfft2(np.fft.rfft2(tile)[None] * patterns_fft, s=(TILE, TILE), axes=(-2, -1))
    energy = np.einsum("kij,kij->ij", corr, corr)
    sy, sx = np.unravel_index(int(np.argmax(energy)), energy.shape)
    bits = patterns_fft.shape[0]
    logits = gain * corr[:, sy, sx] * np.sqrt(TILE * TILE / bits)
    return logits.astype(np.float32), float(energy[sy, sx] / (energy.mean() + 1e-12))
