"""The detection measures every tamper report uses, defined once so that reports agree.

Layer: evaluation (numpy only). A tamper detector gives each image (or frame) a score, higher
meaning more likely tampered, and is run at a threshold ``t``; everywhere in medsec-edge the
decision rule is ``score >= t`` means tampered. The measures here are the ones a report states:
ROC and its area, the detection rate at a fixed false-positive rate with the threshold that gives
it, confusion counts with Wilson intervals (a rate measured on 50 images is not a rate measured on
5000, and the report must say so), pixel F1/IoU of a localisation mask, and the study-level
false-positive rate, which is what a radiologist meets: a per-frame rate that looks small is
multiplied by every frame of a study.

Labels are booleans, ``True`` for tampered (positive). Results are plain floats, or frozen
dataclasses where they belong together; a measure with an empty denominator is ``nan``, not an
exception, because an evaluation grid legitimately has empty cells.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medsec_edge.runtime.errors import UsageError

Z_95 = 1.959964  # two-sided 95% normal quantile


def _scores(values: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if np.isnan(arr).any():
        raise UsageError(
            f"{what} contain {int(np.isnan(arr).sum())} NaN value(s): a detector must score every "
            "image; drop or fix those images before computing detection measures"
        )
    return arr


def _scores_and_labels(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = _scores(scores, "scores")
    y = np.asarray(labels)
    if y.dtype != np.bool_:
        raise UsageError(
            f"labels have dtype {y.dtype}, expected bool (True = tampered): "
            "pass labels.astype(bool) after checking that is what they mean"
        )
    y = y.ravel()
    if y.shape != s.shape:
        raise UsageError(f"{s.size} scores but {y.size} labels: give one label per score")
    return s, y


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` for the rule ``score >= threshold``.

    ``thresholds`` are the distinct scores in descending order, preceded by ``+inf`` so that the
    curve starts at (0, 0); point ``i`` is the rate of negatives and positives with
    ``score >= thresholds[i]``, so the last point is (1, 1). Tied scores form one point, which makes
    the trapezoid area under this curve equal :func:`roc_auc` (ties counting half). With no
    negatives ``fpr`` is all NaN, with no positives ``tpr`` is.
    """
    s, y = _scores_and_labels(scores, labels)
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    # The last index of each run of equal scores: everything up to it is flagged at that score.
    last_of_run = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1] if s.size else []
    tp = np.cumsum(y_sorted)[last_of_run]
    fp = np.cumsum(~y_sorted)[last_of_run]
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tp] / n_pos if n_pos else np.full(len(tp) + 1, math.nan)
        fpr = np.r_[0.0, fp] / n_neg if n_neg else np.full(len(fp) + 1, math.nan)
    thresholds = np.r_[math.inf, s_sorted[last_of_run]]
    return fpr.astype(np.float64), tpr.astype(np.float64), thresholds.astype(np.float64)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_vals) != 0) + 1]
    ends = np.r_[starts[1:], values.size]  # exclusive
    mean_rank = (starts + ends + 1) / 2.0  # mean of (start+1 .. end)
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: P(score of a tampered image > score of a genuine one).

    Computed as the Mann-Whitney U statistic, a tie between a positive and a negative counting half,
    which is the probability a random tampered/genuine pair is ordered correctly. NaN if either
    class is empty (an AUC needs both).
    """
    s, y = _scores_and_labels(scores, labels)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def threshold_at_fpr(negative_scores: np.ndarray, fpr: float) -> float:
    """The smallest threshold ``t`` at which at most a share ``fpr`` of genuine images is flagged.

    The share of negatives flagged, ``mean(negative_scores >= t)``, only falls as ``t`` rises, so
    the smallest admissible ``t`` gives the highest detection rate the FPR budget allows. Let
    ``k`` be the largest count with ``k / n <= fpr`` and ``d`` the (k+1)-th largest negative score:
    any ``t <= d`` flags at least k+1 negatives, any ``t > d`` at most k, so the answer is the
    first float above ``d``, ``np.nextafter(d, inf)``. Thresholds are therefore always just above
    a genuine score, never equal to one; with ties at ``d`` the measured FPR can be below the
    target (ties cannot be split).

    When ``fpr * n < 1`` (say 1% on 50 images) no negative may be flagged: ``k = 0`` and ``t`` is
    just above the largest negative score. That threshold says only "above everything seen", so
    such a row must be reported with its ``n``. ``fpr >= 1`` allows every negative and gives
    ``-inf``.
    """
    neg = _scores(negative_scores, "negative scores")
    if neg.size == 0:
        raise UsageError("no negative (genuine) scores: a threshold at a given FPR needs genuine images")
    fpr = float(fpr)
    if not 0.0 <= fpr <= 1.0:
        raise UsageError(f"fpr is {fpr}, expected a rate in [0, 1] (e.g. 0.01 for 1%)")
    n = neg.size
    # k / n is compared in floating point as the caller will measure it (np.mean(neg >= t)).
    k = min(n, int(math.floor(fpr * n)))
    while k < n and (k + 1) / n <= fpr:
        k += 1
    while k > 0 and k / n > fpr:
        k -= 1
    if k >= n:
        return -math.inf
    descending = np.sort(neg)[::-1]
    return float(np.nextafter(descending[k], math.inf))


def tpr_at_fpr(scores: np.ndarray, labels: np.ndarray, fpr: float) -> tuple[float, float]:
    """``(tpr, threshold)``: the detection rate at the threshold :func:`threshold_at_fpr` picks.

    The threshold comes from the negatives alone, as it would be calibrated in deployment; the TPR
    is the share of positives with ``score >= threshold`` (NaN with no positives).
    """
    s, y = _scores_and_labels(scores, labels)
    t = threshold_at_fpr(s[~y], fpr)
    pos = s[y]
    tpr = float(np.mean(pos >= t)) if pos.size else math.nan
    return tpr, t


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion ``successes / n``; ``(nan, nan)`` when ``n == 0``.

    Wilson rather than the normal approximation because detection rates sit near 0 and 1, where
    ``p +- z sqrt(p(1-p)/n)`` collapses to a zero-width interval (0 false positives in 50 images
    does not mean an FPR of exactly 0; Wilson says up to 7.1% at 95%).
    """
    successes = int(successes)
    n = int(n)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise UsageError(f"{successes} successes out of {n}: expected 0 <= successes <= n")
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    z2 = z * z
    den = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / den
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


