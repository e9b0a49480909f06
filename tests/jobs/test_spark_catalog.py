"""Spark catalog split: popularity over a window, segments equal to the library's, stable shards."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.spark_catalog import catalog_split
from sa2crq.config import SegmentConfig
from sa2crq.data.segments import SEGMENT_NAMES, assign_segments


@pytest.mark.timeout(300)
def test_segments_equal_the_library_and_the_window_bounds_popularity(spark):
    rng = np.random.default_rng(11)
    n = 2000
    item_ids = rng.permutation(50 * n)[:n].astype(np.int64)
    # Heavy-tailed traffic with many ties, some items never seen.
    per_item = (rng.pareto(1.0, n) * 2).astype(np.int64)
    rows = np.repeat(item_ids, per_item)
    stamps = rng.integers(0, 100, len(rows))
    items = spark.createDataFrame([(int(i),) for i in item_ids], "item_id long")
    interactions = spark.createDataFrame(
        [(0, int(i), int(t)) for i, t in zip(rows, stamps)], "user_id long, item_id long, timestamp long"
    )
    config = SegmentConfig(head_fraction=0.2, torso_fraction=0.3)
    got = catalog_split(items, interactions, config, shards=8, window=(10, 90)).toPandas().set_index("item_id").loc[item_ids]

    inside = (stamps >= 10) & (stamps < 90)
    expected_pop = np.zeros(n, dtype=np.int64)
    np.add.at(expected_pop, np.searchsorted(np.sort(item_ids), rows[inside]), 1)
    expected_pop = expected_pop[np.argsort(np.argsort(item_ids))]
    np.testing.assert_array_equal(got["popularity"].to_numpy(), expected_pop)
    # Both boundaries (ranks 400 and 1,000) fall inside a tied popularity value: the ids decide there.
    ranked = np.sort(expected_pop)[::-1]
    assert ranked[399] == ranked[400] > 0 and ranked[999] == ranked[1000] > 0
    expected_segments = np.asarray(SEGMENT_NAMES)[assign_segments(item_ids, expected_pop, config)]
    np.testing.assert_array_equal(got["segment"].to_numpy(), expected_segments)
    assert set(got["segment"]) == set(SEGMENT_NAMES)
    assert got["shard"].between(0, 7).all() and got["shard"].nunique() == 8
    again = catalog_split(items, interactions, config, shards=8, window=(10, 90)).toPandas().set_index("item_id").loc[item_ids]
    np.testing.assert_array_equal(again["shard"].to_numpy(), got["shard"].to_numpy())
