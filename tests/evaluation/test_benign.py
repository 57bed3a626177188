"""Benign steps: right kind/dtype/range, the mask follows geometry exactly, seeded, errors."""

import numpy as np
import pytest
from scipy import ndimage

from medsec_edge.evaluation.benign import BENIGN, BenignResult, benign
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import ImageMeta, display_window

SIDE = 192
GEOMETRIC = ("resize", "rot_flip", "crop")


def _phantom(rng, lo, hi, dtype):
    y, x = np.mgrid[:SIDE, :SIDE].astype(np.float64)
    img = 0.25 + 0.25 * (x / SIDE) + 0.1 * (y / SIDE)
    for cy, cx, a, b, v in [(96, 96, 70, 55, 0.2), (70, 65, 20, 12, 0.25), (125, 130, 16, 24, -0.15)]:
        img += v * (((y - cy) / a) ** 2 + ((x - cx) / b) ** 2 < 1)
    img += rng.normal(0, 0.02, (SIDE, SIDE))
    return np.clip(np.rint(lo + np.clip(img, 0, 1) * (hi - lo)), lo, hi).astype(dtype)


def _mask():
    """An asymmetric region (an L shape off centre), so a wrong rotation or flip shows."""
    m = np.zeros((SIDE, SIDE), bool)
    m[30:80, 110:130] = True
    m[60:80, 130:170] = True
    return m


