"""The recode job's SID statistics (Spark aggregates) equal the library's tokenizer report on the same table."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.recode import _sid_statistics
from sa2crq.config import SIDConfig
from sa2crq.data.segments import SEGMENT_NAMES
from sa2crq.ids.sid_table import assign_sids
from sa2crq.metrics.tokenizer_report import tokenizer_report


def test_recode_sid_statistics_equal_the_library_report(spark, tmp_path):
    rng = np.random.default_rng(3)
    n = 600
    codes = rng.integers(0, 8, (n, 3))
    codes[:40] = codes[0]  # one near-duplicate group: a large bucket
    segments = rng.integers(0, len(SEGMENT_NAMES), n).astype(np.int8)
    table = assign_sids(np.arange(n) * 7, codes, rng.integers(0, 30, n), segments, (8, 8, 8), SIDConfig(max_bucket=8))
    library = tokenizer_report(table, {}, method="sa2crq", max_bucket=8)
    pq.write_table(table.to_arrow(), tmp_path / "sid_table.parquet")
    spark_stats = _sid_statistics(spark.read.parquet(str(tmp_path / "sid_table.parquet")), table.vocab)

    assert spark_stats["items"] == n and spark_stats["distinct_sids"] == library["distinct_sids"]
    assert spark_stats["bucket_sizes"] == library["bucket_sizes"] and len(library["bucket_sizes"]) > 2
    assert spark_stats["collision_rate"] == pytest.approx(library["collision_rate"], abs=1e-6)
    assert spark_stats["codebook"] == [pytest.approx(level) for level in library["codebook"]]
    for name in SEGMENT_NAMES:
        ours, theirs = spark_stats["segments"][name], library["segments"][name]
        assert ours["items"] == theirs["items"] and ours["sid_length_histogram"] == theirs["sid_length_histogram"], name
        assert ours["mean_sid_len"] == pytest.approx(theirs["mean_sid_len"], abs=1e-6)
