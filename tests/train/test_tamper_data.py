"""Tamper-detector training samples: shapes and ranges, labels from masks, seeded, families."""

import numpy as np
import pytest

from medsec_edge.evaluation.manipulations import MANIPULATIONS
from medsec_edge.runtime.errors import UsageError
from medsec_edge.runtime.io.image import MedicalImage, stored_range
from medsec_edge.train.tamper_data import (
    HELD_OUT_FAMILY,
    META8,
    SOURCE_SIDE,
    TRAIN_FAMILIES,
    TamperSamples,
    synthetic_source,
)

CROP = 64


def test_families():
    assert HELD_OUT_FAMILY == "splice"
    assert HELD_OUT_FAMILY in MANIPULATIONS
    assert HELD_OUT_FAMILY not in TRAIN_FAMILIES
    assert set(TRAIN_FAMILIES) == set(MANIPULATIONS) - {HELD_OUT_FAMILY}
    assert TamperSamples(0).families == TRAIN_FAMILIES


def test_sample_contract():
    gen = TamperSamples(3, crop=CROP)
    labels = []
    for i in range(24):
        x, mask, label, info = gen.sample(i)
        assert x.shape == (CROP, CROP) and x.dtype == np.float32
        assert np.isfinite(x).all()
        assert x.min() >= -0.5 and x.max() <= 1.5
        assert mask.shape == (CROP, CROP) and mask.dtype == np.float32
        assert set(np.unique(mask)) <= {0.0, 1.0}
        assert label == float(mask.any())
        assert x.std() > 0  # real content, not a constant crop
        if label:
            assert info["kind"] in TRAIN_FAMILIES
        else:
            assert info["kind"] == "genuine" or info["kind"].endswith("(cut away)")
        labels.append(label)
    assert 0 < np.mean(labels) < 1  # the default mix has both classes


def test_sample_is_a_pure_function_of_seed_and_index():
    a, b = TamperSamples(5, crop=CROP), TamperSamples(5, crop=CROP)
    # out of order on purpose: nothing carries over from one index to the next
    for i in (7, 2, 7, 0):
        xa, ma, la, ia = a.sample(i)
        xb, mb, lb, ib = b.sample(i)
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ma, mb)
        assert la == lb and ia == ib
    # (a small real frame may be cut whole at the same place twice: look at several indices)
    assert len({a.sample(i)[0].tobytes() for i in range(6)}) > 1
    other = TamperSamples(6, crop=CROP)
    assert any(not np.array_equal(other.sample(i)[0], a.sample(i)[0]) for i in range(6))


def test_no_tampering_means_no_positives():
    gen = TamperSamples(9, crop=CROP, p_tampered=0.0)
    for i in range(30):
        _, mask, label, info = gen.sample(i)
        assert label == 0.0 and not mask.any()
        assert info["kind"] == "genuine"


def test_always_tampered():
    gen = TamperSamples(9, crop=CROP, p_tampered=1.0, p_benign=0.0)
    labels, kinds = [], set()
    for i in range(30):
        _, mask, label, info = gen.sample(i)
        labels.append(label)
        if label:
            assert info["kind"] in TRAIN_FAMILIES
            kinds.add(info["kind"])
            assert info["benign"] is None
    assert np.mean(labels) >= 0.8
    assert HELD_OUT_FAMILY not in kinds
    assert len(kinds) >= 3  # families are drawn, not one


def test_held_out_family_only_when_asked():
    gen = TamperSamples(2, crop=CROP, p_tampered=1.0, p_benign=0.0, families=(HELD_OUT_FAMILY,))
    kinds = {gen.sample(i)[3]["kind"] for i in range(4)}
    assert HELD_OUT_FAMILY in kinds


