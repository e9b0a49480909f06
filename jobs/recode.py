"""``sa2crq recode``: the nightly full-catalog recode.

validate (Spark) -> catalog split: popularity, segments, shards (Spark) -> embed (Ray Data) ->
train the tokenizer (Ray Train) or reuse a published one -> full-depth codes (Ray Data) ->
SIDs: SARQ finalisation, or with a reused tokenizer the stability rule of DESIGN §3.3a (Spark) ->
trie (Spark) -> churn and remap against the parent version (Spark) -> report -> publish.

Everything is written under the new version's directory; the version becomes visible only when a
commit names it, created only if the latest version is still the one it built on
(:mod:`sa2crq.storage.publish`). Published versions are never touched.

A recode resumes at stage granularity (:mod:`jobs.recode_attempts`): each stage (split, which
validates too, embed, tokenizer, encode, sids, trie, report) records itself in the unpublished
version once its outputs are complete, so a recode that failed or was killed leaves a resumable
attempt, and a rerun with the same run key (config, parent version, input files) skips the
stages it recorded ("resuming <version>: skipping stages ..." in the log, ``report["resumed"]``)
and redoes the rest: a Spark stage rewrites its outputs whole, embed and encode do only the shards
not written yet. A recode that lost the commit race to another publisher, or failed before it
completed a stage (bad input, for one), discards its files: there is nothing to resume. A recode
whose churn exceeds ``churn_limit``, or that lost more than ``removed_limit`` of the previous
version's items, refuses to publish (unless forced) and leaves its files, unpublished, for
inspection: a rerun with ``--force`` (or raised limits) resumes that attempt and publishes them.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from jobs.config import RecodeConfig, config_dict
from jobs.engines import SparkStaging, ray_runtime, remove_tree, spark_session
from jobs.object_store import object_store
from jobs.publishing import write_json, write_text
from jobs.recode_attempts import RecodeAttempt, open_attempt, run_key
from jobs.summary import JobSummary
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.metrics.html_report import sid_version_page
from sa2crq.metrics.tokenizer_report import codebook_stats
from sa2crq.data.segments import SEGMENT_NAMES
from sa2crq.quantize.tokenizer import Tokenizer, load_tokenizer
from sa2crq.storage import layout
from sa2crq.storage.filesystem import parquet_rows
from sa2crq.storage.publish import ConcurrentPublishError, Publisher
from sa2crq.storage.published import PublishedVersion

if TYPE_CHECKING:
    from ray_workers.shards import ShardRunResult

log = logging.getLogger(__name__)


class ChurnLimitExceeded(RuntimeError):
    """More items changed SID, or more of the previous version's items are gone, than the limits
    allow; nothing was published."""


def run_recode(config: RecodeConfig, *, force: bool = False) -> JobSummary:
    with (
        object_store(config.storage),
        spark_session(config.spark, "recode") as spark,
        ray_runtime(config.ray),
    ):
        publisher = Publisher(config.storage.sids)
        parent = publisher.latest()
        if config.reuse_tokenizer is not None:
            publisher.manifest(config.reuse_tokenizer)  # fails early, naming it, when it is not published
        attempt = open_attempt(publisher, run_key(config, parent), parent)
        if attempt.resumed:
            log.info("resuming %s: skipping stages %s", attempt.version, ", ".join(attempt.resumed))
        staging = SparkStaging(config.spark)
        summary = JobSummary("recode", attempt.version)
        try:
            _recode(config, spark, staging, publisher, parent, attempt, summary, force=force)
        except ChurnLimitExceeded:
            raise  # its files stay, unpublished, for inspection; a rerun with --force publishes them
        except ConcurrentPublishError:
            publisher.discard(attempt.version)  # built on a version that is no longer the latest: nothing to resume
            raise
        except BaseException:
            if not attempt.completed:  # nothing to resume (bad input fails here, in validation)
                publisher.discard(attempt.version)
                raise
            log.error("recode %s failed; its completed stages (%s) stay: a rerun with the same inputs and config resumes them",
                      attempt.version, ", ".join(attempt.completed))  # fmt: skip
            raise
        finally:
            staging.cleanup()
        return summary


def _recode(config: RecodeConfig, spark, staging: SparkStaging, publisher: Publisher, parent: str | None,
            attempt: RecodeAttempt, summary: JobSummary, *, force: bool) -> None:  # fmt: skip
    """The stages, each skipped when ``attempt`` records it complete. A stage that writes with Spark
    replaces what an interrupted run of it left; embed and encode write each shard whole and do only
    the shards not written yet, so the rows they check are counted over every shard."""
    from jobs.spark_catalog import catalog_split
    from ray_workers.shards import map_shards
    from ray_workers.stages import embed_stage, encode_stage

    version = attempt.version
    url = attempt.url
    work = f"{url}/{layout.WORK}"
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        clock = now
        log.info("recode %s: %s done in %.1f s", version, stage, timings[stage])

    # 1. Validate (Spark): bad rows are quarantined with a reason, rows in = rows out + rejected.
    #    Then the catalog split (Spark): popularity over the window, segments, hash shards. One stage: the
    #    validated frames live only in Spark's memory, and the split persists what later stages read.
    if not attempt.done("split"):
        items, interactions = validate_inputs(config, spark, staging, url)
        lap("validate")
        split = catalog_split(
            items.valid, interactions.valid, config.tokenizer.segments, shards=config.shards,
            window=(config.window_start, config.window_end),
        ).cache()  # fmt: skip
        staging.write(split, f"{url}/{layout.CATALOG}")
        # One parquet file per shard: each is a unit of work for the Ray Data stages.
        work_items = items.valid.join(split.hint("merge"), "item_id").repartition(config.shards, "shard").drop("shard")
        staging.write(work_items, f"{work}/items")
        # The tokenizer sample's strata, a Spark aggregate.
        segments = {row["segment"]: row["count"] for row in split.groupBy("segment").count().collect()}
        lap("catalog split")
        attempt.complete("split", {"items": items.counts, "interactions": interactions.counts, "segments": segments})
    counts = attempt.record("split")
    expected_rows = counts["items"]["rows_out"]

    # 2. Embed (Ray Data actor pool).
    pool = config.ray.actor_pool
    if not attempt.done("embed"):
        embedded = map_shards(f"{work}/items", f"{url}/{layout.EMBEDDINGS}", embed_stage, {"cache_dir": config.embedding_cache}, desc="embed", **pool)
        attempt.complete("embed", {"rows": _check_rows("embed", embedded, expected_rows)})
        lap("embed")

    # 3. Tokenizer: train (Ray Train) or reuse a published one.
    target = f"{url}/{layout.TOKENIZER}"
    if not attempt.done("tokenizer"):
        attempt.complete("tokenizer", {"fit": _tokenizer(config, publisher, version, target, counts["segments"]).fit_report})
        lap("tokenizer")
    tokenizer = load_tokenizer(target)  # the one encode reads

    # 4. Full-depth codes (Ray Data actor pool).
    if not attempt.done("encode"):
        encoded = map_shards(f"{url}/{layout.EMBEDDINGS}", f"{url}/{layout.CODES}", encode_stage,
                             {"tokenizer_url": target}, desc="encode", **pool)  # fmt: skip
        attempt.complete("encode", {"rows": _check_rows("encode", encoded, expected_rows)})
        lap("encode")

    # 5. SIDs (Spark): SARQ finalisation, or with a reused tokenizer the stability rule against the parent.
    from jobs.spark_sarq import finalise_sids, sid_table
    from jobs.spark_stability import stable_sids_spark
    from jobs.spark_trie import TrieCounts, write_trie_spark

    vocab = SIDVocabulary(tokenizer.codebook_sizes(), config.tokenizer.sid.digit_vocab)
    levels = len(tokenizer.codebook_sizes())
    # The parent is read through its manifest: only listed files, each checked.
    parent_files = PublishedVersion.open(publisher, parent) if parent is not None else None
    if not attempt.done("sids"):
        codes = staging.read(spark, f"{url}/{layout.CODES}")
        stability: dict[str, Any] = {}
        if config.reuse_tokenizer is not None and parent_files is not None:
            previous = staging.read_published(spark, parent_files, layout.SID_TABLE)
            finalised, stable_counts = stable_sids_spark(previous, codes, levels, config.tokenizer.sid)
            stability = {**stable_counts, "hysteresis_bits": config.tokenizer.sid.hysteresis_bits}
        else:
            finalised = finalise_sids(codes, levels, config.tokenizer.sid)
        staging.write(sid_table(finalised, vocab).select(*layout.SID_TABLE_COLUMNS), f"{url}/{layout.SID_TABLE}")
        attempt.complete("sids", {"stability": stability})
        lap("sids")

    # 6. Trie (Spark).
    if not attempt.done("trie"):
        written = write_trie_spark(staging.read(spark, f"{url}/{layout.SID_TABLE}"), vocab.size, f"{url}/{layout.TRIE}", staging)
        attempt.complete("trie", vars(written))
        lap("trie")
    trie = TrieCounts(**attempt.record("trie"))

    # 7. Report: SID statistics (Spark), churn and remap against the parent.
    if not attempt.done("report"):
        sids = _sid_statistics(staging.read(spark, f"{url}/{layout.SID_TABLE}"), vocab)
        churn = {"churn": 0.0}
        if parent_files is not None:
            from jobs.spark_stability import sid_churn_spark

            churn, remap = sid_churn_spark(
                staging.read_published(spark, parent_files, layout.SID_TABLE),
                staging.read(spark, f"{url}/{layout.SID_TABLE}"),
            )
            staging.write(remap, f"{url}/{layout.REMAP}")
        attempt.complete("report", {"sids": sids, "churn": churn})
        lap("report")
    churn = attempt.record("report")["churn"]
    report: dict[str, Any] = {
        "version": version,
        "parent": parent,
        "input": {"items": counts["items"], "interactions": counts["interactions"]},
        "sids": attempt.record("report")["sids"],
        "tokenizer": {"reused_from": config.reuse_tokenizer, "fit": attempt.record("tokenizer")["fit"]},
        "stability": attempt.record("sids")["stability"],
        "config": config_dict(config),
        "churn": churn,
        "seconds": timings,  # this run's stages; a resumed run's skipped stages ran in an earlier attempt
        "resumed": list(attempt.resumed),
    }

    remove_tree(work)
    write_text(f"{url}/{layout.REPORT_PAGE}", sid_version_page(report, f"SID version {version} (recode)"))
    write_json(f"{url}/{layout.REPORT}", report)
    summary.report = report
    if attempt.resumed:
        summary.notes.append(f"resumed {version}: stages {', '.join(attempt.resumed)} reused from an earlier attempt")
    summary.add("rejected items", f"{url}/{layout.REJECTS}/items", counts["items"]["rejected"])
    summary.add("rejected interactions", f"{url}/{layout.REJECTS}/interactions", counts["interactions"]["rejected"])
    summary.add("catalog split", f"{url}/{layout.CATALOG}", expected_rows)
    summary.add("embeddings", f"{url}/{layout.EMBEDDINGS}", expected_rows)
    summary.add("codes", f"{url}/{layout.CODES}", expected_rows)
    summary.add("sid table", f"{url}/{layout.SID_TABLE}", trie.n_rows)
    summary.add("trie", f"{url}/{layout.TRIE}", trie.n_sids, unit="SIDs")
    if parent is not None:
        summary.add("remap", f"{url}/{layout.REMAP}", churn["changed"] + churn["added"] + churn["removed"])
    summary.add("tokenizer", f"{url}/{layout.TOKENIZER}")
    summary.add("report", f"{url}/{layout.REPORT}")
    summary.add("report page", f"{url}/{layout.REPORT_PAGE}")

    refusal = publish_refusal(churn, config) if parent is not None and not force else None
    if refusal is not None:
        summary.notes.append(f"unpublished files left at {url} for inspection")
        raise ChurnLimitExceeded(
            f"{refusal} against version {parent}: nothing published. The remap is at {url}/{layout.REMAP}; "
            "rerun with --force to publish these files anyway."
        )
    attempt.remove_records()
    from ray_workers.hashing import file_hashes

    publisher.publish(version, parent=parent, meta={"job": "recode", "items": trie.n_rows, "churn": churn["churn"],
                                                    "vocab": vocab.to_dict(), "sid_config": config_dict(config.tokenizer.sid)},
                      hash_files=file_hashes)  # fmt: skip
    summary.published = True


def validate_inputs(config: RecodeConfig, spark, staging: SparkStaging, url: str):
    """Recode's first step (Spark): items, then interactions against the items that survived; every
    rejected row is written with its reason under ``url``'s rejects. Returns both
    :class:`jobs.spark_validation.SparkValidated`; a table-level problem raises an ``InputError``."""
    from jobs.spark_validation import validate_interactions, validate_items

    items = validate_items(staging.read(spark, config.items), max_reject_fraction=config.max_reject_fraction)
    interactions = validate_interactions(
        staging.read(spark, config.interactions), items.valid, max_reject_fraction=config.max_reject_fraction
    )
    staging.write(items.rejects, f"{url}/{layout.REJECTS}/items")
    staging.write(interactions.rejects, f"{url}/{layout.REJECTS}/interactions")
    return items, interactions


def publish_refusal(churn: dict[str, Any], config: RecodeConfig) -> str | None:
    """Why a recode must not publish over its parent (churn and remap counts of
    :func:`jobs.spark_stability.sid_churn_spark`), or None: too many kept items changed SID, or too
    many of the parent's items are gone."""
    if churn["churn"] > config.churn_limit:
        return (f"SID churn {churn['churn']:.2%} exceeds the limit of {config.churn_limit:.2%} "
                f"({churn['changed']:,} of {churn['common']:,} items changed SID)")  # fmt: skip
    removed = churn["removed"] / max(churn["previous"], 1)
    if removed > config.removed_limit:
        return (f"{churn['removed']:,} of the previous version's {churn['previous']:,} items ({removed:.2%}) are missing, "
                f"above the limit of {config.removed_limit:.2%}: is the item snapshot truncated or stale?")  # fmt: skip
    return None


