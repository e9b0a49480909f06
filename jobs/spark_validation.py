"""Input validation on Spark: the library's rules (:mod:`sa2crq.data.validation`), as distributed SQL.

Row rules are column expressions; the two rules that need the whole table, duplicate ids and the
most common embedding length, come from aggregations whose results are small (the duplicated ids
are joined back, the length histogram has one row per distinct length). A row breaking several
rules gets the first in the library's order, and ``rows_in == rows_out + rejected`` is checked.
``tests/jobs/test_spark_validation.py`` checks that both implementations quarantine the same rows
for the same reasons. Table-level problems (missing columns, wrong types, item ids of different
types in the two tables) are checked on the schema by the library's own functions before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from sa2crq.data.validation import (
    EMBEDDING_COLUMN,
    INTERACTION_REJECT_REASONS,
    ITEM_REJECT_REASONS,
    MAX_EMBEDDING_VALUE,
    MIN_EMBEDDING_NORM,
    QUERY_REJECT_REASONS,
    REJECT_REASON_COLUMN,
    InputError,
    check_interactions_schema,
    check_item_id_types,
    check_items_schema,
    check_queries_schema,
)


@dataclass(frozen=True)
class SparkValidated:
    valid: DataFrame
    rejects: DataFrame
    counts: dict  # rows_in, rows_out, rejected, by_reason: the same shape as the library's


def validate_items(items: DataFrame, *, max_reject_fraction: float) -> SparkValidated:
    schema = pa.schema([pa.field(f.name, _arrow_type(f.dataType)) for f in items.schema.fields])
    text_columns, has_embedding = check_items_schema(schema)
    duplicated = items.groupBy("item_id").count().filter((F.col("count") > 1) & F.col("item_id").isNotNull())
    marked = items.join(duplicated.select("item_id", F.lit(True).alias("_duplicate")), "item_id", "left")
    has_text = F.lit(False)
    for column in text_columns:
        # Any Unicode non-whitespace character, as the library's utf8_trim_whitespace (F.trim strips spaces only).
        has_text = has_text | F.coalesce(F.col(column).rlike(r"(?U)\S"), F.lit(False))
    rules = {
        "null_item_id": F.col("item_id").isNull(),
        "duplicate_item_id": F.coalesce(F.col("_duplicate"), F.lit(False)),
        "invalid_utf8": _invalid_utf8(items),
    }
    present = F.lit(False)
    if has_embedding:
        emb = F.col(EMBEDDING_COLUMN)
        present = emb.isNotNull()
        lengths = items.filter(emb.isNotNull()).groupBy(F.size(emb).alias("n")).count()
        # The most common length, the smaller on a tie (as the library).
        mode = lengths.orderBy(F.col("count").desc(), F.col("n").asc()).first()
        dim = mode["n"] if mode is not None else 0
        wrong = present & (F.size(emb) != dim)
        # Beyond float32's range counts as non-finite: a float64 input becomes inf when stored as float32.
        non_finite = present & ~wrong & F.exists(emb, lambda x: x.isNull() | F.isnan(x) | (F.abs(x) > MAX_EMBEDDING_VALUE))
        norm = F.sqrt(F.aggregate(emb, F.lit(0.0).cast("double"), lambda acc, x: acc + x.cast("double") * x.cast("double")))
        rules |= {
            "embedding_wrong_dimension": wrong,
            "embedding_non_finite": non_finite,
            "embedding_zero_norm": present & ~wrong & ~non_finite & (norm <= MIN_EMBEDDING_NORM),
        }
    rules["no_text_or_embedding"] = ~present & ~has_text
    return _quarantine("items", marked, ITEM_REJECT_REASONS, rules, max_reject_fraction, drop=["_duplicate"])


def validate_interactions(interactions: DataFrame, valid_item_ids: DataFrame, *, max_reject_fraction: float) -> SparkValidated:
    schema = pa.schema([pa.field(f.name, _arrow_type(f.dataType)) for f in interactions.schema.fields])
    check_interactions_schema(schema)
    # Spark would cast one id type to the other in the join: numeric strings match, others raise mid-job.
    check_item_id_types(schema.field("item_id").type, _arrow_type(valid_item_ids.schema["item_id"].dataType))
    known = valid_item_ids.select("item_id").distinct().withColumn("_known", F.lit(True))
    marked = interactions.join(known.hint("merge"), "item_id", "left")  # the catalog: never broadcast
    # Copies of one event are identical in these columns, so which copy stays does not matter.
    event = Window.partitionBy("user_id", "item_id", "timestamp").orderBy("_seq")
    marked = marked.withColumn("_seq", F.monotonically_increasing_id()).withColumn("_copy", F.row_number().over(event))
    rules = {
        "null_user_id": F.col("user_id").isNull(),
        "null_item_id": F.col("item_id").isNull(),
        "null_timestamp": F.col("timestamp").isNull(),
        "invalid_utf8": _invalid_utf8(interactions),
        "unknown_item_id": F.col("_known").isNull(),
        "duplicate_interaction": F.col("_copy") > 1,
    }
    return _quarantine("interactions", marked, INTERACTION_REJECT_REASONS, rules, max_reject_fraction, drop=["_known", "_seq", "_copy"])


def validate_queries(queries: DataFrame, valid_item_ids: DataFrame, *, max_reject_fraction: float) -> SparkValidated:
    schema = pa.schema([pa.field(f.name, _arrow_type(f.dataType)) for f in queries.schema.fields])
    check_queries_schema(schema)
    check_item_id_types(schema.field("item_id").type, _arrow_type(valid_item_ids.schema["item_id"].dataType), table="queries")
    known = valid_item_ids.select("item_id").distinct().withColumn("_known", F.lit(True))
    marked = queries.join(known.hint("merge"), "item_id", "left")  # the catalog: never broadcast
    rules = {
        "null_query_id": F.col("query_id").isNull(),
        "null_item_id": F.col("item_id").isNull(),
        "invalid_utf8": _invalid_utf8(queries),
        # Any Unicode non-whitespace character, as the library's utf8_trim_whitespace.
        "blank_query": ~F.coalesce(F.col("query").rlike(r"(?U)\S"), F.lit(False)),
        "unknown_item_id": F.col("_known").isNull(),
    }
    return _quarantine("queries", marked, QUERY_REJECT_REASONS, rules, max_reject_fraction, drop=["_known"])


def _quarantine(name: str, frame: DataFrame, reasons: tuple[str, ...], rules: dict, max_reject_fraction: float, *, drop: list[str]) -> SparkValidated:
    columns = [c for c in frame.columns if c not in drop]
    reason = F.lit(None).cast("string")
    for rule in reversed(reasons):  # earlier rules overwrite later ones: a row gets its first broken rule
        if rule in rules:
            reason = F.when(rules[rule], F.lit(rule)).otherwise(reason)
    tagged = frame.withColumn(REJECT_REASON_COLUMN, reason).select(*columns, REJECT_REASON_COLUMN).cache()
    tallies = {row[REJECT_REASON_COLUMN]: row["count"] for row in tagged.groupBy(REJECT_REASON_COLUMN).count().collect()}
    rows_out = tallies.pop(None, 0)
    rejected = sum(tallies.values())
    counts = {"rows_in": rows_out + rejected, "rows_out": rows_out, "rejected": rejected, "by_reason": dict(sorted(tallies.items()))}
    if counts["rows_in"] == 0:
        raise InputError(f"{name}: the input has no rows")
    if rejected / counts["rows_in"] > max_reject_fraction:
        raise InputError(
            f"{name}: {rejected} of {counts['rows_in']} rows rejected ({rejected / counts['rows_in']:.2%}), "
            f"above max_reject_fraction={max_reject_fraction:.2%}; by reason {counts['by_reason']}"
        )
    valid = tagged.filter(F.col(REJECT_REASON_COLUMN).isNull()).drop(REJECT_REASON_COLUMN)
    rejects = tagged.filter(F.col(REJECT_REASON_COLUMN).isNotNull())
    return SparkValidated(valid, rejects, counts)


def _invalid_utf8(frame: DataFrame) -> Column:
    """True where any string column's value is not valid UTF-8 (Spark reads parquet strings unchecked)."""
    invalid = F.lit(False)
    for field in frame.schema.fields:
        if isinstance(field.dataType, T.StringType):
            invalid = invalid | ~F.coalesce(F.is_valid_utf8(F.col(field.name)), F.lit(True))
    return invalid


def _arrow_type(dtype: T.DataType) -> pa.DataType:
    """Enough of Spark's type system for the library's schema checks."""
    simple = {
        T.LongType: pa.int64(), T.IntegerType: pa.int32(), T.ShortType: pa.int16(), T.ByteType: pa.int8(),
        T.StringType: pa.string(), T.DoubleType: pa.float64(), T.FloatType: pa.float32(), T.BooleanType: pa.bool_(),
        T.TimestampType: pa.timestamp("us"), T.TimestampNTZType: pa.timestamp("us"), T.NullType: pa.null(),
    }  # fmt: skip
    for spark_type, arrow in simple.items():
        if isinstance(dtype, spark_type):
            return arrow
    if isinstance(dtype, T.ArrayType):
        return pa.list_(_arrow_type(dtype.elementType))
    return pa.binary()  # any other type fails the library's type rules with a clear message
