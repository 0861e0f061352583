"""The statistics behind every uncertainty and every verdict the tool reports (one implementation:
`modeltest compare`, `clip_score --reference` and the results JSON all use these).

For n per-sample scores x_i (a run) or paired differences d_i = candidate_i - baseline_i (a
comparison, samples paired by id):

- mean m = (1/n) Σ x_i; standard error se = s / √n with s the sample standard deviation (n - 1);
- closed-form 95% interval m ± 1.959964 se (normal approximation);
- paired bootstrap 95% interval: the 2.5th and 97.5th percentiles of the mean over B = 10,000
  resamples of the n items with replacement, from a fixed seed (0), so the same inputs always give
  the same interval;
- one-sided p-value that the candidate is worse: p = Φ(z) with z = m_d / se_d for a metric where
  higher is better (Φ(-z) where lower is better); se_d = 0 gives p = 0 when the candidate is worse
  on every sample by the same amount and 1 otherwise. Normal approximation: for small n (< 30) it
  is a little optimistic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
Z95 = 1.959963984540054


def normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); se 0 for fewer than 2 values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return 0.0, 0.0
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def normal_ci(mean: float, se: float) -> tuple[float, float]:
    return mean - Z95 * se, mean + Z95 * se


def bootstrap_ci(values, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = 0.95) -> tuple[float, float]:  # fmt: skip
    """Percentile bootstrap interval of the mean (items resampled with replacement, fixed seed)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-d array")
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, 4_000_000 // x.size))  # bounds the index matrix to ~32 MB
    means = np.empty(resamples)
    for lo in range(0, resamples, chunk):
        hi = min(resamples, lo + chunk)
        means[lo:hi] = x[rng.integers(0, x.size, size=(hi - lo, x.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Uncertainty:
    """A run's metric with its uncertainty over samples."""

    value: float
    stderr: float
    ci95: tuple[float, float]  # closed form

    @classmethod
    def of(cls, scores: Sequence[float]) -> Uncertainty:
        m, se = mean_stderr(scores)
        return cls(m, se, normal_ci(m, se))


@dataclass(frozen=True)
class Paired:
    """candidate - baseline over n paired samples."""

    n: int
    baseline: float  # mean score
    candidate: float
    diff: float  # mean of candidate - baseline
    stderr: float
    ci95: tuple[float, float]  # paired bootstrap
    ci95_normal: tuple[float, float]  # closed form
    p_value: float  # one-sided: the candidate is worse
    improved: int  # samples better in the candidate
    regressed: int
    unchanged: int

    @property
    def drop(self) -> float:
        """How much worse the candidate is (negative: better), in the metric's direction."""
        return -self.diff if self.higher_is_better else self.diff

    higher_is_better: bool = True


def paired(baseline: Sequence[float], candidate: Sequence[float], higher_is_better: bool = True) -> Paired:
    b = np.asarray(baseline, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    if b.shape != c.shape or b.ndim != 1 or b.size == 0:
        raise ValueError("paired statistics need two equal-length, non-empty 1-d arrays")
    d = c - b
    m, se = mean_stderr(d)
    worse = -m if higher_is_better else m  # > 0: the candidate is worse
    if se > 0:
        p = normal_cdf(-worse / se)
    else:
        p = 0.0 if worse > 0 else 1.0
    better = d > 0 if higher_is_better else d < 0
    poorer = d < 0 if higher_is_better else d > 0
    return Paired(
        n=int(d.size),
        baseline=float(b.mean()),
        candidate=float(c.mean()),
        diff=m,
        stderr=se,
        ci95=bootstrap_ci(d),
        ci95_normal=normal_ci(m, se),
        p_value=float(p),
        improved=int(better.sum()),
        regressed=int(poorer.sum()),
        unchanged=int((d == 0).sum()),
        higher_is_better=higher_is_better,
    )


def verdict(stats: Paired, max_drop: float, gate: str = "abs", alpha: float = 0.05) -> str:
    """FAIL when the drop exceeds max_drop (gate "abs"); with gate "stat", only when it is also
    significant (p < alpha). PASS otherwise."""
    if gate not in ("abs", "stat"):
        raise ValueError(f"gate must be 'abs' or 'stat', got {gate!r}")
    failed = stats.drop > max_drop
    if gate == "stat":
        failed = failed and stats.p_value < alpha
    return "FAIL" if failed else "PASS"
