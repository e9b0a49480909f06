"""Catalog split on Spark: shard by item-id hash, popularity over an interaction window, segments.

Segments follow the library's rule (:func:`sa2crq.data.segments.assign_segments`): rank by
popularity descending, ties by item id, head = the first floor(head_fraction * N) ranks, torso the
next floor(torso_fraction * N), the rest tail, popularity 0 cold. Nothing is ranked item by item:
the driver reads the popularity histogram ((value, item count) pairs, as many as there are distinct
popularity values), which settles the segment of every value whose ranks lie inside one segment.
A value that straddles a segment boundary (at most two do) is cut at the item id of the boundary's
rank, found by a distributed sort of that value's items alone: no task sorts a whole segment, where
a window over the popularity value would sort, say, every item seen once in one task.

Output: ``item_id``, ``popularity``, ``segment`` (head / torso / tail / cold), ``shard``.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from sa2crq.config import SegmentConfig
from sa2crq.data.segments import COLD, HEAD, SEGMENT_NAMES, TAIL, TORSO


def catalog_split(
    items: DataFrame,
    interactions: DataFrame,
    config: SegmentConfig,
    *,
    shards: int,
    window: tuple[int | None, int | None] = (None, None),
) -> DataFrame:
    """``window`` = [start, end) on ``timestamp``; None leaves that side open. Interactions are the
    training interactions: callers never pass validation or test rows."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    start, end = window
    counted = interactions
    if start is not None:
        counted = counted.filter(F.col("timestamp") >= start)
    if end is not None:
        counted = counted.filter(F.col("timestamp") < end)
    pop = counted.groupBy("item_id").agg(F.count(F.lit(1)).alias("popularity"))
    catalog = (
        items.select("item_id")
        .join(pop.hint("merge"), "item_id", "left")  # both catalog-sized: never broadcast
        .withColumn("popularity", F.coalesce(F.col("popularity"), F.lit(0)).cast("long"))
        .cache()  # read by the histogram, each boundary cut and the output: count the interactions once
    )
    shard = F.pmod(F.xxhash64("item_id"), F.lit(shards)).cast("int")
    return catalog.select("item_id", "popularity", _segment(catalog, config).alias("segment"), shard.alias("shard"))


def _segment(catalog: DataFrame, config: SegmentConfig) -> F.Column:
    """The segment of every item as a column expression over ``popularity`` and ``item_id`` (module docstring)."""
    counts = catalog.groupBy("popularity").agg(F.count(F.lit(1)).alias("items")).collect()
    histogram = sorted(((int(row["popularity"]), int(row["items"])) for row in counts), reverse=True)
    n = sum(items for _, items in histogram)
    bounds = (int(config.head_fraction * n), int(config.head_fraction * n) + int(config.torso_fraction * n))
    names = [F.lit(name) for name in SEGMENT_NAMES]

    def of_rank(rank: int) -> int:
        return HEAD if rank < bounds[0] else TORSO if rank < bounds[1] else TAIL

    segment = F.when(F.col("popularity") == 0, names[COLD])
    whole: dict[int, list[int]] = {HEAD: [], TORSO: [], TAIL: []}  # values lying inside one segment
    first = 0  # rank of the value's first item: every item of higher popularity comes before it
    for value, items in histogram:
        last = first + items - 1
        if value > 0 and of_rank(first) == of_rank(last):
            whole[of_rank(first)].append(value)
        elif value > 0:
            # The items of this value with rank < b are those whose id is below the id at position b - first.
            at_value = F.col("popularity") == value
            for bound in (b for b in bounds if first < b <= last):
                cut = _id_at(catalog.filter(at_value).select("item_id"), bound - first)
                segment = segment.when(at_value & (F.col("item_id") < F.lit(cut)), names[of_rank(bound - 1)])
            segment = segment.when(at_value, names[of_rank(last)])
        first += items
    for code, values in whole.items():
        if values:
            segment = segment.when(F.col("popularity").isin(values), names[code])
    return segment


def _id_at(ids: DataFrame, position: int):
    """The item id at 0-based ``position`` in ascending id order: a range-partitioned (distributed)
    sort, then one pass counting each partition's rows."""
    found = ids.orderBy("item_id").rdd.zipWithIndex().filter(lambda pair: pair[1] == position).map(lambda pair: pair[0][0]).take(1)
    if not found:
        raise ValueError(f"no item at position {position} of a popularity value's ids")
    return found[0]
