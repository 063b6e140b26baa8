"""core/stats.paired_mean_se on hand-computed cases."""

import math

import pytest

from ellava_lib.core.stats import paired_mean_se


def test_paired_mean_se_by_hand():
    # d = (2, 0, 1): mean 1, sample variance ((1 + 1 + 0) / 2) = 1, se = 1 / sqrt(3) = 0.57735...
    mean, se = paired_mean_se([5.0, 3.0, 4.0], [3.0, 3.0, 3.0])
    assert mean == pytest.approx(1.0)
    assert se == pytest.approx(0.5773502692)
    # a constant shift has no spread: pairing removes what both sides share
    mean, se = paired_mean_se([10.0, 20.0, 30.0], [9.5, 19.5, 29.5])
    assert (mean, se) == (pytest.approx(0.5), pytest.approx(0.0))


def test_paired_mean_se_sign_and_single_pair():
    mean, se = paired_mean_se([1.0, 2.0], [2.0, 4.0])  # d = (-1, -2): mean -1.5, sd 0.70711, se 0.5
    assert mean == pytest.approx(-1.5)
    assert se == pytest.approx(0.5)
    mean, se = paired_mean_se([0.25], [0.5])
    assert mean == pytest.approx(-0.25) and math.isnan(se)


@pytest.mark.parametrize("a, b", [([1.0, 2.0], [1.0]), ([], []), ([1.0, float("nan")], [0.0, 0.0])])
def test_paired_mean_se_rejects_bad_input(a, b):
    with pytest.raises(ValueError):
        paired_mean_se(a, b)
