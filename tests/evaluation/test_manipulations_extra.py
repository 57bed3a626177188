"""Issue 3 additions to the manipulations: grow_structure, and copy_move from a neighbour frame."""

import math

import numpy as np
import pytest

from medsec_edge.evaluation.manipulations import (
    MANIPULATIONS,
    copy_move,
    grow_structure,
    manipulate,
    size_bin_of,
)
from medsec_edge.runtime.errors import UsageError

SIDE = 192
OFFSET = 1000


def _phantom(rng, lo, hi, dtype):
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float64)
    img = 0.25 + 0.25 * (x / SIDE) + 0.1 * (y / SIDE)
    for cy, cx, a, b, v in [(96, 96, 70, 55, 0.2), (70, 65, 20, 12, 0.25), (125, 130, 16, 24, -0.15)]:
        img += v * (((y - cy) / a) ** 2 + ((x - cx) / b) ** 2 < 1)
    img += rng.normal(0, 0.02, (SIDE, SIDE))
    return np.clip(np.rint(lo + np.clip(img, 0, 1) * (hi - lo)), lo, hi).astype(dtype)


CASES = {
    "u16_12bit": dict(lo=0, hi=4095, dtype=np.uint16),
    "i16_signed": dict(lo=-1024, hi=3071, dtype=np.int16),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    c = CASES[request.param]
    return _phantom(np.random.default_rng(21), c["lo"], c["hi"], c["dtype"]), (c["lo"], c["hi"])


# --- grow_structure --------------------------------------------------------------------------


def test_grow_structure_registered():
    assert MANIPULATIONS["grow_structure"] is grow_structure


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_grow_structure_contract(case, seed):
    frame, vr = case
    before = frame.copy()
    m = manipulate(frame, "grow_structure", np.random.default_rng(seed), value_range=vr)
    np.testing.assert_array_equal(frame, before)
    assert m.kind == "grow_structure"
    assert m.pixels.shape == frame.shape and m.pixels.dtype == frame.dtype
    assert m.pixels.min() >= vr[0] and m.pixels.max() <= vr[1]
    assert m.mask.dtype == bool and m.mask.shape == frame.shape and m.mask.any()
    # outside the mask: bit-identical
    np.testing.assert_array_equal(m.pixels[~m.mask], frame[~m.mask])
    # inside: a real share moved
    changed = m.pixels != frame
    assert changed[m.mask].mean() > 0.3
    # size bookkeeping
    area = int(m.mask.sum())
    assert m.size_px == int(round(2.0 * math.sqrt(area / math.pi)))
    assert m.size_bin == size_bin_of(m.size_px)
    # a grey dilation only raises values, an erosion only lowers them: never both
    diff = m.pixels.astype(np.int64) - frame.astype(np.int64)
    assert (diff[m.mask] >= 0).all() or (diff[m.mask] <= 0).all()


def test_grow_structure_both_directions_and_seeded(case):
    frame, vr = case
    signs = set()
    for seed in range(10):
        a = grow_structure(frame, np.random.default_rng(seed), value_range=vr)
        b = grow_structure(frame, np.random.default_rng(seed), value_range=vr)
        np.testing.assert_array_equal(a.pixels, b.pixels)
        np.testing.assert_array_equal(a.mask, b.mask)
        d = (a.pixels.astype(np.int64) - frame)[a.mask]
        signs.add(int(np.sign(d.sum())))
    assert signs == {-1, 1}  # dilation and erosion are both drawn


def test_grow_structure_flat_frame_raises():
    flat = np.full((SIDE, SIDE), 1000, np.uint16)
    with pytest.raises(UsageError):
        grow_structure(flat, np.random.default_rng(0), value_range=(0, 4095))


# --- copy_move from a neighbour --------------------------------------------------------------


@pytest.fixture(scope="module")
def low_frame():
    """A 12-bit frame that stays below 4095 - OFFSET, so frame + OFFSET is not clipped."""
    return _phantom(np.random.default_rng(22), 0, 2800, np.uint16), (0, 4095)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_copy_move_reads_the_neighbour(low_frame, seed):
    frame, vr = low_frame
    neighbour = frame.astype(np.float64) + OFFSET
    plain = copy_move(frame, np.random.default_rng(seed), value_range=vr)
    moved = copy_move(frame, np.random.default_rng(seed), value_range=vr, neighbour=neighbour)
    # the neighbour changes where the patch is read from, not the draws
    np.testing.assert_array_equal(moved.mask, plain.mask)
    np.testing.assert_array_equal(moved.pixels[~moved.mask], frame[~moved.mask])
    # clearly shifted up compared with the same paste read from the frame itself
    assert moved.pixels[moved.mask].mean() - plain.pixels[plain.mask].mean() > 0.3 * OFFSET
    # pixel by pixel: neighbour paste = own paste + alpha * OFFSET, with 0 <= alpha <= 1
    extra = moved.pixels.astype(np.float64) - plain.pixels.astype(np.float64)
    assert extra[moved.mask].min() >= -1 and extra[moved.mask].max() <= OFFSET + 1
    assert abs(extra[moved.mask].max() - OFFSET) <= 1  # the patch centre is fully pasted


def test_copy_move_neighbour_wrong_shape(low_frame):
    frame, vr = low_frame
    with pytest.raises(UsageError, match="neighbour"):
        copy_move(frame, np.random.default_rng(0), value_range=vr, neighbour=np.zeros((SIDE, SIDE + 1)))
    with pytest.raises(UsageError, match="neighbour"):
        manipulate(frame, "copy_move", np.random.default_rng(0), value_range=vr, neighbour=np.zeros((SIDE - 8, SIDE)))


def test_manipulate_passes_neighbour_to_copy_move(low_frame):
    frame, vr = low_frame
    neighbour = frame.astype(np.float64) + OFFSET
    direct = copy_move(frame, np.random.default_rng(5), value_range=vr, neighbour=neighbour)
    via = manipulate(frame, "copy_move", np.random.default_rng(5), value_range=vr, neighbour=neighbour)
    without = manipulate(frame, "copy_move", np.random.default_rng(5), value_range=vr)
    np.testing.assert_array_equal(via.pixels, direct.pixels)
    np.testing.assert_array_equal(via.mask, direct.mask)
    assert not np.array_equal(via.pixels, without.pixels)


def test_manipulate_ignores_neighbour_for_other_kinds(low_frame):
    frame, vr = low_frame
    neighbour = frame.astype(np.float64) + OFFSET
    a = manipulate(frame, "grow_structure", np.random.default_rng(3), value_range=vr, neighbour=neighbour)
    b = manipulate(frame, "grow_structure", np.random.default_rng(3), value_range=vr)
    np.testing.assert_array_equal(a.pixels, b.pixels)
