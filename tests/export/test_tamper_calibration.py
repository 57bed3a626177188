"""The watermark-deficit threshold: smallest one keeping the OR rule within the FPR target."""

import numpy as np
import pytest

from medsec_edge.export.tamper_calibration import wm_threshold

NAN = np.nan


def _or_fpr(blind, deficits, blind_threshold, t):
    """Independent reference: share flagged by (blind >= tb) OR (watermark read and deficit >= t)."""
    flagged = 0
    for b, d in zip(blind, deficits):
        by_wm = (not np.isnan(d)) and d >= t
        flagged += (b >= blind_threshold) or by_wm
    return flagged / len(blind)


def test_hand_made_case():
    blind = np.arange(10, dtype=float)  # only the last one (9.0) is over the blind threshold 8.5
    deficits = np.array([0.1, 0.5, 0.3, NAN, 0.9, 0.2, NAN, 0.4, 0.8, 0.7])
    # budget 20% = 2 of 10: the blind rule uses 1, so only the single largest read deficit (0.9)
    # may be flagged; at 0.8 three frames would be flagged (0.9, 0.8 and the blind one).
    assert wm_threshold(blind, deficits, 8.5, 0.2) == 0.9
    # budget 40% = 4: at 0.5 the flagged frames are {1, 4, 8, 9} (frame 9, flagged by both rules,
    # counts once); at 0.4 there would be 5.
    assert wm_threshold(blind, deficits, 8.5, 0.4) == 0.5
    # with the blind rule flagging nothing, two read deficits fit the 20% budget
    assert wm_threshold(blind, deficits, 100.0, 0.2) == 0.8


def test_returns_the_smallest_admissible_threshold():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(20, 80))
        blind = rng.normal(size=n)
        deficits = np.round(rng.normal(size=n), 1)  # ties on purpose
        deficits[rng.random(n) < 0.3] = NAN
        tb = float(np.quantile(blind, 0.95))
        target = float(rng.choice([0.05, 0.1, 0.2]))
        t = wm_threshold(blind, deficits, tb, target)
        if np.isfinite(t):
            assert _or_fpr(blind, deficits, tb, t) <= target
            assert t in set(deficits[np.isfinite(deficits)])
        # any read deficit below t would flag too many frames
        for lower in np.unique(deficits[np.isfinite(deficits) & (deficits < t)]):
            assert _or_fpr(blind, deficits, tb, lower) > target


def test_unread_watermarks_count_only_through_the_blind_rule():
    blind = np.zeros(10)
    deficits = np.array([NAN] * 8 + [0.5, 0.6])
    # 10% = 1 frame: the 8 unread frames are never flagged by the watermark rule
    assert wm_threshold(blind, deficits, 1.0, 0.1) == 0.6
    # unless the blind rule flags one of them: then it uses the budget and 0.6 is one too many
    blind[0] = 2.0
    assert wm_threshold(blind, deficits, 1.0, 0.2) == 0.6
    assert wm_threshold(blind, deficits, 1.0, 0.1) == np.inf


def test_nothing_read_and_blind_within_target():
    blind = np.array([0.0, 0.0, 3.0, 0.0])
    deficits = np.full(4, NAN)
    # no read deficit to threshold: the watermark rule is off (inf) and the blind rule alone is fine
    assert wm_threshold(blind, deficits, 1.0, 0.25) == np.inf


def test_blind_rule_alone_over_the_target_gives_inf():
    blind = np.array([5.0, 5.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    deficits = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    assert wm_threshold(blind, deficits, 1.0, 0.2) == np.inf  # 3 of 10 > 20% whatever t is
    assert wm_threshold(blind, deficits, 1.0, 0.3) == np.inf  # 3 of 10 fit, no room for any deficit
    assert wm_threshold(blind, deficits, 1.0, 0.4) == 1.0  # room for exactly one more


def test_threshold_falls_as_the_budget_grows():
    rng = np.random.default_rng(3)
    blind = rng.normal(size=200)
    deficits = rng.normal(size=200)
    deficits[::7] = NAN
    tb = float(np.quantile(blind, 0.99))
    ts = [wm_threshold(blind, deficits, tb, target) for target in (0.02, 0.05, 0.1, 0.3)]
    assert all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("target", [0.01, 0.001])
def test_real_targets_on_the_calibration_size(target):
    """The shipped targets on 300 frames: 1% allows 3 frames, 0.1% none (only over every deficit)."""
    rng = np.random.default_rng(4)
    blind = np.full(300, -5.0)
    deficits = rng.permutation(np.arange(300, dtype=float))
    t = wm_threshold(blind, deficits, 0.0, target)
    allowed = int(round(target * 300))
    assert np.sum(deficits >= t) == allowed
    assert t == (299.0 - allowed + 1 if allowed else np.inf)
