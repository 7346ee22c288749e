"""The tests behind every claim fashionlab prints: Welch's t-test, Holm's correction, a one-sample
t-test against a published figure, and confidence intervals of a mean."""

from __future__ import annotations

import math
import warnings

MIN_RUNS = 3  # below this many runs per side, a comparison says "not enough runs to say"


def _var(v: list[float]) -> float:
    m = sum(v) / len(v)
    return sum((x - m) ** 2 for x in v)


def welch(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test; None when a side has fewer than 2 runs."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats
    if _var(a) == 0 and _var(b) == 0:  # identical repeats: the test is undefined, the answer is not
        return 1.0 if sum(a) / len(a) == sum(b) / len(b) else 0.0
    with warnings.catch_warnings():  # near-identical runs: scipy warns, the p-value is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def one_sample(values: list[float], mu: float) -> float | None:
    """Two-sided p-value that the runs' mean equals mu (e.g. a published figure); None below 2 runs."""
    if len(values) < 2:
        return None
    from scipy import stats
    if _var(values) == 0:
        return 1.0 if values[0] == mu else 0.0
    return float(stats.ttest_1samp(values, mu).pvalue)


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The t-interval of the mean; (mean, mean) for a single run."""
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, m
    from scipy import stats
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * math.sqrt(_var(values) / (len(values) - 1) / len(values))
    return m - half, m + half


def holm(pvalues: list[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [0.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def fmt_p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"{p:.2g}" if p < 0.01 else f"{p:.2f}"
