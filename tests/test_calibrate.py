"""Choosing a drafter's default confidence threshold from recorded rounds (train/calibrate.py)."""

import pytest

from aheadlm.train.calibrate import DRAFT_STEP_COST, VERIFY_ROW_COST, choose_threshold, modeled_speed


def test_modeled_speed_counts_tokens_against_cost():
    # one round: 4 drafts, the first two accepted
    rounds = [([0.9, 0.6, 0.3, 0.1], 2)]
    ungated = 3 / (1 + 4 * DRAFT_STEP_COST + 4 * VERIFY_ROW_COST)
    assert modeled_speed(rounds, 0.0) == pytest.approx(ungated)
    # stopping below 0.5 keeps two drafts (both accepted) and pays for the third draft's step
    assert modeled_speed(rounds, 0.5) == pytest.approx(3 / (1 + 3 * DRAFT_STEP_COST + 2 * VERIFY_ROW_COST))
    # stopping below 0.95 drafts nothing: one token for the target forward and one draft step
    assert modeled_speed(rounds, 0.95) == pytest.approx(1 / (1 + DRAFT_STEP_COST))


def test_threshold_separates_confident_drafts_from_the_rest():
    # confident drafts (>= 0.6) are accepted, the others rejected
    good, bad = ([0.8, 0.7], 2), ([0.3, 0.2], 0)
    t = choose_threshold([good] * 10 + [bad] * 10)
    assert 0.3 < t <= 0.6
    # a drafter that is always right drafts ungated; no rounds give 0
    assert choose_threshold([([0.1, 0.1], 2)] * 5) == 0.0
    assert choose_threshold([]) == 0.0
