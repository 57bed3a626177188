"""Every manipulation: documented shape/dtype/range, mask is exactly where pixels moved, seeded."""

import math

import numpy as np
import pytest
from scipy import ndimage

from medsec_edge.evaluation.manipulations import (
    MANIPULATIONS,
    Manipulation,
    manipulate,
    size_bin_of,
)
from medsec_edge.runtime.errors import UsageError

NAMES = ["inject_lesion", "remove_lesion", "copy_move", "splice", "local_contrast", "local_blur", "local_sharpen", "grow_structure"]


def _phantom(rng, lo, hi, dtype, background=None):
    h = w = 256
    y, x = np.mgrid[:h, :w].astype(np.float64)
    img = 0.25 + 0.25 * (x / w) + 0.1 * (y / h)
    for cy, cx, a, b, v in [(128, 128, 90, 70, 0.2), (100, 90, 25, 15, 0.25), (160, 170, 20, 30, -0.15)]:
        img += v * (((y - cy) / a) ** 2 + ((x - cx) / b) ** 2 < 1)
    img += rng.normal(0, 0.02, (h, w))
    frame = lo + np.clip(img, 0, 1) * (hi - lo)
    if background is not None:
        frame[:, :20] = background  # flat, saturated air at the range minimum
    return np.clip(np.rint(frame), lo, hi).astype(dtype)


CASES = {
    "u16_12bit": dict(lo=0, hi=4095, dtype=np.uint16, background=None),
    "i16_signed": dict(lo=-1024, hi=3071, dtype=np.int16, background=-1024),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    c = CASES[request.param]
    rng = np.random.default_rng(7)
    frame = _phantom(rng, c["lo"], c["hi"], c["dtype"], c["background"])
    donor = np.flipud(_phantom(np.random.default_rng(8), c["lo"], c["hi"], c["dtype"])).T.copy()
    return frame, donor, (c["lo"], c["hi"])


def _run(frame, donor, vr, name, seed):
    return manipulate(frame, name, np.random.default_rng(seed), value_range=vr, donor=donor)


def test_registry_names():
    assert list(MANIPULATIONS) == NAMES


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_contract(case, name, seed):
    frame, donor, vr = case
    before = frame.copy()
    m = _run(frame, donor, vr, name, seed)
    assert isinstance(m, Manipulation) and m.kind == name
    np.testing.assert_array_equal(frame, before)  # input untouched
    assert m.pixels.shape == frame.shape and m.pixels.dtype == frame.dtype
    assert m.pixels.min() >= vr[0] and m.pixels.max() <= vr[1]
    assert m.mask.dtype == bool and m.mask.shape == frame.shape and m.mask.any()
    area = int(m.mask.sum())
    assert abs(area - math.pi * (m.size_px / 2) ** 2) <= 0.2 * area
    assert m.size_bin == size_bin_of(m.size_px)
    changed = m.pixels != frame
    outside = ~ndimage.binary_dilation(m.mask, iterations=3)
    assert not changed[outside].any()
    # Visible: a real share of the masked pixels moved, not just a rounding speck.
    assert changed[m.mask].mean() > 0.3


def test_masks_leave_background_alone():
    """Sites avoid flat saturated background: the signed phantom's air strip is never touched."""
    c = CASES["i16_signed"]
    frame = _phantom(np.random.default_rng(7), c["lo"], c["hi"], c["dtype"], c["background"])
    for name in NAMES:
        for seed in range(5):
            rng = np.random.default_rng(seed)
            m = manipulate(frame, name, rng, value_range=(c["lo"], c["hi"]), donor=frame.T.copy())
            assert not m.mask[:, :16].any(), (name, seed)


@pytest.mark.parametrize("name", NAMES)
def test_seeded(case, name):
    frame, donor, vr = case
    a, b, c = (_run(frame, donor, vr, name, s) for s in (11, 11, 12))
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.pixels, c.pixels)


@pytest.mark.parametrize("name", NAMES)
def test_constant_image_is_refused(name):
    frame = np.full((128, 128), 1000, dtype=np.uint16)
    with pytest.raises(UsageError):
        manipulate(frame, name, np.random.default_rng(0), value_range=(0, 4095), donor=frame)


def test_splice_needs_donor_and_unknown_kind():
    frame = _phantom(np.random.default_rng(0), 0, 4095, np.uint16)
    with pytest.raises(UsageError, match="donor"):
        manipulate(frame, "splice", np.random.default_rng(0), value_range=(0, 4095))
    with pytest.raises(UsageError, match="unknown manipulation"):
        manipulate(frame, "smudge", np.random.default_rng(0), value_range=(0, 4095))


@pytest.mark.parametrize(
    "size, expected", [(4, "<16"), (15, "<16"), (16, "16-32"), (31, "16-32"), (32, "32-64"), (64, ">=64")]
)
def test_size_bins(size, expected):
    assert size_bin_of(size) == expected


def test_sizes_cover_documented_ranges():
    frame = _phantom(np.random.default_rng(3), 0, 4095, np.uint16)
    donor = frame.T.copy()
    kinds = ("inject_lesion", "copy_move")
    sizes = {n: [_run(frame, donor, (0, 4095), n, s).size_px for s in range(20)] for n in kinds}
    assert 3 <= min(sizes["inject_lesion"]) and max(sizes["inject_lesion"]) <= 31
    # A pasted square of side 16-64 has equivalent diameter 18-72.
    assert 17 <= min(sizes["copy_move"]) and max(sizes["copy_move"]) <= 73
