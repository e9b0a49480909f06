"""The serving trie of a SID table, built in Spark and written in shards: no catalog-sized step in
the driver.

The same trie as the library's :meth:`sa2crq.ids.trie.SIDTrie.build` over the table's rows in item-id
order (``tests/jobs/test_spark_trie.py`` checks it array for array), in the library's on-disk layout
(``nodes/``, ``rows/``, ``trie.json``; see :mod:`sa2crq.ids.trie`). Every number in that layout is a
position in a sorted order: a row's in item-id order, a SID's index in lexicographic order of the
distinct SIDs, and a node's breadth-first id (depth by depth, each depth's prefixes in lexicographic
order, which is (parent, token) order). Spark orders arrays of equal length lexicographically, and
distinct SIDs never compare as prefix and extension (EOS ends each and appears nowhere else), so
each position is a range-partitioned sort plus per-partition counts (:func:`positions`): only those
counts, the SID-rule check's first offender and the trie's totals reach the driver.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark import StorageLevel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from jobs.engines import SparkStaging
from sa2crq.ids.trie import EOS, NODES_DIR, PAD, ROWS_DIR, write_meta


@dataclass(frozen=True)
class TrieCounts:
    n_nodes: int
    n_sids: int
    n_rows: int
    max_length: int


def write_trie_spark(sid_table: DataFrame, vocab_size: int, url: str, staging: SparkStaging) -> TrieCounts:
    """Build the trie of ``sid_table`` (``item_id``, ``sid``; item ids unique) and write it under
    ``url``, ``trie.json`` last. Raises ValueError naming the first item (by id) whose SID breaks a
    SID rule, as the library names the row."""
    frame = sid_table.select("item_id", "sid")
    _check_sid_rules(frame, vocab_size)
    held: list[DataFrame] = []
    try:
        rows, n_rows = positions(frame, ["item_id"], "row", held)
        distinct = rows.select("sid").distinct()
        sids, n_sids = positions(distinct, ["sid"], "sid_index", held)
        # Every prefix of every SID once, as (depth, prefix): breadth-first order is this order.
        prefix = F.transform(F.sequence(F.lit(1), F.size("sid")), lambda d: F.struct(d.alias("depth"), F.slice("sid", 1, d).alias("prefix")))
        prefixes = distinct.select(F.explode(prefix).alias("p")).select("p.depth", "p.prefix").distinct()
        ranked, n_prefixes = positions(prefixes, ["depth", "prefix"], "node", held)
        ranked = ranked.withColumn("node", F.col("node") + 1)  # node 0 is the root
        up = ranked.select((F.col("depth") + 1).alias("depth"), F.col("prefix").alias("parent_prefix"), F.col("node").alias("parent"))
        below_root = (
            ranked.withColumn("parent_prefix", F.slice("prefix", 1, F.col("depth") - 1))
            .join(up.hint("merge"), ["depth", "parent_prefix"], "left")
            # Only a prefix ending in EOS is a whole SID, so this left join finds exactly the terminal nodes.
            .join(sids.withColumnRenamed("sid", "prefix").hint("merge"), "prefix", "left")
            .select("node", F.coalesce("parent", F.lit(0).cast("long")).alias("parent"), F.element_at("prefix", F.col("depth")).alias("token"),
                    F.col("depth").cast("int").alias("depth"), F.coalesce("sid_index", F.lit(-1).cast("long")).alias("terminal_sid"))
        )  # fmt: skip
        root = frame.sparkSession.createDataFrame([(0, -1, PAD, 0, -1)], "node long, parent long, token int, depth int, terminal_sid long")
        staging.write(root.unionByName(below_root), f"{url}/{NODES_DIR}")
        staging.write(rows.join(sids.hint("merge"), "sid").select("row", "sid_index"), f"{url}/{ROWS_DIR}")
        max_length = ranked.agg(F.max("depth")).first()[0] or 0
    finally:
        for frame_held in held:
            frame_held.unpersist()
    counts = TrieCounts(n_nodes=n_prefixes + 1, n_sids=n_sids, n_rows=n_rows, max_length=int(max_length))
    write_meta(url, vocab_size=vocab_size, **vars(counts))
    return counts


def positions(frame: DataFrame, keys: list[str], name: str, held: list[DataFrame]) -> tuple[DataFrame, int]:
    """``frame`` with ``name``: each row's 0-based position in ``keys`` order (keys unique), and the
    row count.

    A range-partitioned sort puts partition p's keys before partition p + 1's; within a partition
    ``monotonically_increasing_id`` counts rows in order from ``p << 33``. So a row's position is its
    id minus its partition's first id plus the rows of earlier partitions: one count per partition
    reaches the driver. The tagged rows are persisted (appended to ``held``) so every later use sees
    the ids the counts were taken from.
    """
    tagged = _hold(
        frame.repartitionByRange(*keys).sortWithinPartitions(*keys)
        .withColumn("_partition", F.spark_partition_id()).withColumn("_id", F.monotonically_increasing_id()),
        held,
    )  # fmt: skip
    stats = sorted(tagged.groupBy("_partition").agg(F.count("*").alias("n"), F.min("_id").alias("first")).collect())
    bases, start = [], 0
    for partition, n, first in stats:
        bases.append((partition, start - first))
        start += n
    if not bases:
        return tagged.withColumn(name, F.col("_id")).drop("_partition", "_id"), 0
    base = frame.sparkSession.createDataFrame(bases, "_partition int, _base long")
    out = tagged.join(F.broadcast(base), "_partition").withColumn(name, F.col("_id") + F.col("_base"))
    return out.drop("_partition", "_id", "_base"), start


def _hold(frame: DataFrame, held: list[DataFrame]) -> DataFrame:
    held.append(frame.persist(StorageLevel.MEMORY_AND_DISK))
    return held[-1]


def _check_sid_rules(frame: DataFrame, vocab_size: int) -> None:
    """The library's SID rules (:func:`sa2crq.ids.trie._validate_rows`), one reason per row; the
    first offending item by id is reported."""
    sid, size = F.col("sid"), F.size("sid")
    body = F.slice(sid, 1, F.greatest(size - 1, F.lit(1)))  # all but the last token (guarded for size 0)
    reason = (
        F.when(sid.isNull() | (size < 1), F.lit("empty SID"))
        .when(F.exists(sid, lambda t: t.isNull() | (t < 0) | (t >= vocab_size)), F.lit(f"token out of range [0, {vocab_size})"))
        .when(F.exists(sid, lambda t: t == PAD), F.lit(f"PAD ({PAD}) inside the ID"))
        .when(F.element_at(sid, -1) != EOS, F.lit(f"EOS ({EOS}) missing at the end"))
        .when((size > 1) & F.exists(body, lambda t: t == EOS), F.lit(f"EOS ({EOS}) in the middle of the ID"))
    )  # fmt: skip
    bad = frame.select("item_id", reason.alias("reason")).where(F.col("reason").isNotNull())
    first = bad.orderBy("item_id").limit(1).collect()
    if first:
        raise ValueError(f"invalid SID for item {first[0]['item_id']}: {first[0]['reason']}")
