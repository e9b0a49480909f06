"""Spark SARQ finalisation and SID tokens equal the library's single-process SID assignment, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.spark_sarq import finalise_sids, sid_table
from sa2crq.config import SIDConfig
from sa2crq.data.segments import TAIL
from sa2crq.ids.sid_table import assign_sids

CASES = [
    SIDConfig(),
    SIDConfig(max_bucket=100, min_length=2, tau=9.0),
    SIDConfig(adaptive_length=False, always_digit=True, digit_vocab=4),
    SIDConfig(max_bucket=100, one_item_per_id=True, digit_vocab=256),
]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("config", CASES, ids=["default", "deep-min", "tiger-digits", "one-per-id"])
def test_spark_finalisation_equals_the_library(spark, config):
    rng = np.random.default_rng(7)
    n, levels = 3000, 3
    codes = rng.integers(0, 6, size=(n, levels))  # few codes: shared prefixes, buckets and collisions
    popularity = (rng.pareto(1.1, n) * 3).astype(np.int64) * (rng.random(n) < 0.8)
    popularity[:30] = 10_000  # a few items carry the traffic, so the rest is truncated
    item_ids = rng.permutation(10 * n)[:n].astype(np.int64)
    expected = assign_sids(item_ids, codes, popularity, np.full(n, TAIL), (6,) * levels, config)

    frame = spark.createDataFrame(
        [(int(i), [int(c) for c in row], int(p)) for i, row, p in zip(item_ids, codes, popularity)],
        "item_id long, codes array<int>, popularity long",
    )
    finalised = finalise_sids(frame, levels, config)
    got = sid_table(finalised, expected.vocab).select("item_id", "code_depth", "digit", "sid", "bucket_size").toPandas()
    got = got.set_index("item_id").loc[item_ids]
    if config.adaptive_length:  # the case exercises truncation, not just full depth
        assert (expected.code_depth < levels).any()
    np.testing.assert_array_equal(got["code_depth"].to_numpy(), expected.code_depth)
    np.testing.assert_array_equal(got["digit"].to_numpy(), expected.digit)
    library_sids = expected.to_arrow().column("sid").to_pylist()
    assert [list(s) for s in got["sid"]] == library_sids
    np.testing.assert_array_equal(got["bucket_size"].to_numpy(), expected.bucket_size)
