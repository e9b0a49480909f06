"""Spark SID churn and remap equal the library's single-process sid_churn, bit for bit."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from jobs.spark_stability import sid_churn_spark
from sa2crq.config import SIDConfig
from sa2crq.data.segments import TAIL
from sa2crq.ids.sid_table import assign_sids
from sa2crq.ids.stability import sid_churn

K, LEVELS = 4, 3  # few codes: shared prefixes, truncated buckets and digits in a tiny catalog
CONFIG = SIDConfig(max_bucket=4)
COUNTS = ("common", "changed", "added", "removed")


def _sids(ids, codes, pop) -> pa.Table:
    """A SID table as the jobs publish it (every column of SIDTable.to_arrow)."""
    ids = np.asarray(ids, dtype=np.int64)
    return assign_sids(ids, codes, pop, np.full(len(ids), TAIL), (K,) * LEVELS, CONFIG).to_arrow()


def _catalog(seed: int = 3, n: int = 40):
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) * 10**10  # past int32: the ids must stay long
    codes = rng.integers(0, K, size=(n, LEVELS))
    pop = (rng.pareto(1.1, n) * 3).astype(np.int64)
    pop[:3] = 1000  # a few hot items at full depth, the cold rest truncated
    return rng, ids, codes, pop


def unchanged():
    rng, ids, codes, pop = _catalog()
    previous = _sids(ids, codes, pop)
    return previous, previous.take(rng.permutation(previous.num_rows))  # rows in another order


def changed():
    rng, ids, codes, pop = _catalog()
    recoded = codes.copy()
    recoded[:10] = rng.integers(0, K, size=(10, LEVELS))
    return _sids(ids, codes, pop), _sids(ids, recoded, pop)


def removed():
    rng, ids, codes, pop = _catalog()
    previous = _sids(ids, codes, pop)
    return previous, previous.filter(pa.array(rng.random(len(ids)) < 0.7))


def added():
    rng, ids, codes, pop = _catalog()
    current = _sids(ids, codes, pop)
    return current.filter(pa.array(rng.random(len(ids)) < 0.7)), current


def disjoint():
    _, ids, codes, pop = _catalog()
    return _sids(ids[:20], codes[:20], pop[:20]), _sids(ids[20:], codes[20:], pop[20:])


def recoded():
    """A recode: some items leave, some get new codes and popularity, new ones arrive."""
    rng, ids, codes, pop = _catalog()
    keep = rng.random(len(ids)) < 0.75
    new_codes = codes.copy()
    new_codes[:8] = rng.integers(0, K, size=(8, LEVELS))
    fresh_ids = (np.arange(8) + 1) * 10**10 + 7
    current = _sids(
        np.concatenate([ids[keep], fresh_ids]),
        np.concatenate([new_codes[keep], rng.integers(0, K, size=(8, LEVELS))]),
        np.concatenate([(pop * rng.integers(0, 3, len(ids)))[keep], rng.integers(0, 20, 8)]),
    )
    return _sids(ids, codes, pop), current


def string_ids():
    """The recode with string ids, whose sort order differs from the integers'."""

    def named(table: pa.Table) -> pa.Table:
        index = table.schema.get_field_index("item_id")
        return table.set_column(index, "item_id", pa.array([f"sku-{i}" for i in table.column(index).to_pylist()]))

    previous, current = recoded()
    return named(previous), named(current)


def tiny():
    """The library test's hand example, two columns only: same length other token, longer, removed, added."""
    sid = pa.list_(pa.int32())
    previous = pa.table({"item_id": [1, 2, 3, 4], "sid": pa.array([[2, 5, 1], [2, 1], [3, 1], [4, 1]], sid)})
    current = pa.table({"item_id": [5, 4, 3, 2], "sid": pa.array([[6, 1], [7, 1], [3, 9, 1], [2, 1]], sid)})
    return previous, current


# Each case with the counts it must make positive (the others of COUNTS are 0).
CASES = {
    "unchanged": (unchanged, ("common",)),
    "changed": (changed, ("common", "changed")),
    "removed": (removed, ("common", "removed")),
    "added": (added, ("common", "added")),
    "disjoint": (disjoint, ("added", "removed")),
    "recode-int64": (recoded, COUNTS),
    "recode-string": (string_ids, COUNTS),
    "tiny": (tiny, COUNTS),
}

_SPARK_TYPES = {"int64": "long", "int32": "int", "int16": "short", "string": "string"}


def _spark_type(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
        return f"array<{_spark_type(t.value_type)}>"
    return _SPARK_TYPES[str(t)]


def _frame(spark, table: pa.Table):
    """The table as a DataFrame with the Spark types the jobs write (sid and codes as array<int>)."""
    schema = ", ".join(f"{field.name} {_spark_type(field.type)}" for field in table.schema)
    rows = list(zip(*(table.column(name).to_pylist() for name in table.column_names)))
    return spark.createDataFrame(rows, schema)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(CASES))
def test_spark_churn_and_remap_equal_the_library(spark, case):
    build, positive = CASES[case]
    previous, current = build()
    expected, expected_remap = sid_churn(previous, current)
    assert {key: expected[key] > 0 for key in COUNTS} == {key: key in positive for key in COUNTS}

    stats, remap = sid_churn_spark(_frame(spark, previous), _frame(spark, current))
    assert stats == expected
    assert [(key, type(value)) for key, value in stats.items()] == [(k, type(v)) for k, v in expected.items()]

    assert remap.columns == expected_remap.column_names
    rows = sorted((row.asDict() for row in remap.collect()), key=lambda row: row["item_id"])
    assert rows == expected_remap.to_pylist()  # the library's rows are sorted by item id
    # The conversion the docstring promises gives the library's table, types included.
    assert remap.toArrow().sort_by("item_id").cast(expected_remap.schema).equals(expected_remap)


@pytest.mark.timeout(300)
def test_repeated_or_null_ids_raise_like_the_library(spark):
    previous, current = tiny()
    doubled = pa.concat_tables([current, current])
    sid = pa.list_(pa.int32())
    null_id = pa.table({"item_id": pa.array([1, None], pa.int64()), "sid": pa.array([[2, 1], [3, 1]], sid)})
    cases = [(previous, doubled, "current"), (doubled, previous, "previous"), (doubled, doubled, "previous"),
             (null_id, current, "previous")]  # fmt: skip
    for old, new, side in cases:
        with pytest.raises(ValueError, match=f"the {side} SID table repeats item ids"):
            sid_churn(old, new)
        with pytest.raises(ValueError, match=f"the {side} SID table repeats item ids"):
            sid_churn_spark(_frame(spark, old), _frame(spark, new))
