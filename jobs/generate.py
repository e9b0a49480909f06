"""``sa2crq generate``: offline candidate generation with a published retriever (Ray Data).

requests (parquet; each row group one shard) -> constrained beam search + the item scorer, in an
actor pool -> ``OUT/parts/<shard>.parquet`` (``request_id``, ``item_ids``, ``scores``, the SID and
retriever versions used). A shard's file appears complete or not at all, so a rerun skips the
committed shards and does the rest. ``OUT/_RUN.json`` pins the versions of the candidate set: a
rerun with other versions into the same ``out`` is refused, and so is a retriever trained on
another SID version than the one served.
"""

from __future__ import annotations

import logging
import time

import pyarrow.fs as pafs

from jobs.config import GenerateConfig
from jobs.engines import ray_runtime
from jobs.object_store import object_store
from jobs.publishing import read_json, resolve_version, write_json
from jobs.summary import JobSummary
from sa2crq.retrieval.serving import VersionMismatchError
from sa2crq.storage.filesystem import resolve_filesystem
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion

log = logging.getLogger(__name__)

PARTS = "parts"
RUN_FILE = "_RUN.json"


def run_generate(config: GenerateConfig) -> JobSummary:
    from ray_workers.shards import map_shards
    from ray_workers.stages import generate_stage

    storage = config.storage
    with object_store(storage), ray_runtime(config.ray):
        retrievers, sids = Publisher(storage.retrievers), Publisher(storage.sids)
        retriever_version = resolve_version(retrievers, config.retriever_version, "retriever", hint="run `sa2crq train-retriever` first")
        sid_version = resolve_version(sids, config.sid_version, "SID", hint="run `sa2crq recode` first")
        trained = retrievers.manifest(retriever_version).meta
        trained_on = trained["sid_version"]
        if trained.get("request_kind", "history") != config.request_kind:
            raise ValueError(
                f"retriever {retriever_version} answers {trained.get('request_kind', 'history')} requests, not "
                f"{config.request_kind}: train one with request_kind={config.request_kind} or pick another retriever_version"
            )
        if trained_on != sid_version:
            raise VersionMismatchError(
                f"retriever {retriever_version} was trained on SID version {trained_on}, but SID version {sid_version} "
                f"would be served: train a retriever on {sid_version}, or set sid_version={trained_on}"
            )
        out = config.out.rstrip("/")
        run = {"retriever_version": retriever_version, "sid_version": sid_version, "request_kind": config.request_kind,
               "generation": config.generation.to_dict()}  # fmt: skip
        _pin_run(out, run)
        started = time.perf_counter()
        result = map_shards(
            config.requests, f"{out}/{PARTS}", generate_stage,
            {
                "sids": PublishedVersion.open(sids, sid_version), "retriever": PublishedVersion.open(retrievers, retriever_version),
                "generation": config.generation.to_dict(),
                "request_kind": config.request_kind, "cache_dir": config.embedding_cache,
            },
            desc="generate", **config.ray.actor_pool,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        if result.rows_in != result.rows_out:
            raise RuntimeError(f"generate: {result.rows_in} requests in but {result.rows_out} candidate rows out")
        summary = JobSummary("generate", publishes=False)
        summary.add("candidates", f"{out}/{PARTS}", result.rows_out)
        summary.notes.append(
            f"{result.shards_done} shards written, {result.shards_skipped} already committed and skipped "
            f"(of {result.shards_total}); retriever {retriever_version} on SID version {sid_version}; "
            f"{seconds:.1f} s for the Ray Data stage (actor start-up, reads and writes included)"
        )
        summary.report = {**run, "shards": result.shards_total, "shards_done": result.shards_done,
                          "shards_skipped": result.shards_skipped, "rows_written": result.rows_out,
                          "stage_seconds": round(seconds, 2)}  # fmt: skip
        return summary


def _pin_run(out: str, run: dict) -> None:
    """Record the versions of this candidate set, or check them against the ones recorded."""
    fs, path = resolve_filesystem(f"{out}/{RUN_FILE}")
    if fs.get_file_info(path).type == pafs.FileType.File:
        pinned = read_json(f"{out}/{RUN_FILE}")
        if pinned != run:
            raise VersionMismatchError(
                f"{out} already holds candidates from {pinned['retriever_version']} on SID version {pinned['sid_version']} "
                f"(kind {pinned['request_kind']}): write these to another out, or delete it"
            )
        return
    write_json(f"{out}/{RUN_FILE}", run)
