"""Where the watermark is still present: the watermark-aware half of the tamper check.

Layer: runtime (numpy). Once the payload has decoded, the code word is known exactly (after
Reed-Solomon correction), so the tile the decoder should see at every position is known too:
the readout patterns signed by the code bits, at the cyclic shift and on the lattice the
extractor found. Regressing the decoder's map on that expected pattern (weighted by where the
strength network puts a mark) window by window says how much watermark each region carries
compared with the frame as a whole; a replaced region (injected or inpainted content, a patch
moved by anything but a multiple of the tile period, a splice) carries none. Windows where no
mark would have been put (flat, saturated background) are left out: absence proves nothing there.

Measured limits (issue 3 note): the decoder's local gain varies with content, so genuine frames
have windows with little watermark too; and the map works at the watermark's working resolution
(a 2k radiograph is read at ~1/8), so edits smaller than a few working pixels are not resolved.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medsec_edge.runtime.watermark.spec import TILE
from medsec_edge.runtime.watermark.sync import NOMINAL, Lattice

WINDOW = 8  # working pixels per side of a local window (16 native px at the usual 2x factor)
MIN_STRENGTH_SHARE = 0.25  # windows with less than this share of the median mark energy are skipped
MIN_GLOBAL_CORR = 0.02  # below this the watermark is too weak overall for a local map to mean anything


@dataclass(frozen=True)
class ConsistencyMap:
    """Local watermark deficit of one frame at working resolution.

    ``deficit_z`` is, per window, how many standard errors of watermark are missing compared
    with the frame as a whole (about 0 where intact, large where gone); NaN where the window is
    uninformative. ``score`` is its maximum: the evidence that some region was replaced.
    """

    deficit_z: np.ndarray
    global_corr: float
    factor: int
    score: float

    def lost(self, threshold: float) -> np.ndarray:
        """Working-resolution cells whose deficit is at least ``threshold``."""
        with np.errstate(invalid="ignore"):
            return self.deficit_z >= threshold


def ideal_tile(code_bits: np.ndarray, readout_unit: np.ndarray) -> np.ndarray:
    """Sum of the unit-norm readout patterns signed by the code bits (unshifted), (TILE, TILE)."""
    signs = np.asarray(code_bits, dtype=np.float64) * 2.0 - 1.0
    tile = np.tensordot(signs, readout_unit, axes=(0, 0))
    tile -= tile.mean()
    return tile / (np.sqrt(np.mean(tile * tile)) + 1e-12)


def aligned_tile(folded: np.ndarray, ideal: np.ndarray) -> np.ndarray:
    """``ideal`` rolled to the cyclic shift at which it best matches the folded map."""
    f = folded - folded.mean()
    corr = np.fft.ifft2(np.fft.fft2(f) * np.conj(np.fft.fft2(ideal))).real
    sy, sx = np.unravel_index(int(np.argmax(corr)), corr.shape)
    return np.roll(ideal, (sy, sx), axis=(0, 1))


def expected_map(tile: np.ndarray, lattice: Lattice, shape_hw: tuple[int, int]) -> np.ndarray:
    """The tile laid over a map of ``shape_hw`` along ``lattice`` (as ``wm_sync.fold`` reads it)."""
    h, w = shape_hw
    if np.array_equal(lattice.basis, NOMINAL.basis):
        reps = (-(-h // TILE), -(-w // TILE))
        return np.tile(tile, reps)[:h, :w].astype(np.float32)
    inv = np.linalg.inv(lattice.basis) * TILE
    ys, xs = np.mgrid[0:h, 0:w]
    u = np.rint(inv[0, 0] * xs + inv[0, 1] * ys).astype(np.intp) % TILE
    v = np.rint(inv[1, 0] * xs + inv[1, 1] * ys).astype(np.intp) % TILE
    return tile[v, u].astype(np.float32)


def box_sum(values: np.ndarray, k: int) -> np.ndarray:
    """Sums over k x k windows at every position where the window fits (integral image)."""
    c = np.zeros((values.shape[0] + 1, values.shape[1] + 1), dtype=np.float64)
    np.cumsum(np.cumsum(values, axis=0), axis=1, out=c[1:, 1:])
    return c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]


def consistency_map(signal: np.ndarray, strength: np.ndarray, expected: np.ndarray, factor: int,
                    window: int = WINDOW) -> ConsistencyMap:
    """How significantly each window lacks the watermark the rest of the frame carries.

    The decoder map is modelled as ``s = G * e' + n`` with ``e'`` the strength-weighted expected
    pattern and ``G`` the frame's gain (least squares over informative windows). In a window the
    deficit ``G * sum(e'^2) - sum(s * e')`` is compared with its standard error under that model
    (the residual's frame-wide variance times ``sum(e'^2)``): a z value, near 0 where the mark is
    intact, large where it is gone, and never large where the mark is too weak to tell.
    """
    h, w = signal.shape
    k = min(window, h, w)
    s = signal.astype(np.float64)
    s = s - box_mean_full(s, TILE)
    e = expected.astype(np.float64) * np.maximum(strength.astype(np.float64), 0.0)
    se, ee = box_sum(s * e, k), box_sum(e * e, k)
    informative = ee >= MIN_STRENGTH_SHARE * max(float(np.percentile(ee, 90)), 1e-12)
    z_small = np.full(se.shape, np.nan)
    gain = float(se[informative].sum() / (ee[informative].sum() + 1e-24)) if informative.any() else 0.0
    corr = float(se[informative].sum() / np.sqrt((box_sum(s * s, k)[informative].sum()) * ee[informative].sum() + 1e-24)) \
        if informative.any() else 0.0
    if corr >= MIN_GLOBAL_CORR and gain > 0:
        # The residual's variance is taken frame-wide (median over informative windows): the
        # window's own would contain the very deficit it measures (z could never exceed k).
        r = s - gain * e
        rr = float(np.median(box_sum(r * r, k)[informative])) / (k * k)
        z = (gain * ee - se) / np.sqrt(rr * np.maximum(ee, 0.0) + 1e-24)
        z_small[informative] = z[informative]
    # Each window's value goes to its centre pixel; the border (k/2 wide) takes the nearest value.
    top, left = (k - 1) // 2, (k - 1) // 2
    z_map = np.pad(z_small, ((top, h - z_small.shape[0] - top), (left, w - z_small.shape[1] - left)), mode="edge")
    finite = z_small[np.isfinite(z_small)]
    score = float(np.max(finite)) if finite.size else 0.0
    return ConsistencyMap(deficit_z=z_map.astype(np.float32), global_corr=corr, factor=int(factor), score=score)


def box_mean_full(values: np.ndarray, k: int) -> np.ndarray:
    """Mean over the k x k window around each pixel (edge-replicated), same shape as ``values``."""
    pad = k // 2
    padded = np.pad(values, ((pad, k - 1 - pad), (pad, k - 1 - pad)), mode="edge")
    return box_sum(padded, k) / (k * k)
