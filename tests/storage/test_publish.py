"""Versioned publishing: a commit log of exclusive creates, on a local path and on S3: a version is
visible whole or not at all, no commit is lost, and storage errors are not taken for conflicts."""

from __future__ import annotations

import errno
import threading
from datetime import datetime, timezone

import pytest

from sa2crq.storage.publish import LATEST, MANIFEST, Commit, ConcurrentPublishError, Publisher


def build(publisher: Publisher, text: str) -> str:
    version = publisher.new_version()
    publisher.fs.pipe_file(f"{publisher.version_path(version)}/part-0.txt", text.encode())
    return version


@pytest.mark.timeout(120)
def test_a_version_is_visible_only_once_published(root):
    publisher = Publisher(root)
    assert publisher.latest() is None
    first = build(publisher, "a")
    assert publisher.versions() == []  # files written, no commit yet: invisible
    manifest = publisher.publish(first, parent=None, meta={"rows": 1})
    assert publisher.latest() == first and publisher.versions() == [first]
    assert Publisher(root).latest() == first  # a fresh reader goes by the log
    assert publisher.fs.cat_file(f"{publisher.root}/{LATEST}") == first.encode()  # the copy for people and tools
    assert manifest.files["part-0.txt"]["size"] == 1 and len(manifest.files["part-0.txt"]["sha256"]) == 64
    assert publisher.manifest(first).meta == {"rows": 1}


@pytest.mark.fault_scenario(2)
@pytest.mark.timeout(120)
def test_a_killed_job_leaves_the_previous_version_latest_and_readable(root):
    publisher = Publisher(root)
    first = build(publisher, "a")
    publisher.publish(first, parent=None)
    build(publisher, "half-written")  # the job dies before publish
    assert publisher.latest() == first
    assert publisher.versions() == [first]
    assert publisher.fs.cat_file(f"{publisher.version_path(first)}/part-0.txt") == b"a"


@pytest.mark.fault_scenario(1)
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


@pytest.mark.fault_scenario(8)
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


@pytest.mark.fault_scenario(2)
@pytest.mark.timeout(120)
def test_a_job_killed_between_manifest_and_commit_publishes_nothing(root):
    publisher = Publisher(root)
    base = build(publisher, "base")
    publisher.publish(base, parent=None)
    killed = build(publisher, "killed")
    publisher.fs.pipe_file(f"{publisher.version_path(killed)}/{MANIFEST}", b"{}")  # the manifest, then death
    assert publisher.latest() == base and publisher.versions() == [base]
    with pytest.raises(FileNotFoundError, match="not published"):
        publisher.manifest(killed)
    publisher.discard(killed)  # the next run clears the attempt
    assert not any(publisher.fs.isfile(p) for p in publisher.fs.find(publisher.version_path(killed)))  # SeaweedFS may keep the empty directory
    with pytest.raises(ValueError, match="is published"):
        publisher.discard(base)
    assert not any("lock" in p.lower() for p in publisher.fs.ls(publisher.root, detail=False))  # nothing to go stale


@pytest.mark.fault_scenario(1)
@pytest.mark.timeout(120)
def test_two_writers_racing_for_one_commit_number_cannot_both_win(root):
    """The slow writer read the log before the fast one committed: its create of the same number fails
    as a conflict naming the winner, and the log keeps the winner."""
    slow, fast = Publisher(root), Publisher(root)
    base = build(fast, "base")
    fast.publish(base, parent=None)
    mine, theirs = build(slow, "mine"), build(fast, "theirs")
    fast.publish(theirs, parent=base)
    now = datetime.now(timezone.utc).isoformat()
    with pytest.raises(ConcurrentPublishError, match=f"{theirs} was committed as #1"):
        slow._create_commit(Commit(1, mine, base, now))
    assert Publisher(root).versions() == [base, theirs]
    fast._create_commit(Commit(1, theirs, base, now))  # its own create retried after a lost reply: done, not a conflict
    slow.discard(mine)


@pytest.mark.timeout(120)
def test_a_storage_error_is_raised_as_itself_and_commits_nothing(root, monkeypatch):
    publisher = Publisher(root)
    base = build(publisher, "base")
    publisher.publish(base, parent=None)
    attempt = build(publisher, "attempt")

    def denied(path: str, data: bytes) -> None:
        raise PermissionError(errno.EACCES, "Access Denied")

    monkeypatch.setattr(publisher, "_exclusive_write", denied)
    with pytest.raises(PermissionError, match="Access Denied"):
        publisher.publish(attempt, parent=base)
    assert Publisher(root).versions() == [base]