@dataclass(frozen=True)
class Confusion:
    """Counts of a binary tamper decision (positive = tampered) and the rates a report states."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def accuracy(self) -> float:
        return _ratio(self.tp + self.tn, self.n)

    @property
    def precision(self) -> float:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def fpr(self) -> float:
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def fnr(self) -> float:
        return _ratio(self.fn, self.fn + self.tp)

    def rates_with_ci(self, z: float = Z_95) -> dict[str, tuple[float, float, float]]:
        """``name -> (value, low, high)`` with Wilson intervals for each proportion.

        F1 is not a proportion of anything countable and has no Wilson interval, so it is left out.
        """
        parts = {
            "accuracy": (self.tp + self.tn, self.n),
            "precision": (self.tp, self.tp + self.fp),
            "recall": (self.tp, self.tp + self.fn),
            "fpr": (self.fp, self.fp + self.tn),
            "fnr": (self.fn, self.fn + self.tp),
        }
        return {name: (_ratio(k, n), *wilson_interval(k, n, z)) for name, (k, n) in parts.items()}


def _bool_array(values: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype != np.bool_:
        raise UsageError(f"{what} has dtype {arr.dtype}, expected bool: threshold it first")
    return arr


def confusion(pred: np.ndarray, labels: np.ndarray) -> Confusion:
    """Confusion counts of boolean decisions ``pred`` against boolean ``labels``."""
    p = _bool_array(pred, "pred").ravel()
    y = _bool_array(labels, "labels").ravel()
    if p.shape != y.shape:
        raise UsageError(f"{p.size} predictions but {y.size} labels: give one label per prediction")
    return Confusion(
        tp=int(np.sum(p & y)),
        fp=int(np.sum(p & ~y)),
        tn=int(np.sum(~p & ~y)),
        fn=int(np.sum(~p & y)),
    )


def pixel_scores(pred_mask: np.ndarray, true_mask: np.ndarray) -> tuple[float, float]:
    """``(f1, iou)`` of a predicted tamper mask against the true one, for one image.

    Both empty (a genuine image, nothing predicted) is a perfect answer, (1.0, 1.0); exactly one
    empty is (0.0, 0.0). Average these per image rather than pooling pixels, so that one large
    region does not hide every small one.
    """
    p = _bool_array(pred_mask, "pred_mask")
    t = _bool_array(true_mask, "true_mask")
    if p.shape != t.shape:
        raise UsageError(f"pred_mask is {p.shape} but true_mask is {t.shape}: masks must match the image")
    inter = int(np.sum(p & t))
    n_pred = int(p.sum())
    n_true = int(t.sum())
    if n_pred == 0 and n_true == 0:
        return 1.0, 1.0
    union = n_pred + n_true - inter
    return 2.0 * inter / (n_pred + n_true), inter / union


def study_fpr(frame_fpr: float, frames: int = 300) -> float:
    """Share of genuine studies flagged when each of ``frames`` frames is flagged with ``frame_fpr``.

    ``1 - (1 - p)^frames``, assuming frames are flagged independently. This is the number that
    decides whether a detector is usable: a per-slice FPR of 2% looks small, but it flags 99.8% of
    genuine 300-frame CT studies, so a study-level alarm is meaningless unless the per-frame FPR is
    about 1/frames times smaller than the study FPR one can tolerate. Neighbouring slices are
    correlated in practice; :func:`study_fpr_empirical` measures the real figure.
    """
    p = float(frame_fpr)
    if not 0.0 <= p <= 1.0:
        raise UsageError(f"frame_fpr is {p}, expected a rate in [0, 1]")
    if frames < 0:
        raise UsageError(f"frames is {frames}, expected a count >= 0")
    if p == 1.0:
        return 1.0 if frames > 0 else 0.0
    # expm1/log1p keep precision for the small p that matter here.
    return float(-math.expm1(frames * math.log1p(-p)))


def study_fpr_empirical(frame_scores_by_study: list[np.ndarray], threshold: float) -> float:
    """Share of genuine studies in which any frame scores ``>= threshold``; NaN with no studies.

    The measured counterpart of :func:`study_fpr`, which keeps the correlation between frames of
    one study. A study with no frames cannot raise an alarm and counts as not flagged.
    """
    if len(frame_scores_by_study) == 0:
        return math.nan
    flagged = 0
    for i, study in enumerate(frame_scores_by_study):
        s = _scores(study, f"frame scores of study {i}")
        flagged += bool(np.any(s >= threshold))
    return flagged / len(frame_scores_by_study)
