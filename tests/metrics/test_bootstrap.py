"""Paired bootstrap intervals: degenerate cases, clear wins, determinism, stratification."""

from __future__ import annotations

import numpy as np
import pytest

from sa2crq.metrics import bootstrap as bootstrap_module
from sa2crq.metrics.bootstrap import BootstrapResult, paired_bootstrap


def _hits(n: int, p: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(np.float64)


def test_identical_arrays_give_a_zero_interval():
    a = _hits(500, 0.3, seed=1)
    res = paired_bootstrap(a, a.copy())
    assert (res.mean_diff, res.low, res.high, res.n) == (0.0, 0.0, 0.0, 500)
    assert not res.is_win and not res.is_loss


def test_clearly_better_variant_is_a_win_and_the_reverse_a_loss():
    b = np.random.default_rng(0).random(300)
    a = b + 0.1
    win = paired_bootstrap(a, b)
    assert win.mean_diff == pytest.approx(0.1)
    assert win.low == pytest.approx(0.1) and win.high == pytest.approx(0.1)
    assert win.is_win and not win.is_loss
    loss = paired_bootstrap(b, a)
    assert loss.is_loss and not loss.is_win


def test_noisy_difference_interval_covers_the_mean_and_is_not_called():
    a = _hits(400, 0.3, seed=1)
    b = _hits(400, 0.3, seed=2)
    res = paired_bootstrap(a, b, n_resamples=2000)
    assert res.low < res.mean_diff < res.high
    # Paired 0/1 differences of two independent p=0.3 hit vectors: sd about 0.65, so half-width ~0.064.
    assert 0.03 < (res.high - res.low) / 2 < 0.1
    assert res.low < 0 < res.high and not res.is_win and not res.is_loss


def test_seeded_determinism():
    a, b = _hits(1000, 0.2, seed=3), _hits(1000, 0.25, seed=4)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, seed=7) != paired_bootstrap(a, b, seed=8)


def test_chunked_draws_match_the_unchunked_distribution(monkeypatch):
    # Force many small chunks; the interval is a percentile estimate, so compare loosely.
    a, b = _hits(2000, 0.3, seed=5), _hits(2000, 0.2, seed=6)
    whole = paired_bootstrap(a, b, n_resamples=4000)
    monkeypatch.setattr(bootstrap_module, "_MAX_DRAWS", 2000 * 7)
    chunked = paired_bootstrap(a, b, n_resamples=4000)
    assert chunked.mean_diff == whole.mean_diff
    assert chunked.low == pytest.approx(whole.low, abs=0.005)
    assert chunked.high == pytest.approx(whole.high, abs=0.005)


def test_stratified_groups_keep_each_seed_weight():
    # Two seeds with very different constant differences: unstratified resampling varies the share of
    # rows from each seed and so the pooled mean; stratified resampling keeps n_g fixed, so it cannot.
    n = 200
    diff = np.r_[np.zeros(n), np.ones(n)]
    a, b = diff, np.zeros(2 * n)
    groups = np.r_[np.zeros(n, dtype=int), np.ones(n, dtype=int)]
    pooled = paired_bootstrap(a, b)
    strat = paired_bootstrap(a, b, groups=groups)
    assert pooled.mean_diff == strat.mean_diff == 0.5
    assert pooled.high - pooled.low > 0.05
    assert strat.low == pytest.approx(0.5) and strat.high == pytest.approx(0.5)


def test_stratified_groups_need_not_be_sorted_or_contiguous():
    rng = np.random.default_rng(0)
    a, b = _hits(600, 0.4, seed=8), _hits(600, 0.3, seed=9)
    groups = rng.integers(0, 3, 600)
    res = paired_bootstrap(a, b, groups=groups)
    assert res.low < res.mean_diff < res.high
    perm = rng.permutation(600)
    # Stratification sorts rows by group stably, so permuting rows within the data changes the draws but
    # not the statistic; the interval stays close.
    res_perm = paired_bootstrap(a[perm], b[perm], groups=groups[perm], n_resamples=4000)
    assert res_perm.mean_diff == pytest.approx(res.mean_diff)
    assert abs(res_perm.low - res.low) < 0.02 and abs(res_perm.high - res.high) < 0.02


def test_result_is_frozen_and_serialisable():
    res = BootstrapResult(mean_diff=0.1, low=0.05, high=0.15, n=10)
    with pytest.raises(AttributeError):
        res.low = 0.0  # type: ignore[misc]
    assert res.to_dict() == {"mean_diff": 0.1, "low": 0.05, "high": 0.15, "n": 10, "is_win": True, "is_loss": False}


def test_invalid_inputs_raise():
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(0), np.zeros(0))
    with pytest.raises(ValueError):
        paired_bootstrap(np.array([np.nan, 1.0]), np.zeros(2))
    with pytest.raises(ValueError):
        paired_bootstrap(np.zeros(3), np.zeros(3), groups=np.zeros(2))
