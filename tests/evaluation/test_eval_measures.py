"""The measures of DESIGN.md: PSNR/MSE by their formulas, SSIM on cases computed by hand."""

import math

import numpy as np
import pytest

from medsec_edge.evaluation.measures import mse, psnr_full, psnr_window, quality_row, ssim_window
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import ImageMeta, MedicalImage

C1 = (0.01 * 255) ** 2
C2 = (0.03 * 255) ** 2


def test_mse_and_psnr_of_a_known_error():
    a = np.zeros((16, 16))
    b = a.copy()
    b[:8] = 10.0  # half the pixels off by 10 -> MSE 50
    assert mse(a, b) == pytest.approx(50.0)
    assert psnr_window(a, b) == pytest.approx(10 * math.log10(255**2 / 50.0))


def test_psnr_is_infinite_for_identical_inputs():
    a = np.arange(64, dtype=np.uint16).reshape(8, 8)
    assert psnr_window(a, a.copy()) == math.inf
    assert psnr_full(a, a.copy()) == math.inf


def test_psnr_full_uses_the_original_dynamic_range_as_peak():
    orig = np.zeros((10, 10), dtype=np.uint16)
    orig[0, 0], orig[0, 1] = 100, 1100  # max - min = 1100
    proc = orig.astype(np.int32) + 10  # MSE 100 everywhere
    assert psnr_full(orig, proc) == pytest.approx(20 * math.log10(1100 / 10))


def test_shape_mismatch_is_a_usage_error():
    with pytest.raises(UsageError):
        mse(np.zeros((4, 4)), np.zeros((4, 5)))


def test_ssim_is_one_for_identical_and_below_one_for_noise():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 255, (64, 64))
    assert ssim_window(a, a.copy()) == pytest.approx(1.0)
    noisy = np.clip(a + rng.normal(0, 20, a.shape), 0, 255)
    value = ssim_window(a, noisy)
    assert 0.0 < value < 0.99


def test_ssim_of_two_flat_images_is_the_luminance_term():
    # No variance anywhere: SSIM = (2 mu_a mu_b + C1) / (mu_a^2 + mu_b^2 + C1) exactly.
    a = np.full((32, 32), 100.0)
    b = np.full((32, 32), 150.0)
    expected = (2 * 100 * 150 + C1) / (100**2 + 150**2 + C1)
    assert ssim_window(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_of_a_flat_versus_textured_image_is_the_contrast_term():
    # Same mean everywhere (zero-mean +-s checkerboard): SSIM = C2 / (var_b + C2), var_b = s^2
    # away from the border, where the Gaussian-weighted local mean stays 128 +- tiny.
    a = np.full((64, 64), 128.0)
    s = 20.0
    checker = (np.indices((64, 64)).sum(axis=0) % 2) * 2 - 1
    b = 128.0 + s * checker
    expected = C2 / (s**2 + C2)
    assert ssim_window(a, b) == pytest.approx(expected, rel=1e-3)


def test_ssim_is_symmetric_and_decreases_with_noise():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 255, (48, 48))
    b1 = np.clip(a + rng.normal(0, 5, a.shape), 0, 255)
    b2 = np.clip(a + rng.normal(0, 30, a.shape), 0, 255)
    assert ssim_window(a, b1) == pytest.approx(ssim_window(b1, a), rel=1e-12)
    assert ssim_window(a, b1) > ssim_window(a, b2)


def test_ssim_of_colour_is_the_mean_over_channels():
    rng = np.random.default_rng(2)
    a = rng.uniform(0, 255, (40, 40, 3))
    b = a.copy()
    b[..., 1] = np.clip(b[..., 1] + rng.normal(0, 25, (40, 40)), 0, 255)
    per_channel = [ssim_window(a[..., c], b[..., c]) for c in range(3)]
    assert ssim_window(a, b) == pytest.approx(np.mean(per_channel))
    assert per_channel[0] == pytest.approx(1.0)


def _ct_like(shape=(2, 64, 64)) -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(900, 1300, shape).astype(np.uint16)


def test_quality_row_uses_the_original_window_and_averages_frames():
    pixels = _ct_like()
    meta = ImageMeta(bits_stored=12, signed=False, window=(1100.5, 256.0), intercept=0.0)
    image = MedicalImage(pixels, meta)
    processed = pixels.astype(np.int32) + 2  # 2 stored units everywhere
    processed = processed.astype(np.uint16)
    row = quality_row(image, processed)
    # Window width 256 -> 255/255 display units per stored unit: ~2 display units of error
    # (exactly 2 * 255/255 = 2 inside the window; clipping outside it removes some).
    assert row["mse_full"] == pytest.approx(4.0)
    span = [float(f.max() - f.min()) for f in pixels]
    assert row["psnr_full"] == pytest.approx(np.mean([20 * math.log10(s / 2.0) for s in span]))
    assert 0 < row["mse_window"] <= 4.0 + 1e-6
    assert row["psnr_window"] >= 10 * math.log10(255**2 / 4.0) - 1e-6
    assert 0.5 < row["ssim_window"] < 1.0
    single = quality_row(MedicalImage(pixels[0], meta), processed[0])
    assert single["mse_full"] == pytest.approx(4.0)


def test_quality_row_of_an_unchanged_image_is_lossless():
    pixels = _ct_like((64, 64))
    image = MedicalImage(pixels, ImageMeta(bits_stored=12, signed=False))
    row = quality_row(image, pixels.copy())
    assert row["psnr_window"] == math.inf and row["psnr_full"] == math.inf
    assert row["ssim_window"] == pytest.approx(1.0)


def test_quality_row_refuses_a_resized_result():
    pixels = _ct_like((64, 64))
    with pytest.raises(UsageError):
        quality_row(MedicalImage(pixels, ImageMeta(12, False)), pixels[:32])
