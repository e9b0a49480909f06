"""SARQ: Sequential Adaptive Residual Quantization, the ID-length rule (DESIGN §3.3).

Every item is encoded to full depth; its path is then cut by path entropy. With integer masses
w(i) = pop(i) + epsilon, the mass of a prefix p is M(p) = sum of w over items whose path starts
with p, and S_l(i) = -log2(M(prefix_l(i)) / W). ``S_l <= tau`` is the same as
``M >= W * 2**-tau``, so the keep-test is an exact integer comparison against one threshold,
``ceil(W * 2**-tau)``, computed once by :func:`keep_threshold`. Every implementation (this one,
the Spark one) calls that function, so they agree bit for bit.

All functions are vectorised over items; the only Python loops run over levels.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from sa2crq.config import SIDConfig


def prefix_group_ids(codes: np.ndarray) -> list[np.ndarray]:
    """For each depth l = 1..L, a dense id of every item's prefix c_1..c_l (equal ids, equal prefixes).

    Ids are built depth by depth from (parent id, code) pairs, so they never overflow however
    large the codebooks are.
    """
    codes = np.asarray(codes, dtype=np.int64)
    groups: list[np.ndarray] = []
    parent = np.zeros(codes.shape[0], dtype=np.int64)
    for level in range(codes.shape[1]):
        width = int(codes[:, level].max(initial=0)) + 1
        _, parent = np.unique(parent * width + codes[:, level], return_inverse=True)
        parent = parent.astype(np.int64).reshape(-1)
        groups.append(parent)
    return groups


def item_weights(popularity: np.ndarray, epsilon: int) -> np.ndarray:
    """Integer traffic mass per item, pop + epsilon."""
    return np.asarray(popularity, dtype=np.int64) + np.int64(epsilon)


def keep_threshold(total_mass: int, tau: float) -> int:
    """Smallest integer prefix mass that keeps a prefix: ceil(W * 2**-tau), in exact rational
    arithmetic (2**-tau as a float is a dyadic rational), so no rounding can differ between engines."""
    return max(1, math.ceil(Fraction(int(total_mass)) * Fraction(2.0 ** (-float(tau)))))


def default_tau(n_items: int) -> float:
    """log2 N: keep a prefix while it carries at least an average item's share of traffic."""
    return math.log2(max(n_items, 2))


def prefix_masses(groups: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """(N, L) integer mass of each item's prefix at every depth."""
    masses = np.empty((len(weights), len(groups)), dtype=np.int64)
    for level, gid in enumerate(groups):
        per_group = np.zeros(int(gid.max(initial=-1)) + 1, dtype=np.int64)
        np.add.at(per_group, gid, weights)
        masses[:, level] = per_group[gid]
    return masses


def path_entropy(masses: np.ndarray, total_mass: int) -> np.ndarray:
    """(N, L) S_l(i) in bits, for reports; the length rule itself uses integer masses."""
    return -np.log2(masses / float(total_mass))


def sarq_lengths(codes: np.ndarray, popularity: np.ndarray, config: SIDConfig) -> tuple[np.ndarray, float, int]:
    """Code depth per item, and the tau and integer threshold used.

    len(i) = max{l in [L_min, L_max] : S_l(i) <= tau}, or L_min if none. Masses never grow with
    depth, so the kept depths form a prefix and the length is a count. Then the bucket cap: a
    truncated SID shared by more than ``max_bucket`` items deepens all of them by one level,
    repeated level by level, so no truncated bucket exceeds the cap.
    """
    n, levels = codes.shape
    groups = prefix_group_ids(codes)
    weights = item_weights(popularity, config.epsilon)
    total = int(weights.sum())
    tau = config.tau if config.tau is not None else default_tau(n)
    threshold = keep_threshold(total, tau)
    kept = (prefix_masses(groups, weights) >= threshold).sum(axis=1)
    lengths = np.clip(kept, config.min_length, levels).astype(np.int64)
    return apply_bucket_cap(lengths, groups, config.max_bucket), float(tau), threshold


def apply_bucket_cap(lengths: np.ndarray, groups: list[np.ndarray], max_bucket: int) -> np.ndarray:
    """Deepen by one level every item of a truncated bucket larger than ``max_bucket``.

    Shallow levels first: items deepened at level l join the items already at l + 1 with the same
    prefix, and that merged bucket is checked in the next round.
    """
    lengths = lengths.copy()
    levels = len(groups)
    for depth in range(1, levels):
        at_depth = lengths == depth
        if not at_depth.any():
            continue
        gid = groups[depth - 1]
        sizes = np.bincount(gid[at_depth], minlength=int(gid.max()) + 1)
        lengths[at_depth & (sizes[gid] > max_bucket)] = depth + 1
    return lengths