def _tokenizer(config: RecodeConfig, publisher: Publisher, version: str, target: str, segments: dict[str, int]) -> Tokenizer:
    if config.reuse_tokenizer is not None:
        PublishedVersion.open(publisher, config.reuse_tokenizer).copy(layout.TOKENIZER, target)
        tokenizer = load_tokenizer(target)
        tokenizer.fit_report = {"reused_from": config.reuse_tokenizer}
        return tokenizer
    from ray_workers.training import TrainRun, fit_tokenizer

    # Unique per attempt: Ray Train would restore the run directory a killed attempt left.
    run = TrainRun(name=f"tokenizer-{version}-{uuid.uuid4().hex[:8]}", storage_path=config.storage.runs, **config.ray.train_group)
    segment_counts = np.zeros(len(SEGMENT_NAMES), dtype=np.int64)
    for name, count in segments.items():
        segment_counts[SEGMENT_NAMES.index(name)] = count
    tokenizer = fit_tokenizer(f"{publisher.version_url(version)}/{layout.EMBEDDINGS}", config.tokenizer, run, segment_counts=segment_counts)
    tokenizer.save(target)
    return tokenizer


def _sid_statistics(sids, vocab: SIDVocabulary) -> dict[str, Any]:
    """Per segment and overall: items, mean SID length, collision rate, largest bucket, SID-length
    histogram; overall the bucket-size distribution and each level's codebook use, the same numbers
    the library's tokenizer report gives (Spark aggregates; only histograms reach the driver)."""
    from pyspark.sql import functions as F

    def stats(frame) -> dict[str, Any]:
        row = frame.agg(
            F.count(F.lit(1)).alias("items"),
            F.avg("sid_len").alias("mean_sid_len"),
            F.avg((F.col("bucket_size") > 1).cast("double")).alias("collision_rate"),
            F.max("bucket_size").alias("max_bucket"),
        ).first()
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.asDict().items()}

    def value_counts(frame, column: str) -> dict[str, int]:
        rows = sorted(frame.groupBy(column).count().collect(), key=lambda r: r[column])
        return {str(r[column]): r["count"] for r in rows}

    overall = stats(sids)
    overall["distinct_sids"] = sids.select("sid").distinct().count()
    overall["vocab_size"] = vocab.size
    overall["bucket_sizes"] = value_counts(sids, "bucket_size")
    overall["segments"] = {}
    for name in SEGMENT_NAMES:
        segment = sids.filter(F.col("segment") == name)
        overall["segments"][name] = {**stats(segment), "sid_length_histogram": value_counts(segment, "sid_len")}
    used = sids.select(F.posexplode("codes").alias("level", "code")).groupBy("level", "code").count().collect()
    counts = [np.zeros(size, dtype=np.int64) for size in vocab.codebook_sizes]
    for r in used:  # levels x codebook size rows at most
        counts[r["level"]][r["code"]] = r["count"]
    overall["codebook"] = [codebook_stats(c, size) for c, size in zip(counts, vocab.codebook_sizes)]
    return overall


def _check_rows(stage: str, result: ShardRunResult, expected: int) -> int:
    """The rows ``stage`` wrote over all of its shards, this run's and an earlier attempt's, which
    must be the validated items; each shard this run wrote has as many rows as it read."""
    if result.rows_in != result.rows_out:
        raise RuntimeError(f"{stage}: {result.rows_in} rows in but {result.rows_out} out")
    written = parquet_rows(result.out_url)
    if written != expected:
        raise RuntimeError(f"{stage}: {written} rows written over {result.shards_total} shards, expected {expected}")
    return written
