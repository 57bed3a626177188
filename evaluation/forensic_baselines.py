"""The two baselines the tamper evaluation measures beside our CNN detector.

Layer: evaluation (numpy and scipy.ndimage only). A learned tamper detector is only worth its
cost if it beats what needs no training, so every tamper report measures, on the same images:

- :class:`HashBaseline`, what a hospital can do today: record a SHA-256 of the pixels and compare.
  It is a perfect detector of *change*, not of *tampering*: every benign re-encode that changes
  a bit (JPEG, resize, window burn-in, rescaling) is flagged, so its FPR on benign processing is
  100% and its localisation is the whole frame.
- :class:`NoiseResidualBaseline`, the classical forensic detector: a pasted, inpainted or smoothed
  region rarely carries the sensor noise of the rest of the frame, so a block whose local noise
  level departs from the frame's is suspicious. It needs no reference and localises, but it only
  sees edits that change the noise level, and tissue-dependent noise (X-ray quantum noise, MRI
  background) gives it false alarms.

Each baseline has a ``name``, ``score(frame, ...) -> float`` (higher = more suspicious) and
``mask(frame, ...) -> bool (H, W)``; :data:`BASELINES` resolves them by name.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medsec_edge.runtime.errors import UsageError

MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): MAD of a normal sample times this is its sigma
FLAT_SIGMA_FRACTION = 1e-6  # blocks with residual sigma below this share of the frame range
FLAT_MARGIN_PX = 2  # a 3x3 residual at distance 2 from a constant area still sees its border step
# Floor of the robust spread of log(sigma) across blocks: frames where over half the blocks have
# the same noise level to 0.1% (synthetic frames) would otherwise divide by zero.
MIN_LOG_SPREAD = 1e-3


class HashBaseline:
    """Reference-based detection: the SHA-256 of the genuine original's pixels, compared bit for bit.

    The digest covers the dtype (normalised to little-endian, so the reference does not depend on
    the machine) and the shape as well as the C-order pixel bytes, so a shape or dtype change
    counts as different even when the bytes agree. Why it is a baseline and not a solution: it
    flags every bit change, so any benign processing that changes bits (lossy JPEG, resize,
    re-windowing, a 16-to-8-bit export) is flagged, an FPR of 100% on such processing; only a
    lossless re-encode (same decoded pixels) passes, FPR 0%. It needs the reference to travel with
    or beside the image, and it localises nothing: its mask is the whole frame or nothing.
    """

    name = "sha256"

    @staticmethod
    def reference(pixels: np.ndarray) -> str:
        """Hex SHA-256 of ``pixels`` (dtype, shape and values) to record for the genuine original."""
        arr = np.asarray(pixels)
        if arr.dtype.hasobject:
            raise UsageError(f"pixels have dtype {arr.dtype}: hash a numeric pixel array, not objects")
        little = arr.dtype.newbyteorder("<")
        arr = np.ascontiguousarray(arr, dtype=little)
        digest = hashlib.sha256()
        digest.update(f"{little.str}|{arr.shape}|".encode("ascii"))
        digest.update(arr.tobytes(order="C"))
        return digest.hexdigest()

    @staticmethod
    def verdict(reference_hex: str, pixels: np.ndarray) -> bool:
        """True (tampered) if any bit, the shape or the dtype of ``pixels`` differs from the reference."""
        ref = str(reference_hex).strip().lower()
        if len(ref) != 64 or any(c not in "0123456789abcdef" for c in ref):
            raise UsageError(
                f"reference is not a SHA-256 hex digest ({len(ref)} characters, expected 64 hex "
                "digits): record it with HashBaseline.reference(pixels)"
            )
        return HashBaseline.reference(pixels) != ref

    def score(self, pixels: np.ndarray, reference_hex: str) -> float:
        """1.0 if :meth:`verdict` says tampered, else 0.0: a hash has no degrees of suspicion."""
        return 1.0 if self.verdict(reference_hex, pixels) else 0.0

    def mask(self, pixels: np.ndarray, reference_hex: str) -> np.ndarray:
        """The whole ``(H, W)`` frame if tampered, else nothing: a hash cannot say where.

        Given so that pixel F1/IoU can be reported for this baseline like the others.
        """
        arr = np.asarray(pixels)
        if arr.ndim not in (2, 3):
            raise UsageError(f"pixels have shape {arr.shape}, expected one frame (H, W) or (H, W, C)")
        return np.full(arr.shape[:2], self.verdict(reference_hex, arr), dtype=bool)


@dataclass(frozen=True)
class NoiseAnalysis:
    """One frame's noise-consistency analysis.

    ``z_blocks`` is the robust z of each block's noise level (NaN for flat or saturated blocks),
    on the grid of block origins ``block_rows`` x ``block_cols``; ``score`` is its maximum (0.0 if
    every block is flat) and ``mask`` the pixels nearest a block over the threshold.
    """

    score: float
    mask: np.ndarray
    z_blocks: np.ndarray
    block_rows: np.ndarray
    block_cols: np.ndarray


def _nan_median_rows(values: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (every row has at least one number).

    Sorting once puts NaN last; faster than ``np.nanmedian``, which loops over short rows.
    """
    ordered = np.sort(values, axis=1)
    count = np.sum(~np.isnan(values), axis=1)
    idx = np.arange(values.shape[0])
    return 0.5 * (ordered[idx, (count - 1) // 2] + ordered[idx, count // 2])


def _block_origins(length: int, block: int, stride: int) -> np.ndarray:
    origins = np.arange(0, length - block + 1, stride)
    if origins[-1] != length - block:
        # A last block flush with the edge, so the border strip is analysed too.
        origins = np.r_[origins, length - block]
    return origins


def _nearest_origin_index(length: int, origins: np.ndarray, block: int) -> np.ndarray:
    """For each pixel coordinate, the index of the block whose centre is nearest."""
    centres = origins + (block - 1) / 2.0
    bounds = (centres[:-1] + centres[1:]) / 2.0
    return np.searchsorted(bounds, np.arange(length), side="right")


@dataclass(frozen=True)
class NoiseResidualBaseline:
    """Classical noise-inconsistency detector: where does the local noise level not fit the frame?

    Steps, each for a reason (figures measured on 8 synthetic 256x256 frames per case, a 48x48
    region replaced by its Gaussian blur, sigma 3):

    1. High-pass residual: the discrete Laplacian (``residual="laplacian"``, default), which
       removes smooth anatomy and keeps noise. ``"median"`` (``frame - median3x3(frame)``) is
       kept for comparison but is a poor default: wherever the local slope exceeds the noise the
       3x3 median returns the centre pixel itself, so the residual is exactly 0. Smooth gradients
       then read as noise-free (max z 10-24 on clean frames, against 3-4 with the Laplacian) and a
       blurred region reads as flat and is ignored (not detected, where the Laplacian scores 55-70).
    2. Constant areas (padding, air outside the field of view, saturation) and the pixels within
       2 px of them are left out: they carry no noise, or the step at their border.
    3. Noise level of each ``block`` x ``block`` block (stride ``block // 2``). Default
       (``estimator="clipped_mean"``): the mean absolute deviation from the block median, each
       pixel's deviation clipped at 3 sigma of the whole frame (sigma = 1.4826 x the frame's MAD),
       times sqrt(pi/2). The clip keeps it robust to an edge crossing the block; the mean keeps it
       continuous on quantised frames. ``"mad"`` (1.4826 x the block's own MAD) is kept for
       comparison but fails on stored integer values: with noise of 1-2 units the block MADs take
       a handful of values, most blocks share one, the spread of log sigma collapses, and clean
       frames score 400-700 (clipped mean: 4-6).
    4. Blocks with under half their pixels usable, or sigma below 1e-6 of the frame's range, are
       flat or saturated and are ignored (NaN in ``z_blocks``): they have no noise to compare.
    5. Robust z of each block, ``|log sigma_b - median(log sigma)| / (1.4826 MAD(log sigma))``:
       the log makes it a ratio of noise levels, so the score does not depend on the frame's units
       (scale invariant), and the median/MAD keep a large edited region from setting the norm.
    6. Score = max z over blocks; mask = pixels whose nearest block centre has z > ``z_threshold``.

    The input is one grey frame in any units (stored values, HU, display values). Limits: it only
    sees edits that change the noise level; sharp anatomical edges raise clean scores (max z 4-6
    on frames with sharp disc edges, 3-4 on smooth ones), so the image score needs a threshold
    calibrated on genuine frames, and the fixed mask threshold 3.5 marks stray blocks on some
    clean frames.
    """

    block: int = 16
    z_threshold: float = 3.5
    residual: str = "laplacian"
    estimator: str = "clipped_mean"
    name = "noise_residual"

    def __post_init__(self) -> None:
        if self.block < 4:
            raise UsageError(f"block is {self.block}, expected at least 4 px to estimate a noise level")
        if self.residual not in ("median", "laplacian"):
            raise UsageError(f"residual is {self.residual!r}, expected 'median' or 'laplacian'")
        if self.estimator not in ("clipped_mean", "mad"):
            raise UsageError(f"estimator is {self.estimator!r}, expected 'clipped_mean' or 'mad'")

    def _residual(self, frame: np.ndarray) -> np.ndarray:
        if self.residual == "median":
            return frame - ndimage.median_filter(frame, size=3, mode="reflect")
        return ndimage.laplace(frame, mode="reflect")

    def _block_sigma(self, resid: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Noise level of each block of the residual (NaN = excluded pixel); 0 where unusable."""
        values = resid[~np.isnan(resid)]
        sigma = np.zeros((rows.size, cols.size), dtype=np.float64)
        if values.size == 0:
            return sigma
        deviation = np.abs(values - np.median(values))
        clip = 3.0 * MAD_TO_SIGMA * float(np.median(deviation))
        if clip == 0.0:
            # Over half the residual exactly at its median (a nearly noiseless quantised frame):
            # the mean deviation is then the only scale left.
            clip = 3.0 * math.sqrt(math.pi / 2) * float(np.mean(deviation))
        windows = np.lib.stride_tricks.sliding_window_view(resid, (self.block, self.block))
        for i, r in enumerate(rows):
            # One row of blocks at a time keeps memory to a row even on 2048x2048 frames.
            blocks = windows[r, cols].reshape(cols.size, -1)
            usable = np.sum(~np.isnan(blocks), axis=1) >= blocks.shape[1] // 2
            if not usable.any():
                continue
            dev = np.abs(blocks[usable] - _nan_median_rows(blocks[usable])[:, None])
            if self.estimator == "mad":
                sigma[i, usable] = MAD_TO_SIGMA * _nan_median_rows(dev)
            else:
                sigma[i, usable] = math.sqrt(math.pi / 2) * np.nanmean(np.minimum(dev, clip), axis=1)
        return sigma

    def analyse(self, frame_float: np.ndarray) -> NoiseAnalysis:
        """Score, mask and block z map of one grey frame (computed once for both)."""
        frame = np.asarray(frame_float, dtype=np.float64)
        if frame.ndim != 2:
            raise UsageError(f"frame has shape {frame.shape}, expected one grey frame (H, W)")
        h, w = frame.shape
        if h < self.block or w < self.block:
            raise UsageError(
                f"frame is {h}x{w}, smaller than one {self.block}x{self.block} block: use a smaller block"
            )
        if not np.isfinite(frame).all():
            raise UsageError("frame contains NaN or infinite values: convert it to finite floats first")

        stride = max(1, self.block // 2)
        rows = _block_origins(h, self.block, stride)
        cols = _block_origins(w, self.block, stride)
        frame_range = float(frame.max() - frame.min())
        flat_tol = FLAT_SIGMA_FRACTION * frame_range
        local_range = ndimage.maximum_filter(frame, size=3) - ndimage.minimum_filter(frame, size=3)
        excluded = ndimage.binary_dilation(local_range <= flat_tol, iterations=FLAT_MARGIN_PX)
        sigma = self._block_sigma(np.where(excluded, np.nan, self._residual(frame)), rows, cols)

        valid = sigma > flat_tol if frame_range > 0 else np.zeros(sigma.shape, dtype=bool)
        z = np.full(sigma.shape, math.nan)
        if valid.any():
            log_sigma = np.log(sigma[valid])
            centre = float(np.median(log_sigma))
            spread = max(MAD_TO_SIGMA * float(np.median(np.abs(log_sigma - centre))), MIN_LOG_SPREAD)
            z[valid] = np.abs(log_sigma - centre) / spread
        score = float(np.nanmax(z)) if valid.any() else 0.0

        over = np.where(valid, z > self.z_threshold, False)
        nearest = np.ix_(
            _nearest_origin_index(h, rows, self.block), _nearest_origin_index(w, cols, self.block)
        )
        return NoiseAnalysis(score=score, mask=over[nearest], z_blocks=z, block_rows=rows, block_cols=cols)

    def score(self, frame_float: np.ndarray) -> float:
        """Largest robust z of a block's noise level; higher = more suspicious, units free."""
        return self.analyse(frame_float).score

    def mask(self, frame_float: np.ndarray) -> np.ndarray:
        """``(H, W)`` bool: pixels nearest a block whose noise level is over ``z_threshold``."""
        return self.analyse(frame_float).mask


BASELINES: dict[str, type] = {"sha256": HashBaseline, "noise_residual": NoiseResidualBaseline}
