"""Welch's t interval for the difference of two means: how the study decides.

With n_a and n_b seeds, sample means m_a, m_b and sample variances s_a^2,
s_b^2 (ddof 1), the difference d = m_a - m_b has the standard error

    se = sqrt(s_a^2 / n_a + s_b^2 / n_b)

and, with the Welch-Satterthwaite degrees of freedom

    df = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1)),

the two-sided interval at confidence c is d -/+ t_{(1 + c) / 2}(df) * se.
A difference is decided only when its interval excludes 0.

References:
    Welch, "The generalization of 'Student's' problem when several different
    population variances are involved", Biometrika 34 (1947).
    Satterthwaite, "An approximate distribution of estimates of variance
    components", Biometrics Bulletin 2 (1946).
"""

import dataclasses
import math

import numpy as np

CONFIDENCE = 0.95


def mean_std(values):
    """(mean, sample std) of the values that are not None, the std None for
    one value; None for none."""
    values = np.asarray([v for v in values if v is not None], dtype="float64")
    if not len(values):
        return None
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else None


def t_quantile(probability, df):
    """The `probability` quantile of Student's t with `df` (real) degrees of
    freedom."""
    from scipy import stats

    return float(stats.t.ppf(probability, df))


@dataclasses.dataclass(frozen=True)
class Interval:
    """A difference of means and its Welch interval (low, high)."""

    difference: float
    low: float
    high: float
    df: float
    confidence: float = CONFIDENCE

    @property
    def sign(self):
        """+1 or -1 when the interval excludes 0; 0 when it contains it."""
        return 1 if self.low > 0 else -1 if self.high < 0 else 0

    def scaled(self, factor):
        return dataclasses.replace(self, difference=factor * self.difference,
                                   low=factor * self.low, high=factor * self.high)


def welch(a, b, confidence=CONFIDENCE):
    """The Welch interval of mean(a) - mean(b), or None if either sample has
    fewer than two values (no spread to judge by)."""
    a, b = (np.asarray(x, dtype="float64") for x in (a, b))
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    d = float(a.mean() - b.mean())
    se = math.sqrt(va + vb)
    if se == 0:  # no spread at all: the difference is exact
        return Interval(d, d, d, math.inf, confidence)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = t_quantile((1 + confidence) / 2, df) * se
    return Interval(d, d - half, d + half, float(df), confidence)
