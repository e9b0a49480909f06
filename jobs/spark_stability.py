"""Stability against the published SID table in Spark: the stable-SID rule of a recode with a reused
tokenizer, and the churn and remap between two versions.

The same results as the library's single-process :func:`sa2crq.ids.stability.stable_assign_sids` and
:func:`sa2crq.ids.stability.sid_churn`, which hold both tables in the driver and cannot take a
10^9-item catalog. Here the library's sorts and searchsorted steps become joins and window ranks, and
only counts reach the driver; ranks and counts are integers, so the two implementations agree bit
for bit (``tests/jobs/test_spark_stability.py`` checks it).

Input: SID tables as the jobs write them (:meth:`sa2crq.ids.sid_table.SIDTable.to_arrow`, or the Spark
job's).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from jobs.spark_sarq import bucket_cap, code_prefix, keep_threshold_of, kept_depths
from sa2crq.config import SIDConfig
from sa2crq.quantize.sarq import default_tau, keep_threshold

REMAP_COLUMNS = ("item_id", "old_sid", "new_sid", "change")


def sid_churn_spark(previous: DataFrame, current: DataFrame) -> tuple[dict, DataFrame]:
    """Share of the items in both SID tables whose ``sid`` differs (``churn``), item counts
    (``previous``, ``current``, ``common``, ``unchanged``, ``changed``, ``added``, ``removed``), and the
    remap: :func:`sa2crq.ids.stability.sid_churn`'s summary, key for key and value for value.

    The remap has one row per changed, added or removed item: ``item_id``, ``old_sid`` (null if
    added), ``new_sid`` (null if removed), ``change`` ('changed', 'added' or 'removed'). Where it
    differs from the library's pyarrow remap:

    * Rows come in no particular order (the library's are sorted by item id); sort them when order
      matters (``.orderBy("item_id")``, or ``sort_by("item_id")`` on the Arrow table).
    * Types: ``item_id`` keeps the input's type (long -> int64, string -> string), the SIDs are
      array<int> (int32 elements, as in the library), ``change`` a string. Arrow renders Spark's
      arrays as ``list<element: int32>`` (pyarrow's own lists are ``list<item: int32>``), marks
      ``change`` non-nullable, and gives ``large_string`` under
      ``spark.sql.execution.arrow.useLargeVarTypes``: ``remap.toArrow().cast(library_remap.schema)``
      gives the library's schema exactly.
    * It is lazy: writing it runs the shuffle again. The summary is computed (and the duplicate
      check raises) before this function returns.

    Raises ``ValueError`` as the library does when a table repeats an item id; a null id trips it
    too, as in the library (``pyarrow.compute.count_distinct`` skips nulls).
    """
    # Union + group rather than a full outer join: the per-side row counts per id fall out of the
    # same shuffle, which is the duplicate check (a join would multiply repeated ids instead).
    sides = previous.select("item_id", F.col("sid").alias("old_sid"), F.lit(1).alias("in_previous")).unionByName(
        current.select("item_id", F.col("sid").alias("new_sid"), F.lit(1).alias("in_current")),
        allowMissingColumns=True,  # the other side's columns are null
    )
    # first() is deterministic here: once the check below passes, an id has at most one row per side.
    items = sides.groupBy("item_id").agg(
        F.count("in_previous").alias("n_previous"),
        F.count("in_current").alias("n_current"),
        F.first("old_sid", ignorenulls=True).alias("old_sid"),
        F.first("new_sid", ignorenulls=True).alias("new_sid"),
    )
    had, has = F.col("n_previous") > 0, F.col("n_current") > 0
    # As the library's _same_lists: equal length and elements; a null SID on either side differs.
    same = F.coalesce(F.col("old_sid") == F.col("new_sid"), F.lit(False))
    # Unchanged items get no label (null) and leave the remap.
    classified = items.withColumn("change", F.when(~had, "added").when(~has, "removed").when(~same, "changed"))

    row = classified.agg(
        F.coalesce(F.sum("n_previous"), F.lit(0)).alias("previous"),  # sum over no rows is null
        F.coalesce(F.sum("n_current"), F.lit(0)).alias("current"),
        # Distinct non-null ids per side, as pyarrow's count_distinct counts them.
        F.count_if(had & F.col("item_id").isNotNull()).alias("previous_ids"),
        F.count_if(has & F.col("item_id").isNotNull()).alias("current_ids"),
        F.count_if(had & has).alias("common"),
        *[F.count_if(F.col("change") == name).alias(name) for name in ("changed", "added", "removed")],
    ).first()
    for name in ("previous", "current"):  # previous first, as the library checks
        if row[f"{name}_ids"] != row[name]:
            raise ValueError(f"the {name} SID table repeats item ids")

    counts = {name: int(row[name]) for name in ("changed", "added", "removed")}
    common = int(row["common"])
    stats = {
        "previous": int(row["previous"]),
        "current": int(row["current"]),
        "common": common,
        "unchanged": common - counts["changed"],
        **counts,
        "churn": counts["changed"] / common if common else 0.0,
    }
    remap = classified.filter(F.col("change").isNotNull()).select(*REMAP_COLUMNS)
    return stats, remap


def stable_sids_spark(
    previous: DataFrame, catalog: DataFrame, levels: int, config: SIDConfig, *, pin_all_previous: bool = False
) -> tuple[DataFrame, dict]:
    """SIDs consistent with the published table: :func:`sa2crq.ids.stability.stable_assign_sids`, item
    for item (its module docstring states the rules). ``pin_all_previous=False`` is a recode with a
    reused tokenizer, ``True`` an ingest, whose catalog is every published item (published codes and
    popularity) plus the new items.

    ``previous``: the published SID table (``item_id``, ``codes``, ``code_depth``, ``digit``,
    ``popularity``). ``catalog``: ``item_id``, ``codes`` (full depth) and ``popularity``, other
    columns carried along. Returns the catalog's columns plus ``code_depth`` and ``digit`` (-1 for
    none), ready for :func:`jobs.spark_sarq.sid_table`, and the library's
    :class:`~sa2crq.ids.stability.StabilityStats` counts as a dict. Raises ``ValueError`` where the
    library does, with its message; where several items break a rule the one named may differ.
    """
    checks = previous.agg(
        F.min(F.size("codes")).alias("min_levels"), F.max(F.size("codes")).alias("max_levels"),
        F.max("digit").alias("max_digit"), F.min("digit").alias("min_digit"),
        F.min("code_depth").alias("min_depth"), F.max("code_depth").alias("max_depth"), F.count(F.lit(1)).alias("rows"),
        F.sum(F.col("popularity").cast("long") + F.lit(config.epsilon)).alias("mass"),
    ).first()  # fmt: skip
    if not checks["rows"]:
        raise ValueError("published codes must be a non-empty (items, levels) array, got shape (0,)")
    if checks["min_depth"] < 1 or checks["max_depth"] > checks["max_levels"] or checks["min_digit"] < -1:
        raise ValueError(f"published code_depth must lie in [1, {checks['max_levels']}] and digit be at least -1")
    if checks["min_levels"] != levels or checks["max_levels"] != levels:
        raise ValueError(f"the published table has {checks['max_levels']} code levels, the catalog {levels}")
    if checks["max_digit"] >= config.digit_vocab:
        raise ValueError(f"the published table has digit {checks['max_digit']}, beyond sid.digit_vocab {config.digit_vocab}")
    _require_unique(previous, "the published table")
    _require_unique(catalog, "the catalog (an ingested item must not reuse a published id)")

    long_codes = F.col("codes").cast("array<long>")
    published = previous.select(
        "item_id", long_codes.alias("published_codes"), F.col("code_depth").cast("long").alias("published_depth"),
        F.col("digit").cast("long").alias("published_digit"), F.col("popularity").cast("long").alias("published_popularity"),
    )  # fmt: skip
    if pin_all_previous:
        fresh = _ingest_depths(catalog, levels, int(checks["rows"]), int(checks["mass"]), config)
    else:
        fresh = _recode_depths(catalog, levels, config)
    # The published table is catalog-sized: never broadcast (see jobs.spark_sarq.kept_depths).
    frame = fresh.withColumn("code_depth", F.col("code_depth").cast("long")).join(published.hint("merge"), "item_id", "left")
    known = F.col("published_depth").isNotNull()
    unchanged = known & (long_codes == F.col("published_codes"))
    if pin_all_previous:
        _check_ingest(previous, catalog, frame, known, unchanged, int(checks["rows"]))
        pinned = known
    else:
        published_depth = F.col("published_depth")
        pinned = unchanged & (F.col("shallowest_depth") <= published_depth) & (published_depth <= F.col("deepest_depth"))
    frame = frame.select(
        *catalog.columns, F.when(pinned, F.col("published_depth")).otherwise(F.col("code_depth")).alias("code_depth"),
        F.col("published_digit"), known.alias("known"), unchanged.alias("unchanged"), pinned.alias("pinned"),
    )  # fmt: skip
    frame = _place_depths(frame, levels, config)
    frame = _place_digits(frame, levels, config).cache()

    if config.one_item_per_id:
        sid = Window.partitionBy("code_depth", code_prefix(F.col("code_depth")), "digit")
        shared = frame.withColumn("bucket", F.count(F.lit(1)).over(sid)).filter(~F.col("pinned") & (F.col("bucket") > 1))
        first = shared.select("item_id", "bucket").limit(1).collect()
        if first:
            raise ValueError(
                f"one_item_per_id: item {first[0]['item_id']!r} finds no free digit in the digit vocabulary of "
                f"{config.digit_vocab} and would share its SID with {first[0]['bucket'] - 1} items; raise sid.digit_vocab"
            )
    counts = frame.agg(
        F.count(F.lit(1)).alias("items"),
        F.count_if(F.col("pinned")).alias("pinned"),
        F.count_if(F.col("unchanged") & ~F.col("pinned")).alias("moved_by_hysteresis"),
        F.count_if(~F.col("known")).alias("new_items"),
    ).first()
    if not counts["items"]:
        raise ValueError("cannot assign SIDs to an empty catalog")
    stats = {
        "pinned": int(counts["pinned"]),
        "placed": int(counts["items"] - counts["pinned"]),
        "moved_by_hysteresis": int(counts["moved_by_hysteresis"]),
        "new_items": int(counts["new_items"]),
        "removed_items": int(checks["rows"] - (counts["items"] - counts["new_items"])),
    }
    return frame.select(*catalog.columns, "code_depth", "digit"), stats


def _recode_depths(catalog: DataFrame, levels: int, config: SIDConfig) -> DataFrame:
    """``catalog`` plus its fresh SARQ ``code_depth`` and the band of depths an unchanged item may
    keep (``shallowest_depth``, ``deepest_depth``: :func:`sa2crq.ids.stability.kept_depth_band`)."""
    if not config.adaptive_length:
        full = F.lit(levels).cast("long")
        return catalog.select("*", full.alias("code_depth"), full.alias("shallowest_depth"), full.alias("deepest_depth"))
    threshold = keep_threshold_of(catalog, config)
    scale = 2**config.hysteresis_bits
    depths = kept_depths(
        catalog, levels, {"code_depth": threshold, "shallowest_depth": threshold * scale, "reaching_depth": -(-threshold // scale)}, config
    )
    fresh = bucket_cap(depths, levels, config)
    return fresh.withColumn("deepest_depth", F.greatest("reaching_depth", "code_depth")).drop("reaching_depth")


def _ingest_depths(catalog: DataFrame, levels: int, published_items: int, published_mass: int, config: SIDConfig) -> DataFrame:
    """SARQ depths on the whole catalog's prefix masses against the published keep threshold, before the bucket cap."""
    if not config.adaptive_length:
        return catalog.withColumn("code_depth", F.lit(levels))
    tau = config.tau if config.tau is not None else default_tau(published_items)
    return kept_depths(catalog, levels, {"code_depth": keep_threshold(published_mass, tau)}, config)


def _check_ingest(
    previous: DataFrame, catalog: DataFrame, frame: DataFrame, known: F.Column, unchanged: F.Column, published_items: int
) -> None:
    """An ingest carries every published item exactly as published."""
    same_popularity = F.col("popularity").cast("long") == F.col("published_popularity")
    altered = frame.filter(known & ~(unchanged & same_popularity)).select("item_id").limit(1).collect()
    if altered:
        raise ValueError(
            f"item {altered[0]['item_id']!r} is already published with other codes or popularity: an ingest never "
            "changes a published item (drop exact re-sends before ingesting, or recode)"
        )
    if frame.filter(known).count() != published_items:
        missing = previous.join(catalog.hint("merge"), "item_id", "left_anti").select("item_id").limit(1).collect()
        raise ValueError(f"published item {missing[0]['item_id']!r} is missing: an ingest carries every published item")


def _place_depths(frame: DataFrame, levels: int, config: SIDConfig) -> DataFrame:
    """Bucket cap against the pinned occupancy, shallow levels first: the placed items of a truncated
    bucket take its free places in ascending popularity, then item id; the rest go one level deeper."""
    for level in range(1, levels):
        bucket = ("code_depth", code_prefix(level))
        occupied = F.sum(F.col("pinned").cast("long")).over(Window.partitionBy(*bucket))
        rank = F.row_number().over(Window.partitionBy(*bucket, "pinned").orderBy(F.col("popularity").asc(), F.col("item_id").asc())) - 1
        over = (F.col("code_depth") == level) & ~F.col("pinned") & (occupied + rank >= config.max_bucket)
        frame = frame.withColumn("code_depth", F.when(over, F.lit(level + 1).cast("long")).otherwise(F.col("code_depth")))
    return frame


def _place_digits(frame: DataFrame, levels: int, config: SIDConfig) -> DataFrame:
    """Placed items that need a digit take, by descending popularity then item id, the smallest digits
    below the last one not held by pinned items of their group; the rest share the last digit.

    As in the library, the r-th free digit is r + #{j : u_j - j <= r} over the group's distinct held
    digits u_0 < u_1 < ...; the count is a running sum over the group ordered by that key, the held
    digits before the placed items at equal keys.
    """
    last = config.digit_vocab - 1
    group = ("code_depth", code_prefix(F.col("code_depth")))
    shared = F.count(F.lit(1)).over(Window.partitionBy(*group)) > 1
    needs = (shared | F.lit(config.always_digit)) & (F.col("code_depth") == levels)
    if config.one_item_per_id:
        needs = needs | shared
    digit = F.col("published_digit")
    frame = frame.withColumn("wants", ~F.col("pinned") & needs).withColumn(
        "held", F.col("pinned") & (digit >= 0) & (digit < last)
    )
    # Distinct held digits only (the library deduplicates them), each counted once.
    first_of_digit = F.row_number().over(Window.partitionBy(*group, "held", digit).orderBy("item_id")) == 1
    frame = frame.withColumn("held", F.col("held") & first_of_digit)
    held_index = F.row_number().over(Window.partitionBy(*group, "held").orderBy(digit)) - 1
    want_rank = F.row_number().over(Window.partitionBy(*group, "wants").orderBy(F.col("popularity").desc(), F.col("item_id").asc())) - 1
    frame = frame.withColumn("key", F.when(F.col("held"), digit - held_index).when(F.col("wants"), want_rank))
    running = Window.partitionBy(*group).orderBy(F.col("key").asc_nulls_first(), F.col("held").desc()).rowsBetween(
        Window.unboundedPreceding, Window.currentRow
    )
    held_at_or_below = F.sum(F.col("held").cast("long")).over(running)
    placed = F.least(F.col("key") + held_at_or_below, F.lit(last))
    assigned = F.when(F.col("pinned"), digit).when(F.col("wants"), placed).otherwise(F.lit(-1))
    return frame.withColumn("digit", assigned.cast("long")).drop("wants", "held", "key", "published_digit")


def _require_unique(frame: DataFrame, where: str) -> None:
    repeated = frame.groupBy("item_id").count().filter(F.col("count") > 1).limit(1).collect()
    if repeated:
        raise ValueError(f"item id {repeated[0]['item_id']!r} appears more than once in {where}")
