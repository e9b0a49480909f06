"""Manifest checksums read on Ray workers: the same manifest as the publisher's own reading."""

from __future__ import annotations

import hashlib
import uuid
from functools import partial

import fsspec
import pytest

from ray_workers.hashing import file_hashes
from sa2crq.storage.publish import Publisher

# Sizes around the 1 MiB read block, an empty file and a nested one.
FILES = {"a/part-0.parquet": b"x" * ((1 << 20) + 7), "a/part-1.parquet": b"", "b/c/trie.json": b'{"levels": 3}', "report.json": b"{}"}


@pytest.fixture(params=["local", "s3"])
def publisher(request, tmp_path) -> Publisher:
    if request.param == "local":
        return Publisher(str(tmp_path / "sids"))
    request.getfixturevalue("s3_endpoint")
    bucket = f"hashing-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return Publisher(f"s3://{bucket}/sids")


def _write(publisher: Publisher) -> str:
    version = publisher.new_version()
    for name, data in FILES.items():
        path = f"{publisher.version_path(version)}/{name}"
        publisher.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        publisher.fs.pipe_file(path, data)
    return version


@pytest.mark.parametrize("local_bytes", [0, 1 << 30], ids=["on-ray-tasks", "in-process"])
def test_file_hashes_are_each_files_sha256_in_order(publisher, ray_local, local_bytes):
    version = _write(publisher)
    urls = [f"{publisher.version_url(version)}/{name}" for name in reversed(FILES)]
    sizes = [len(data) for data in reversed(FILES.values())]
    assert file_hashes(urls, sizes, local_bytes=local_bytes) == [hashlib.sha256(data).hexdigest() for data in reversed(FILES.values())]
    assert file_hashes([], [], local_bytes=local_bytes) == []


def test_a_manifest_hashed_on_the_workers_equals_the_one_the_publisher_reads_itself(publisher, ray_local):
    on_workers = publisher.publish(_write(publisher), parent=None, hash_files=partial(file_hashes, local_bytes=0))
    in_process = publisher.publish(_write(publisher), parent=on_workers.version)
    assert on_workers.files == in_process.files
    assert on_workers.files["a/part-0.parquet"] == {"size": len(FILES["a/part-0.parquet"]),
                                                    "sha256": hashlib.sha256(FILES["a/part-0.parquet"]).hexdigest()}  # fmt: skip


def test_a_hasher_that_loses_a_file_publishes_nothing(publisher):
    version = _write(publisher)
    with pytest.raises(RuntimeError, match="3 hashes for 4 files"):
        publisher.publish(version, parent=None, hash_files=lambda urls, sizes: ["0" * 64] * (len(urls) - 1))
    assert publisher.versions() == []
