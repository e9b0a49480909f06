"""The tokenizer's stratified sample: about ``per_segment`` items of each segment, the same items on
every run and for any split of the catalog into shards."""

from __future__ import annotations

import numpy as np
import pytest

from sa2crq.data.segments import COLD, HEAD, TAIL, TORSO
from sa2crq.quantize.sample import in_sample, sample_fractions, sample_report


def test_fractions_cap_only_the_segments_above_the_cap():
    assert sample_fractions(np.array([10, 100, 1000, 0]), 100).tolist() == [1.0, 1.0, 0.1, 1.0]
    assert sample_fractions(np.array([10, 100, 1000, 0]), 0).tolist() == [1.0] * 4  # 0: every item


@pytest.mark.parametrize("ids", [np.arange(200_000, dtype=np.int64) * 7919, np.array([f"item-{i}" for i in range(200_000)], dtype=object)])
def test_sample_is_stratified_seeded_and_shard_independent(ids):
    rng = np.random.default_rng(0)
    segments = rng.choice([HEAD, TORSO, TAIL, COLD], size=ids.size, p=[0.01, 0.09, 0.6, 0.3]).astype(np.int8)
    counts = np.bincount(segments, minlength=4)
    fractions = sample_fractions(counts, 5_000)
    keep = in_sample(ids, segments, fractions, seed=0)
    kept = np.bincount(segments[keep], minlength=4)
    assert kept[HEAD] == counts[HEAD]  # under the cap: whole
    for segment in (TORSO, TAIL, COLD):  # about the cap: binomial, 5 sigma
        assert abs(kept[segment] - 5_000) < 5 * np.sqrt(5_000)
    # Applied shard by shard (any order, any split), the same items; another seed, other items.
    order = rng.permutation(ids.size)
    shards = np.array_split(order, 7)
    by_shard = np.zeros(ids.size, dtype=bool)
    for shard in shards:
        by_shard[shard] = in_sample(ids[shard], segments[shard], fractions, seed=0)
    assert np.array_equal(by_shard, keep)
    other = in_sample(ids, segments, fractions, seed=1)
    assert not np.array_equal(other, keep) and np.array_equal(other[segments == HEAD], keep[segments == HEAD])


def test_report_names_segments():
    report = sample_report(np.array([1, 2, 300, 4]), np.array([1.0, 1.0, 0.5, 1.0]), 150)
    assert report == {"per_segment": 150, "segments": {"head": {"items": 1, "fraction": 1.0}, "torso": {"items": 2, "fraction": 1.0},
                                                       "tail": {"items": 300, "fraction": 0.5}, "cold": {"items": 4, "fraction": 1.0}}}
