"""SARQ lengths and SID assignment (DESIGN §3.3), against a plain-Python reference of the definition."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sa2crq.config import SIDConfig
from sa2crq.data.segments import TAIL
from sa2crq.ids.sid_table import SIDVocabulary, assign_sids
from sa2crq.ids.trie import EOS, SIDTrie
from sa2crq.quantize.sarq import default_tau, keep_threshold, path_entropy, prefix_group_ids, prefix_masses, sarq_lengths


def random_codes(rng: np.random.Generator, n: int, levels: int, k: int) -> np.ndarray:
    # Few distinct first codes so prefixes are shared and collisions happen.
    return rng.integers(0, k, size=(n, levels))


def reference_lengths(codes: np.ndarray, pop: np.ndarray, cfg: SIDConfig) -> list[int]:
    """The definition, item by item, with exact fractions; bucket cap applied level by level."""
    n, levels = codes.shape
    w = [int(p) + cfg.epsilon for p in pop]
    total = sum(w)
    tau = cfg.tau if cfg.tau is not None else math.log2(n)
    limit = Fraction(2.0 ** (-tau))
    mass = Counter()
    for i in range(n):
        for l in range(1, levels + 1):
            mass[tuple(codes[i, :l])] += w[i]
    lengths = []
    for i in range(n):
        kept = [l for l in range(cfg.min_length, levels + 1) if Fraction(mass[tuple(codes[i, :l])], total) >= limit]
        lengths.append(max(kept) if kept else cfg.min_length)
    for depth in range(1, levels):
        buckets = Counter(tuple(codes[i, :depth]) for i in range(n) if lengths[i] == depth)
        for i in range(n):
            if lengths[i] == depth and buckets[tuple(codes[i, :depth])] > cfg.max_bucket:
                lengths[i] = depth + 1
    return lengths


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(1, 120),
    k=st.integers(2, 6),
    tau_shift=st.sampled_from([-3.0, -1.0, -0.25, 0.0, 0.5, 2.0]),
    max_bucket=st.integers(1, 8),
    min_length=st.integers(1, 3),
)
def test_lengths_match_the_definition(seed, n, k, tau_shift, max_bucket, min_length):
    rng = np.random.default_rng(seed)
    codes = random_codes(rng, n, 3, k)
    pop = rng.integers(0, 20, n) * (rng.random(n) < 0.7)
    cfg = SIDConfig(tau=max(0.1, math.log2(max(n, 2)) + tau_shift), max_bucket=max_bucket, min_length=min_length)
    lengths, _, _ = sarq_lengths(codes, pop, cfg)
    assert lengths.tolist() == reference_lengths(codes, pop, cfg)


def test_path_entropy_never_decreases_with_depth():
    rng = np.random.default_rng(0)
    codes = random_codes(rng, 500, 4, 5)
    weights = rng.integers(1, 50, 500)
    entropy = path_entropy(prefix_masses(prefix_group_ids(codes), weights), int(weights.sum()))
    assert (np.diff(entropy, axis=1) >= 0).all()


def test_items_at_or_above_mean_popularity_keep_full_depth():
    rng = np.random.default_rng(1)
    codes = random_codes(rng, 2000, 4, 16)
    pop = rng.pareto(1.2, 2000).astype(np.int64)
    lengths, tau, _ = sarq_lengths(codes, pop, SIDConfig(max_bucket=10**6))
    assert tau == pytest.approx(math.log2(2000))
    above_mean = (pop + 1) >= (pop + 1).mean()
    assert above_mean.any() and (lengths[above_mean] == 4).all()
    assert (lengths < 4).any()  # tau does shape the tail


def test_larger_budget_never_shortens_an_id():
    rng = np.random.default_rng(2)
    codes = random_codes(rng, 3000, 4, 8)
    pop = rng.pareto(1.0, 3000).astype(np.int64)
    previous = None
    for tau in np.arange(4.0, 16.0, 0.25):
        lengths, _, _ = sarq_lengths(codes, pop, SIDConfig(tau=float(tau), max_bucket=10**6))
        if previous is not None:
            assert (lengths >= previous).all()
        previous = lengths


def test_keep_threshold_is_exact_for_huge_masses():
    total = 2**62 + 12345
    threshold = keep_threshold(total, 7.5)
    assert Fraction(threshold - 1) < Fraction(total) * Fraction(2.0**-7.5) <= Fraction(threshold)


def _table(codes, pop, cfg, ids=None):
    n, levels = codes.shape
    ids = np.arange(n) if ids is None else ids
    return assign_sids(ids, codes, pop, np.full(n, TAIL), (int(codes.max()) + 1,) * levels, cfg)


def test_bucket_cap_holds_and_only_full_depth_can_exceed_it():
    rng = np.random.default_rng(3)
    codes = random_codes(rng, 5000, 3, 16)
    pop = np.zeros(5000, dtype=np.int64)
    pop[:50] = 10_000  # a few items carry the traffic, so the cold rest wants to be short
    table = _table(codes, pop, SIDConfig(max_bucket=24))
    truncated = table.code_depth < 3
    assert truncated.any()
    assert table.bucket_size[truncated].max() <= 24
    # Without the cap, level-1 buckets would hold ~300 items.
    uncapped = _table(codes, pop, SIDConfig(max_bucket=10**6))
    assert uncapped.bucket_size[uncapped.code_depth < 3].max() > 24


def test_full_depth_collisions_get_digits_ranked_by_popularity_then_id():
    codes = np.array([[1, 1], [1, 1], [1, 1], [2, 2]])
    pop = np.array([5, 9, 5, 1])
    ids = np.array([30, 20, 10, 40])
    table = _table(codes, pop, SIDConfig(adaptive_length=False), ids)
    # Item 20 (pop 9) first; items 10 and 30 tie on popularity, 10 wins on id. Item 40 is alone.
    assert table.digit.tolist() == [2, 0, 1, -1]
    assert table.bucket_size.tolist() == [1, 1, 1, 1]
    assert len(np.unique(table.sid_index)) == 4


def test_always_digit_gives_every_full_depth_id_a_digit():
    codes = np.array([[1, 1], [1, 1], [2, 2]])
    table = _table(codes, np.ones(3, dtype=np.int64), SIDConfig(adaptive_length=False, always_digit=True))
    assert table.digit.tolist() == [0, 1, 0]
    assert (table.sid_len == 3).all()


def test_digit_overflow_shares_the_last_digit_as_a_bucket():
    codes = np.zeros((7, 2), dtype=np.int64)
    table = _table(codes, np.arange(7), SIDConfig(adaptive_length=False, digit_vocab=4))
    assert sorted(table.digit.tolist()) == [0, 1, 2, 3, 3, 3, 3]
    assert table.digit_overflow_items == 4
    assert table.bucket_size.max() == 4


def test_one_item_per_id_makes_every_sid_unique_and_refuses_overflow():
    rng = np.random.default_rng(4)
    codes = random_codes(rng, 400, 3, 6)
    pop = rng.integers(0, 3, 400)
    table = _table(codes, pop, SIDConfig(max_bucket=8, one_item_per_id=True, digit_vocab=64))
    assert (table.bucket_size == 1).all()
    with pytest.raises(ValueError, match="digit vocabulary"):
        _table(np.zeros((9, 2), dtype=np.int64), np.zeros(9), SIDConfig(one_item_per_id=True, digit_vocab=4))


def test_tokens_end_with_eos_and_the_trie_accepts_exactly_the_table():
    rng = np.random.default_rng(5)
    codes = random_codes(rng, 1000, 4, 5)
    pop = rng.pareto(1.0, 1000).astype(np.int64)
    table = _table(codes, pop, SIDConfig(max_bucket=4))
    lengths = table.sid_len + 1
    assert (table.tokens[np.arange(1000), lengths - 1] == EOS).all()
    trie = SIDTrie.build(table.tokens, lengths, table.vocab.size)
    assert trie.n_sids == len(np.unique(table.sid_index))
    # Same SID index <=> same token sequence.
    _, by_tokens = np.unique(table.tokens, axis=0, return_inverse=True)
    assert len(np.unique(np.stack([by_tokens.reshape(-1), table.sid_index], 1), axis=0)) == trie.n_sids


def test_sids_do_not_depend_on_row_order():
    rng = np.random.default_rng(6)
    codes = random_codes(rng, 800, 3, 5)
    pop = rng.integers(0, 5, 800)
    ids = rng.permutation(10_000)[:800]
    a = _table(codes, pop, SIDConfig(max_bucket=4), ids)
    perm = rng.permutation(800)
    b = _table(codes[perm], pop[perm], SIDConfig(max_bucket=4), ids[perm])
    np.testing.assert_array_equal(a.tokens[perm], b.tokens)


def test_vocabulary_layout():
    vocab = SIDVocabulary((4, 6), digit_vocab=3)
    assert vocab.level_offsets.tolist() == [2, 6]
    assert vocab.digit_offset == 12 and vocab.size == 15 and vocab.max_tokens == 4


def test_tau_defaults_to_log2_n():
    assert default_tau(1024) == 10.0
