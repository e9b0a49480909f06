"""SARQ finalisation as Spark aggregations: prefix traffic masses, ID lengths, bucket cap, digits.

The same rules as the library's single-process :func:`sa2crq.ids.sid_table.assign_sids`, written as
distributed aggregations so nothing catalog-sized reaches the driver: only the total mass and the
item count are collected. Masses are integers and the keep threshold comes from the library's own
:func:`sa2crq.quantize.sarq.keep_threshold`, so the two implementations agree bit for bit
(``tests/jobs/test_spark_sarq.py`` checks it).

Input: a DataFrame with ``item_id``, ``codes`` (array<int>, full depth) and ``popularity`` (long).
:func:`finalise_sids` output: the input's columns plus ``code_depth`` and ``digit`` (-1 for none);
:func:`sid_table` then adds the tokens.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from sa2crq.config import SIDConfig
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.ids.trie import EOS
from sa2crq.quantize.sarq import default_tau, keep_threshold


def finalise_sids(items: DataFrame, levels: int, config: SIDConfig) -> DataFrame:
    return _digits(sarq_depths(items, levels, config), levels, config)


def sarq_depths(items: DataFrame, levels: int, config: SIDConfig) -> DataFrame:
    """``items`` plus ``code_depth``: the SARQ length of :func:`sa2crq.quantize.sarq.sarq_lengths`,
    bucket cap included (full depth for fixed-length configs)."""
    if not config.adaptive_length:
        return items.withColumn("code_depth", F.lit(levels))
    return bucket_cap(kept_depths(items, levels, {"code_depth": keep_threshold_of(items, config)}, config), levels, config)


def keep_threshold_of(items: DataFrame, config: SIDConfig) -> int:
    """SARQ's keep threshold for the catalog ``items``: two numbers reach the driver."""
    totals = items.agg(F.sum(F.col("popularity").cast("long") + F.lit(config.epsilon)).alias("total"), F.count(F.lit(1)).alias("n")).first()
    tau = config.tau if config.tau is not None else default_tau(int(totals["n"]))
    return keep_threshold(int(totals["total"]), tau)


def code_prefix(depth: int | F.Column) -> F.Column:
    """The first ``depth`` codes of an item's ``codes``."""
    return F.slice("codes", 1, depth)


def kept_depths(items: DataFrame, levels: int, thresholds: dict[str, int], config: SIDConfig) -> DataFrame:
    """``items`` plus one column per entry of ``thresholds``: the number of depths whose prefix
    traffic mass reaches that threshold, clipped to [L_min, L_max], before the bucket cap. Masses
    never grow with depth, so the kept depths are a prefix and a count is enough."""
    weighted = items.withColumn("weight", F.col("popularity").cast("long") + F.lit(config.epsilon))
    per_level = weighted.select("item_id", "weight", "codes", F.explode(F.sequence(F.lit(1), F.lit(levels))).alias("level"))
    per_level = per_level.withColumn("prefix", code_prefix(F.col("level")))
    masses = per_level.groupBy("level", "prefix").agg(F.sum("weight").alias("mass"))
    # Both sides of these joins are catalog-sized: sort-merge, never a broadcast chosen from a
    # compressed parquet size (which fits the threshold at 10^6 items and not a 1 GB driver).
    kept = (
        per_level.join(masses.hint("merge"), ["level", "prefix"])
        .groupBy("item_id")
        .agg(*(F.sum(F.when(F.col("mass") >= threshold, 1).otherwise(0)).alias(name) for name, threshold in thresholds.items()))
    )
    clipped = [F.least(F.greatest(F.col(name), F.lit(config.min_length)), F.lit(levels)).alias(name) for name in thresholds]
    return items.join(kept.hint("merge"), "item_id").select(*items.columns, *clipped)


def bucket_cap(result: DataFrame, levels: int, config: SIDConfig) -> DataFrame:
    """Shallow levels first: an over-full truncated bucket deepens by one level."""
    for depth in range(1, levels):
        sized = result.withColumn(
            "bucket", F.count(F.lit(1)).over(Window.partitionBy("code_depth", code_prefix(F.col("code_depth"))))
        )
        result = sized.withColumn(
            "code_depth",
            F.when((F.col("code_depth") == depth) & (F.col("bucket") > config.max_bucket), depth + 1).otherwise(
                F.col("code_depth")
            ),
        ).drop("bucket")
    return result


def _digits(items: DataFrame, levels: int, config: SIDConfig) -> DataFrame:
    """Disambiguation digits, ranked by popularity (descending) then item id, per shared SID."""
    group = Window.partitionBy("code_depth", code_prefix(F.col("code_depth")))
    ranked = items.withColumn("group_size", F.count(F.lit(1)).over(group)).withColumn(
        "rank", F.row_number().over(group.orderBy(F.col("popularity").desc(), F.col("item_id").asc())) - 1
    )
    shared = F.col("group_size") > 1
    full = F.col("code_depth") == levels
    needs = (shared | F.lit(config.always_digit)) & full
    if config.one_item_per_id:
        needs = needs | shared
        overflow = ranked.filter(needs & (F.col("rank") >= config.digit_vocab)).limit(1).collect()
        if overflow:
            raise ValueError(
                f"one_item_per_id: items exceed the digit vocabulary of {config.digit_vocab}, e.g. item "
                f"{overflow[0]['item_id']!r}; raise sid.digit_vocab"
            )
    digit = F.when(needs, F.least(F.col("rank"), F.lit(config.digit_vocab - 1))).otherwise(F.lit(-1))
    return ranked.withColumn("digit", digit.cast("long")).drop("group_size", "rank")


def sid_table(finalised: DataFrame, vocab: SIDVocabulary) -> DataFrame:
    """The SID table's token columns from finalised depths and digits, in the library's token layout
    (:class:`sa2crq.ids.sid_table.SIDVocabulary`): ``sid`` (codes kept, the digit if any, EOS),
    ``sid_len`` (tokens before EOS) and ``bucket_size`` (items sharing the SID)."""
    offsets = F.array(*[F.lit(int(o)) for o in vocab.level_offsets])
    code_tokens = F.transform(code_prefix(F.col("code_depth")), lambda code, level: code + F.element_at(offsets, level + 1))
    digit = F.when(F.col("digit") >= 0, F.array(F.col("digit") + F.lit(vocab.digit_offset))).otherwise(F.array().cast("array<int>"))
    with_sid = finalised.withColumn("sid", F.concat(code_tokens.cast("array<int>"), digit.cast("array<int>"), F.array(F.lit(EOS))))
    return (
        with_sid.withColumn("sid_len", (F.size("sid") - 1).cast("short"))
        .withColumn("bucket_size", F.count(F.lit(1)).over(Window.partitionBy("sid")).cast("int"))
        .withColumn("code_depth", F.col("code_depth").cast("short"))
        .withColumn("digit", F.col("digit").cast("short"))
    )
