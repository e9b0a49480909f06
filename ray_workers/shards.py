"""Parquet in, parquet out, one row group at a time, on a Ray Data actor pool.

A **shard** is one row group of one input parquet file; its output is ``<out>/<name>.parquet``, written
whole or not at all. A run processes only the shards whose output does not exist yet, so a killed or
failed run is resumed by running it again, and a finished run re-runs as a no-op. A transform that
refuses its shard's rows (an ``InputError``) leaves that shard unwritten; once every shard is done the
run raises an ``InputError`` naming each refused shard and why. Only the shard list
(names and paths) and one small count row per shard pass through the driver, never data rows.

Each actor builds its transform once (``factory(**factory_kwargs)``: load a model, a tokenizer) and
then reads, transforms and writes one shard per call. Filesystems are resolved from URLs inside each
process (:func:`sa2crq.storage.filesystem.resolve_filesystem`), so nothing unpicklable crosses to Ray.

S3 settings reach the actors through their environment: s3fs leaves the endpoint to botocore, which
reads ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) and the usual credential variables. Ray's
worker processes inherit the environment Ray started with on their node (for a local Ray, the
driver's at ``ray.init``), not the driver's current one, so jobs set them before Ray starts
(:mod:`jobs.object_store`). ``fsspec.config.conf`` is per process and never reaches an actor.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import posixpath
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import ray.data

from sa2crq.data.validation import InputError
from sa2crq.storage.filesystem import resolve_filesystem
from sa2crq.storage.publish import stream_sha256

__all__ = ["Shard", "ShardRunResult", "input_fingerprint", "list_shards", "map_shards"]

log = logging.getLogger(__name__)

PARQUET_SUFFIX = ".parquet"


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work: one row group of one parquet file."""

    name: str  # stable across reruns: "<path under the input, '/' -> '-'>-rg<row group>"; output <out>/<name>.parquet
    path: str  # inside the input's filesystem
    row_group: int


@dataclasses.dataclass(frozen=True)
class ShardRunResult:
    """Counts of one run. ``rows_in`` / ``rows_out`` cover the shards this run wrote, not skipped ones."""

    shards_total: int
    shards_done: int
    shards_skipped: int
    rows_in: int
    rows_out: int
    out_url: str


def list_shards(url: str) -> list[Shard]:
    """Every row group of every ``*.parquet`` under ``url`` (a directory, or one file), sorted by name.

    Files or directories whose name starts with ``.`` or ``_`` are skipped, as pyarrow datasets skip
    them (temporaries, ``_SUCCESS``, Spark's ``_temporary/``). Only file footers are read.
    """
    fs, base, files = _input_files(url)
    shards = []
    for path in files:
        stem = _under(path, base)[: -len(PARQUET_SUFFIX)].replace("/", "-")
        with fs.open_input_file(path) as handle:
            row_groups = pq.ParquetFile(handle).metadata.num_row_groups
        shards.extend(Shard(f"{stem}-rg{group:05d}", path, group) for group in range(row_groups))
    shards.sort(key=lambda shard: shard.name)
    names = [shard.name for shard in shards]
    if len(set(names)) != len(names):
        raise ValueError(f"{url}: two input files map to the same shard name (e.g. 'a-b.parquet' and 'a/b.parquet')")
    return shards


def input_fingerprint(url: str) -> str:
    """Content fingerprint of the parquet input :func:`list_shards` reads: ``sha256:`` + the sha256
    of one line per file, in sorted path order, of its path under ``url``, its size and the sha256
    of its bytes. Paths count because shard (and output) names come from them. Reads every byte once."""
    fs, base, files = _input_files(url)
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: _under(p, base)):
        with fs.open_input_stream(path) as stream:
            size, sha256 = stream_sha256(stream)
        digest.update(f"{_under(path, base)}\t{size}\t{sha256}\n".encode())
    return f"sha256:{digest.hexdigest()}"


def input_snapshot(url: str) -> str:
    """Identity of the parquet input :func:`list_shards` reads, from one listing and no reads:
    ``sha256:`` over one line per file, in sorted path order, of its path under ``url``, its size and
    its modification time. A file rewritten since (even with the same content) gives another
    snapshot; for a content fingerprint, which reads every byte, use :func:`input_fingerprint`."""
    fs, base, files = _input_files(url)
    infos = sorted(fs.get_file_info(files), key=lambda info: _under(info.path, base))
    lines = (f"{_under(info.path, base)}\t{info.size}\t{info.mtime_ns}\n" for info in infos)
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def _under(path: str, base: str) -> str:
    """``path`` relative to the directory ``base`` (both of one filesystem). Not ``posixpath.relpath``:
    on the bucket-relative paths of an object store it reads the process's working directory, which a
    Ray job's driver may have lost (its working_dir is unpacked again under it)."""
    return path[len(base.rstrip("/")) + 1 :]


