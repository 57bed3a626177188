"""Forensic baselines: the hash flags every bit change; the noise detector finds a smoothed region."""

import numpy as np
import pytest
from scipy import ndimage

from medsec_edge.evaluation.detection_metrics import pixel_scores
from medsec_edge.evaluation.forensic_baselines import (
    BASELINES,
    HashBaseline,
    NoiseResidualBaseline,
)
from medsec_edge.runtime.errors import UsageError

SIZE = 256
REGION = (slice(100, 148), slice(120, 168))  # 48x48


def textured_frame(seed: int, noise: float = 5.0) -> np.ndarray:
    """Smooth 'anatomy' (gradients and blobs, HU-like values) plus stationary Gaussian noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    anatomy = 1000 + 300 * np.sin(x / 40) + 200 * np.cos(y / 25)
    anatomy += 2000 * ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 8)
    return anatomy + rng.normal(0.0, noise, (SIZE, SIZE))


def smoothed_region(frame: np.ndarray) -> np.ndarray:
    """The frame with REGION replaced by Gaussian-blurred (sigma 3) content, as an inpainting would."""
    out = frame.copy()
    out[REGION] = ndimage.gaussian_filter(frame, 3)[REGION]
    return out


def region_mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[REGION] = True
    return mask


# ------------------------------------------------------------------------------------ hash


def test_hash_flags_a_one_bit_flip_and_not_an_identical_copy():
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 4096, (64, 64), dtype=np.uint16)
    ref = HashBaseline.reference(pixels)
    assert HashBaseline.verdict(ref, pixels.copy()) is False
    flipped = pixels.copy()
    flipped[17, 33] ^= np.uint16(1)
    assert HashBaseline.verdict(ref, flipped) is True
    assert HashBaseline().score(flipped, ref) == 1.0
    assert HashBaseline().score(pixels, ref) == 0.0


def test_hash_counts_shape_and_dtype_changes_even_with_equal_values():
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    ref = HashBaseline.reference(pixels)
    assert HashBaseline.verdict(ref, pixels.reshape(4, 16))  # same bytes, other shape
    assert HashBaseline.verdict(ref, pixels.astype(np.int32))  # same values, other dtype
    assert HashBaseline.verdict(ref, pixels.astype(np.int16))  # same bytes, other dtype


def test_hash_depends_on_values_not_memory_layout_or_byte_order():
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8)
    ref = HashBaseline.reference(pixels)
    assert not HashBaseline.verdict(ref, np.asfortranarray(pixels))
    assert not HashBaseline.verdict(ref, pixels.astype(">u2"))
    assert not HashBaseline.verdict(ref.upper(), pixels)


def test_hash_flags_benign_lossy_processing_and_its_mask_is_the_whole_frame():
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 4096, (32, 32), dtype=np.uint16)
    ref = HashBaseline.reference(pixels)
    requantised = (np.round(pixels / 4.0) * 4).astype(np.uint16)  # a mild lossy re-encode
    assert HashBaseline.verdict(ref, requantised)
    mask = HashBaseline().mask(requantised, ref)
    assert mask.shape == (32, 32) and mask.all()
    assert not HashBaseline().mask(pixels, ref).any()


def test_hash_rejects_a_malformed_reference():
    with pytest.raises(UsageError, match="SHA-256"):
        HashBaseline.verdict("not-a-digest", np.zeros((2, 2), np.uint8))


# ----------------------------------------------------------------------------- noise residual


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_residual_finds_a_smoothed_region_and_localises_it(seed):
    detector = NoiseResidualBaseline()
    clean = textured_frame(seed)
    tampered = smoothed_region(clean)
    clean_score = detector.score(clean)
    result = detector.analyse(tampered)
    assert result.score > 3 * clean_score
    assert result.score > detector.z_threshold
    _, iou = pixel_scores(result.mask, region_mask())
    assert iou > 0.3
    assert result.mask.shape == (SIZE, SIZE) and result.mask.dtype == bool


def test_noise_residual_score_of_uniform_noise_is_low():
    rng = np.random.default_rng(3)
    detector = NoiseResidualBaseline()
    frame = rng.uniform(0.0, 1.0, (SIZE, SIZE))
    result = detector.analyse(frame)
    assert result.score < 5.0
    assert result.mask.mean() < 0.01  # at most a stray block or two


def test_noise_residual_score_is_scale_and_offset_invariant():
    detector = NoiseResidualBaseline()
    frame = smoothed_region(textured_frame(4))
    base = detector.analyse(frame)
    scaled = detector.analyse(frame * 10.0)
    shifted = detector.analyse(frame - 1024.0)
    assert scaled.score == pytest.approx(base.score, rel=1e-9)
    assert shifted.score == pytest.approx(base.score, rel=1e-6)
    np.testing.assert_array_equal(scaled.mask, base.mask)


def test_noise_residual_ignores_flat_and_saturated_blocks():
    detector = NoiseResidualBaseline()
    frame = textured_frame(5)
    frame[:, :96] = -1024.0  # air padding: no noise, must not read as a suspicious region
    frame[:, -40:] = frame.max()  # saturated strip
    result = detector.analyse(frame)
    assert result.score < 6.0
    assert not result.mask[:, :88].any()
    assert np.isnan(result.z_blocks[:, 0]).all()


def test_noise_residual_of_a_constant_frame_is_zero():
    result = NoiseResidualBaseline().analyse(np.full((64, 64), 7.0))
    assert result.score == 0.0
    assert not result.mask.any()


def test_noise_residual_covers_frames_not_a_multiple_of_the_stride():
    detector = NoiseResidualBaseline()
    frame = textured_frame(6)[:-3, :-5]  # 253 x 251
    result = detector.analyse(frame)
    assert result.mask.shape == frame.shape
    assert result.block_rows[-1] == frame.shape[0] - detector.block
    assert result.block_cols[-1] == frame.shape[1] - detector.block


def test_noise_residual_rejects_unusable_input():
    with pytest.raises(UsageError, match="smaller than"):
        NoiseResidualBaseline().score(np.zeros((8, 8)))
    with pytest.raises(UsageError, match="NaN"):
        frame = np.ones((32, 32))
        frame[3, 3] = np.nan
        NoiseResidualBaseline().score(frame)
    with pytest.raises(UsageError, match="grey frame"):
        NoiseResidualBaseline().score(np.zeros((32, 32, 3)))
    with pytest.raises(UsageError, match="residual"):
        NoiseResidualBaseline(residual="wavelet")


def test_baselines_are_resolved_by_name():
    assert set(BASELINES) == {"sha256", "noise_residual"}
    for name, cls in BASELINES.items():
        assert cls().name == name


def test_noise_residual_works_on_quantised_stored_values():
    # Integer frame with noise of 1 unit: block MADs would take a handful of values and clean
    # frames would score in the hundreds; the clipped mean stays continuous.
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    anatomy = 100 + 50 * np.sin(x / 30) + 200 * ndimage.gaussian_filter(rng.normal(size=(SIZE, SIZE)), 6)
    clean = np.round(anatomy + rng.normal(0.0, 1.0, (SIZE, SIZE))).astype(np.uint8)
    tampered = np.round(smoothed_region(clean.astype(np.float64))).astype(np.uint8)
    detector = NoiseResidualBaseline()
    clean_score = detector.score(clean)
    result = detector.analyse(tampered)
    assert clean_score < 8.0
    assert result.score > clean_score + 4.0
    assert pixel_scores(result.mask, region_mask())[1] > 0.3
