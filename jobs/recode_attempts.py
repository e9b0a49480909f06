"""A recode's attempt: its unpublished version directory and what it records, so a rerun resumes it.

An attempt writes ``<version>/_stages/run.json`` (its run key and parent) when it starts, and
``<version>/_stages/<stage>.json`` after each stage's outputs are complete, holding what later
stages need from it (row counts, segment counts, the fit report, ...). The run key fingerprints
everything that decides the recode's output: the config, less where and how the engines run and the
publish limits (:data:`NOT_IN_RUN_KEY`), the parent version, and a snapshot of the items and
interactions (:func:`ray_workers.shards.input_snapshot`: each file's path, size and mtime). A
rerun with the same key finds the newest attempt that has it, skips its recorded stages and goes on
in the same directory; any other key starts a new version. The records are removed before the manifest is written, so no published
version holds them.

Nothing accumulates: opening an attempt discards the older attempts of the same key, and every
recode attempt built on a parent that is no longer the latest version (the commit log would refuse
to publish it, and its key, which names that parent, matches no rerun). Published versions are never
touched (:meth:`~sa2crq.storage.publish.Publisher.discard` refuses them), nor directories without a
run record (an ingest in flight). One recode at a time per store: a rerun started while an identical
recode still runs would work in the same directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from jobs.config import RecodeConfig, config_dict
from jobs.engines import remove_tree
from jobs.publishing import write_json
from sa2crq.storage import layout
from sa2crq.storage.filesystem import resolve_filesystem
from sa2crq.storage.publish import Publisher
from sa2crq.storage.reports import dumps_report

log = logging.getLogger(__name__)

# The stages in the order they run; "split" validates the inputs too (its validated frames live
# only in Spark's memory, and the split persists what later stages read).
STAGES = ("split", "embed", "tokenizer", "encode", "sids", "trie", "report")
RUN_FILE = "run.json"
# Config fields that say where and how the engines run, or whether to publish, not what a stage
# writes: a rerun with more driver memory after an out-of-memory crash, or a raised churn limit
# after a refusal, resumes. A section maps to None (all of it) or to the fields left out.
NOT_IN_RUN_KEY: dict[str, tuple[str, ...] | None] = {
    "storage": None,
    "spark": None,
    "embedding_cache": None,  # a cache keyed by content: hits and misses give the same embeddings
    "churn_limit": None,
    "removed_limit": None,
    # Kept: train_workers and use_gpu, which change the data-parallel tokenizer fit.
    "ray": ("address", "num_cpus", "actors", "cpus_per_actor", "gpus_per_actor", "cpus_per_train_worker", "train_max_failures"),
}


def run_key(config: RecodeConfig, parent: str | None) -> str:
    """``sha256:`` over the recode's config (less :data:`NOT_IN_RUN_KEY`), its parent version and
    the snapshots of its items and interactions (path, size and modification time of each file:
    a listing, not a read, as a nightly input may be terabytes; a rewritten input starts afresh)."""
    from ray_workers.shards import input_snapshot

    settings = config_dict(config)
    for name, fields in NOT_IN_RUN_KEY.items():
        if fields is None:
            del settings[name]
        else:
            settings[name] = {k: v for k, v in settings[name].items() if k not in fields}
    material = {
        "config": settings,
        "parent": parent,
        "items": input_snapshot(config.items),
        "interactions": input_snapshot(config.interactions),
    }
    return "sha256:" + hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass
class RecodeAttempt:
    version: str
    url: str  # the version's directory
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage -> its record, in STAGES order
    resumed: tuple[str, ...] = ()  # the stages earlier attempts completed, which this one skips

    def done(self, stage: str) -> bool:
        return stage in self.completed

    def record(self, stage: str) -> dict[str, Any]:
        return self.completed[stage]

    def complete(self, stage: str, record: dict[str, Any]) -> None:
        """Record ``stage`` as complete: call only once all of its outputs are written."""
        write_json(f"{self.url}/{layout.STAGES}/{stage}.json", record)
        self.completed[stage] = json.loads(dumps_report(record))  # as a resumed attempt reads it

    def remove_records(self) -> None:
        """Before the manifest: a published version holds no records."""
        remove_tree(f"{self.url}/{layout.STAGES}")


def open_attempt(publisher: Publisher, key: str, parent: str | None) -> RecodeAttempt:
    """The attempt to build: the newest unpublished one with ``key`` (its completed stages read),
    else a new version with its run record. Older attempts of ``key``, and recode attempts built on
    another parent than ``parent`` (the latest version), are discarded first."""
    matching: list[tuple[str, dict[str, dict[str, Any]]]] = []  # (version, its records), oldest first
    for version in publisher.unpublished():
        records = _read_records(publisher.version_url(version))
        run = records.get(RUN_FILE)
        if run is None:
            continue  # not a recode attempt (an ingest in flight), or one killed before it wrote its record
        if run["parent"] != parent:
            log.info("discarding recode attempt %s: built on version %s, which is no longer the latest", version, run["parent"])
            publisher.discard(version)
        elif run["key"] == key:
            matching.append((version, records))
    for older, _ in matching[:-1]:
        log.info("discarding recode attempt %s: the newer attempt %s of the same run is resumed", older, matching[-1][0])
        publisher.discard(older)
    if not matching:
        version = publisher.new_version()
        url = publisher.version_url(version)
        write_json(f"{url}/{layout.STAGES}/{RUN_FILE}", {"key": key, "parent": parent})
        return RecodeAttempt(version, url)
    version, records = matching[-1]
    completed = {}
    for stage in STAGES:  # a stage counts only after every stage before it: they complete in order
        if f"{stage}.json" not in records:
            break
        completed[stage] = records[f"{stage}.json"]
    return RecodeAttempt(version, publisher.version_url(version), completed, resumed=tuple(completed))


def _read_records(url: str) -> dict[str, dict[str, Any]]:
    """The readable JSON records under ``<url>/_stages``, by file name: one killed while it was
    written is left out (its stage is redone)."""
    fs, path = resolve_filesystem(f"{url}/{layout.STAGES}")
    records = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".json"):
            continue
        with fs.open_input_stream(info.path) as f:
            try:
                records[info.base_name] = json.loads(f.read())
            except ValueError:
                continue
    return records
