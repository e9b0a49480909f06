"""``sa2crq train-retriever``: train the generative retriever (Ray Train) on a published SID version.

The retriever is sized to that version's SID vocabulary, trained data-parallel on the training
interactions with early stopping on the validation targets, and published as a retriever version
whose checkpoint records the SID version it was trained on (generation refuses any other).
"""

from __future__ import annotations

import dataclasses
import logging

from jobs.config import TrainRetrieverConfig, config_dict
from jobs.engines import ray_runtime
from jobs.object_store import object_store
from jobs.publishing import publish_on_latest, resolve_version, write_json
from jobs.summary import JobSummary
from sa2crq.data.embed import EMBEDDING_DIM
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.retrieval.checkpoint import save_retriever
from sa2crq.retrieval.model import RetrieverConfig
from sa2crq.storage import layout
from sa2crq.storage.publish import Publisher

log = logging.getLogger(__name__)


def run_train_retriever(config: TrainRetrieverConfig) -> JobSummary:
    from ray_workers.training import TrainRun, fit_retriever

    storage = config.storage
    with object_store(storage), ray_runtime(config.ray):
        sids = Publisher(storage.sids)
        sid_version = resolve_version(sids, config.sid_version, "SID", hint="run `sa2crq recode` first")
        vocab = SIDVocabulary.from_dict(sids.manifest(sid_version).meta["vocab"])
        model_config = RetrieverConfig(
            vocab_size=vocab.size, encoder_vocab_size=vocab.size + config.train.user_buckets,
            query_dim=EMBEDDING_DIM if config.request_kind == "query" else 0, **dataclasses.asdict(config.model),
        )  # fmt: skip
        retrievers = Publisher(storage.retrievers)
        version = retrievers.new_version()
        url = retrievers.version_url(version)
        summary = JobSummary("train-retriever", version)
        try:
            run = TrainRun(
                name=f"retriever-{version}", storage_path=storage.runs, workers=config.ray.train_workers,
                use_gpu=config.ray.use_gpu, cpus_per_worker=config.ray.cpus_per_train_worker,
            )  # fmt: skip
            model, history = fit_retriever(
                f"{sids.version_url(sid_version)}/{layout.SID_TABLE}", config.interactions, config.valid,
                model_config, config.train, run, sid_version=sid_version, query_cache_dir=config.embedding_cache,
            )  # fmt: skip
            meta = {"train_config": config.train.to_dict(), "request_kind": config.request_kind, "history": history,
                    "parameters": model.num_parameters()}  # fmt: skip
            save_retriever(f"{url}/{layout.RETRIEVER}", model, sid_version=sid_version, meta=meta)
            report = {"sid_version": sid_version, "parameters": model.num_parameters(), "history": history, "config": config_dict(config)}
            write_json(f"{url}/{layout.TRAIN_REPORT}", report)
            publish_on_latest(retrievers, version, meta={"job": "train-retriever", "sid_version": sid_version, "request_kind": config.request_kind})
        except BaseException:
            retrievers.discard(version)
            raise
        summary.published = True
        summary.report = report
        summary.add("retriever", f"{url}/{layout.RETRIEVER}")
        summary.add("train report", f"{url}/{layout.TRAIN_REPORT}")
        summary.notes.append(
            f"trained on SID version {sid_version}: {model.num_parameters():,} parameters, best epoch "
            f"{history['best_epoch']} of {len(history['valid_loss'])}, validation loss {history['best_valid_loss']:.4f}"
        )
        return summary