CASES = {
    "u16_12bit": dict(lo=0, hi=4095, dtype=np.uint16, meta=ImageMeta(bits_stored=12, signed=False)),
    "i16_signed": dict(lo=-1024, hi=3071, dtype=np.int16, meta=ImageMeta(bits_stored=16, signed=True)),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    c = CASES[request.param]
    frame = _phantom(np.random.default_rng(11), c["lo"], c["hi"], c["dtype"])
    return frame, display_window(c["meta"], frame), (c["lo"], c["hi"])


def _run(case, name, seed, mask=None):
    frame, window, vr = case
    return benign(frame, window, np.random.default_rng(seed), value_range=vr, mask=mask, name=name)


def _coords_through(name, seed, window):
    """Run the same seeded geometric step on a frame whose values are their own flat indices."""
    coords = np.arange(SIDE * SIDE, dtype=np.uint16).reshape(SIDE, SIDE)
    return benign(coords, window, np.random.default_rng(seed), value_range=(0, 65535), name=name).pixels


def _highpass_energy(a):
    return float(np.mean(ndimage.laplace(a.astype(np.float64)) ** 2))


def test_registry_names():
    assert set(BENIGN) == {"jpeg", "j2k", "resize", "rot_flip", "crop", "noise", "blur", "lossless"}


@pytest.mark.parametrize("name", list(BENIGN))
def test_contract(case, name):
    frame, window, vr = case
    before = frame.copy()
    mask = _mask()
    r = _run(case, name, 3, mask=mask)
    assert isinstance(r, BenignResult) and r.name == name
    np.testing.assert_array_equal(frame, before)  # input untouched
    assert r.pixels.ndim == 2
    if name == "jpeg":
        assert r.kind == "display8" and r.pixels.dtype == np.uint8
        assert r.pixels.shape == frame.shape
    else:
        assert r.kind == "stored" and r.pixels.dtype == frame.dtype
        assert r.pixels.min() >= vr[0] and r.pixels.max() <= vr[1]
    assert r.mask is not None and r.mask.dtype == bool and r.mask.shape == r.pixels.shape
    if name not in GEOMETRIC:
        np.testing.assert_array_equal(r.mask, mask)  # photometric steps leave the mask alone
    if name != "lossless":  # every other step really changes something
        assert r.pixels.shape != frame.shape or r.kind != "stored" or not np.array_equal(r.pixels, frame)


@pytest.mark.parametrize("name", list(BENIGN))
def test_without_mask_gives_none(case, name):
    assert _run(case, name, 5).mask is None


@pytest.mark.parametrize("name", list(BENIGN))
def test_seeded(case, name):
    mask = _mask()
    a, b = _run(case, name, 42, mask), _run(case, name, 42, mask)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert a.params == b.params and a.kind == b.kind


def test_random_name_is_seeded_and_registered(case):
    names = set()
    for seed in range(12):
        a, b = _run(case, None, seed), _run(case, None, seed)
        assert a.name in BENIGN and a.name == b.name
        np.testing.assert_array_equal(a.pixels, b.pixels)
        names.add(a.name)
    assert len(names) >= 3  # the draw is not stuck on one step


def test_different_seeds_differ(case):
    a, b = _run(case, "noise", 1), _run(case, "noise", 2)
    assert not np.array_equal(a.pixels, b.pixels)


def test_rot_flip_mask_follows(case):
    frame, window, _ = case
    mask = _mask()
    expected_fn = {
        "rot90": lambda a: np.rot90(a, 1),
        "rot180": lambda a: np.rot90(a, 2),
        "rot270": lambda a: np.rot90(a, 3),
        "flip_lr": np.fliplr,
        "flip_ud": np.flipud,
    }
    seen = set()
    for seed in range(40):
        r = _run(case, "rot_flip", seed, mask)
        op = r.params["op"]
        seen.add(op)
        fn = expected_fn[op]
        np.testing.assert_array_equal(r.pixels, fn(frame))
        np.testing.assert_array_equal(r.mask, fn(mask))
        # and independently of np.rot90: each output pixel's mask value is its source pixel's
        src = _coords_through("rot_flip", seed, window).astype(np.int64)
        np.testing.assert_array_equal(r.mask, mask.ravel()[src])
        np.testing.assert_array_equal(r.pixels, frame.ravel()[src])
        if len(seen) == len(expected_fn):
            break
    assert seen == set(expected_fn)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_crop_mask_is_the_same_crop(case, seed):
    frame, window, _ = case
    mask = _mask()
    r = _run(case, "crop", seed, mask)
    src = _coords_through("crop", seed, window).astype(np.int64)
    ys, xs = np.divmod(src, SIDE)
    y0, x0 = int(ys[0, 0]), int(xs[0, 0])
    ch, cw = src.shape
    # the output is one contiguous window of the input
    np.testing.assert_array_equal(ys, np.arange(y0, y0 + ch)[:, None] + 0 * xs)
    np.testing.assert_array_equal(xs, np.arange(x0, x0 + cw)[None, :] + 0 * ys)
    np.testing.assert_array_equal(r.pixels, frame[y0 : y0 + ch, x0 : x0 + cw])
    np.testing.assert_array_equal(r.mask, mask[y0 : y0 + ch, x0 : x0 + cw])
    kept = ch * cw / SIDE**2
    assert 0.35 <= kept <= 0.95
    assert abs(kept - r.params["area"]) < 0.03


def test_resize_mask_follows(case):
    frame, _, _ = case
    mask = _mask()
    ys, xs = np.nonzero(mask)
    scales = []
    for seed in range(8):
        r = _run(case, "resize", seed, mask)
        h, w = r.pixels.shape
        assert r.mask.shape == (h, w)
        sy, sx = h / SIDE, w / SIDE
        assert abs(sy - r.params["scale"]) < 0.01 and abs(sx - r.params["scale"]) < 0.01
        assert 0.5 - 0.01 <= sy <= 2.0 + 0.01
        scales.append(sy)
        area = r.mask.sum()
        assert abs(area - mask.sum() * sy * sx) <= 0.2 * mask.sum() * sy * sx
        # the region lands where the geometry puts it (centroid within 2 px)
        my, mx = np.nonzero(r.mask)
        assert abs(my.mean() - ((ys.mean() + 0.5) * sy - 0.5)) < 2.0
        assert abs(mx.mean() - ((xs.mean() + 0.5) * sx - 0.5)) < 2.0
    assert min(scales) < 1.0 < max(scales)  # both directions exercised


def test_lossless_is_identity(case):
    frame, _, _ = case
    mask = _mask()
    r = _run(case, "lossless", 0, mask)
    assert r.pixels.dtype == frame.dtype
    np.testing.assert_array_equal(r.pixels, frame)
    np.testing.assert_array_equal(r.mask, mask)
    assert r.pixels is not frame  # a copy, not the caller's array


def test_blur_smooths(case):
    frame, _, _ = case
    r = _run(case, "blur", 0)
    assert 0.5 <= r.params["sigma"] <= 1.0
    assert _highpass_energy(r.pixels) < 0.6 * _highpass_energy(frame)
    # but it is mild: the low frequencies survive
    lo_in = ndimage.gaussian_filter(frame.astype(np.float64), 4)
    lo_out = ndimage.gaussian_filter(r.pixels.astype(np.float64), 4)
    assert np.abs(lo_in - lo_out)[8:-8, 8:-8].max() < 0.05 * (float(frame.max()) - float(frame.min()))


def test_noise_sigma_in_documented_range(case):
    frame, _, _ = case
    span = float(frame.max()) - float(frame.min())
    for seed in range(3):
        r = _run(case, "noise", seed)
        diff = r.pixels.astype(np.float64) - frame
        rel = diff.std() / span
        assert 0.0015 <= rel <= 0.009
        assert abs(rel - r.params["fraction"]) < 0.15 * r.params["fraction"] + 0.0005


def test_jpeg_is_a_display_of_the_frame(case):
    frame, window, _ = case
    r = _run(case, "jpeg", 0)
    assert 70 <= r.params["quality"] <= 95
    display = np.rint(window.to_display(frame))
    assert np.abs(r.pixels.astype(np.float64) - display).mean() < 3.0


def test_j2k_is_close_but_lossy(case):
    frame, _, vr = case
    r = _run(case, "j2k", 0)
    assert 5.0 <= r.params["ratio"] <= 20.0
    diff = np.abs(r.pixels.astype(np.float64) - frame)
    assert diff.max() > 0
    assert diff.mean() < 0.02 * (vr[1] - vr[0])


def test_unknown_name(case):
    with pytest.raises(UsageError, match="unknown benign step"):
        _run(case, "sharpen", 0)


def test_mask_shape_mismatch(case):
    with pytest.raises(UsageError, match="mask shape"):
        _run(case, "noise", 0, mask=np.zeros((SIDE, SIDE - 1), bool))
