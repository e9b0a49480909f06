"""``sa2crq ingest``: cold-start ingestion of a batch of new items.

validate -> drop items already published (an exact re-send changes nothing) -> embed and encode
with the published tokenizer (Ray Data) -> SIDs consistent with the published table (Spark): every
published item keeps its SID, new items are placed against the published occupancy
(:func:`jobs.spark_stability.stable_sids_spark` with every published item pinned) -> publish a new
version holding the full table and the delta, whose manifest lists the parent's embeddings where
the parent holds them (no copy) beside the new items' own.

Two ingests may run at once: each builds on the latest version it read, and the publisher's commit
log lets only one of them commit on top of it; the other discards its attempt and rebuilds on the
winner, so neither batch is lost. Ingest never changes an existing item: a batch row whose
id is already published is reported as such and not re-coded (a recode changes items).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import IngestConfig
from jobs.engines import SparkStaging, ray_runtime, remove_tree, spark_session
from jobs.object_store import object_store
from jobs.publishing import resolve_version, write_json
from jobs.summary import JobSummary
from sa2crq.config import SIDConfig
from sa2crq.data.segments import COLD, SEGMENT_NAMES
from sa2crq.data.validation import Validated, check_item_id_types, validate_items, write_rejects
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.storage import layout
from sa2crq.storage.filesystem import read_parquet, write_parquet
from sa2crq.storage.publish import ConcurrentPublishError, Publisher
from sa2crq.storage.published import PublishedVersion

log = logging.getLogger(__name__)


def run_ingest(config: IngestConfig, *, attempts: int = 5) -> JobSummary:
    storage = config.storage
    with object_store(storage), spark_session(config.spark, "ingest") as spark, ray_runtime(config.ray):
        publisher = Publisher(storage.sids)
        for attempt in range(1, attempts + 1):
            parent = resolve_version(publisher, None, "SID", hint="ingest adds to a published catalog: run `sa2crq recode` first")
            version = publisher.new_version()
            staging = SparkStaging(config.spark)
            try:
                return _ingest(config, spark, staging, publisher, parent, version)
            except ConcurrentPublishError:
                log.info("ingest: LATEST moved while building on %s (attempt %d of %d); rebuilding on the new one", parent, attempt, attempts)
                publisher.discard(version)
            except BaseException:
                publisher.discard(version)
                raise
            finally:
                staging.cleanup()
        raise ConcurrentPublishError(f"ingest: LATEST kept moving; nothing published after {attempts} attempts")


def validate_batch(config: IngestConfig, parent_files: PublishedVersion, url: str) -> Validated:
    """Ingest's first step: the batch (intra-day, not catalog-sized) validated in this process, naming
    items by the published items' id type; its rejected rows are written with their reasons under
    ``url``'s rejects. A table-level problem raises an ``InputError``."""
    items = validate_items(read_parquet(config.items), max_reject_fraction=config.max_reject_fraction)
    published_type = parent_files.parquet_schema(layout.SID_TABLE).field("item_id").type
    check_item_id_types(items.valid.schema.field("item_id").type, published_type, table="items",
                        known=f"the published version {parent_files.version}'s")  # fmt: skip
    write_rejects(items, f"{url}/{layout.REJECTS}/items/part-00000.parquet")
    return items


