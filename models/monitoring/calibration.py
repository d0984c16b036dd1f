"""Thresholds calibrated on a no-drift reference, not guessed.

The reference is a run of buckets (fixed spans of stream time) with no drift. For each test
and window length (w buckets), a block bootstrap draws what the statistic looks like without
drift: a window is a run of w consecutive reference buckets (from a random start, wrapping
around), compared with a reference made of all R buckets drawn with replacement (resampling both
sides counts the reference's own noise; resampling whole buckets keeps whatever correlates events
within a bucket, such as a shopper's session, and drawing the window as a run keeps what
correlates neighbouring buckets: the same items, sessions and slowly moving rates). The
threshold is the (1 - alpha) quantile of a scaled chi-square matched to
the mean and variance of those draws (Satterthwaite; for a |z| statistic, of z squared): a few
hundred draws cannot show a 1e-6 quantile directly, and PSI, MMD^2 and z^2 are all close to
scaled chi-squares without drift. It is never below the largest draw nor below the statistic's
textbook null quantile for independent events (so overdispersion can only raise it).
``alpha`` is the per-window false-alarm rate divided by the number of tests (Bonferroni), so
the chance that any test alerts on a window without drift stays at most that rate.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats as sstats

Statistic = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (reference, window) summaries, batched


def bonferroni(alpha_window: float, tests: int) -> float:
    """The per-test level that keeps the chance of any false alarm on a window <= ``alpha_window``."""
    return alpha_window / max(tests, 1)


def _counts(picks: np.ndarray, buckets: int) -> np.ndarray:
    """(draws, buckets): how often each bucket is among a draw's picks (draws, size)."""
    draws = len(picks)
    offset = picks + np.arange(draws)[:, None] * buckets
    return np.bincount(offset.ravel(), minlength=draws * buckets).reshape(draws, buckets).astype(float)


def _multiplicities(rng: np.random.Generator, draws: int, buckets: int, size: int) -> np.ndarray:
    """(draws, buckets): how often each bucket is drawn in ``size`` draws with replacement."""
    return _counts(rng.integers(0, buckets, size=(draws, size)), buckets)


def _runs(rng: np.random.Generator, draws: int, buckets: int, size: int) -> np.ndarray:
    """(draws, buckets): how often each bucket is in a run of ``size`` consecutive buckets from a
    random start (circular: a run past the last bucket goes on from the first)."""
    starts = rng.integers(0, buckets, size=draws)
    return _counts((starts[:, None] + np.arange(size)) % buckets, buckets)


def bootstrap_null(buckets: np.ndarray, window: int, statistic: Statistic, draws: int,
                   rng: np.random.Generator) -> np.ndarray:
    """``draws`` values of ``statistic`` with no drift, from per-bucket summaries (R, d) in
    stream order."""
    buckets = np.asarray(buckets, dtype=float)
    r = len(buckets)
    win = _runs(rng, draws, r, window) @ buckets
    ref = _multiplicities(rng, draws, r, r) @ buckets
    return np.asarray(statistic(ref, win), dtype=float)


def mmd_null(block_sums: np.ndarray, sizes: np.ndarray, window: int, draws: int,
             rng: np.random.Generator) -> np.ndarray:
    """``draws`` values of the biased MMD^2 with no drift, from the kernel sums between every
    pair of reference buckets (R, R) and each bucket's sample size (R,): the kernel matrix is
    computed once, a draw only re-weights its blocks."""
    r = len(sizes)
    a, b = _runs(rng, draws, r, window), _multiplicities(rng, draws, r, r)
    n_a, n_b = a @ sizes, b @ sizes
    aa = np.einsum("dr,rs,ds->d", a, block_sums, a)
    bb = np.einsum("dr,rs,ds->d", b, block_sums, b)
    ab = np.einsum("dr,rs,ds->d", a, block_sums, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = aa / n_a ** 2 + bb / n_b ** 2 - 2 * ab / (n_a * n_b)
    return np.nan_to_num(out)


def tail_threshold(null: np.ndarray, alpha: float, floor: float = 0.0, squared: bool = False) -> float:
    """The (1 - alpha) quantile of c * chi2(k) with c and k matching the null draws' mean and
    variance (of their squares if ``squared``: for |z|); at least the largest draw and ``floor``."""
    null = np.asarray(null, dtype=float)
    x = null ** 2 if squared else null
    mean, var = float(x.mean()), float(x.var(ddof=1)) if len(x) > 1 else 0.0
    fitted = 0.0
    if mean > 0 and var > 0:
        scale, dof = var / (2 * mean), 2 * mean ** 2 / var
        fitted = scale * float(sstats.chi2.isf(alpha, dof))
    fitted = float(np.sqrt(fitted)) if squared else fitted
    return max(fitted, float(null.max(initial=0.0)), floor)


def z_floor(alpha: float) -> float:
    """|z| exceeded with probability alpha by a standard normal (two-sided)."""
    return float(sstats.norm.isf(alpha / 2))


def psi_floor(bins: int, n_reference: float, n_window: float, alpha: float) -> float:
    """PSI of two independent samples of one distribution is about chi2(bins - 1) * (1/n + 1/m)."""
    if bins < 2 or n_reference <= 0 or n_window <= 0:
        return 0.0
    return float(sstats.chi2.isf(alpha, bins - 1) * (1 / n_reference + 1 / n_window))
