"""``sa2crq generate``: offline candidate generation with a published retriever (Ray Data).

requests (parquet; each row group one shard) -> constrained beam search + the item scorer, in an
actor pool (with ``ray.catalog_shards``, the catalog's vectors held by that many more actors, a row
range each: :mod:`ray_workers.catalog_shards`) -> ``OUT/versions/<v>/parts/<shard>.parquet``
(``request_id``, ``item_ids``, ``scores``, the SID and retriever versions used), committed as
version ``v`` of the store ``OUT`` (:class:`sa2crq.storage.publish.Publisher`: manifest, then
commit), so a reader sees the whole candidate set or none of it. ``OUT/_RUN.json`` pins the run:
the requests' content fingerprint (:func:`ray_workers.shards.input_fingerprint`), the retriever and
SID versions, the request kind, the generation config, and the version being built. A rerun of the
same run reuses the parts a killed or failed attempt finished (each appears complete or not at all)
and commits, or does nothing once committed; a rerun of another run into the same ``out`` is
refused, naming both. A retriever trained on another SID version than the one served is refused
too, and so is a request file that
breaks a table-level rule (:func:`sa2crq.retrieval.serving.check_requests_schema`: its columns, a history
of the catalog's item id type), before anything is written; a request with a null id or body, or a
string that is not UTF-8, stops its shard naming the rows (nothing is committed).
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
from sa2crq.retrieval.serving import VersionMismatchError, check_requests_schema
from sa2crq.storage import layout
from sa2crq.storage.filesystem import parquet_dataset, parquet_rows, resolve_filesystem
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion

log = logging.getLogger(__name__)

PARTS = "parts"
RUN_FILE = "_RUN.json"


def run_generate(config: GenerateConfig) -> JobSummary:
    from ray_workers.catalog_shards import start_catalog_shards
    from ray_workers.hashing import file_hashes
    from ray_workers.shards import input_fingerprint, map_shards
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
        sid_files = PublishedVersion.open(sids, sid_version)
        # The request file's table-level rules, before anything is written or any actor starts.
        check_requests_schema(parquet_dataset(config.requests).schema, config.request_kind,
                              sid_files.parquet_schema(layout.SID_TABLE).field("item_id").type)  # fmt: skip
        out = config.out.rstrip("/")
        candidates = Publisher(out)
        run = {"requests": input_fingerprint(config.requests), "retriever_version": retriever_version, "sid_version": sid_version,
               "request_kind": config.request_kind, "generation": config.generation.to_dict()}  # fmt: skip
        version = _pin_run(candidates, run)
        summary = JobSummary("generate", version=version)
        if version in candidates.versions():
            meta = candidates.manifest(version).meta
            summary.add("candidates", candidates.version_url(version), meta["candidate_rows"])
            summary.notes.append(f"{out} already holds version {version} of these candidates, committed by an earlier run: nothing to do")
            summary.report = {**run, "version": version, "already_committed": True}
            return summary
        parts = f"{candidates.version_url(version)}/{PARTS}"
        retriever_files = PublishedVersion.open(retrievers, retriever_version)
        started = time.perf_counter()
        shards = None
        if config.ray.catalog_shards:
            shards = start_catalog_shards(
                sid_files, retriever_files, config.ray.catalog_shards, items=int(sid_files.meta["items"]),
                max_batch_scores=config.generation.max_batch_scores, cpus_per_shard=config.ray.cpus_per_catalog_shard,
            )  # fmt: skip
        try:
            result = map_shards(
                config.requests, parts, generate_stage,
                {
                    "sids": sid_files, "retriever": retriever_files, "generation": config.generation.to_dict(),
                    "request_kind": config.request_kind, "cache_dir": config.embedding_cache, "catalog_shards": shards,
                },
                desc="generate", **config.ray.actor_pool,
            )  # fmt: skip
        finally:
            if shards is not None:
                shards.stop()
        seconds = time.perf_counter() - started
        # Over every part, this run's and an earlier attempt's: the version holds them all.
        requests_in, candidate_rows = parquet_rows(config.requests), parquet_rows(parts)
        if requests_in != candidate_rows:
            raise RuntimeError(f"generate: {requests_in} requests in but {candidate_rows} candidate rows out")
        meta = {"job": "generate", **run, "requests_in": requests_in, "candidate_rows": candidate_rows, "shards": result.shards_total}
        # The manifest (parts past 64 MiB in all hashed on Ray workers), then the commit: readers see all parts or none.
        candidates.publish(version, parent=None, meta=meta, hash_files=file_hashes)
        summary.published = True
        summary.add("candidates", candidates.version_url(version), candidate_rows)
        summary.notes.append(
            f"{result.shards_done} shards written, {result.shards_skipped} already written by an earlier attempt and reused "
            f"(of {result.shards_total}); retriever {retriever_version} on SID version {sid_version}; "
            f"{seconds:.1f} s for the Ray Data stage (actor start-up, reads and writes included)"
        )
        summary.report = {**meta, "version": version, "shards_done": result.shards_done,
                          "shards_skipped": result.shards_skipped, "stage_seconds": round(seconds, 2)}  # fmt: skip
        return summary


def _pin_run(candidates: Publisher, run: dict) -> str:
    """The version this run builds under ``OUT``: the pinned one when ``OUT/_RUN.json`` records the
    same run (its finished parts are reused, or it is already committed), else a new one, pinned.
    A pin of another run is refused: its parts and these would mix."""
    pin = f"{candidates.root_url}/{RUN_FILE}"
    fs, path = resolve_filesystem(pin)
    if fs.get_file_info(path).type != pafs.FileType.File:
        version = candidates.new_version()
        write_json(pin, {**run, "version": version})
        return version
    pinned = read_json(pin)
    version = pinned.pop("version", None)  # a pin written before versions were committed has none
    if pinned != run:
        state = "committed" if version in candidates.versions() else "not committed yet"
        raise VersionMismatchError(
            f"{candidates.root_url} holds candidate version {version} ({state}) for requests {pinned.get('requests')} "
            f"from retriever {pinned['retriever_version']} on SID version {pinned['sid_version']} (kind {pinned['request_kind']}, "
            f"generation {pinned['generation']}); this run has requests {run['requests']} from retriever {run['retriever_version']} "
            f"on SID version {run['sid_version']} (kind {run['request_kind']}, generation {run['generation']}): "
            f"write these candidates to a new out, or delete {candidates.root_url}"
        )
    return version