def _input_files(url: str) -> tuple[pafs.FileSystem, str, list[str]]:
    """The filesystem, base directory and parquet files of ``url`` (a directory, or one file)."""
    fs, root = resolve_filesystem(url)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no parquet input at {url}")
    if info.type == pafs.FileType.File:
        return fs, posixpath.dirname(root), [root]
    found = [f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
    return fs, root, [p for p in found if p.endswith(PARQUET_SUFFIX) and not _hidden(_under(p, root))]


def map_shards(
    in_url: str,
    out_url: str,
    factory: Callable[..., Callable[[pa.Table], pa.Table]],
    factory_kwargs: dict[str, Any],
    *,
    actors: int = 1,
    cpus_per_actor: float = 0.5,
    gpus_per_actor: float = 0.0,
    desc: str,
) -> ShardRunResult:
    """Apply ``factory(**factory_kwargs)`` to every pending shard of ``in_url``, writing under ``out_url``.

    ``factory`` must pickle by reference (a module-level function). Ray must already be running.
    """
    if not ray.is_initialized():
        raise RuntimeError("map_shards needs a running Ray: call ray.init() (or connect to a cluster) first")
    started = time.monotonic()
    shards = list_shards(in_url)
    out_fs, out_root = resolve_filesystem(out_url)
    out_fs.create_dir(out_root, recursive=True)
    # One listing of the output, not one existence check per shard.
    written = {
        posixpath.basename(f.path)
        for f in out_fs.get_file_info(pafs.FileSelector(out_root, allow_not_found=True))
        if f.type == pafs.FileType.File
    }
    pending = [shard for shard in shards if f"{shard.name}{PARQUET_SUFFIX}" not in written]
    skipped = len(shards) - len(pending)
    log.info("%s: %d shards under %s, %d already written, %d to do", desc, len(shards), in_url, skipped, len(pending))

    rows_in = rows_out = done = 0
    if pending:
        # One block per shard, so every shard is its own actor call and the pool shares them out.
        dataset = ray.data.from_items([dataclasses.asdict(shard) for shard in pending], override_num_blocks=len(pending))
        results = dataset.map_batches(
            _ShardWorker,
            fn_constructor_kwargs={
                "in_url": in_url,
                "out_url": out_url,
                "factory": factory,
                "factory_kwargs": factory_kwargs,
                "cpus_per_actor": cpus_per_actor,
            },
            batch_size=1,
            # A queued shard is only a name (the actor reads the data), so queueing a second one per
            # actor prefetches nothing and can leave one actor the last two shards while another idles.
            compute=ray.data.ActorPoolStrategy(size=min(actors, len(pending)), max_tasks_in_flight_per_actor=1),
            num_cpus=cpus_per_actor,
            num_gpus=gpus_per_actor,
        )
        every = max(1, len(pending) // 10)
        refusals = []
        for row in results.iter_rows():
            if row["refusal"]:
                refusals.append(f"shard {row['shard']}: {row['refusal']}")
                continue
            done += 1
            rows_in += int(row["rows_in"])
            rows_out += int(row["rows_out"])
            if done % every == 0 or done == len(pending):
                log.info("%s: %d/%d shards written", desc, done, len(pending))
        if refusals:
            raise InputError(f"{desc}: {len(refusals)} of {len(pending)} shards of {in_url} refused their input; {'; '.join(refusals[:10])}")
    log.info(
        "%s: wrote %d shards (%d rows in, %d rows out), skipped %d, in %.1f s -> %s",
        desc, done, rows_in, rows_out, skipped, time.monotonic() - started, out_url,
    )
    return ShardRunResult(
        shards_total=len(shards),
        shards_done=done,
        shards_skipped=skipped,
        rows_in=rows_in,
        rows_out=rows_out,
        out_url=out_url,
    )


class _ShardWorker:
    """The actor of the pool: builds the transform once, then reads, transforms, writes one shard a call."""

    def __init__(
        self,
        in_url: str,
        out_url: str,
        factory: Callable[..., Callable[[pa.Table], pa.Table]],
        factory_kwargs: dict[str, Any],
        cpus_per_actor: float,
    ) -> None:
        import torch

        # Our transforms run torch, whose intra-op pool would otherwise claim the whole machine in every
        # actor. Ray exports OMP_NUM_THREADS = floor(num_cpus) only where the cluster left it unset, and
        # torch reads it only as it loads, so size the pool explicitly: one thread per whole CPU, at least one.
        torch.set_num_threads(max(1, int(cpus_per_actor)))
        self.in_fs, _ = resolve_filesystem(in_url)
        self.out_fs, self.out_root = resolve_filesystem(out_url)
        self.transform = factory(**factory_kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts: dict[str, list] = {"shard": [], "rows_in": [], "rows_out": [], "refusal": []}
        for name, path, row_group in zip(batch["name"], batch["path"], batch["row_group"]):
            with self.in_fs.open_input_file(str(path)) as handle:
                # The writer's schema metadata describes the input, not our output: Spark, for one,
                # would read the output with the input's schema stored there.
                table = pq.ParquetFile(handle).read_row_group(int(row_group)).replace_schema_metadata(None)
            try:
                out, refusal = self.transform(table), ""
            except InputError as refused:
                # The input's fault, not the code's: the driver raises it by its message (Ray would
                # wrap it in a UserCodeException); the shard stays unwritten.
                out, refusal = table.slice(0, 0), str(refused)
            else:
                _write_atomically(self.out_fs, f"{self.out_root}/{name}{PARQUET_SUFFIX}", out)
            counts["shard"].append(str(name))
            counts["rows_in"].append(table.num_rows)
            counts["rows_out"].append(out.num_rows)
            counts["refusal"].append(refusal)
        return {key: np.asarray(values) for key, values in counts.items()}


def _write_atomically(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write a dot-named temporary beside ``path``, then move it into place.

    The move is a rename on a local disk and a server-side copy (one CopyObject) on S3: either way
    ``path`` appears complete or not at all. Writing straight to the S3 key is not enough, because
    fsspec's file commits whatever it buffered when closed during an exception. A crash leaves at
    most the temporary, which :func:`list_shards` and pyarrow datasets ignore.
    """
    directory, name = posixpath.split(path)
    temporary = f"{directory}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, temporary, filesystem=fs)
        fs.move(temporary, path)
    except BaseException:
        if fs.get_file_info(temporary).type == pafs.FileType.File:
            fs.delete_file(temporary)
        raise



def _hidden(relative_path: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative_path.split("/"))
