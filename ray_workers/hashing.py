"""File checksums for a version's manifest, read on the Ray cluster instead of in the job's driver.

A version's files are as large as the catalog: hashing them in the driver would read every byte
through one process. :func:`file_hashes` spreads the files over Ray tasks, each reading a few of
them through the storage layer (local paths or any fsspec URL) in 1 MiB blocks; a task lost with
its worker is retried by Ray. A small version (``LOCAL_BYTES``) is read in the calling process.
"""

from __future__ import annotations

import numpy as np
import ray

from sa2crq.storage.filesystem import resolve_filesystem
from sa2crq.storage.publish import stream_sha256

__all__ = ["file_hashes"]

# Tasks per CPU of the cluster: enough that one large file does not leave the other CPUs idle.
TASKS_PER_CPU = 4
# Below this many bytes in all, this process reads the files itself: starting tasks costs more.
LOCAL_BYTES = 64 << 20


def file_hashes(urls: list[str], sizes: list[int], *, local_bytes: int = LOCAL_BYTES) -> list[str]:
    """Hex sha256 of each file at ``urls`` (``sizes`` bytes each), in order: ``Publisher.publish``'s
    ``hash_files``. A version under ``local_bytes`` in all is read here, a bounded amount."""
    if not urls or sum(sizes) < local_bytes:
        return _hash_files(urls)
    tasks = min(len(urls), max(1, int(ray.cluster_resources().get("CPU", 1)) * TASKS_PER_CPU))
    groups = [group.tolist() for group in np.array_split(np.asarray(urls, dtype=object), tasks)]
    return [digest for digests in ray.get([_hash_group.remote(group) for group in groups]) for digest in digests]


@ray.remote(num_cpus=0.5)  # below 1: a CPU still held by an ending actor pool cannot stall a publish
def _hash_group(urls: list[str]) -> list[str]:
    return _hash_files(urls)


def _hash_files(urls: list[str]) -> list[str]:
    digests = []
    for url in urls:
        fs, path = resolve_filesystem(url)
        with fs.open_input_stream(path) as stream:
            digests.append(stream_sha256(stream)[1])
    return digests
