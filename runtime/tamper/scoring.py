"""Fingerprint comparison that tells benign processing from a local edit (issue 9); runtime layer.

A recorded fingerprint (``fingerprint.py``) holds Gaussian-weighted display means at cell centres.
The image under test may have been re-encoded, exported to 8 bits, noised, blurred, resized or
cropped: all of that is benign. The comparison therefore goes in four steps:

1. **Align** (``align``): the same geometry is the identity; otherwise the test frame's own cell
   means are matched against the recorded grid over scales 0.5-2x and every offset (normalised
   cross-correlation of the low-resolution grids, FFT), then refined to a fraction of a cell.
2. **Resample**: the test frame's display is averaged with the recorded Gaussian, scaled to the
   test geometry, at the recorded cell centres mapped into it (``cell_means_at``); a cell whose
   support leaves the test frame is not covered (a crop) and never scored.
3. **Explain the global change** (``residuals``): the deviation ``test - recorded`` is fitted,
   robustly (Huber IRLS), by what global benign processing does: an affine-quadratic change of
   display level (window, gamma, clipping bias under noise), a blur (the recorded grid's
   Laplacian) and a residual shift (its x and y gradients). A local edit moves a few cells and
   does not fit that; it stays in the residual.
4. **Normalise and pool**: each residual is divided by the scale benign processing leaves there:
   a floor, the image's own robust residual scale (noise), growing with the local gradient of
   the recorded grid and the test frame's fine detail (edges and fine structure move most under
   JPEG, blur and resampling). The score of an image is its largest 2 x 2 block z (the signed sum
   over a block divided by 2: an edit of two cells or more adds up coherently, noise does not).

The constants of ``ScoringParams`` are calibrated on real validation images (never pydicom-data):
``python -m medsec_edge.calibration.fingerprint_scoring`` prints them and its figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from medsec_edge.runtime.tamper.fingerprint import CellRegion, Fingerprint

__all__ = [
    "DEFAULT_PARAMS",
    "Alignment",
    "FingerprintScore",
    "ScoringParams",
    "align",
    "cell_means_at",
    "pixel_mask",
    "score_displays",
]


@dataclass(frozen=True)
class ScoringParams:
    """What benign processing leaves per cell, and where a deviation becomes an edit.

    The defaults are calibrated on real images of ``train/real_data.py`` (176 frames of both
    splits: CT, MR, XA, DX, US, RT; CTs shown with clinical windows 60% of the time; 1567
    header-kept and 1199 header-stripped benign cases), never pydicom-data, by ``python -m
    medsec_edge.calibration.fingerprint_scoring --split all --per-group 12 --max-frames 260 --out
    runs/fp-cal-all3``: ``threshold`` is the 99.9% quantile of the header-kept benign scores,
    ``registry_threshold`` the 99% quantile of the exports'; the gains maximise the detected 16-32 px
    edits of 3% contrast in both settings.
    """

    floor: float = 0.8  # display levels: the least residual scale (quantisation, re-encoding)
    gradient_gain: float = 0.02  # extra scale per display level of |gradient| between neighbour cells
    curvature_gain: float = 0.08  # extra scale per level of fine detail (test Laplacian x cell variance)
    texture_gain: float = 0.02  # extra scale per level of the test frame's local standard deviation
    clip_edge_gain: float = 20.0  # extra scale on the edge of a clipped area (half its pixels at a bound)
    threshold: float = 7.96  # on the image score (z), header kept: above it, tampered
    registry_threshold: float = 2.95  # the same for an export compared through the registry
    # the mask: chosen on validation frames with the manipulations of evaluation/manipulations.py
    # (mean IoU of flagged 32-64 px edits 0.413 with the half-height rule alone, 0.760 with these)
    mask_fraction: float = 0.3  # a region's pixels are those above this share of its peak residual,
    mask_z: float = 5.0  # or above this many residual scales
    mask_low: float = 0.4  # a region grows over blocks above this share of the threshold
    min_covered: int = 16  # fewer covered cells than this: nothing can be said


DEFAULT_PARAMS = ScoringParams()


@dataclass(frozen=True)
class Alignment:
    """Where the test frame sits on the recorded one: recorded pixel = offset + test pixel / scale."""

    scale: float
    offset_y: float
    offset_x: float
    match: float  # normalised cross-correlation of the grids at this alignment (1: identical)
    exact: bool  # same geometry, no search

    def to_dict(self) -> dict:
        return {"scale": round(self.scale, 4), "offset_y": round(self.offset_y, 2),
                "offset_x": round(self.offset_x, 2), "match": round(self.match, 4), "exact": self.exact}


@dataclass(frozen=True)
class FingerprintScore:
    """Per-frame residual z maps over the recorded grid and the image's verdict."""

    score: float
    tampered: bool
    alignment: Alignment
    z: np.ndarray = field(repr=False)  # frames x gh x gw, NaN where not covered
    residual: np.ndarray = field(repr=False)  # display levels, NaN where not covered
    score_maps: np.ndarray = field(repr=False, default=None)  # frames x gh x gw: max(|cell z|, |block z|)
    alignments: tuple[Alignment, ...] = ()
    covered_share: float = 1.0
    noise_scale: float = 0.0  # the image's robust residual scale, display levels
    regions: tuple[CellRegion, ...] = ()
    reason: str = ""


