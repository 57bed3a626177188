"""Detection measures: checked against brute-force definitions, hand-computed values and properties."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medsec_edge.evaluation.detection_metrics import (
    Confusion,
    confusion,
    pixel_scores,
    roc_auc,
    roc_curve,
    study_fpr,
    study_fpr_empirical,
    threshold_at_fpr,
    tpr_at_fpr,
    wilson_interval,
)
from medsec_edge.runtime.errors import UsageError

# Small integer scores make ties frequent, which is where AUC and threshold code goes wrong.
tied_scores = st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=30)


@st.composite
def scored_labels(draw):
    scores = draw(tied_scores)
    labels = draw(st.lists(st.booleans(), min_size=len(scores), max_size=len(scores)))
    return np.array(scores, dtype=np.float64), np.array(labels, dtype=bool)


def brute_force_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = scores[labels]
    neg = scores[~labels]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (pos.size * neg.size)


# ------------------------------------------------------------------------------- ROC and AUC


@settings(max_examples=150, deadline=None)
@given(scored_labels())
def test_auc_equals_the_pairwise_count_with_ties_counting_half(case):
    scores, labels = case
    if labels.all() or not labels.any():
        assert math.isnan(roc_auc(scores, labels))
    else:
        assert roc_auc(scores, labels) == pytest.approx(brute_force_auc(scores, labels), abs=1e-12)


@settings(max_examples=150, deadline=None)
@given(scored_labels())
def test_roc_points_are_the_rates_at_each_threshold_and_its_area_is_the_auc(case):
    scores, labels = case
    if labels.all() or not labels.any():
        return
    fpr, tpr, thr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, math.inf)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(thr) < 0)
    np.testing.assert_array_equal(thr[1:], np.unique(scores)[::-1])
    for f, t, th in zip(fpr, tpr, thr):
        assert f == np.mean(scores[~labels] >= th)
        assert t == np.mean(scores[labels] >= th)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(scores, labels), abs=1e-12)


def test_auc_of_perfect_reversed_and_all_tied_scores():
    labels = np.array([False, False, True, True])
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert roc_auc(np.full(4, 0.5), labels) == 0.5


def test_roc_with_one_class_missing_gives_nan_rates_for_that_class():
    fpr, tpr, _ = roc_curve(np.array([0.1, 0.2]), np.array([True, True]))
    assert np.isnan(fpr).all()
    np.testing.assert_array_equal(tpr, [0.0, 0.5, 1.0])


def test_labels_must_be_bool_and_scores_finite():
    with pytest.raises(UsageError, match="bool"):
        roc_auc(np.array([0.1, 0.2]), np.array([0, 1]))
    with pytest.raises(UsageError, match="NaN"):
        roc_auc(np.array([0.1, np.nan]), np.array([False, True]))
    with pytest.raises(UsageError, match="one label per score"):
        roc_auc(np.array([0.1, 0.2, 0.3]), np.array([False, True]))


# -------------------------------------------------------------------------- threshold at FPR


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.integers(-3, 3).map(float), st.floats(-1e6, 1e6, allow_nan=False)),
        min_size=1,
        max_size=60,
    ),
    st.floats(0.0, 1.0),
)
def test_threshold_at_fpr_meets_the_target_and_is_the_smallest_that_does(neg_list, target):
    neg = np.array(neg_list)
    t = threshold_at_fpr(neg, target)
    assert np.mean(neg >= t) <= target
    if t != -math.inf:
        # The float just below t already flags too many: no smaller threshold meets the target.
        assert np.mean(neg >= np.nextafter(t, -math.inf)) > target


def test_threshold_when_fpr_times_n_is_below_one_is_just_above_the_largest_negative():
    neg = np.array([0.1, 0.7, 0.3, 0.5])
    t = threshold_at_fpr(neg, 0.01)
    assert t == np.nextafter(0.7, math.inf)
    assert t > 0.7


def test_threshold_at_fpr_on_a_known_sample():
    neg = np.arange(100, dtype=np.float64)  # 0..99
    # 5% of 100 may be flagged: 95..99; t is just above 94.
    assert threshold_at_fpr(neg, 0.05) == np.nextafter(94.0, math.inf)
    # 0.29 * 100 is 28.999... in floating point; 29 negatives are still allowed.
    assert np.mean(neg >= threshold_at_fpr(neg, 0.29)) == 0.29
    assert threshold_at_fpr(neg, 1.0) == -math.inf


def test_threshold_with_ties_cannot_split_them():
    neg = np.array([1.0, 2.0, 2.0, 2.0, 3.0])
    t = threshold_at_fpr(neg, 0.4)  # 2 of 5 allowed, but the next three are tied at 2.0
    assert t == np.nextafter(2.0, math.inf)
    assert np.mean(neg >= t) == 0.2


def test_threshold_rejects_bad_input():
    with pytest.raises(UsageError, match="genuine"):
        threshold_at_fpr(np.array([]), 0.01)
    with pytest.raises(UsageError, match=r"\[0, 1\]"):
        threshold_at_fpr(np.array([1.0]), 1.5)


def test_tpr_at_fpr_uses_the_negatives_threshold():
    neg = np.arange(100, dtype=np.float64)
    pos = np.array([90.0, 94.0, 94.5, 99.0, 200.0])
    scores = np.r_[neg, pos]
    labels = np.r_[np.zeros(100, bool), np.ones(5, bool)]
    tpr, t = tpr_at_fpr(scores, labels, 0.05)
    assert t == np.nextafter(94.0, math.inf)
    assert tpr == pytest.approx(3 / 5)  # 94.5, 99, 200; not 94.0 (tied with a negative)


def test_tpr_at_fpr_without_positives_is_nan():
    tpr, t = tpr_at_fpr(np.array([0.1, 0.2]), np.array([False, False]), 0.5)
    assert math.isnan(tpr)
    assert t == np.nextafter(0.1, math.inf)


# ----------------------------------------------------------------------------- Wilson, confusion


def test_wilson_interval_matches_hand_computed_values():
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(1.959964**2 / (10 + 1.959964**2))
    assert wilson_interval(5, 10) == pytest.approx((0.236593, 0.763407), abs=1e-6)
    low, high = wilson_interval(10, 10)
    assert high == 1.0
    assert low == pytest.approx(10 / (10 + 1.959964**2))
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


@given(st.integers(1, 5000), st.data())
def test_wilson_interval_contains_the_estimate_and_narrows_with_n(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    low4, high4 = wilson_interval(4 * k, 4 * n)
    assert high4 - low4 < high - low


def test_wilson_interval_rejects_impossible_counts():
    with pytest.raises(UsageError):
        wilson_interval(11, 10)


def test_confusion_counts_and_rates():
    pred = np.array([True, True, True, False, False, False, False, True])
    labels = np.array([True, True, False, False, False, False, True, True])
    c = confusion(pred, labels)
    assert c == Confusion(tp=3, fp=1, tn=3, fn=1)
    assert c.accuracy == 6 / 8
    assert c.precision == 3 / 4
    assert c.recall == 3 / 4
    assert c.f1 == pytest.approx(0.75)
    assert c.fpr == 1 / 4
    assert c.fnr == 1 / 4


def test_confusion_rates_with_zero_denominators_are_nan_not_errors():
    c = confusion(np.array([False, False]), np.array([False, False]))
    assert c == Confusion(tp=0, fp=0, tn=2, fn=0)
    assert math.isnan(c.precision) and math.isnan(c.recall) and math.isnan(c.f1) and math.isnan(c.fnr)
    assert c.fpr == 0.0 and c.accuracy == 1.0
    rates = c.rates_with_ci()
    assert all(math.isnan(v) for v in rates["recall"])


def test_rates_with_ci_give_wilson_intervals_around_each_proportion():
    c = Confusion(tp=40, fp=2, tn=48, fn=10)
    rates = c.rates_with_ci()
    assert set(rates) == {"accuracy", "precision", "recall", "fpr", "fnr"}
    assert rates["recall"] == (40 / 50, *wilson_interval(40, 50))
    assert rates["fpr"] == (2 / 50, *wilson_interval(2, 50))
    assert rates["precision"] == (40 / 42, *wilson_interval(40, 42))
    for value, low, high in rates.values():
        assert low < value < high


def test_confusion_is_frozen():
    c = Confusion(1, 2, 3, 4)
    with pytest.raises(AttributeError):
        c.tp = 5  # type: ignore[misc]


# ------------------------------------------------------------------------------ pixel scores


def test_pixel_scores_of_a_known_overlap():
    pred = np.zeros((10, 10), bool)
    true = np.zeros((10, 10), bool)
    pred[0:4, 0:5] = True  # 20 px
    true[2:6, 0:5] = True  # 20 px, 10 shared
    f1, iou = pixel_scores(pred, true)
    assert f1 == pytest.approx(2 * 10 / 40)
    assert iou == pytest.approx(10 / 30)


def test_pixel_scores_of_empty_masks():
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1, 1] = True
    assert pixel_scores(empty, empty) == (1.0, 1.0)
    assert pixel_scores(some, empty) == (0.0, 0.0)
    assert pixel_scores(empty, some) == (0.0, 0.0)
    assert pixel_scores(some, some) == (1.0, 1.0)


def test_pixel_scores_need_matching_bool_masks():
    with pytest.raises(UsageError, match="must match"):
        pixel_scores(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(UsageError, match="bool"):
        pixel_scores(np.zeros((4, 4)), np.zeros((4, 4), bool))


# ---------------------------------------------------------------------------------- study FPR


def test_a_two_percent_slice_fpr_flags_almost_every_300_frame_study():
    assert study_fpr(0.02, 300) == pytest.approx(1 - 0.98**300)
    assert study_fpr(0.02, 300) > 0.997
    assert study_fpr(0.0, 300) == 0.0
    assert study_fpr(1.0, 300) == 1.0
    assert study_fpr(0.3, 1) == pytest.approx(0.3)
    assert study_fpr(1e-12, 300) == pytest.approx(300e-12, rel=1e-6)


def test_study_fpr_empirical_counts_studies_with_any_frame_over_threshold():
    studies = [np.array([0.1, 0.2]), np.array([0.1, 0.9]), np.array([0.5]), np.array([])]
    assert study_fpr_empirical(studies, 0.5) == 2 / 4
    assert study_fpr_empirical(studies, 0.95) == 0.0
    assert math.isnan(study_fpr_empirical([], 0.5))


def test_study_fpr_empirical_agrees_with_the_formula_for_independent_frames():
    rng = np.random.default_rng(0)
    studies = list(rng.uniform(size=(4000, 30)))
    p = 0.01  # uniform scores >= 0.99 happen with probability 1%
    measured = study_fpr_empirical(studies, 1 - p)
    assert measured == pytest.approx(study_fpr(p, 30), abs=0.025)
