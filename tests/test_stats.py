"""recipes.stats: the Welch t interval the study's verdicts are decided by."""

import math

import pytest

from recipes import stats


@pytest.mark.parametrize("df, quantile", [
    # Student's t, two-sided 95% (the 0.975 quantile), from the printed
    # tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2).
    (1, 12.706), (2, 4.303), (3, 3.182), (4, 2.776), (5, 2.571), (10, 2.228),
    (30, 2.042), (1e9, 1.960),
])
def test_t_quantile_matches_the_table(df, quantile):
    assert stats.t_quantile(0.975, df) == pytest.approx(quantile, abs=6e-4)


def test_welch_interval_by_hand():
    # Equal variances (1) and n = 3 each: df = 2 (n - 1) = 4, se = sqrt(2/3).
    interval = stats.welch([0.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    half = 2.776445 * math.sqrt(2 / 3)
    assert interval.difference == pytest.approx(-1.0)
    assert interval.df == pytest.approx(4.0)
    assert (interval.low, interval.high) == pytest.approx((-1 - half, -1 + half), abs=1e-5)
    assert interval.sign == 0  # contains 0: not decided
    # Unequal variances: df = (1/3 + 4/3)^2 / ((1/3)^2 / 2 + (4/3)^2 / 2) = 50/17.
    interval = stats.welch([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])
    assert interval.df == pytest.approx(50 / 17)
    assert interval.high - interval.difference == pytest.approx(
        stats.t_quantile(0.975, 50 / 17) * math.sqrt(5 / 3))
    # Far apart: decided, and the sign says which way.
    assert stats.welch([10.0, 10.1, 9.9], [1.0, 1.1, 0.9]).sign == 1
    assert stats.welch([1.0, 1.1, 0.9], [10.0, 10.1, 9.9]).scaled(100).sign == -1


def test_one_value_decides_nothing():
    assert stats.welch([0.5], [0.1, 0.2]) is None
    assert stats.mean_std([0.5]) == (0.5, None)
    assert stats.mean_std([None]) is None
