"""Spark stable SIDs (recode with a reused tokenizer), churn and remap equal the library's single-process
stable_assign_sids and sid_churn, bit for bit."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pytest

from jobs.spark_sarq import sid_table
from jobs.spark_stability import sid_churn_spark, stable_sids_spark
from sa2crq.config import SIDConfig
from sa2crq.data.segments import TAIL
from sa2crq.ids.sid_table import assign_sids
from sa2crq.ids.stability import PublishedSIDs, sid_churn, stable_assign_sids

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


# The recode rule under each kind of SID config: a hysteresis band of one bit and of none, fixed length with
# a digit on every item and a digit vocabulary small enough to overflow, one item per ID.
STABLE_CASES = {
    "sarq": SIDConfig(max_bucket=20),
    "sarq-no-hysteresis": SIDConfig(max_bucket=20, hysteresis_bits=0),
    "fixed-digits": SIDConfig(adaptive_length=False, always_digit=True, digit_vocab=5),
    "one-per-id": SIDConfig(max_bucket=20, one_item_per_id=True, digit_vocab=256),
}
STABLE_K = 6  # 216 leaves for 600 items: truncated buckets at the cap, shared leaves, digits


def _inputs(config: SIDConfig, job: str, n: int = 600):
    """A published table and the catalog of the next job. A recode: items leave (digit gaps), change
    codes or popularity (masses move within and past the hysteresis band), and new items arrive. An
    ingest: every published item as published, plus new items of popularity 0."""
    rng = np.random.default_rng(11)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) * 10**10  # past int32
    codes = rng.integers(0, STABLE_K, size=(n, LEVELS))
    pop = (rng.pareto(1.1, n) * 3).astype(np.int64) * (rng.random(n) < 0.7)
    pop[:10] = 5000
    previous = assign_sids(ids, codes, pop, np.full(n, TAIL), (STABLE_K,) * LEVELS, config)
    fresh_ids = (np.arange(60) + 1) * 10**10 + 3
    fresh_codes = rng.integers(0, STABLE_K, size=(60, LEVELS))
    if job == "ingest":
        return previous, np.concatenate([ids, fresh_ids]), np.concatenate([codes, fresh_codes]), np.concatenate([pop, np.zeros(60, dtype=np.int64)])
    keep = rng.random(n) < 0.85
    new_codes = codes.copy()
    moved = rng.random(n) < 0.1
    new_codes[moved] = rng.integers(0, STABLE_K, size=(int(moved.sum()), LEVELS))
    new_pop = np.where(rng.random(n) < 0.3, pop * rng.integers(0, 30, n), pop)
    new_pop[rng.random(n) < 0.05] = 5000  # cold to hot: past a one-bit hysteresis band
    cat_ids = np.concatenate([ids[keep], fresh_ids])
    cat_codes = np.concatenate([new_codes[keep], fresh_codes])
    cat_pop = np.concatenate([new_pop[keep], rng.integers(0, 20, 60)])
    return previous, cat_ids, cat_codes, cat_pop


def _catalog_frame(spark, ids, codes, pop):
    rows = [(int(i), [int(c) for c in row], int(p), "tail") for i, row, p in zip(ids, codes, pop)]
    return spark.createDataFrame(rows, "item_id long, codes array<int>, popularity long, segment string")


def _library(previous, ids, codes, pop, config, levels=LEVELS, **kwargs):
    published = PublishedSIDs.from_arrow(previous.to_arrow())
    return stable_assign_sids(published, ids, codes, pop, np.full(len(ids), TAIL), (STABLE_K,) * levels, config, **kwargs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("job", ["recode", "ingest"])
@pytest.mark.parametrize("case", list(STABLE_CASES))
def test_spark_stable_sids_equal_the_library(spark, case, job):
    config = STABLE_CASES[case]
    ingest = job == "ingest"
    previous, ids, codes, pop = _inputs(config, job)
    expected, expected_stats = _library(previous, ids, codes, pop, config, pin_all_previous=ingest)
    # The case exercises every branch of its job: kept, placed, new, and for a recode removed and
    # moved past the hysteresis (where there is one).
    assert min(expected_stats.pinned, expected_stats.placed, expected_stats.new_items) > 0
    if not ingest:
        assert expected_stats.removed_items > 0 and (expected_stats.moved_by_hysteresis > 0 or not config.adaptive_length)

    finalised, stats = stable_sids_spark(
        _frame(spark, previous.to_arrow()), _catalog_frame(spark, ids, codes, pop), LEVELS, config, pin_all_previous=ingest
    )
    assert stats == asdict(expected_stats)
    got = sid_table(finalised, expected.vocab).select("item_id", "code_depth", "digit", "sid", "bucket_size").toPandas()
    got = got.set_index("item_id").loc[ids]
    np.testing.assert_array_equal(got["code_depth"].to_numpy(), expected.code_depth)
    np.testing.assert_array_equal(got["digit"].to_numpy(), expected.digit)
    assert [list(s) for s in got["sid"]] == expected.to_arrow().column("sid").to_pylist()
    np.testing.assert_array_equal(got["bucket_size"].to_numpy(), expected.bucket_size)


@pytest.mark.timeout(300)
def test_spark_stable_sids_refuse_what_the_library_refuses(spark):
    config = STABLE_CASES["sarq"]
    previous, ids, codes, pop = _inputs(config, "recode")
    published = _frame(spark, previous.to_arrow())

    def both(catalog_ids, catalog_codes, catalog_pop, cfg=config, levels=LEVELS, ingest=False) -> str:
        with pytest.raises(ValueError) as library:
            _library(previous, catalog_ids, catalog_codes, catalog_pop, cfg, levels, pin_all_previous=ingest)
        with pytest.raises(ValueError) as spark_error:
            frame = _catalog_frame(spark, catalog_ids, catalog_codes, catalog_pop)
            stable_sids_spark(published, frame, levels, cfg, pin_all_previous=ingest)
        assert str(spark_error.value) == str(library.value)
        return str(library.value)

    assert "appears more than once in the catalog" in both(np.append(ids, ids[0]), np.vstack([codes, codes[:1]]), np.append(pop, 0))
    below = int(previous.digit.max())
    assert f"beyond sid.digit_vocab {below}" in both(ids, codes, pop, SIDConfig(max_bucket=20, digit_vocab=below))
    assert "code levels" in both(ids, np.hstack([codes, codes[:, :1]]), pop, levels=LEVELS + 1)
    # An ingest changes no published item and drops none (one offending item: both name it).
    _, ingest_ids, ingest_codes, ingest_pop = _inputs(config, "ingest")
    altered = ingest_pop.copy()
    altered[5] += 1
    assert f"item {int(ingest_ids[5])} is already published" in both(ingest_ids, ingest_codes, altered, ingest=True)
    assert f"published item {int(ingest_ids[7])} is missing" in both(
        np.delete(ingest_ids, 7), np.delete(ingest_codes, 7, axis=0), np.delete(ingest_pop, 7), ingest=True
    )
