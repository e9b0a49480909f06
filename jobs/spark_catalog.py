"""Catalog split on Spark: shard by item-id hash, popularity over an interaction window, segments.

Segments follow the library's rule (:func:`sa2crq.data.segments.assign_segments`): rank by
popularity descending, ties by item id, head = the first floor(head_fraction * N) ranks, torso the
next floor(torso_fraction * N), the rest tail, popularity 0 cold. A global sort would funnel the
catalog through one task, so the ranks are found from the popularity histogram instead: only
(popularity value, item count) pairs reach the driver, a table as small as the number of distinct
popularity values; ties inside the one popularity value that straddles a boundary are ranked by
item id within that value's partition.

Output: ``item_id``, ``popularity``, ``segment`` (head / torso / tail / cold), ``shard``.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from sa2crq.config import SegmentConfig
from sa2crq.data.segments import SEGMENT_NAMES


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
        .join(pop, "item_id", "left")
        .withColumn("popularity", F.coalesce(F.col("popularity"), F.lit(0)).cast("long"))
    )
    ranked = _rank(catalog)
    n = ranked.agg(F.count(F.lit(1))).first()[0]
    n_head = int(config.head_fraction * n)
    n_torso = int(config.torso_fraction * n)
    head, torso, tail, cold = (F.lit(name) for name in SEGMENT_NAMES)
    segment = (
        F.when(F.col("popularity") == 0, cold)
        .when(F.col("rank") < n_head, head)
        .when(F.col("rank") < n_head + n_torso, torso)
        .otherwise(tail)
    )
    shard = F.pmod(F.xxhash64("item_id"), F.lit(shards)).cast("int")
    return ranked.select("item_id", "popularity", segment.alias("segment"), shard.alias("shard"))


def _rank(catalog: DataFrame) -> DataFrame:
    """0-based rank by (popularity desc, item id asc), without a global sort: the items ranked
    before a popularity value are all items with a higher one (a prefix sum over the small
    histogram), plus the item's position among equals by id."""
    histogram = catalog.groupBy("popularity").agg(F.count(F.lit(1)).alias("items"))
    offsets = histogram.withColumn(
        "offset",
        F.coalesce(
            F.sum("items").over(Window.orderBy(F.col("popularity").desc()).rowsBetween(Window.unboundedPreceding, -1)),
            F.lit(0),
        ),
    ).select("popularity", "offset")
    within = F.row_number().over(Window.partitionBy("popularity").orderBy("item_id")) - 1
    return catalog.join(F.broadcast(offsets), "popularity").withColumn("rank", F.col("offset") + within).drop("offset")
