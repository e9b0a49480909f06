"""Spark validation quarantines exactly the rows the library does, for the same reasons."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import spark_validation
from sa2crq.data.validation import InputError, validate_interactions, validate_items

pytestmark = pytest.mark.timeout(300)


def _items() -> pa.Table:
    ok = [0.6, 0.8, 0.0]
    return pa.table(
        {
            "item_id": pa.array([1, 2, 2, None, 5, 6, 7, 8, 9, 10, 11, 12, 13], pa.int64()),
            # 11, 12: blank in every whitespace, not only spaces (tab, newline, no-break and ideographic space)
            "title": ["a", "b", "c", "d", "  ", None, "g", "h", "", "j", "\t\n", "\u00a0\u3000", "\tx\n"],
            "embedding": pa.array(
                [ok, None, ok, ok, None, ok, [1.0, 0.0], [math.nan, 1.0, 0.0], [0.0, 0.0, 0.0], None, None, None, None],
                pa.list_(pa.float32()),
            ),
        }
    )


def _interactions() -> pa.Table:
    return pa.table(
        {
            # the last two rows: the first event, (1, 1, 1), re-sent twice; its first copy is kept
            "user_id": pa.array([1, 1, None, 2, 2, 1, 1], pa.int64()),
            "item_id": pa.array([1, 2, 1, 99, None, 1, 1], pa.int64()),
            "timestamp": pa.array([1, 2, 3, None, 5, 1, 1], pa.int64()),
        }
    )


def _by_reason(table: pa.Table, keys: list[str]) -> set[tuple]:
    return {tuple(row[k] for k in [*keys, "reject_reason"]) for row in table.to_pylist()}


def test_float64_embeddings_beyond_float32_are_non_finite_in_spark_as_in_the_library(spark, tmp_path):
    big = float(np.finfo(np.float32).max)
    items = pa.table({
        "item_id": pa.array([1, 2, 3, 4], pa.int64()),
        "embedding": pa.array([[0.6, 0.8], [1e39, 0.0], [big, 0.0], [-1e300, 1.0]], pa.list_(pa.float64())),
    })  # fmt: skip
    pq.write_table(items, tmp_path / "items.parquet")
    expected = validate_items(items)
    got = spark_validation.validate_items(spark.read.parquet(str(tmp_path / "items.parquet")), max_reject_fraction=1.0)
    rejects = pa.Table.from_pylist([r.asDict() for r in got.rejects.select("item_id", "reject_reason").collect()])
    assert _by_reason(rejects, ["item_id"]) == _by_reason(expected.rejects, ["item_id"]) == {(2, "embedding_non_finite"), (4, "embedding_non_finite")}


def test_spark_and_library_reject_the_same_rows_for_the_same_reasons(spark, tmp_path):
    items, interactions = _items(), _interactions()
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(interactions, tmp_path / "interactions.parquet")

    expected_items = validate_items(items)
    got_items = spark_validation.validate_items(spark.read.parquet(str(tmp_path / "items.parquet")), max_reject_fraction=1.0)
    rejects = pa.Table.from_pylist([r.asDict() for r in got_items.rejects.select("item_id", "reject_reason").collect()])
    assert _by_reason(rejects, ["item_id"]) == _by_reason(expected_items.rejects, ["item_id"])
    assert sorted(r["item_id"] for r in got_items.valid.select("item_id").collect()) == sorted(
        expected_items.valid.column("item_id").to_pylist()
    )
    assert got_items.counts == expected_items.counts

    expected = validate_interactions(interactions, known_item_ids=expected_items.valid.column("item_id"))
    got = spark_validation.validate_interactions(
        spark.read.parquet(str(tmp_path / "interactions.parquet")), got_items.valid, max_reject_fraction=1.0
    )
    keys = ["user_id", "item_id", "timestamp"]
    rejects = pa.Table.from_pylist([r.asDict() for r in got.rejects.select(*keys, "reject_reason").collect()])
    assert _by_reason(rejects, keys) == _by_reason(expected.rejects, keys)
    assert got.counts == expected.counts
    assert got.counts["rows_in"] == got.counts["rows_out"] + got.counts["rejected"]
    assert expected.counts["by_reason"]["duplicate_interaction"] == 2  # the two re-sent copies


def test_the_reject_ceiling_and_schema_rules_refuse_the_input(spark, tmp_path):
    pq.write_table(_items(), tmp_path / "items.parquet")
    with pytest.raises(InputError, match="above max_reject_fraction"):
        spark_validation.validate_items(spark.read.parquet(str(tmp_path / "items.parquet")), max_reject_fraction=0.1)
    pq.write_table(pa.table({"item_id": [1.5], "title": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="item_id"):
        spark_validation.validate_items(spark.read.parquet(str(tmp_path / "bad.parquet")), max_reject_fraction=1.0)
