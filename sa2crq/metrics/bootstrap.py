"""Paired bootstrap confidence intervals for a difference between two retrievers (DESIGN §5).

``a`` (the variant) and ``b`` (the reference) are per-request metric values on the *same* requests, in
the same order (e.g. :meth:`RetrievalAccumulator.per_request("recall@10")` of two runs). The statistic
is the mean paired difference ``mean(a - b)``; its distribution is estimated by resampling requests
with replacement ``n_resamples`` times, and the interval is the percentile interval of the resampled
means (95% by default). A difference is a **win** when the whole interval lies above zero, a **loss**
when it lies below, and otherwise not called.

**Pooling over seeds.** DESIGN §5 calls a win only over at least two seeds. The caller concatenates
the per-request arrays of every seed (row ``j`` of ``a`` and of ``b`` must come from the same seed and
request) and passes ``groups``, the seed id of every row. Resampling is then *stratified*: each
resample draws, within every seed, as many rows as that seed has, with replacement, so every seed
keeps its weight in the pooled mean and the interval reflects request-level noise within seeds, not a
reshuffling of seeds. Without ``groups`` all rows form one stratum.

Implementation: the resample index matrix is drawn in chunks of resamples (bounded to about
``_MAX_DRAWS`` indices at a time, so memory does not grow with ``n_resamples``) from
``np.random.default_rng(seed)``; the chunking depends only on the input size, so a given seed gives
the same interval every time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["BootstrapResult", "paired_bootstrap"]

_MAX_DRAWS = 1 << 24  # indices per chunk of resamples: 128 MiB of int64


@dataclass(frozen=True)
class BootstrapResult:
    """Observed mean difference ``a - b``, its bootstrap interval ``[low, high]``, over ``n`` rows."""

    mean_diff: float
    low: float
    high: float
    n: int

    @property
    def is_win(self) -> bool:
        """The variant is better: the whole interval lies above zero."""
        return self.low > 0

    @property
    def is_loss(self) -> bool:
        """The variant is worse: the whole interval lies below zero."""
        return self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "is_win": self.is_win, "is_loss": self.is_loss}


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
    confidence: float = 0.95,
) -> BootstrapResult:
    """Percentile bootstrap interval of ``mean(a - b)`` over requests; see the module docstring.

    ``groups`` (same length as ``a``) makes the resampling stratified per group (per seed).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be 1-d arrays of the same length, got {a.shape} and {b.shape}")
    n = a.size
    if n == 0:
        raise ValueError("paired_bootstrap needs at least one request")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diff = a - b
    if not np.isfinite(diff).all():
        raise ValueError("a and b must be finite")

    # Rows sorted by stratum; each sorted position draws uniformly within its own stratum's range.
    if groups is None:
        order = np.arange(n)
        stratum_start = np.zeros(n, dtype=np.int64)
        stratum_size = np.full(n, n, dtype=np.int64)
    else:
        groups = np.asarray(groups)
        if groups.shape != a.shape:
            raise ValueError(f"groups has shape {groups.shape}, expected {a.shape}")
        order = np.argsort(groups, kind="stable")
        _, first, sizes = np.unique(groups[order], return_index=True, return_counts=True)
        stratum_start = np.repeat(first, sizes).astype(np.int64)
        stratum_size = np.repeat(sizes, sizes).astype(np.int64)
    sorted_diff = diff[order]

    rng = np.random.default_rng(seed)
    chunk = max(1, _MAX_DRAWS // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for lo in range(0, n_resamples, chunk):  # loop over chunks of resamples, not over requests
        hi = min(lo + chunk, n_resamples)
        idx = stratum_start + rng.integers(0, stratum_size, size=(hi - lo, n))
        means[lo:hi] = sorted_diff[idx].mean(axis=1)

    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return BootstrapResult(mean_diff=float(diff.mean()), low=float(low), high=float(high), n=int(n))
