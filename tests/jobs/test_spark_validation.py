"""Spark validation accepts, quarantines (for the same reasons) and refuses (with the same message) exactly as
the library does, over the hard cases."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from jobs import spark_validation
from sa2crq.data.validation import InputError, validate_interactions, validate_items, validate_queries
from sa2crq.storage.filesystem import read_parquet
from tests.data.test_data_validation import INVALID_UTF8, unchecked_strings

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


def _invalid_utf8_tables() -> tuple[pa.Table, pa.Table]:
    """String ids, and invalid UTF-8 in every kind of string column: an id, a title, an extra column."""
    items = pa.table({
        "item_id": unchecked_strings([b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h\xff", b"i", b"i", b"j"]),
        "title": unchecked_strings([b"ok", b"caf\xc3\xa9 \xf0\x9f\x98\x80", *INVALID_UTF8, b"fine", b"dup", b"dup \xff", b"j"]),
        "brand": unchecked_strings([*[b"x"] * 10, b"\xfe"]),
    })  # fmt: skip
    interactions = pa.table({
        "user_id": unchecked_strings([b"u", b"u\xff", b"v", b"v", b"w", b"u"]),
        "item_id": unchecked_strings([b"a", b"a", b"b", b"h\xff", b"c", b"a"]),
        "timestamp": pa.array([1, 2, 3, 4, 5, 1], pa.int64()),
    })  # fmt: skip
    return items, interactions


def _cases() -> dict[str, tuple[pa.Table, pa.Table]]:
    big = float(np.finfo(np.float32).max)
    beyond_float32 = pa.table({
        "item_id": pa.array([1, 2, 3, 4], pa.int64()),
        "embedding": pa.array([[0.6, 0.8], [1e39, 0.0], [big, 0.0], [-1e300, 1.0]], pa.list_(pa.float64())),
    })  # fmt: skip
    return {
        "every row rule": (_items(), _interactions()),
        "float64 embeddings beyond float32": (beyond_float32, _interactions()),
        "invalid utf8": _invalid_utf8_tables(),
        # Spark would cast one side in the join: "1" would match 1 silently, "a" would stop the job mid-way.
        "string item ids, integer interactions": (pa.table({"item_id": ["1", "a"], "title": ["x", "y"]}), _interactions()),
        "integer item ids, numeric-string interactions": (
            _items(), _interactions().set_column(1, "item_id", _interactions()["item_id"].cast(pa.string()))),
        "binary title": (pa.table({"item_id": pa.array([1], pa.int64()), "title": pa.array([b"x"], pa.binary())}), _interactions()),
    }  # fmt: skip


_KEYS = {"items": ["item_id"], "interactions": ["user_id", "item_id", "timestamp"]}


def _arrow_rows(table: pa.Table, columns: list[str]) -> list[tuple]:
    """Rows of ``columns``, strings as their bytes (what the file holds, valid UTF-8 or not), sorted."""
    raw = table.select(columns)
    raw = raw.cast(pa.schema([f.with_type(pa.binary()) if pa.types.is_string(f.type) else f for f in raw.schema]))
    return sorted((tuple(row.values()) for row in raw.to_pylist()), key=repr)


def _spark_rows(frame: DataFrame, columns: list[str]) -> list[tuple]:
    strings = {f.name for f in frame.schema.fields if isinstance(f.dataType, T.StringType)}
    raw = frame.select(*[F.col(c).cast("binary") if c in strings else F.col(c) for c in columns]).collect()
    return sorted((tuple(bytes(v) if isinstance(v, bytearray) else v for v in row) for row in raw), key=repr)


def _library_outcome(items_path, interactions_path) -> dict:
    """Per table: counts, accepted keys, rejected keys with reasons; or the refusal that stopped it."""
    outcome: dict = {}
    try:
        # Read as a run reads its input (read_parquet), so both paths see the same bytes.
        items = validate_items(read_parquet(items_path))
        outcome["items"] = (items.counts, _arrow_rows(items.valid, _KEYS["items"]),
                            _arrow_rows(items.rejects, [*_KEYS["items"], "reject_reason"]))  # fmt: skip
        interactions = validate_interactions(read_parquet(interactions_path), known_item_ids=items.valid.column("item_id"))
        outcome["interactions"] = (interactions.counts, _arrow_rows(interactions.valid, _KEYS["interactions"]),
                                   _arrow_rows(interactions.rejects, [*_KEYS["interactions"], "reject_reason"]))  # fmt: skip
    except InputError as refusal:
        outcome["refusal"] = str(refusal)
    return outcome


def _spark_outcome(spark, items_path, interactions_path) -> dict:
    outcome: dict = {}
    try:
        items = spark_validation.validate_items(spark.read.parquet(str(items_path)), max_reject_fraction=1.0)
        outcome["items"] = (items.counts, _spark_rows(items.valid, _KEYS["items"]),
                            _spark_rows(items.rejects, [*_KEYS["items"], "reject_reason"]))  # fmt: skip
        interactions = spark_validation.validate_interactions(spark.read.parquet(str(interactions_path)), items.valid, max_reject_fraction=1.0)
        outcome["interactions"] = (interactions.counts, _spark_rows(interactions.valid, _KEYS["interactions"]),
                                   _spark_rows(interactions.rejects, [*_KEYS["interactions"], "reject_reason"]))  # fmt: skip
    except InputError as refusal:
        outcome["refusal"] = str(refusal)
    return outcome


@pytest.mark.parametrize("case", list(_cases()))
def test_spark_and_library_accept_quarantine_and_refuse_alike(case, spark, tmp_path):
    items, interactions = _cases()[case]
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(interactions, tmp_path / "interactions.parquet")
    expected = _library_outcome(tmp_path / "items.parquet", tmp_path / "interactions.parquet")
    assert _spark_outcome(spark, tmp_path / "items.parquet", tmp_path / "interactions.parquet") == expected

    for name in ("items", "interactions"):
        if name in expected:
            counts = expected[name][0]
            assert counts["rows_in"] == counts["rows_out"] + counts["rejected"]
    # What each case must show, so that agreement cannot come from both paths doing nothing.
    if case == "every row rule":
        assert expected["interactions"][0]["by_reason"]["duplicate_interaction"] == 2  # the two re-sent copies
    elif case == "float64 embeddings beyond float32":
        assert expected["items"][2] == [(2, b"embedding_non_finite"), (4, b"embedding_non_finite")]
    elif case == "invalid utf8":
        # five broken titles, an id, a brand; the two copies of i are duplicates first
        assert expected["items"][0]["by_reason"] == {"duplicate_item_id": 2, "invalid_utf8": 7}
        assert expected["items"][1] == [(b"a",), (b"b",)]
        # a user id and an item id; (w, c) names a quarantined item; (u, a, 1) is sent twice
        assert expected["interactions"][0]["by_reason"] == {"duplicate_interaction": 1, "invalid_utf8": 2, "unknown_item_id": 1}
    elif case == "binary title":
        assert expected["refusal"] == "items: column 'title' has type binary, breaks rule 'string'"
    else:
        assert "both must be integer or both string" in expected["refusal"]


def test_the_reject_ceiling_and_schema_rules_refuse_the_input(spark, tmp_path):
    pq.write_table(_items(), tmp_path / "items.parquet")
    with pytest.raises(InputError, match="above max_reject_fraction"):
        spark_validation.validate_items(spark.read.parquet(str(tmp_path / "items.parquet")), max_reject_fraction=0.1)
    pq.write_table(pa.table({"item_id": [1.5], "title": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(InputError, match="item_id"):
        spark_validation.validate_items(spark.read.parquet(str(tmp_path / "bad.parquet")), max_reject_fraction=1.0)


QUERY_CASES = {
    # every rule once: null query id, null item id, invalid UTF-8 (in the text and in a string id),
    # blank in any whitespace, no text, an unknown item; the first rule broken wins
    "every row rule": pa.table({
        "query_id": pa.array([1, None, 3, 4, 5, 6, 7, 8, 9], pa.int64()),
        "query": unchecked_strings([b"red lipstick", b"x", b"y", b"caf\xff", " \t\u3000".encode(), None, b"z", b"\xff", b"ok"]),
        "item_id": pa.array([1, 2, None, 2, 1, 1, 99, 3, 2], pa.int64()),
    }),
    "string item ids": pa.table({"query_id": [1], "query": ["x"], "item_id": ["1"]}),
    "missing column": pa.table({"query_id": [1], "item_id": pa.array([1], pa.int64())}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(QUERY_CASES))
def test_spark_and_library_quarantine_query_logs_alike(case, spark, tmp_path):
    pq.write_table(QUERY_CASES[case], tmp_path / "queries.parquet")
    known = pa.table({"item_id": pa.array([1, 2, 3], pa.int64())})
    pq.write_table(known, tmp_path / "known.parquet")
    keys = ["query_id", "item_id"]
    outcomes = []
    try:
        result = validate_queries(read_parquet(tmp_path / "queries.parquet"), known_item_ids=known.column("item_id"))
        outcomes.append((result.counts, _arrow_rows(result.valid, keys), _arrow_rows(result.rejects, [*keys, "reject_reason"])))
    except InputError as refusal:
        outcomes.append(str(refusal))
    try:
        result = spark_validation.validate_queries(spark.read.parquet(str(tmp_path / "queries.parquet")),
                                                   spark.read.parquet(str(tmp_path / "known.parquet")), max_reject_fraction=1.0)  # fmt: skip
        outcomes.append((result.counts, _spark_rows(result.valid, keys), _spark_rows(result.rejects, [*keys, "reject_reason"])))
    except InputError as refusal:
        outcomes.append(str(refusal))
    assert outcomes[0] == outcomes[1]
    if case == "every row rule":
        assert outcomes[0][0]["by_reason"] == {"blank_query": 2, "invalid_utf8": 2, "null_item_id": 1, "null_query_id": 1, "unknown_item_id": 1}
        assert [row[0] for row in outcomes[0][1]] == [1, 9]
    elif case == "string item ids":
        assert "both must be integer or both string" in outcomes[0]
    else:
        assert outcomes[0].startswith("queries: missing required column 'query'")
