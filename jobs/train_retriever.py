"""``sa2crq train-retriever``: train the generative retriever (Ray Train) on a published SID version.

The retriever is sized to that version's SID vocabulary, trained data-parallel on the training
interactions with checkpoints selected by validation Recall@10, its item scorer tuned on the
validation targets, and published as a retriever version whose checkpoint records the SID version
it was trained on (generation refuses any other) and the tuned scorer weights.
"""

from __future__ import annotations

import dataclasses
import logging

from jobs.config import TrainRetrieverConfig, config_dict
from jobs.engines import ray_runtime
from jobs.object_store import object_store
from jobs.publishing import publish_on_latest, resolve_version, write_json, write_text
from jobs.summary import JobSummary
from sa2crq.data.embed import EMBEDDING_DIM
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
    with object_store(storage), ray_runtime(config.ray):
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
        try:
            run = TrainRun(name=f"retriever-{version}", storage_path=storage.runs, **config.ray.train_group)
            model, history, scorer = fit_retriever(
                sid_files, config.interactions, config.valid,
                model_config, config.train, run, query_cache_dir=config.embedding_cache,
            )  # fmt: skip
            meta = {"train_config": config.train.to_dict(), "request_kind": config.request_kind, "history": history,
                    "scorer": scorer, "parameters": model.num_parameters()}  # fmt: skip
            save_retriever(f"{url}/{layout.RETRIEVER}", model, sid_version=sid_version, meta=meta)
            report = {"sid_version": sid_version, "parameters": model.num_parameters(), "history": history, "scorer": scorer,
                      "config": config_dict(config)}  # fmt: skip
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
        summary.notes.append(
            f"trained on SID version {sid_version}: {model.num_parameters():,} parameters, {history['examples_per_second']:.0f} "
            f"examples/s, best step {history['best_step']} of {history['steps']} (validation Recall@10 "
            f"{history['best_metric']:.4f}{'' if history['converged'] else ', not converged'}), scorer tuned to {scorer}"
        )
        if history["resumed_at"]:
            summary.notes.append(f"training workers failed and resumed from the evaluations at steps {history['resumed_at']}")
        return summary


def _embedding_dim(sids: PublishedVersion) -> int:
    """Width of the SID version's item embeddings (text embeddings, or the items' own vectors)."""
    return sids.parquet_schema(layout.EMBEDDINGS).field("embedding").type.list_size