# --------------------------------------------------------------------------------------------
# resampling


def _centres(n_pixels: int, cell: int) -> np.ndarray:
    """Recorded cell centres along one axis, as ``fingerprint._gaussian_weights`` places them."""
    n_cells = -(-n_pixels // cell)
    return np.minimum((np.arange(n_cells, dtype=np.float64) + 0.5) * cell - 0.5, n_pixels - 1)


def _weights_at(n_pixels: int, centres: np.ndarray, sigma: float, *, second: bool = False):
    """(rows normalised Gaussian weights, whether each centre's 3-sigma support is inside), and
    with ``second`` also the weights of the Gaussian's second derivative (same normalisation)."""
    x = np.arange(n_pixels, dtype=np.float64)
    d = (x[None, :] - centres[:, None]) / sigma
    w = np.exp(-0.5 * d * d)
    w[np.abs(d) > 3.0] = 0.0
    total = w.sum(axis=1, keepdims=True)
    inside = (centres - 3 * sigma >= -0.5) & (centres + 3 * sigma <= n_pixels - 0.5)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    if not second:
        return w.astype(np.float32), inside & (total[:, 0] > 0)
    w2 = w * (d * d - 1.0) / (sigma * sigma)
    return w.astype(np.float32), inside & (total[:, 0] > 0), w2.astype(np.float32)


class SmoothedFrame:
    """A test frame Gaussian-smoothed once per sigma, sampled anywhere by bilinear interpolation.

    The frame is box-averaged by ``b`` first (so the dense smoothing matrices stay small) and
    smoothed with the sigma that makes box plus Gaussian the wanted one; sampling a field this
    smooth bilinearly costs far less error than a display level. Alignment evaluates hundreds of
    candidate placements: each is then a gather, not two products with the whole frame.
    """

    def __init__(self, display: np.ndarray) -> None:
        self.display = np.asarray(display, dtype=np.float32)
        self._cache: dict[float, tuple[np.ndarray, int]] = {}
        self._squares: SmoothedFrame | None = None
        self._clipped: SmoothedFrame | None = None

    def clipped_share(self, sigma: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Gaussian-weighted share of pixels at the display's bounds (0 or 255) around each point."""
        if self._clipped is None:
            self._clipped = SmoothedFrame(((self.display <= 0.5) | (self.display >= 254.5)).astype(np.float32))
        return np.clip(self._clipped.sample(sigma, ys, xs), 0.0, 1.0)

    def local_std(self, sigma: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Gaussian-weighted standard deviation of the frame around ``ys`` x ``xs``."""
        if self._squares is None:
            self._squares = SmoothedFrame(self.display * self.display)
        mean = self.sample(sigma, ys, xs)
        return np.sqrt(np.maximum(self._squares.sample(sigma, ys, xs) - mean * mean, 0.0))

    def field(self, sigma: float) -> tuple[np.ndarray, int]:
        key = round(sigma * 8) / 8  # 1/8 px steps: a sigma off by that changes a mean far below a level
        if key not in self._cache:
            b = max(1, int(key // 2))
            h, w = self.display.shape
            hb, wb = h // b, w // b
            small = self.display[: hb * b, : wb * b].reshape(hb, b, wb, b).mean(axis=(1, 3))
            s2 = max(key * key - (b * b - 1) / 12.0, 0.25) ** 0.5 / b
            wy, _ = _weights_at(hb, np.arange(hb, dtype=np.float64), s2)
            wx, _ = _weights_at(wb, np.arange(wb, dtype=np.float64), s2)
            if len(self._cache) >= 4:  # bounded memory: alignment visits a few sigmas at a time
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = ((wy @ small) @ wx.T, b)
        return self._cache[key]

    def laplacian(self, sigma: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Laplacian of the smoothed frame (levels per px^2) at ``ys`` x ``xs``."""
        f, b = self.field(sigma)
        p = np.pad(f, 1, mode="edge")
        lap = (p[2:, 1:-1] + p[:-2, 1:-1] + p[1:-1, 2:] + p[1:-1, :-2] - 4 * f) / (b * b)
        return self._bilinear(lap, b, ys, xs)

    def sample(self, sigma: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """Smoothed values at full-resolution coordinates ``ys`` (column) x ``xs`` (row)."""
        f, b = self.field(sigma)
        return self._bilinear(f, b, ys, xs)

    @staticmethod
    def _bilinear(f: np.ndarray, b: int, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        gy = np.clip((ys + 0.5) / b - 0.5, 0, f.shape[0] - 1)
        gx = np.clip((xs + 0.5) / b - 0.5, 0, f.shape[1] - 1)
        y0 = np.minimum(np.floor(gy).astype(int), f.shape[0] - 2) if f.shape[0] > 1 else np.zeros(gy.shape, int)
        x0 = np.minimum(np.floor(gx).astype(int), f.shape[1] - 2) if f.shape[1] > 1 else np.zeros(gx.shape, int)
        ty = (gy - y0)[:, None]
        tx = (gx - x0)[None, :]
        y1 = np.minimum(y0 + 1, f.shape[0] - 1)
        x1 = np.minimum(x0 + 1, f.shape[1] - 1)
        top = f[y0][:, x0] * (1 - tx) + f[y0][:, x1] * tx
        bottom = f[y1][:, x0] * (1 - tx) + f[y1][:, x1] * tx
        return (top * (1 - ty) + bottom * ty).astype(np.float32)


def cell_means_at(display: np.ndarray | SmoothedFrame, cell: int, recorded_hw: tuple[int, int],
                  alignment: Alignment, *, laplacian: bool = False):
    """The test display averaged like the recorded cells, at their centres mapped into it.

    Returns (means gh x gw float32, covered bool gh x gw), and with ``laplacian`` also the
    Laplacian of the smoothed test frame there (levels per px^2: what a blur changes a mean by,
    times half its variance), the frame's standard deviation under each cell's Gaussian
    (texture and edges: where lossy coding leaves most error) and the share of its pixels at the
    display's bounds there (a cell on the edge of a clipped area moves when a blur or resampling
    of the stored values shifts that edge). With an exact alignment the weights are the recorded ones (borders
    normalised alike), so every cell is covered; otherwise a cell is covered when its 3-sigma
    support lies inside the test frame.
    """
    cy = _centres(recorded_hw[0], cell)
    cx = _centres(recorded_hw[1], cell)
    sigma = cell / 2.0
    if alignment.exact:
        plain = display.display if isinstance(display, SmoothedFrame) else np.asarray(display, dtype=np.float32)
        h, w = plain.shape
        covered = np.ones((cy.size, cx.size), dtype=bool)
        if not laplacian:
            wy, _ = _weights_at(h, cy, sigma)
            wx, _ = _weights_at(w, cx, sigma)
            return (wy @ plain) @ wx.T, covered
        wy, _, wy2 = _weights_at(h, cy, sigma, second=True)
        wx, _, wx2 = _weights_at(w, cx, sigma, second=True)
        rows, rows2 = wy @ plain, wy2 @ plain
        means = rows @ wx.T
        std = np.sqrt(np.maximum((wy @ (plain * plain)) @ wx.T - means * means, 0.0))
        clipped = (wy @ ((plain <= 0.5) | (plain >= 254.5)).astype(np.float32)) @ wx.T
        return means, covered, rows2 @ wx.T + rows @ wx2.T, std, np.clip(clipped, 0.0, 1.0)
    frame = display if isinstance(display, SmoothedFrame) else SmoothedFrame(display)
    h, w = frame.display.shape
    s = alignment.scale
    ys = (cy - alignment.offset_y) * s
    xs = (cx - alignment.offset_x) * s
    reach = 3 * sigma * s
    iy = (ys - reach >= -0.5) & (ys + reach <= h - 0.5)
    ix = (xs - reach >= -0.5) & (xs + reach <= w - 0.5)
    covered = iy[:, None] & ix[None, :]
    if not laplacian:
        return frame.sample(sigma * s, ys, xs), covered
    # per test px^2; in recorded px^2 (what the fit compares across images) times s^2
    return (frame.sample(sigma * s, ys, xs), covered, frame.laplacian(sigma * s, ys, xs) * (s * s),
            frame.local_std(sigma * s, ys, xs), frame.clipped_share(sigma * s, ys, xs))


# --------------------------------------------------------------------------------------------
# alignment


def _ncc_offsets(big: np.ndarray, small: np.ndarray) -> tuple[float, int, int]:
    """Best placement of ``small`` inside ``big`` (all offsets where it overlaps by >= half its
    area), by normalised cross-correlation over the overlap: (ncc, dy, dx) with big[dy+i, dx+j]
    ~ small[i, j]."""
    bh, bw = big.shape
    sh, sw = small.shape
    ph, pw = bh + sh, bw + sw
    fshape = (int(2 ** math.ceil(math.log2(ph))), int(2 ** math.ceil(math.log2(pw))))
    ones_b = np.ones_like(big)
    ones_s = np.ones_like(small)

    def corr(a, b):
        return np.fft.irfft2(np.fft.rfft2(a, fshape) * np.conj(np.fft.rfft2(b, fshape)), fshape)

    n = corr(ones_b, ones_s)
    sb = corr(big, ones_s)
    ss = corr(ones_b, small)
    sbb = corr(big * big, ones_s)
    sss = corr(ones_b, small * small)
    sbs = corr(big, small)
    with np.errstate(divide="ignore", invalid="ignore"):
        cov = sbs - sb * ss / n
        vb = sbb - sb * sb / n
        vs = sss - ss * ss / n
        ncc = cov / np.sqrt(np.maximum(vb, 1e-6) * np.maximum(vs, 1e-6))
    ncc[n < 0.5 * small.size - 0.5] = -np.inf
    ncc[~np.isfinite(ncc)] = -np.inf
    idx = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
    dy = idx[0] if idx[0] < bh else idx[0] - fshape[0]
    dx = idx[1] if idx[1] < bw else idx[1] - fshape[1]
    return float(ncc[idx]), int(dy), int(dx)


def _test_grid(display: np.ndarray, step: float) -> np.ndarray:
    """The test display box-averaged over ``step`` pixels (the recorded cell, scaled): cheap, and
    close enough to the recorded Gaussian means for a coarse search."""
    h, w = display.shape
    gh, gw = max(1, int(h // step)), max(1, int(w // step))
    img = Image.fromarray(np.ascontiguousarray(display[: int(gh * step), : int(gw * step)], dtype=np.float32),
                          mode="F")
    return np.asarray(img.resize((gw, gh), Image.Resampling.BOX), dtype=np.float64)


def _match_at(display: SmoothedFrame, recorded: np.ndarray, cell: int, recorded_hw, alignment: Alignment,
              ) -> float:
    means, covered = cell_means_at(display, cell, recorded_hw, alignment)
    if covered.sum() < 16:
        return -1.0
    a = means[covered].astype(np.float64)
    b = recorded[covered].astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else -1.0


def _refine(display: SmoothedFrame, recorded: np.ndarray, cell: int, recorded_hw, start: Alignment,
            iterations: int = 6) -> Alignment:
    """Gauss-Newton on (scale, offsets) with a photometric gain and bias: the grid at the current
    alignment is linearised by finite differences and the step that best explains the recorded
    grid is taken, while it improves the match (Lucas-Kanade on the cell grid)."""
    current = start
    best = _match_at(display, recorded, cell, recorded_hw, current)
    h_px, h_log = 0.25, 0.002
    for _ in range(iterations):
        base, covered = cell_means_at(display, cell, recorded_hw, current)
        probes = (Alignment(current.scale, current.offset_y + h_px, current.offset_x, 0.0, False),
                  Alignment(current.scale, current.offset_y, current.offset_x + h_px, 0.0, False),
                  Alignment(current.scale * math.exp(h_log), current.offset_y, current.offset_x, 0.0, False))
        cols, mask = [], covered.copy()
        for probe, h in zip(probes, (h_px, h_px, h_log)):
            moved, cov = cell_means_at(display, cell, recorded_hw, probe)
            mask &= cov
            cols.append((moved - base) / h)
        if mask.sum() < 16:
            break
        y = recorded[mask].astype(np.float64)
        a = np.stack([base[mask], np.ones(int(mask.sum()))] + [c[mask] for c in cols], axis=1).astype(np.float64)
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        gain = coef[0] if abs(coef[0]) > 1e-6 else 1.0
        # recorded ~ gain * (base + J step) + bias: the geometric step is coef[2:] / gain
        dy, dx, ds = (coef[2:] / gain).tolist()
        dy, dx = float(np.clip(dy, -cell, cell)), float(np.clip(dx, -cell, cell))
        ds = float(np.clip(ds, -0.05, 0.05))
        cand = Alignment(current.scale * math.exp(ds), current.offset_y + dy, current.offset_x + dx, 0.0, False)
        m = _match_at(display, recorded, cell, recorded_hw, cand)
        if m <= best + 1e-7:
            break
        current, best = cand, m
        if abs(dy) < 0.02 and abs(dx) < 0.02 and abs(ds) < 1e-4:
            break
    return Alignment(current.scale, current.offset_y, current.offset_x, best, False)


def align(recorded: np.ndarray, cell: int, recorded_hw: tuple[int, int], display: np.ndarray,
          *, scale_hint: float | None = None) -> Alignment | None:
    """Where ``display`` (one test frame, display levels) sits on the recorded frame.

    Same size: the identity. Otherwise a search over scales 0.5-2x (or around ``scale_hint``)
    and offsets at cell resolution by normalised cross-correlation of the grids, then a
    Gauss-Newton refinement of scale and offsets (``_refine``). None if nothing matches.
    """
    if tuple(display.shape) == tuple(recorded_hw):
        return Alignment(1.0, 0.0, 0.0, 1.0, True)
    rec = recorded.astype(np.float64)
    if scale_hint is not None:
        scales = scale_hint * np.exp(np.linspace(-0.06, 0.06, 5))
    else:
        scales = np.exp(np.linspace(math.log(0.45), math.log(2.2), 33))
    found = []
    for s in scales:
        grid = _test_grid(display, cell * s)
        if min(grid.shape) < 4:
            continue
        ncc, dy, dx = _ncc_offsets(rec, grid.astype(np.float64))
        if np.isfinite(ncc):
            found.append((ncc, float(s), dy, dx))
    if not found:
        return None
    frame = SmoothedFrame(display)
    best = None
    for ncc, s, dy, dx in sorted(found, reverse=True)[:2]:
        # the test grid's sample i sits at test pixel (i + 0.5) * cell * s - 0.5, i.e. recorded
        # pixel offset + that / s; the recorded cell dy + i sits at (dy + i + 0.5) * cell - 0.5
        off_y = (dy + 0.5) * cell - 0.5 - (0.5 * cell * s - 0.5) / s
        off_x = (dx + 0.5) * cell - 0.5 - (0.5 * cell * s - 0.5) / s
        refined = _refine(frame, recorded, cell, recorded_hw, Alignment(s, off_y, off_x, 0.0, False))
        if best is None or refined.match > best.match:
            best = refined
    return best


# --------------------------------------------------------------------------------------------
# residuals and scores


def _structure(recorded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient y, gradient x and Laplacian of the recorded grid (display levels per cell)."""
    padded = np.pad(recorded.astype(np.float64), 1, mode="edge")
    gy = (padded[2:, 1:-1] - padded[:-2, 1:-1]) / 2
    gx = (padded[1:-1, 2:] - padded[1:-1, :-2]) / 2
    lap = padded[2:, 1:-1] + padded[:-2, 1:-1] + padded[1:-1, 2:] + padded[1:-1, :-2] - 4 * padded[1:-1, 1:-1]
    return gy, gx, lap


def residuals(recorded: np.ndarray, test: np.ndarray, covered: np.ndarray,
              test_laplacian: np.ndarray | None = None) -> np.ndarray:
    """``test - recorded`` less its robust fit by global benign change (NaN where not covered).

    ``test_laplacian`` (from ``cell_means_at``) lets the fit explain a global blur or resampling
    at the pixel scale, where the grid's own Laplacian (cells 8 px apart) sees fine detail poorly.
    """
    rec = recorded.astype(np.float64)
    d = test.astype(np.float64) - rec
    out = np.full(rec.shape, np.nan)
    if not covered.any():
        return out
    gy, gx, lap = _structure(rec)
    v = rec / 255.0
    # level terms: a window change (1, v, v^2) and the bias noise leaves where the display clips
    # (a pixel below 0 or above 255 is shown at the bound, so a noisy dark region's mean rises):
    # smooth tails at the two ends, for noise of a few and of tens of levels
    columns = [np.ones_like(v), v, v * v, np.exp(-rec / 12), np.exp(-(255 - rec) / 12),
               np.exp(-rec / 40), np.exp(-(255 - rec) / 40), gy / 16, gx / 16, lap / 16]
    if test_laplacian is not None:
        columns.append(np.asarray(test_laplacian, dtype=np.float64))
    features = np.stack(columns, axis=-1)[covered]
    y = d[covered]
    if y.size < 4 * features.shape[1]:
        features = features[:, :1]
    weights = np.ones_like(y)
    coef = np.zeros(features.shape[1])
    # Huber first (a stable start), then Tukey's biweight: an edit covering a quarter of a small
    # frame gets weight zero instead of pulling the fit towards itself
    for iteration in range(6):
        sw = np.sqrt(weights)
        coef, *_ = np.linalg.lstsq(features * sw[:, None], y * sw, rcond=None)
        r = y - features @ coef
        scale = max(1.4826 * float(np.median(np.abs(r))), 0.25)
        a = np.abs(r)
        if iteration < 2:
            k = 1.5 * scale
            weights = np.where(a <= k, 1.0, k / np.maximum(a, 1e-12))
        else:
            u = a / (4.685 * scale)
            weights = np.where(u < 1.0, (1.0 - u * u) ** 2, 0.0)
            if weights.sum() < features.shape[1] * 4:
                break
    out[covered] = y - features @ coef
    return out


def _scale_map(recorded: np.ndarray, params: ScoringParams, test_laplacian: np.ndarray | None = None,
               cell: int = 8, test_std: np.ndarray | None = None,
               test_clipped: np.ndarray | None = None) -> np.ndarray:
    """Relative residual scale per cell: 1, more on edges (gradient) and fine detail (the test
    frame's pixel-scale Laplacian, in levels over a cell's variance, else the grid's)."""
    gy, gx, lap = _structure(recorded)
    grad = np.hypot(gy, gx)
    if test_laplacian is not None:
        lap = np.nan_to_num(np.asarray(test_laplacian, dtype=np.float64)) * (cell / 2.0) ** 2
    texture = 0.0 if test_std is None else params.texture_gain * np.nan_to_num(np.asarray(test_std, np.float64))
    clip_edge = 0.0
    if test_clipped is not None:  # 0 inside or outside a clipped area, 1 half way across its edge
        share = np.nan_to_num(np.asarray(test_clipped, np.float64))
        # only where the recorded image was near a display bound too: an edit that pushes pixels
        # into clipping must not excuse itself
        bound = np.pad((recorded <= 25.0) | (recorded >= 230.0), 1, mode="edge")
        near = np.zeros(recorded.shape, dtype=bool)
        for dy in range(3):
            for dx in range(3):
                near |= bound[dy:dy + recorded.shape[0], dx:dx + recorded.shape[1]]
        clip_edge = params.clip_edge_gain * 4.0 * share * (1.0 - share) * near
    return np.sqrt(1.0 + (params.gradient_gain * grad) ** 2 + (params.curvature_gain * lap) ** 2 + texture ** 2
                   + clip_edge ** 2)


def _block_z(z: np.ndarray) -> np.ndarray:
    """Signed sum of z over each 2 x 2 block, / 2 (NaN cells count 0), at the block's top-left."""
    zz = np.nan_to_num(z, nan=0.0)
    padded = np.pad(zz, ((0, 1), (0, 1)))
    return (padded[:-1, :-1] + padded[1:, :-1] + padded[:-1, 1:] + padded[1:, 1:]) / 2.0


def frame_z(recorded: np.ndarray, test: np.ndarray, covered: np.ndarray, params: ScoringParams,
            test_laplacian: np.ndarray | None = None, cell: int = 8, test_std: np.ndarray | None = None,
            test_clipped: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """(z map, residual map, noise scale, image-score map) for one frame."""
    r = residuals(recorded, test, covered, test_laplacian)
    z, noise, smap = normalised(r, covered, recorded, params, test_laplacian, cell, test_std, test_clipped)
    return z, r, noise, smap


def normalised(residual: np.ndarray, covered: np.ndarray, recorded: np.ndarray, params: ScoringParams,
               test_laplacian: np.ndarray | None = None, cell: int = 8, test_std: np.ndarray | None = None,
               test_clipped: np.ndarray | None = None) -> tuple[np.ndarray, float, np.ndarray]:
    """(z map, noise scale, image-score map) of a residual map: divided by what benign processing
    leaves per cell, then pooled. Calibration calls this on stored residuals with other constants."""
    rel = _scale_map(recorded, params, test_laplacian, cell, test_std, test_clipped)
    u = np.abs(residual[covered]) / rel[covered]
    noise = max(params.floor, 1.4826 * float(np.median(u))) if u.size else params.floor
    z = residual / (noise * rel)
    # the 2 x 2 block sum, not the single cell: an edit of 16 px or more moves neighbouring cells
    # the same way, what benign processing leaves at fine detail alternates in sign (measured on
    # the calibration set: at the same benign quantile it finds more 16-32 px edits than the
    # cell maximum or a 3 x 3 block)
    return z, noise, np.abs(_block_z(z))


def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of a boolean grid (0 = background) and their count."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    n = 0
    for i, j in zip(*np.nonzero(mask)):
        if labels[i, j]:
            continue
        n += 1
        labels[i, j] = n
        stack = [(int(i), int(j))]
        while stack:
            a, b = stack.pop()
            for y in range(max(a - 1, 0), min(a + 2, mask.shape[0])):
                for x in range(max(b - 1, 0), min(b + 2, mask.shape[1])):
                    if mask[y, x] and not labels[y, x]:
                        labels[y, x] = n
                        stack.append((y, x))
    return labels, n


def _regions(score_map: np.ndarray, residual: np.ndarray, frame: int, threshold: float, cell: int,
             hw: tuple[int, int]) -> list[CellRegion]:
    """Connected flagged cells as boxes in recorded pixels (a block score speaks for 2 x 2 cells)."""
    labels, n = _label(score_map > threshold)
    found = []
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        block = residual[ys.min(): ys.max() + 2, xs.min(): xs.max() + 2]
        peak = float(np.nanmax(np.abs(block))) if np.isfinite(block).any() else 0.0
        found.append(CellRegion(frame=frame, y0=int(ys.min()) * cell, x0=int(xs.min()) * cell,
                                y1=min((int(ys.max()) + 2) * cell, hw[0]), x1=min((int(xs.max()) + 2) * cell, hw[1]),
                                peak=peak, cells=int(ys.size)))
    return found


def pixel_mask(result: FingerprintScore, frame: int, cell: int, test_hw: tuple[int, int],
               params: ScoringParams = DEFAULT_PARAMS, alignment: Alignment | None = None) -> np.ndarray:
    """Bool (H, W) in the test frame's pixels: inside each flagged region, the pixels whose
    interpolated residual reaches ``mask_fraction`` of the region's peak (an edit's smoothed
    profile crosses half its height at its border)."""
    alignment = alignment or result.alignment
    h, w = test_hw
    residual = np.nan_to_num(result.residual[frame].astype(np.float64), nan=0.0)
    smap = result.score_maps[frame]
    if not (smap > params.threshold).any():
        return np.zeros((h, w), dtype=bool)
    # hysteresis: a region is every block above ``mask_low`` x threshold connected to one above it
    labels, n = _label(smap > params.mask_low * params.threshold)
    keep = np.unique(labels[smap > params.threshold])
    labels = np.where(np.isin(labels, keep), labels, 0)
    # each region reaches one cell further (a block score speaks for its 2 x 2 cells)
    grown = labels.copy()
    for dy in (0, 1):
        for dx in (0, 1):
            shifted = np.zeros_like(labels)
            shifted[dy:, dx:] = labels[: labels.shape[0] - dy, : labels.shape[1] - dx]
            grown = np.where(grown == 0, shifted, grown)
    peaks = np.zeros(n + 1)
    for k in range(1, n + 1):
        peaks[k] = np.abs(residual[grown == k]).max(initial=0.0)
    # recorded pixel of each test pixel, then its grid coordinate
    ry = (np.arange(h, dtype=np.float64) / alignment.scale + alignment.offset_y + 0.5) / cell - 0.5
    rx = (np.arange(w, dtype=np.float64) / alignment.scale + alignment.offset_x + 0.5) / cell - 0.5
    gh, gw = residual.shape
    ry = np.clip(ry, 0, gh - 1)
    rx = np.clip(rx, 0, gw - 1)
    y0 = np.minimum(np.floor(ry).astype(int), max(gh - 2, 0))
    x0 = np.minimum(np.floor(rx).astype(int), max(gw - 2, 0))
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    ty, tx = (ry - y0)[:, None], (rx - x0)[None, :]
    def bilinear(a):
        return (a[y0][:, x0] * (1 - ty) * (1 - tx) + a[y0][:, x1] * (1 - ty) * tx
                + a[y1][:, x0] * ty * (1 - tx) + a[y1][:, x1] * ty * tx)

    interp = bilinear(np.abs(residual))
    z = bilinear(np.abs(np.nan_to_num(result.z[frame].astype(np.float64), nan=0.0)))
    near = grown[np.clip(np.rint(ry).astype(int), 0, gh - 1)][:, np.clip(np.rint(rx).astype(int), 0, gw - 1)]
    # half height of the region's peak (the border of a uniform edit), or clearly above what
    # benign processing leaves there (the weaker parts of an uneven edit)
    return (near > 0) & ((interp >= params.mask_fraction * peaks[near]) | (z >= params.mask_z))


def score_displays(fp: Fingerprint, displays: list[np.ndarray], *, params: ScoringParams = DEFAULT_PARAMS,
                   alignments: list[Alignment] | None = None) -> FingerprintScore:
    """Score test frames (display levels 0..255, one per recorded frame) against ``fp``."""
    if len(displays) != fp.n_frames:
        raise ValueError(f"{len(displays)} frames, the fingerprint has {fp.n_frames}")
    values = fp.values
    zs, rs, maps, scores, regions = [], [], [], [], []
    covered_total, noises, used = 0, [], []
    for i, display in enumerate(displays):
        nan = np.full(values[i].shape, np.nan, dtype=np.float32)
        alignment = alignments[i] if alignments is not None else align(values[i], fp.cell, fp.shape_hw, display)
        means, covered, lap, std, clipped = (None,) * 5 if alignment is None else cell_means_at(
            display, fp.cell, fp.shape_hw, alignment, laplacian=True)
        if alignment is None or covered.sum() < params.min_covered:
            used.append(alignment or Alignment(1.0, 0.0, 0.0, -1.0, False))
            zs.append(nan)
            rs.append(nan)
            maps.append(np.zeros(values[i].shape, dtype=np.float32))
            continue
        used.append(alignment)
        z, r, noise, smap = frame_z(values[i], means, covered, params, lap, fp.cell, std, clipped)
        covered_total += int(covered.sum())
        noises.append(noise)
        zs.append(z.astype(np.float32))
        rs.append(r.astype(np.float32))
        maps.append(smap.astype(np.float32))
        scores.append(float(smap.max()))
        regions.extend(_regions(smap, r, i, params.threshold, fp.cell, fp.shape_hw))
    n_cells = values[0].size * fp.n_frames
    if not scores:
        return FingerprintScore(
            score=float("nan"), tampered=False, alignment=used[0], z=np.stack(zs), residual=np.stack(rs),
            score_maps=np.stack(maps), alignments=tuple(used), covered_share=0.0,
            reason="the image under test could not be aligned with the recorded fingerprint")
    score = max(scores)
    return FingerprintScore(
        score=score, tampered=score > params.threshold, alignment=used[0], z=np.stack(zs), residual=np.stack(rs),
        score_maps=np.stack(maps), alignments=tuple(used), covered_share=covered_total / n_cells,
        noise_scale=float(np.median(noises)), regions=tuple(sorted(regions, key=lambda r: -r.peak)))
