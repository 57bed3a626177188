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


# --- real frames: split by patient, the fallback, never the held-out overlap ------------------

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from medsec_edge.train import tamper_data  # noqa: E402
from medsec_edge.train.tamper_data import FALLBACK_FILES, Source, load_real  # noqa: E402

OVERLAP_LISTS = [Path(__file__).resolve().parents[2] / "train" / "heldout_overlap.txt",
                 Path(__file__).resolve().parents[3] / "shared" / "notes" / "heldout-overlap.txt"]


def _overlap_names() -> set[str]:
    names = set()
    for path in OVERLAP_LISTS:
        if path.exists():
            for line in path.read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if line:
                    names.add(Path(line.rsplit(":", 1)[-1].strip()).name)
    return names


def test_fallback_files_share_no_study_with_the_held_out_set():
    names = [n for split in FALLBACK_FILES.values() for n in split]
    assert "examples_rgb_color.dcm" not in names  # on the overlap list: read before, never again
    assert not set(FALLBACK_FILES["train"]) & set(FALLBACK_FILES["val"])
    overlap = _overlap_names()
    if not overlap:
        pytest.skip("no held-out overlap list in this checkout (train/heldout_overlap.txt, shared/notes/)")
    assert not set(names) & overlap


@pytest.fixture
def no_real_data(monkeypatch):
    """As in CI without the real-data module: importing it fails."""
    load_real.cache_clear()
    monkeypatch.setitem(sys.modules, "medsec_edge.train.real_data", None)
    yield
    load_real.cache_clear()


def test_without_real_data_pydicom_test_files_stand_in(no_real_data):
    train, origin = load_real("train")
    val, origin_val = load_real("val")
    assert origin == origin_val == "pydicom-fallback"
    assert {s.group for s in train} <= set(FALLBACK_FILES["train"]) and train
    assert {s.group for s in val} <= set(FALLBACK_FILES["val"])
    assert not {s.group for s in train} & {s.group for s in val}
    gen = TamperSamples(0, crop=CROP)
    x, _, _, _ = gen.sample(0)
    assert x.shape == (CROP, CROP) and gen.real_origin == "pydicom-fallback"


def test_unknown_split_is_refused():
    with pytest.raises(UsageError, match="split"):
        TamperSamples(0, split="test")
    with pytest.raises(UsageError, match="split"):
        load_real("heldout")


def test_real_splits_share_no_patient():
    load_real.cache_clear()
    train, origin = load_real("train")
    val, _ = load_real("val")
    assert train and val
    assert not {s.group for s in train} & {s.group for s in val}
    if origin == "real_data":
        from medsec_edge.train.real_data import split_of

        assert {split_of(s.group) for s in train} == {"train"}
        assert {split_of(s.group) for s in val} == {"val"}


def _two_groups(monkeypatch, big: int = 40):
    """A long series (group 'big', value 1000) beside a single frame (group 'one', value 3000)."""
    rng = np.random.default_rng(0)
    meta = ImageMeta(bits_stored=12, signed=False)
    frames = [Source((1000 + rng.integers(0, 50, (96, 96))).astype(np.uint16), meta, "big") for _ in range(big)]
    frames.append(Source((3000 + rng.integers(0, 50, (300, 280))).astype(np.uint16), meta, "one"))
    monkeypatch.setattr(tamper_data, "load_real", lambda split, max_side=1024: (frames, "real_data"))
    return frames


from medsec_edge.runtime.io.image import ImageMeta  # noqa: E402


def test_real_frames_are_drawn_patient_first(monkeypatch):
    _two_groups(monkeypatch)
    gen = TamperSamples(1, crop=CROP, p_real=1.0, side=128)
    draws = [gen._source(np.random.default_rng(i)) for i in range(200)]
    share_one = np.mean([d.group == "one" for d in draws])
    assert 0.35 < share_one < 0.65  # one frame of its own patient weighs as much as a 40-frame series
    for d in draws:
        assert d.frame.shape == ((128, 128) if d.group == "one" else (96, 96))  # small frames whole


def test_p_real_is_the_share_of_real_frames(monkeypatch):
    _two_groups(monkeypatch)
    gen = TamperSamples(1, crop=CROP, p_real=0.7, side=128)
    real = [gen._source(np.random.default_rng(i)).group != "" for i in range(300)]
    assert 0.6 < np.mean(real) < 0.8
    assert not any(TamperSamples(1, crop=CROP, p_real=0.0)._source(np.random.default_rng(i)).group
                   for i in range(20))


def test_splice_donor_is_another_real_frame(monkeypatch):
    frames = _two_groups(monkeypatch)
    gen = TamperSamples(1, crop=CROP, p_real=1.0, side=128)
    donor = gen._donor(np.random.default_rng(3))
    assert donor.dtype == np.float64 and donor.ndim == 2 and min(donor.shape) >= 64
    assert 900 < donor.mean() < 3100  # from the real frames, not a phantom
    assert donor.shape in {(96, 96), (128, 128)}
    del frames


def test_validation_crop_cuts_the_whole_source(monkeypatch):
    _two_groups(monkeypatch)
    gen = TamperSamples(2, crop=CROP, p_real=1.0, side=128, families=tuple(MANIPULATIONS), p_tampered=1.0)
    for i in range(6):
        x, mask, label, info = gen.sample(i, crop=128)
        assert x.shape == (128, 128) and mask.shape == (128, 128)
        assert label == float(mask.any())
