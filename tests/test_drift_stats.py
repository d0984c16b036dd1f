"""The drift statistics and their calibration (models/monitoring), against values worked out by hand."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from scipy import stats as sstats
from tailbridge.models.monitoring import calibration, stats
from tailbridge.models.monitoring.embed import hashed_trigrams


def test_psi_by_hand():
    # p = (.5, .5), q = (.25, .75): (.25-.5) ln(.5) + (.75-.5) ln(1.5)
    assert stats.psi(np.array([10, 10]), np.array([10, 30]), smoothing=0) == pytest.approx(0.274653, abs=1e-6)
    assert stats.psi(np.array([5, 5]), np.array([50, 50])) == pytest.approx(0.0, abs=1e-3)
    batched = stats.psi(np.array([[10, 10], [10, 10]]), np.array([[10, 30], [10, 10]]), smoothing=0)
    assert batched == pytest.approx([0.274653, 0.0], abs=1e-6)


def test_binned_wasserstein_by_hand():
    edges = [0.0, 1.0, 2.0]  # bins (-inf,0) [0,1) [1,2) [2,inf) with mass at 0, .5, 1.5, 2
    assert stats.wasserstein_binned(np.array([1, 0, 0, 0]), np.array([0, 0, 0, 1]), edges) == pytest.approx(2.0)
    assert stats.wasserstein_binned(np.array([0, 1, 0, 0]), np.array([0, 0, 1, 0]), edges) == pytest.approx(1.0)
    assert stats.wasserstein_binned(np.array([0, 3, 1, 0]), np.array([0, 3, 1, 0]), edges) == 0.0


def test_two_sample_z_by_hand():
    # 50/100 vs 70/100: Fisher's exact one-sided tail of the 2x2 table less half the table's own
    # probability (mid-p), as the normal |z| with it
    table = [[70, 30], [50, 50]]
    one_sided = sstats.fisher_exact(table, alternative="greater")[1] - sstats.hypergeom.pmf(70, 200, 120, 100) / 2
    assert stats.proportion_z(np.array([50, 100]), np.array([70, 100])) == pytest.approx(sstats.norm.isf(one_sided))
    assert 2.75 < stats.proportion_z(np.array([50, 100]), np.array([70, 100])) < 2.89  # the normal approximation: 2.89
    # a rare-event rate (3% of a few hundred): the normal approximation's |z| 5.3 is a tail far above 1e-7
    assert stats.proportion_z(np.array([59, 1919]), np.array([30, 384])) < 4.5
    assert stats.proportion_z(np.array([0, 100]), np.array([0, 0])) == 0.0  # an empty window has no score
    assert math.isfinite(stats.proportion_z(np.array([0, 1000]), np.array([5, 100])))  # a share that was exactly 0
    # means .5 (var .25) vs .6 (var .24), n 100 each: se = sqrt(.0025 + .0024) = .07
    assert stats.mean_z(np.array([50, 50, 100]), np.array([60, 60, 100])) == pytest.approx(1 / 0.7, abs=1e-6)


def test_calibration_chi2_is_zero_when_the_window_clicks_as_predicted():
    reference = np.array([10 - 0.5, 90 - 0.5, 99, 99])  # +0.5 / +1 smoothing: predicted .1 and .9
    assert stats.calibration_chi2(reference, np.array([10, 90, 100, 100])) == pytest.approx(0.0, abs=1e-9)
    # bin 1 clicks 50 of 100 against .9 predicted: (50-90)^2 / (90 * .1) / 2 bins
    assert stats.calibration_chi2(reference, np.array([10, 50, 100, 100])) == pytest.approx(1600 / 9 / 2)


def test_mmd_and_kernel_width_by_hand():
    assert stats.mmd2(np.array([[0.0]]), np.array([[1.0]]), gamma=1.0) == pytest.approx(2 - 2 * math.exp(-1))
    assert stats.median_gamma(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(1 / 4)  # distances^2 1, 4, 9
    x = np.random.default_rng(0).normal(size=(20, 3))
    assert stats.mmd2(x, x, 0.5) == pytest.approx(0.0, abs=1e-9)


def test_quantile_edges_and_bins():
    assert stats.quantile_edges(list(range(1, 11)), 2) == [5.5]
    assert stats.quantile_edges([3.0] * 50, 10) == [3.0]  # ties merged into one edge
    assert stats.quantile_edges([], 10) == []
    assert [stats.bin_index([5.5], v) for v in (5, 5.5, 1e12)] == [0, 1, 1]


def test_reservoir_is_bounded_and_uniform():
    rng = random.Random(1)
    hits = np.zeros(10)
    for _ in range(3000):
        sample = stats.Reservoir(3, rng)
        for i in range(10):
            sample.add(i)
        assert len(sample.items) == 3 and sample.seen == 10
        hits[sample.items] += 1
    assert np.allclose(hits / 3000, 0.3, atol=0.04), hits / 3000


def test_bonferroni_and_textbook_floors():
    assert calibration.bonferroni(1e-4, 40) == pytest.approx(2.5e-6)
    assert calibration.z_floor(0.05) == pytest.approx(1.959964, abs=1e-6)
    assert calibration.psi_floor(2, 100, 100, 0.05) == pytest.approx(3.841459 * 0.02, abs=1e-6)


def test_tail_threshold_recovers_a_scaled_chi_square_quantile():
    null = 2.0 * np.random.default_rng(3).chisquare(3, size=20_000)
    # far beyond the largest of the draws, as the per-test levels are
    assert calibration.tail_threshold(null, 1e-6) == pytest.approx(2 * sstats.chi2.isf(1e-6, 3), rel=0.05)
    assert calibration.tail_threshold(np.zeros(50), 0.01, floor=4.7) == 4.7  # no variation: the floor
    z = np.abs(np.random.default_rng(4).normal(size=20_000))  # |z| of a standard normal: its own quantile
    assert calibration.tail_threshold(z, 1e-5, squared=True) == pytest.approx(calibration.z_floor(1e-5), rel=0.05)


def test_block_bootstrap_sees_overdispersion():
    rng = np.random.default_rng(5)
    iid = np.stack([[s, 200] for s in rng.binomial(200, 0.3, size=30)])
    clustered = np.stack([[rng.binomial(200, p), 200] for p in rng.uniform(0.1, 0.5, size=30)])
    z_iid = calibration.bootstrap_null(iid, 6, stats.proportion_z, 2000, rng)
    z_clustered = calibration.bootstrap_null(clustered, 6, stats.proportion_z, 2000, rng)
    assert 0.6 < np.mean(z_iid ** 2) < 1.6  # independent events: about a chi-square(1)
    assert np.mean(z_clustered ** 2) > 3  # buckets that differ: a wider null, so a higher threshold


def test_windows_are_runs_so_neighbouring_buckets_that_move_together_widen_the_null():
    rng = np.random.default_rng(8)
    rate = 0.3 + 0.15 * np.sin(2 * np.pi * np.arange(30) / 30)  # a slow swing, no drift
    buckets = np.stack([[rng.binomial(400, p), 400] for p in rate])
    z_runs = calibration.bootstrap_null(buckets, 6, stats.proportion_z, 2000, np.random.default_rng(1))
    shuffled = buckets[np.random.default_rng(2).permutation(30)]  # same buckets, order lost
    z_shuffled = calibration.bootstrap_null(shuffled, 6, stats.proportion_z, 2000, np.random.default_rng(1))
    assert np.mean(z_runs ** 2) > 2 * np.mean(z_shuffled ** 2)


def test_mmd_null_from_block_sums_matches_direct_computation():
    rng = np.random.default_rng(6)
    vectors = [rng.normal(size=(4, 3)) for _ in range(5)]
    everything = np.concatenate(vectors)
    kernel = stats.rbf_kernel(everything, everything, 0.3)
    owner = np.repeat(np.arange(5), 4)
    blocks = np.array([[kernel[owner == a][:, owner == b].sum() for b in range(5)] for a in range(5)])
    null = calibration.mmd_null(blocks, np.full(5, 4.0), 5, 3, np.random.default_rng(7))
    # the same draws, computed directly from the vectors
    again = np.random.default_rng(7)
    picks_a = (again.integers(0, 5, size=3)[:, None] + np.arange(5)) % 5  # the window: a run of buckets
    picks_b = again.integers(0, 5, size=(3, 5))
    for d in range(3):
        x = np.concatenate([vectors[i] for i in picks_a[d]])
        y = np.concatenate([vectors[i] for i in picks_b[d]])
        assert null[d] == pytest.approx(stats.mmd2(x, y, 0.3), abs=1e-9)


def test_hashed_trigram_vectors_are_unit_and_separate_new_words():
    v = hashed_trigrams(["red sofa", "red sofa", "quadcopter gimbal"])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0)
    assert v[0] @ v[1] == pytest.approx(1.0) and v[0] @ v[2] < 0.3
