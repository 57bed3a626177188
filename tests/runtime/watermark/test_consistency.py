"""The watermark-aware half of the tamper check: where the watermark is still present (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from medsec_edge.runtime.watermark.consistency import (
    WINDOW,
    aligned_tile,
    box_mean_full,
    box_sum,
    consistency_map,
    expected_map,
    ideal_tile,
)
from medsec_edge.runtime.watermark.spec import TILE
from medsec_edge.runtime.watermark.sync import NOMINAL, Lattice, fold

ROT_345 = np.array([[0.8, -0.6], [0.6, 0.8]])  # a rotation (36.87 deg) with rational entries


def _tile(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tile = rng.standard_normal((TILE, TILE))
    tile -= tile.mean()
    return tile / tile.std()


# --- box sums ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 8])
def test_box_sum_equals_brute_force_window_sums(k):
    values = np.random.default_rng(k).standard_normal((13, 17)) * 100 + 1000  # offset: cancellation
    got = box_sum(values, k)
    want = np.array([[values[y:y + k, x:x + k].sum() for x in range(17 - k + 1)] for y in range(13 - k + 1)])
    assert got.shape == (13 - k + 1, 17 - k + 1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)


def test_box_mean_full_keeps_the_shape_and_averages_the_window_around_each_pixel():
    values = np.random.default_rng(1).standard_normal((20, 24))
    got = box_mean_full(values, 4)
    assert got.shape == values.shape
    padded = np.pad(values, ((2, 1), (2, 1)), mode="edge")
    assert got[7, 9] == pytest.approx(padded[7:11, 9:13].mean())
    assert got[0, 0] == pytest.approx(padded[0:4, 0:4].mean())


# --- expected map ------------------------------------------------------------------------------


def test_expected_map_nominal_lattice_tiles_exactly():
    tile = _tile()
    got = expected_map(tile, NOMINAL, (70, 100))
    assert got.shape == (70, 100) and got.dtype == np.float32
    np.testing.assert_array_equal(got, np.tile(tile, (3, 4))[:70, :100].astype(np.float32))
    # the general (any lattice) branch agrees with the nominal shortcut on the nominal basis
    almost = Lattice(np.eye(2) * TILE * (1 + 1e-12), 0.0)
    np.testing.assert_array_equal(expected_map(tile, almost, (70, 100)), got)


def test_expected_map_rotated_lattice_agrees_with_tiling_on_lattice_aligned_points():
    tile = _tile(2)
    lattice = Lattice(TILE * ROT_345, 0.5)
    h, w = 120, 140
    got = expected_map(tile, lattice, (h, w))
    assert got.shape == (h, w)
    big = np.tile(tile, (8, 8))  # tile coordinates up to 256 in both directions
    checked = 0
    for m in range(-40, 41):
        for n in range(-40, 41):
            # tile coordinates (a, b) = (5m, 5n) sit on the integer pixel R @ (a, b) = (4m-3n, 3m+4n)
            x, y = 4 * m - 3 * n, 3 * m + 4 * n
            if 0 <= x < w and 0 <= y < h:
                a, b = 5 * m, 5 * n
                assert got[y, x] == np.float32(big[b % big.shape[0], a % big.shape[1]]), (x, y)
                checked += 1
    assert checked > 500
    # it is really rotated: the nominal tiling differs on most pixels
    assert np.mean(got != np.tile(tile, (4, 5))[:h, :w].astype(np.float32)) > 0.9


def test_expected_map_is_what_fold_reads_back_along_the_same_lattice():
    tile = _tile(3)
    lattice = Lattice(TILE * ROT_345, 0.5)
    folded = fold(expected_map(tile, lattice, (192, 192)), lattice)
    assert np.corrcoef(folded.ravel(), tile.ravel())[0, 1] > 0.8
    assert abs(np.corrcoef(folded.ravel(), tile.T.ravel())[0, 1]) < 0.3  # not transposed


def test_ideal_tile_is_zero_mean_unit_rms_and_aligned_tile_finds_the_shift():
    rng = np.random.default_rng(4)
    readout = rng.standard_normal((128, TILE, TILE))
    bits = rng.integers(0, 2, 128)
    ideal = ideal_tile(bits, readout)
    assert ideal.shape == (TILE, TILE)
    assert abs(ideal.mean()) < 1e-9 and np.sqrt(np.mean(ideal**2)) == pytest.approx(1.0, rel=1e-6)
    flipped = ideal_tile(1 - bits, readout)
    np.testing.assert_allclose(flipped, -ideal, atol=1e-9)  # signs follow the code bits
    folded = np.roll(ideal, (5, 11), axis=(0, 1)) * 0.3 + 0.05 * rng.standard_normal((TILE, TILE))
    np.testing.assert_array_equal(aligned_tile(folded, ideal), np.roll(ideal, (5, 11), axis=(0, 1)))


# --- consistency map ---------------------------------------------------------------------------


def _synthetic(seed: int = 0, shape=(128, 128), gain: float = 0.5, noise: float = 0.05):
    rng = np.random.default_rng(seed)
    expected = expected_map(_tile(seed), NOMINAL, shape)
    signal = gain * expected + noise * rng.standard_normal(shape)
    return signal, np.ones(shape, np.float32), expected


def test_intact_watermark_gives_calibrated_deficits_and_a_low_score():
    signal, strength, expected = _synthetic()
    cmap = consistency_map(signal, strength, expected, factor=2)
    assert cmap.deficit_z.shape == signal.shape and cmap.deficit_z.dtype == np.float32
    assert cmap.factor == 2
    assert cmap.global_corr > 0.9
    z = cmap.deficit_z[np.isfinite(cmap.deficit_z)]
    assert z.size == signal.size  # every window informative (uniform strength)
    # z is, window by window, a standard normal where the mark is intact ...
    assert abs(float(z.mean())) < 0.15 and 0.85 < float(z.std()) < 1.15
    # ... so the frame's score (its maximum over ~14k overlapping windows) is a few units, far
    # below a replaced region's. (Not < 3: the max of that many N(0,1) windows is ~3.1-4.2.)
    assert cmap.score == pytest.approx(float(np.max(z)))
    assert cmap.score < 5
    assert not cmap.lost(5).any()


def test_zeroed_block_gives_a_high_score_and_lost_covers_it():
    signal, strength, expected = _synthetic()
    y0, x0, side = 50, 60, 24
    signal[y0:y0 + side, x0:x0 + side] = 0.0
    cmap = consistency_map(signal, strength, expected, factor=1)
    assert cmap.score > 5
    lost = cmap.lost(5)
    r = WINDOW // 2
    # every window fully inside the block is lost, and nothing far from the block is
    assert lost[y0 + r:y0 + side - r, x0 + r:x0 + side - r].all()
    ys, xs = np.nonzero(lost)
    assert ys.min() >= y0 - r and ys.max() < y0 + side + r
    assert xs.min() >= x0 - r and xs.max() < x0 + side + r
    # the worst windows are inside the block
    worst = np.unravel_index(int(np.nanargmax(cmap.deficit_z)), lost.shape)
    assert y0 <= worst[0] < y0 + side and x0 <= worst[1] < x0 + side


def test_uninformative_regions_stay_nan_and_never_count():
    signal, strength, expected = _synthetic(1)
    strength[:, :48] = 0.0  # no mark would have been put there (flat background)
    signal[:, :48] = 0.0  # and none is there: absence proves nothing
    cmap = consistency_map(signal, strength, expected, factor=1)
    assert np.isnan(cmap.deficit_z[:, :40]).all()  # windows entirely in the flat part
    assert not cmap.lost(-1e9)[:, :40].any()  # NaN is never "lost", whatever the threshold
    assert np.isfinite(cmap.deficit_z[:, 56:]).all()
    assert cmap.score < 5  # the empty part did not raise the score
    # the same frame with the mark replaced there while strength says it should be present
    strength[:, :48] = 1.0
    replaced = consistency_map(signal, strength, expected, factor=1)
    assert replaced.score > 5 and replaced.lost(5)[:, 8:40].all()


def test_no_watermark_at_all_gives_an_empty_map():
    rng = np.random.default_rng(5)
    expected = expected_map(_tile(5), NOMINAL, (96, 96))
    cmap = consistency_map(rng.standard_normal((96, 96)), np.ones((96, 96)), expected, factor=1)
    assert abs(cmap.global_corr) < 0.02
    assert np.isnan(cmap.deficit_z).all() and cmap.score == 0.0
    assert not cmap.lost(0.0).any()


def test_small_map_uses_a_window_that_fits():
    signal, strength, expected = _synthetic(6, shape=(6, 40))
    cmap = consistency_map(signal, strength, expected, factor=1)
    assert cmap.deficit_z.shape == (6, 40)
    assert np.isfinite(cmap.deficit_z).all()
