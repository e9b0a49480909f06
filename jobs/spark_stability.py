"""SID churn and the remap table between two SID table versions, as one Spark shuffle and one aggregation.

The same result as the library's single-process :func:`sa2crq.ids.stability.sid_churn`, which joins the
two tables in the driver with pyarrow and cannot hold a 10^9-item catalog. Here both tables are tagged
by side, unioned and grouped by ``item_id`` (one shuffle, standing in for the full outer join); a
single aggregation brings the item counts to the driver, and the remap stays a DataFrame. The counts
are integers and ``churn`` is the same Python division of them, so the two implementations agree bit
for bit (``tests/jobs/test_spark_stability.py`` checks it).

Input: SID tables as the jobs write them (:meth:`sa2crq.ids.sid_table.SIDTable.to_arrow`, or the Spark
job's), of which only ``item_id`` and ``sid`` (array<int>) are read.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

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
