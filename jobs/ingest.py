"""``sa2crq ingest``: cold-start ingestion of a batch of new items.

validate -> drop items already published (an exact re-send changes nothing) -> embed and encode
with the published tokenizer (Ray Data) -> SIDs consistent with the published table: every
published item keeps its SID, new items are placed against the published occupancy
(:func:`sa2crq.ids.stability.stable_assign_sids` with every published item pinned) -> publish a new
version holding the full table and the delta.

Two ingests may run at once: each builds on the LATEST it read, and the publisher's
compare-and-swap lets only one of them move LATEST; the other discards its attempt and rebuilds on
the new LATEST, so neither batch is lost. Ingest never changes an existing item: a batch row whose
id is already published is reported as such and not re-coded (a recode changes items).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.config import IngestConfig
from sa2crq.config import SIDConfig, build_config
from jobs.engines import copy_tree, ray_runtime, remove_tree
from jobs.object_store import object_store
from jobs.publishing import resolve_version, write_json
from jobs.summary import JobSummary
from sa2crq.data.columns import list_matrix
from sa2crq.data.segments import COLD, SEGMENT_NAMES, segment_codes
from sa2crq.data.validation import validate_items, write_rejects
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.ids.stability import PublishedSIDs, stable_assign_sids
from sa2crq.retrieval.serving import build_serving_trie
from sa2crq.storage import layout
from sa2crq.storage.filesystem import read_parquet, write_parquet
from sa2crq.storage.publish import ConcurrentPublishError, Publisher

log = logging.getLogger(__name__)

def run_ingest(config: IngestConfig, *, attempts: int = 5) -> JobSummary:
    storage = config.storage
    with object_store(storage), ray_runtime(config.ray):
        publisher = Publisher(storage.sids)
        for attempt in range(1, attempts + 1):
            parent = resolve_version(publisher, None, "SID", hint="ingest adds to a published catalog: run `sa2crq recode` first")
            version = publisher.new_version()
            try:
                return _ingest(config, publisher, parent, version)
            except ConcurrentPublishError:
                log.info("ingest: LATEST moved while building on %s (attempt %d of %d); rebuilding on the new one", parent, attempt, attempts)
                publisher.discard(version)
            except BaseException:
                publisher.discard(version)
                raise
        raise ConcurrentPublishError(f"ingest: LATEST kept moving; nothing published after {attempts} attempts")


def _ingest(config: IngestConfig, publisher: Publisher, parent: str, version: str) -> JobSummary:
    from ray_workers.shards import map_shards
    from ray_workers.stages import embed_stage, encode_stage

    parent_url, url = publisher.version_url(parent), publisher.version_url(version)
    work = f"{url}/{layout.WORK}"
    summary = JobSummary("ingest", version)

    items = validate_items(read_parquet(config.items), max_reject_fraction=config.max_reject_fraction)
    published = read_parquet(f"{parent_url}/{layout.SID_TABLE}", columns=list(layout.SID_TABLE_COLUMNS))
    already = pc.is_in(items.valid.column("item_id"), value_set=published.column("item_id").combine_chunks())
    new_items = items.valid.filter(pc.invert(already))
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
    # Named by version: the embedding file it becomes sits beside the parent's in the new version.
    write_parquet(work_items, f"{work}/items/{version}.parquet")
    pool = config.ray.actor_pool
    copy_tree(f"{parent_url}/{layout.TOKENIZER}", f"{url}/{layout.TOKENIZER}")
    map_shards(f"{work}/items", f"{url}/{layout.EMBEDDINGS}", embed_stage, {"cache_dir": config.embedding_cache}, desc="embed", **pool)
    map_shards(f"{url}/{layout.EMBEDDINGS}", f"{work}/codes", encode_stage, {"tokenizer_url": f"{url}/{layout.TOKENIZER}"}, desc="encode", **pool)
    copy_tree(f"{parent_url}/{layout.EMBEDDINGS}", f"{url}/{layout.EMBEDDINGS}")

    # SIDs: published items pinned, new ones placed against their occupancy.
    codes = read_parquet(f"{work}/codes")
    previous = PublishedSIDs.from_arrow(published)
    new_codes = list_matrix(codes.column("codes"))
    parent_meta = publisher.manifest(parent).meta
    # New items follow the SID rules the published version was built with.
    sid_config = build_config(SIDConfig, parent_meta["sid_config"])
    table, stats = stable_assign_sids(
        previous,
        np.concatenate([previous.item_ids, codes.column("item_id").to_numpy(zero_copy_only=False)]),
        np.concatenate([previous.codes, new_codes]),
        np.concatenate([previous.popularity, np.zeros(codes.num_rows, dtype=np.int64)]),
        np.concatenate([segment_codes(published.column("segment")), np.full(codes.num_rows, COLD, dtype=np.int8)]),
        SIDVocabulary.from_dict(parent_meta["vocab"]).codebook_sizes,
        sid_config,
        pin_all_previous=True,
    )
    full = table.to_arrow().select(list(layout.SID_TABLE_COLUMNS))
    delta = full.filter(pc.is_in(full.column("item_id"), value_set=codes.column("item_id").combine_chunks()))
    write_parquet(full, f"{url}/{layout.SID_TABLE}/part-00000.parquet")
    write_parquet(delta, f"{url}/{layout.DELTA}/part-00000.parquet")
    trie = build_serving_trie(full, table.vocab.size)
    trie.save(f"{url}/{layout.TRIE}")
    write_rejects(items, f"{url}/{layout.REJECTS}/items/part-00000.parquet")
    remove_tree(work)

    report |= {"pinned": stats.pinned, "placed": stats.placed, "delta_rows": delta.num_rows,
               "delta_from_buckets": int((delta.column("bucket_size").to_numpy() > 1).sum())}  # fmt: skip
    write_json(f"{url}/{layout.REPORT}", report)
    publisher.publish(version, parent=parent, meta={"job": "ingest", "items": full.num_rows, "vocab": parent_meta["vocab"],
                                                    "sid_config": parent_meta["sid_config"]})  # fmt: skip
    summary.published = True
    summary.report = report
    summary.add("sid table", f"{url}/{layout.SID_TABLE}", full.num_rows)
    summary.add("delta", f"{url}/{layout.DELTA}", delta.num_rows)
    summary.add("embeddings", f"{url}/{layout.EMBEDDINGS}", full.num_rows)
    summary.add("trie", f"{url}/{layout.TRIE}", trie.n_sids, unit="SIDs")
    summary.add("rejected items", f"{url}/{layout.REJECTS}/items", items.counts["rejected"])
    summary.add("report", f"{url}/{layout.REPORT}")
    summary.notes.append(f"{n_already} items of the batch were already published in {parent} and left unchanged")
    return summary
