"""The tile geometry on the device: downsampling, folding, lattice estimation, shift search."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsec_edge.runtime.watermark import sync as S
from medsec_edge.runtime.watermark.spec import TILE, working_factor


def _random_tile(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tile = rng.standard_normal((TILE, TILE))
    # smooth a little, as the learned tiles are
    spec = np.fft.fft2(tile)
    f = np.fft.fftfreq(TILE)
    spec *= np.exp(-(f[:, None] ** 2 + f[None, :] ** 2) * 20)
    tile = np.fft.ifft2(spec).real
    return ((tile - tile.mean()) / tile.std()).astype(np.float32)


def _render(tile: np.ndarray, h: int, w: int, angle_deg: float = 0.0, scale: float = 1.0,
            shift=(0.0, 0.0)) -> np.ndarray:
    """The tiled pattern seen through a rotation/scale/shift (bilinear sampling of a periodic tile)."""
    theta = np.radians(angle_deg)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    xs, ys = xs - shift[0], ys - shift[1]
    u = (np.cos(theta) * xs + np.sin(theta) * ys) / scale
    v = (-np.sin(theta) * xs + np.cos(theta) * ys) / scale
    u0, v0 = np.floor(u).astype(int), np.floor(v).astype(int)
    fu, fv = u - u0, v - v0
    t = lambda a, b: tile[b % TILE, a % TILE]  # noqa: E731
    return ((1 - fu) * (1 - fv) * t(u0, v0) + fu * (1 - fv) * t(u0 + 1, v0)
            + (1 - fu) * fv * t(u0, v0 + 1) + fu * fv * t(u0 + 1, v0 + 1)).astype(np.float32)


@pytest.mark.parametrize("shape,factor", [((513, 300), 2), ((64, 64), 1), ((100, 37), 3)])
def test_box_downsample_and_upsample_shapes(shape, factor):
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    small = S.box_downsample(img, factor)
    assert small.shape == (-(-shape[0] // factor), -(-shape[1] // factor))
    assert np.isclose(small[0, 0], img[:factor, :factor].mean())
    up = S.upsample_bilinear(small, factor, *shape)
    assert up.shape == shape
    # a constant survives both ways exactly
    const = np.full(shape, 7.5, np.float32)
    assert np.allclose(S.upsample_bilinear(S.box_downsample(const, factor), factor, *shape), 7.5)


def test_working_factor_keeps_model_cost_roughly_constant():
    assert working_factor(64, 64) == 1
    assert working_factor(512, 512) == 2
    assert working_factor(2048, 2048) == 8
    assert working_factor(4096, 4096) == 16
    assert working_factor(1024, 256) == 2


def test_fold_nominal_matches_general_fold_and_recovers_tile():
    tile = _random_tile(1)
    pattern = _render(tile, 200, 150)
    nominal = S.fold(pattern, S.NOMINAL)
    general = S.fold(pattern, S.Lattice(S.NOMINAL.basis * (1 + 1e-9), 0.0))
    assert np.allclose(nominal, general, atol=1e-4)
    assert np.allclose(nominal, tile, atol=1e-4)


@given(dy=st.integers(0, TILE - 1), dx=st.integers(0, TILE - 1))
@settings(max_examples=25, deadline=None)
def test_shift_search_finds_any_crop_offset(dy, dx):
    tile = _random_tile(2)
    rng = np.random.default_rng(3)
    bits = rng.choice([-1.0, 1.0], 128)
    patterns = rng.standard_normal((128, TILE, TILE))
    message_tile = np.tensordot(bits, patterns, axes=1)
    big = _render(message_tile.astype(np.float32), 160 + dy, 160 + dx)[dy:, dx:]
    fft = S.readout_spectrum(patterns)
    logits, energy = S.read_bits(S.fold(big, S.NOMINAL), fft, gain=1.0)
    assert np.mean(np.sign(logits) == bits) == 1.0
    assert energy > 5.0
    del tile


@pytest.mark.parametrize("angle,scale", [(0.0, 1.0), (2.0, 1.0), (5.0, 1.0), (-3.0, 0.75), (0.0, 0.5 * 2), (4.0, 1.3)])
def test_lattice_estimate_recovers_rotation_and_scale(angle, scale):
    tile = _random_tile(4)
    noise = np.random.default_rng(5).standard_normal((256, 256)).astype(np.float32)
    sig = _render(tile, 256, 256, angle, scale, shift=(7.3, 11.1)) + 0.5 * noise
    lattices = S.estimate_lattices(sig, TILE / 2.6, TILE * 2.6, max_candidates=6)
    assert lattices, "no lattice found"
    # the tile's own lattice is among the candidates (the extractor lets the check value choose)
    match = [lat for lat in lattices if abs(lat.period - TILE * scale) < 0.01 * TILE * scale]
    assert match, [(lat.period, lat.angle_deg) for lat in lattices]
    assert match[0].angle_deg == pytest.approx(angle, abs=0.3)


def test_no_lattice_in_white_noise_is_weak():
    noise = np.random.default_rng(6).standard_normal((256, 256)).astype(np.float32)
    lattices = S.estimate_lattices(noise, TILE / 2.6, TILE * 2.6)
    assert all(lat.strength < 0.1 for lat in lattices)

