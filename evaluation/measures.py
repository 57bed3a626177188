"""The image-quality measures every report uses (DESIGN.md, Measures), defined once.

Layer: evaluation. PSNR_window and SSIM_window compare display values (0..255 floats) obtained
through the ORIGINAL frame's display window, applied to both the original and the processed frame,
so an embedder cannot improve its score by shifting the window. PSNR_full compares stored values
with the original's own dynamic range as peak.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import gaussian_filter

from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import MedicalImage, display_window

DISPLAY_PEAK = 255.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # 11x11 Gaussian window at sigma 1.5, as in Wang et al. 2004
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise UsageError(
            f"cannot compare arrays of shape {a.shape} and {b.shape}: "
            "measures need the processed image at the original's size"
        )
    return a, b


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every element (all channels), in the inputs' units."""
    a, b = _same_shape(a, b)
    return float(np.mean((a - b) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    """10 log10(peak^2 / MSE) in dB; ``inf`` for identical inputs."""
    err = mse(a, b)
    if err == 0.0:
        return math.inf
    return float(10.0 * math.log10(peak**2 / err))


def psnr_window(orig_display: np.ndarray, proc_display: np.ndarray) -> float:
    """PSNR of display values (0..255), peak 255."""
    return psnr(orig_display, proc_display, DISPLAY_PEAK)


def psnr_full(orig_stored: np.ndarray, proc_stored: np.ndarray) -> float:
    """PSNR of stored values with peak = original max - min.

    A constant original has no dynamic range; its peak is taken as 1 stored unit so the value stays
    finite and comparable (a single-grey-level change then reads as 0 dB).
    """
    orig = np.asarray(orig_stored, dtype=np.float64)
    peak = float(orig.max() - orig.min()) if orig.size else 0.0
    return psnr(orig, proc_stored, max(peak, 1.0))


def _ssim_2d(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2

    def blur(x: np.ndarray) -> np.ndarray:
        return gaussian_filter(x, SSIM_SIGMA, mode="reflect", truncate=SSIM_TRUNCATE)

    mu_a, mu_b = blur(a), blur(b)
    # Population (biased) moments, as in Wang et al.; clamp tiny negative variances from rounding.
    var_a = np.maximum(blur(a * a) - mu_a * mu_a, 0.0)
    var_b = np.maximum(blur(b * b) - mu_b * mu_b, 0.0)
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    # Keep only windows that lie inside the image ('valid' filtering, as the reference code does);
    # images too small for that are averaged whole.
    r = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)
    if ssim_map.shape[0] > 2 * r and ssim_map.shape[1] > 2 * r:
        ssim_map = ssim_map[r:-r, r:-r]
    return float(ssim_map.mean())


def ssim_window(orig_display: np.ndarray, proc_display: np.ndarray) -> float:
    """SSIM of display values (L=255, Gaussian window sigma 1.5, K1=0.01, K2=0.03).

    ``(H, W)`` grey or ``(H, W, C)`` colour (channels last, mean over channels).
    """
    a, b = _same_shape(orig_display, proc_display)
    if a.ndim == 2:
        return _ssim_2d(a, b, DISPLAY_PEAK)
    if a.ndim == 3:
        return float(np.mean([_ssim_2d(a[..., c], b[..., c], DISPLAY_PEAK) for c in range(a.shape[2])]))
    raise UsageError(f"SSIM takes one (H, W) or (H, W, C) frame, got shape {a.shape}")


def quality_row(image: MedicalImage, processed_pixels: np.ndarray) -> dict[str, float]:
    """All measures of ``processed_pixels`` against ``image``, per frame, averaged over frames.

    Keys: ``psnr_window``, ``ssim_window``, ``mse_window`` (display units), ``psnr_full``,
    ``mse_full`` (stored units). An unchanged frame has infinite PSNR and the frame mean is then
    infinite too: reports read that as "lossless" instead of averaging it into a finite number.
    """
    processed_pixels = np.asarray(processed_pixels)
    if processed_pixels.shape != image.pixels.shape:
        raise UsageError(
            f"processed pixels have shape {processed_pixels.shape}, the image {image.pixels.shape}: "
            "quality is measured at the original's size and frame count"
        )
    processed = MedicalImage(processed_pixels, image.meta)
    rows: list[dict[str, float]] = []
    for orig, proc in zip(image.frames(), processed.frames()):
        window = display_window(image.meta, orig)
        orig_display = window.to_display(orig)
        proc_display = window.to_display(proc)
        rows.append(
            {
                "psnr_window": psnr_window(orig_display, proc_display),
                "ssim_window": ssim_window(orig_display, proc_display),
                "mse_window": mse(orig_display, proc_display),
                "psnr_full": psnr_full(orig, proc),
                "mse_full": mse(orig, proc),
            }
        )
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