def _ingest(config: IngestConfig, spark, staging: SparkStaging, publisher: Publisher, parent: str, version: str) -> JobSummary:
    from pyspark.sql import functions as F

    from jobs.spark_sarq import sid_table
    from jobs.spark_stability import stable_sids_spark
    from jobs.spark_trie import write_trie_spark
    from ray_workers.shards import map_shards
    from ray_workers.stages import embed_stage, encode_stage

    # Everything read from the parent goes through its manifest: only listed files, each checked.
    parent_files, url = PublishedVersion.open(publisher, parent), publisher.version_url(version)
    work = f"{url}/{layout.WORK}"
    summary = JobSummary("ingest", version)

    items = validate_batch(config, parent_files, url)
    # The published table stays in Spark; only the batch's ids cross over.
    published = staging.read_published(spark, parent_files, layout.SID_TABLE)
    batch_ids = spark.createDataFrame(items.valid.select(["item_id"]).to_pandas(), schema=published.select("item_id").schema)
    already_ids = published.select("item_id").join(batch_ids, "item_id").toArrow().column("item_id").combine_chunks()
    id_type = items.valid.schema.field("item_id").type
    new_items = items.valid.filter(pc.invert(pc.is_in(items.valid.column("item_id"), value_set=already_ids.cast(id_type))))
    n_already = items.valid.num_rows - new_items.num_rows
    report = {"parent": parent, "input": items.counts, "already_published": n_already, "new_items": new_items.num_rows}
    if new_items.num_rows == 0:
        publisher.discard(version)
        summary.version = None
        summary.report = report
        summary.notes.append(f"nothing to ingest: {n_already} valid items already published in {parent}, {items.counts['rejected']} rejected")
        return summary

    # Embed and encode the new items with the published tokenizer (Ray Data actor pools).
    n = new_items.num_rows
    work_items = new_items.append_column("popularity", pa.array(np.zeros(n, dtype=np.int64))).append_column(
        "segment", pa.array([SEGMENT_NAMES[COLD]] * n)
    )
    # Named by version: the embedding file it becomes is listed beside the parent's (which the
    # new version references), so the two never share a name.
    write_parquet(work_items, f"{work}/items/{version}.parquet")
    pool = config.ray.actor_pool
    parent_files.copy(layout.TOKENIZER, f"{url}/{layout.TOKENIZER}")
    map_shards(f"{work}/items", f"{url}/{layout.EMBEDDINGS}", embed_stage, {"cache_dir": config.embedding_cache}, desc="embed", **pool)
    map_shards(f"{url}/{layout.EMBEDDINGS}", f"{work}/codes", encode_stage, {"tokenizer_url": f"{url}/{layout.TOKENIZER}"}, desc="encode", **pool)

    # SIDs (Spark): published items pinned, new ones placed against their occupancy, under the SID
    # rules the published version was built with.
    parent_meta = publisher.manifest(parent).meta
    sid_config = SIDConfig.from_dict(parent_meta["sid_config"])
    vocab = SIDVocabulary.from_dict(parent_meta["vocab"])
    columns = ["item_id", F.col("codes").cast("array<int>").alias("codes"), F.col("popularity").cast("long").alias("popularity"), "segment"]
    new_codes = staging.read(spark, f"{work}/codes").select(*columns)
    catalog = published.select(*columns).unionByName(new_codes)
    finalised, stats = stable_sids_spark(published, catalog, len(vocab.codebook_sizes), sid_config, pin_all_previous=True)
    staging.write(sid_table(finalised, vocab).select(*layout.SID_TABLE_COLUMNS), f"{url}/{layout.SID_TABLE}")
    delta = staging.read(spark, f"{url}/{layout.SID_TABLE}").join(new_codes.select("item_id"), "item_id")
    staging.write(delta, f"{url}/{layout.DELTA}")
    delta_counts = staging.read(spark, f"{url}/{layout.DELTA}").agg(
        F.count(F.lit(1)).alias("rows"), F.count_if(F.col("bucket_size") > 1).alias("from_buckets")
    ).first()
    trie = write_trie_spark(staging.read(spark, f"{url}/{layout.SID_TABLE}"), vocab.size, f"{url}/{layout.TRIE}", staging)
    remove_tree(work)

    rows = stats["pinned"] + stats["placed"]
    report |= {"pinned": stats["pinned"], "placed": stats["placed"], "delta_rows": int(delta_counts["rows"]),
               "delta_from_buckets": int(delta_counts["from_buckets"])}  # fmt: skip
    write_json(f"{url}/{layout.REPORT}", report)
    from ray_workers.hashing import file_hashes

    # A delta: the parent's embeddings are listed in the new manifest, not copied (O(batch), not O(catalog)).
    publisher.publish(version, parent=parent, meta={"job": "ingest", "items": rows, "vocab": parent_meta["vocab"],
                                                    "sid_config": parent_meta["sid_config"]},
                      references=parent_files.references(layout.EMBEDDINGS), hash_files=file_hashes)  # fmt: skip
    summary.published = True
    summary.report = report
    summary.add("sid table", f"{url}/{layout.SID_TABLE}", rows)
    summary.add("delta", f"{url}/{layout.DELTA}", int(delta_counts["rows"]))
    summary.add("embeddings (the new items'; the parent's are referenced)", f"{url}/{layout.EMBEDDINGS}", n)
    summary.add("trie", f"{url}/{layout.TRIE}", trie.n_sids, unit="SIDs")
    summary.add("rejected items", f"{url}/{layout.REJECTS}/items", items.counts["rejected"])
    summary.add("report", f"{url}/{layout.REPORT}")
    summary.notes.append(f"{n_already} items of the batch were already published in {parent} and left unchanged")
    return summary
