"""Versioned publishing: manifest last, atomic LATEST by compare-and-swap, on a local path and on S3."""

from __future__ import annotations

import threading
import uuid

import fsspec
import pytest

from sa2crq.storage.publish import MANIFEST, ConcurrentPublishError, Publisher


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "published")
    request.getfixturevalue("s3_endpoint")
    bucket = f"publish-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/sids"


def build(publisher: Publisher, text: str) -> str:
    version = publisher.new_version()
    publisher.fs.pipe_file(f"{publisher.version_path(version)}/part-0.txt", text.encode())
    return version


@pytest.mark.timeout(120)
def test_a_version_is_visible_only_once_published(root):
    publisher = Publisher(root)
    assert publisher.latest() is None
    first = build(publisher, "a")
    assert publisher.versions() == []  # files written, no manifest yet: invisible
    manifest = publisher.publish(first, parent=None, meta={"rows": 1})
    assert publisher.latest() == first and publisher.versions() == [first]
    assert manifest.files["part-0.txt"]["size"] == 1 and len(manifest.files["part-0.txt"]["sha256"]) == 64
    assert publisher.manifest(first).meta == {"rows": 1}


@pytest.mark.timeout(120)
def test_a_killed_job_leaves_the_previous_version_latest_and_readable(root):
    publisher = Publisher(root)
    first = build(publisher, "a")
    publisher.publish(first, parent=None)
    build(publisher, "half-written")  # the job dies before publish
    assert publisher.latest() == first
    assert publisher.versions() == [first]
    assert publisher.fs.cat_file(f"{publisher.version_path(first)}/part-0.txt") == b"a"


@pytest.mark.timeout(120)
def test_a_stale_parent_is_refused_and_the_retry_loses_nothing(root):
    publisher = Publisher(root)
    base = build(publisher, "base")
    publisher.publish(base, parent=None)
    mine, theirs = build(publisher, "mine"), build(publisher, "theirs")
    publisher.publish(theirs, parent=base)
    with pytest.raises(ConcurrentPublishError):
        publisher.publish(mine, parent=base)
    assert publisher.latest() == theirs
    rebuilt = build(publisher, "mine on theirs")
    publisher.publish(rebuilt, parent=theirs)
    assert publisher.latest() == rebuilt and publisher.manifest(rebuilt).parent == theirs


@pytest.mark.timeout(120)
def test_concurrent_publishers_form_one_chain(root):
    def worker(n: int) -> None:
        publisher = Publisher(root)
        while True:
            parent = publisher.latest()
            version = build(publisher, f"worker {n}")
            try:
                publisher.publish(version, parent=parent)
                return
            except ConcurrentPublishError:
                continue

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    publisher = Publisher(root)
    chain, version = [], publisher.latest()
    while version is not None:
        chain.append(version)
        version = publisher.manifest(version).parent
    assert len(chain) == 4  # every publish is on the chain: no update was lost


def test_a_stale_lock_from_a_killed_job_is_broken(tmp_path):
    publisher = Publisher(str(tmp_path), stale_lock_s=0.0, lock_timeout_s=5)
    publisher.fs.pipe_file(f"{publisher.root}/LATEST.lock", b"0")
    version = build(publisher, "x")
    publisher.publish(version, parent=None)
    assert publisher.latest() == version
    assert MANIFEST in [p.rsplit("/", 1)[-1] for p in publisher.fs.ls(publisher.version_path(version), detail=False)]