def test_mask_is_exactly_where_the_frame_changed():
    """Same (seed, index) with and without tampering share the source: they differ only in the mask."""
    tampered = TamperSamples(4, crop=CROP, p_tampered=1.0, p_benign=0.0)
    genuine = TamperSamples(4, crop=CROP, p_tampered=0.0, p_benign=0.0)
    checked = 0
    for i in range(10):
        f1, m1, mask, info = tampered.make(i)
        f0, m0, mask0, _ = genuine.make(i)
        assert f1.shape == f0.shape and f1.dtype == f0.dtype and m1 == m0
        assert not mask0.any()
        if info["kind"] == "genuine":
            continue
        np.testing.assert_array_equal(f1[~mask], f0[~mask])
        assert (f1[mask] != f0[mask]).any()
        checked += 1
    assert checked >= 8


def test_make_mask_follows_the_frame():
    gen = TamperSamples(8, crop=CROP, p_tampered=1.0, p_benign=1.0)
    benign_steps = set()
    for i in range(16):
        frame, meta, mask, info = gen.make(i)
        assert frame.ndim == 2
        assert mask.dtype == bool and mask.shape == frame.shape
        benign_steps.add(info["benign"])
        if info["benign"] == "jpeg":
            assert meta == META8 and frame.dtype == np.uint8
        lo, hi = stored_range(meta, frame.dtype)
        assert frame.min() >= lo and frame.max() <= hi
    assert None not in benign_steps and len(benign_steps) >= 3


@pytest.mark.parametrize("seed", range(24))
def test_synthetic_source_dtype_and_range(seed):
    src = synthetic_source(np.random.default_rng(seed), side=96)
    frame, meta = src.frame, src.meta
    assert frame.shape == (96, 96)
    assert meta.bits_stored in (8, 10, 12, 16)
    expected = np.uint8 if meta.bits_stored == 8 else (np.int16 if meta.signed else np.uint16)
    assert frame.dtype == expected
    if meta.bits_stored == 8:
        assert not meta.signed
    lo, hi = stored_range(meta, frame.dtype)
    assert frame.min() >= lo and frame.max() <= hi
    assert frame.std() > 0
    if meta.window is not None:
        center, width = meta.window
        assert width >= 2.0 and lo <= center <= hi


def test_synthetic_source_seeded():
    a = synthetic_source(np.random.default_rng(1), side=64)
    b = synthetic_source(np.random.default_rng(1), side=64)
    np.testing.assert_array_equal(a.frame, b.frame)
    assert a.meta == b.meta


def test_crop_larger_than_half_the_source():
    with pytest.raises(UsageError, match="crop"):
        TamperSamples(0, crop=SOURCE_SIDE // 2 + 8)


def test_watermarked_genuine_frames_carry_our_mark():
    from medsec_edge.runtime.pipeline import load_watermarker

    # phantoms of SOURCE_SIDE (real frames may be smaller, and CI may lack them)
    marked_gen = TamperSamples(7, crop=CROP, p_tampered=0.0, p_benign=0.0, p_watermark=1.0, p_real=0.0)
    plain_gen = TamperSamples(7, crop=CROP, p_tampered=0.0, p_benign=0.0, p_watermark=0.0, p_real=0.0)
    watermarker = load_watermarker(threads=1)[0]
    n, flags, found_marked, found_plain = 8, [], 0, 0
    for i in range(n):
        frame, meta, mask, info = marked_gen.make(i)
        plain, plain_meta, _, plain_info = plain_gen.make(i)
        assert frame.shape == (SOURCE_SIDE, SOURCE_SIDE) and not mask.any()
        assert plain_info["watermarked"] is False
        flags.append(info["watermarked"])
        # the source is drawn before the watermark: same frame, plus the mark
        assert meta == plain_meta and frame.dtype == plain.dtype
        if info["watermarked"]:
            assert not np.array_equal(frame, plain)
        found_marked += watermarker.extract(MedicalImage(frame, meta)).found
        found_plain += watermarker.extract(MedicalImage(plain, plain_meta)).found
    assert np.mean(flags) >= 0.75
    # Extraction from a small 256 px phantom is not perfect (frames mostly outside the window
    # carry a weak mark), but most marks read back and an unmarked frame never reads.
    assert found_marked >= n // 2 + 1
    assert found_plain == 0
