"""Statistics of Table 1 over seeds: mean +- std, paired tests against Scratch, ties within noise.

The choice, documented once:

- **Mean and spread.** A cell is the mean over its seeds with the sample standard deviation
  (``ddof=1``); one seed has no spread (shown without +-).
- **Delta against Scratch: a paired t-test over seeds.** The planner runs Scratch and each method
  with the same seed values, and a seed fixes the fine-tuning data order and head initialisation
  of both, so the runs are paired by seed value: ``d_i = x_method(seed_i) - x_scratch(seed_i)``
  over the seeds both have, ``t = mean(d) / (sd(d) / sqrt(n))`` with ``n - 1`` degrees of
  freedom, two-sided p-value (``scipy.stats.ttest_rel``). The delta is *significant* when
  ``p < alpha`` (``report.alpha``, 0.05 by default); equivalently the ``1 - alpha`` t confidence
  interval of ``mean(d)`` excludes 0, and that interval is what the error bars of the delta plot
  show. With fewer than 2 paired seeds there is no test ("n=1: no test"), never a made-up one.
  The delta printed is the difference of the two cell means, which equals ``mean(d)`` when both
  sides have the same seeds; where they do not (a partial sweep) the delta is not tested, since a
  test over the common seeds would judge another difference, possibly of the other sign.
  A bootstrap interval is not used: with the 2-5 seeds a sweep affords, resampling 3 values gives
  intervals that are too narrow.
- **Many cells, many tests.** A table of 4 methods x 7 columns makes 28 tests; at alpha = 0.05 about
  one is "significant" by chance. ``report.correction: holm`` applies the Holm-Bonferroni
  step-down over all deltas of the table (family-wise error <= alpha); the default ``none`` keeps
  the per-cell test.
- **Bold = best of its group, not tied within noise.** In each row group and column the method
  with the highest mean is bold only when a paired t-test against every other member of its group
  (over their common seeds, same alpha, no correction) says it is better. A comparison with fewer
  than 2 common seeds cannot be tested and falls back to the paper's rule (highest value wins).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of two runs over their common seeds (``a - b``)."""

    n: int  # number of paired seeds
    mean: float  # mean of the differences
    sd: float  # sample std of the differences (nan for n < 2)
    t: float  # t statistic (nan without a test; +-inf when all differences are equal and non-zero)
    p: float  # two-sided p-value (nan without a test)
    ci_low: float  # (1 - alpha) t interval of the mean difference (nan without a test)
    ci_high: float

    @property
    def tested(self) -> bool:
        return self.n >= 2 and not math.isnan(self.p)

    def significant(self, alpha: float) -> bool:
        return self.tested and self.p < alpha


def mean_std(values: Sequence[float]) -> Tuple[float, float, int]:
    """Mean, sample std (ddof=1; nan for one value) and count."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size)


def median_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """A distribution-free confidence interval for the median: ``(low, high, coverage)`` with
    ``low, high`` the k-th smallest and k-th largest value for the largest k whose interval
    covers the median with probability at least ``level`` (the number of values below the
    median is Binomial(n, 1/2)); ``coverage`` is that probability. Too few values for
    ``level`` give the full range and its lower coverage (n = 5: 0.9375). For benchmark
    ratios measured in pairs, where a bootstrap of a dozen values is too narrow."""
    x = sorted(float(v) for v in values)
    n = len(x)
    if n == 0:
        raise ValueError("median_interval: no values")
    below = [math.comb(n, i) / 2 ** n for i in range(n + 1)]  # P(B = i), B ~ Binomial(n, 1/2); exact ints
    k, cdf = 1, below[0]  # cdf = P(B <= k - 1): the chance the median lies below x[k - 1]
    while k < (n + 1) // 2 and 1.0 - 2.0 * (cdf + below[k]) >= level:
        cdf += below[k]
        k += 1
    return x[k - 1], x[n - k], 1.0 - 2.0 * cdf


def paired_test(a: Mapping[int, float], b: Mapping[int, float], alpha: float = 0.05) -> PairedTest:
    """Paired two-sided t-test of ``a`` against ``b`` over the seeds both have (seed -> value)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in seeds], dtype=float)
    n = int(d.size)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return PairedTest(n, mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    if sd == 0.0 or sd < 1e-12 * max(1.0, abs(mean)):
        # Every seed moved by the same amount: no spread to test against. Identical runs are
        # "no difference" (p = 1); a constant non-zero shift is as certain as a t-test can say.
        if mean == 0.0:
            return PairedTest(n, 0.0, 0.0, math.nan, 1.0, 0.0, 0.0)
        return PairedTest(n, mean, 0.0, math.copysign(math.inf, mean), 0.0, mean, mean)
    res = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
    half = float(stats.t.ppf(1.0 - alpha / 2.0, n - 1)) * sd / math.sqrt(n)
    return PairedTest(n, mean, sd, float(res.statistic), float(res.pvalue), mean - half, mean + half)


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm-Bonferroni adjusted p-values (nan entries are not tests and stay nan).

    Sorted ascending, ``p_(i)`` becomes ``max_{j <= i} min(1, (m - j + 1) p_(j))``; rejecting where the
    adjusted value is below alpha is Holm's step-down procedure at family-wise level alpha.
    """
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    out = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda k: pvalues[k])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def best_of_group(values: Mapping[str, Mapping[int, float]], alpha: float) -> Dict[str, bool]:
    """Which members of one row group are bold in one column (see the module docstring).

    ``values``: member -> {seed: value}. The member with the highest mean is bold when it beats
    every other member (paired test where >= 2 common seeds, the higher value otherwise); a tie
    for the highest mean is bold for nobody (as in the paper: KITTI, 42.0 and 42.0, neither bold).
    """
    means = {m: mean_std(v.values())[0] for m, v in values.items() if len(v)}
    means = {m: x for m, x in means.items() if not math.isnan(x)}
    bold = {m: False for m in values}
    if not means:
        return bold
    top = max(means.values())
    leaders = [m for m, x in means.items() if x == top]
    if len(leaders) > 1:
        return bold
    lead = leaders[0]
    for other in (m for m in means if m != lead):
        test = paired_test(values[lead], values[other], alpha)
        if test.n >= 2 and not (test.significant(alpha) and test.mean > 0):
            return bold
    bold[lead] = True
    return bold
