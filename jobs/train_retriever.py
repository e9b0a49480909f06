"""``sa2crq train-retriever``: train the generative retriever (Ray Train) on a published SID version.

The retriever is sized to that version's SID vocabulary, trained data-parallel on the training
interactions with checkpoints selected by validation Recall@10, its item scorer tuned on the
validation targets, and published as a retriever version whose checkpoint records the SID version
it was trained on (generation refuses any other) and the tuned scorer weights.

Both inputs are validated in Spark before any worker starts (:func:`validate_inputs`), against the
SID version's items, so no catalog-sized column or input reaches the driver: interactions by
:func:`jobs.spark_validation.validate_interactions` (the recode's rules), query logs by
:func:`jobs.spark_validation.validate_queries` (the library's :func:`sa2crq.data.validation.validate_queries`).
Rejected rows are published with the retriever under ``rejects/<input>/`` with their reasons; the
workers read the rows that passed, in the input's order.
"""

from __future__ import annotations

import dataclasses
import logging

from jobs.config import TrainRetrieverConfig, config_dict
from jobs.engines import SparkStaging, ray_runtime, remove_tree, spark_session
from jobs.object_store import object_store
from jobs.publishing import publish_on_latest, resolve_version, write_json, write_text
from jobs.summary import JobSummary
from sa2crq.data.embed import EMBEDDING_DIM
from sa2crq.data.validation import InputError
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.metrics.html_report import retriever_page
from sa2crq.retrieval.checkpoint import save_retriever
from sa2crq.retrieval.model import RetrieverConfig
from sa2crq.storage import layout
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion

log = logging.getLogger(__name__)


def run_train_retriever(config: TrainRetrieverConfig) -> JobSummary:
    from ray_workers.training import TrainRun, fit_retriever

    storage = config.storage
    with object_store(storage), spark_session(config.spark, "train-retriever") as spark, ray_runtime(config.ray):
        sids = Publisher(storage.sids)
        sid_version = resolve_version(sids, config.sid_version, "SID", hint="run `sa2crq recode` first")
        vocab = SIDVocabulary.from_dict(sids.manifest(sid_version).meta["vocab"])
        sid_files = PublishedVersion.open(sids, sid_version)
        model_config = RetrieverConfig(
            vocab_size=vocab.size, encoder_vocab_size=vocab.size + config.train.user_buckets,
            query_dim=EMBEDDING_DIM if config.request_kind == "query" else 0,
            item_content_dim=_embedding_dim(sid_files) if config.model.item_content else 0,
            **{k: v for k, v in dataclasses.asdict(config.model).items() if k != "item_content"},
        )  # fmt: skip
        retrievers = Publisher(storage.retrievers)
        version = retrievers.new_version()
        url = retrievers.version_url(version)
        summary = JobSummary("train-retriever", version)
        staging = SparkStaging(config.spark)
        try:
            run = TrainRun(name=f"retriever-{version}", storage_path=storage.runs, **config.ray.train_group)
            try:
                counts = validate_inputs(config, spark, staging, sid_files, url)
            finally:
                staging.cleanup()
            model, history, scorer = fit_retriever(
                sid_files, valid_rows(url, "interactions"), valid_rows(url, "valid"),
                model_config, config.train, run, query_cache_dir=config.embedding_cache,
            )  # fmt: skip
            remove_tree(f"{url}/{layout.WORK}")
            meta = {"train_config": config.train.to_dict(), "request_kind": config.request_kind, "history": history,
                    "scorer": scorer, "parameters": model.num_parameters()}  # fmt: skip
            save_retriever(f"{url}/{layout.RETRIEVER}", model, sid_version=sid_version, meta=meta)
            report = {"sid_version": sid_version, "input": counts, "parameters": model.num_parameters(), "history": history,
                      "scorer": scorer, "config": config_dict(config)}  # fmt: skip
            write_text(f"{url}/{layout.TRAIN_REPORT_PAGE}", retriever_page(report, f"Retriever version {version} on SID version {sid_version}"))
            write_json(f"{url}/{layout.TRAIN_REPORT}", report)
            publish_on_latest(retrievers, version, meta={"job": "train-retriever", "sid_version": sid_version, "request_kind": config.request_kind})
        except BaseException:
            retrievers.discard(version)
            raise
        summary.published = True
        summary.report = report
        summary.add("retriever", f"{url}/{layout.RETRIEVER}")
        summary.add("train report", f"{url}/{layout.TRAIN_REPORT}")
        summary.add("train report page", f"{url}/{layout.TRAIN_REPORT_PAGE}")
        for name, input_counts in counts.items():
            summary.add(f"rejected {name} rows", f"{url}/{layout.REJECTS}/{name}", input_counts["rejected"])
        summary.notes.append(
            f"trained on SID version {sid_version}: {model.num_parameters():,} parameters, {history['examples_per_second']:.0f} "
            f"examples/s, best step {history['best_step']} of {history['steps']} (validation Recall@10 "
            f"{history['best_metric']:.4f}{'' if history['converged'] else ', not converged'}), scorer tuned to {scorer}"
        )
        if history["resumed_at"]:
            summary.notes.append(f"training workers failed and resumed from the evaluations at steps {history['resumed_at']}")
        return summary


def validate_inputs(config: TrainRetrieverConfig, spark, staging: SparkStaging, sids: PublishedVersion, url: str) -> dict[str, dict]:
    """The job's first step, in Spark: both inputs (``interactions`` and ``valid``) validated against
    the SID version's items, each one's rejected rows written with their reasons under ``url``'s
    ``rejects/<input>/`` and the rows that passed, in the input's order, to its work directory,
    which the workers read. Returns each input's counts; a table-level problem raises an
    ``InputError`` naming the input."""
    from pyspark.sql import functions as F

    from jobs.spark_validation import validate_interactions, validate_queries

    known = staging.read_published(spark, sids, layout.SID_TABLE).select("item_id")
    validate = validate_queries if config.request_kind == "query" else validate_interactions
    results = {}
    for name in ("interactions", "valid"):
        source = getattr(config, name)
        # The input's row order, kept for the workers (ties in a user's timestamps keep their order).
        frame = staging.read(spark, source).withColumn("_input_row", F.monotonically_increasing_id())
        try:
            results[name] = validate(frame, known, max_reject_fraction=config.max_reject_fraction)
        except InputError as refusal:
            raise InputError(f"{name} ({source}): {refusal}") from refusal
    for name, result in results.items():  # a refused run writes nothing
        staging.write(result.rejects.drop("_input_row"), f"{url}/{layout.REJECTS}/{name}")
        staging.write(result.valid.orderBy("_input_row").drop("_input_row"), valid_rows(url, name))
    return {name: result.counts for name, result in results.items()}


def valid_rows(url: str, name: str) -> str:
    """The directory of an input's rows that passed validation, which the workers read."""
    return f"{url}/{layout.WORK}/{name}"


def _embedding_dim(sids: PublishedVersion) -> int:
    """Width of the SID version's item embeddings (text embeddings, or the items' own vectors)."""
    return sids.parquet_schema(layout.EMBEDDINGS).field("embedding").type.list_size
