"""Fault injection into the commit protocol with real processes, on a local path and on a real S3 server
(issue 11, scenarios 1-3): a publisher paused while another commits, a publisher killed between its
publish steps, and files under the commit prefix that no publisher wrote.

The publisher under test is a separate process (:data:`JOB`) that stops itself at the named point:
SIGSTOP (paused until the test sends SIGCONT) or SIGKILL (dead, nothing cleaned up). After each fault
the previous version must be intact and latest (or the new one whole, once its commit exists), no
published version may be lost, and a rerun must publish exactly what an undisturbed run publishes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import fsspec
import pytest

from jobs.cli import VERIFY_FAILED, main
from jobs.object_store import _LOCAL_SERVER_ENV, ENDPOINT_ENV, LocalS3Server, ensure_bucket, set_endpoint
from sa2crq.storage.publish import COMMITS, LATEST, Commit, CommitLogError, Publisher
from sa2crq.storage.published import PublishedVersion

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[2]
# The storage conftest's roots, a local path and a real S3 server; the S3 runs (a second or two each,
# mostly a process starting s3fs) are left to `make faults`.
ROOTS = pytest.mark.parametrize("root", ["local", pytest.param("s3", marks=pytest.mark.slow_fault)], indirect=True)

# A publishing job: writes FILES (argv[3], JSON: name -> text, each text repeated argv[4] times) into
# a new version, printing "wrote <name>" after each, and publishes it on the latest version,
# rebuilding on the winner after a conflict. The fault (argv[2]) stops it once, at that point of the
# commit protocol, after printing "<fault> <version>".
JOB = r"""
import json, os, signal, sys
from sa2crq.storage.publish import ConcurrentPublishError, Publisher

root, fault, files, repeat = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
publisher = Publisher(root)
publish, create_commit = publisher.publish, publisher._create_commit

def stop_here(point, signum):
    global fault
    if fault == point:
        fault = None
        print(point, version, flush=True)
        os.kill(os.getpid(), signum)

def faulty_publish(*args, **kwargs):
    stop_here("crash-after-data", signal.SIGKILL)
    return publish(*args, **kwargs)

def faulty_create_commit(commit):
    stop_here("crash-after-manifest", signal.SIGKILL)
    stop_here("pause-before-commit", signal.SIGSTOP)
    create_commit(commit)
    stop_here("crash-after-commit", signal.SIGKILL)
    stop_here("pause-after-commit", signal.SIGSTOP)

publisher.publish, publisher._create_commit = faulty_publish, faulty_create_commit
while True:
    parent = publisher.latest()
    version = publisher.new_version()
    for name, text in files.items():
        publisher.fs.pipe_file(f"{publisher.version_path(version)}/{name}", (text * repeat).encode())
        print("wrote", name, flush=True)
    try:
        publisher.publish(version, parent=parent)
    except ConcurrentPublishError as conflict:
        print("conflict", version, conflict, flush=True)
        publisher.discard(version)
        continue
    print("published", version, flush=True)
    break
"""

BASE = {"part-0.txt": "base rows", "report.json": '{"rows": 1}'}
FILES = {"part-0.txt": "new rows", "part-1.txt": "more new rows", "report.json": '{"rows": 2}'}
THEIRS = {"part-0.txt": "their rows"}


def publish_files(publisher: Publisher, files: dict[str, str]) -> str:
    """Publish ``files`` as a new version on the latest one, in this process (the other publisher)."""
    version = publisher.new_version()
    for name, text in files.items():
        publisher.fs.pipe_file(f"{publisher.version_path(version)}/{name}", text.encode())
    publisher.publish(version, parent=publisher.latest())
    return version


def assert_holds(root: str, version: str, files: dict[str, str]) -> None:
    """``version`` is published and holds exactly ``files``, each read through its manifest (size and sha256 checked)."""
    published = PublishedVersion.open(Publisher(root), version)
    assert sorted(published.files) == sorted(files)
    assert {name: published.read_bytes(name).decode() for name in files} == files


def start_job(root: str, fault: str, files: dict[str, str], repeat: int = 1, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", JOB, root, fault, json.dumps(files), str(repeat)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, **popen)  # fmt: skip


def events(out: str) -> list[list[str]]:
    """The job's output lines, split into words, without its per-file progress."""
    return [line.split() for line in out.splitlines() if not line.startswith("wrote ")]


def run_job(root: str, fault: str, files: dict[str, str], repeat: int = 1) -> tuple[int, list[list[str]]]:
    """Run the job to its end (or its death); its exit code and output events."""
    job = start_job(root, fault, files, repeat)
    out, _ = job.communicate(timeout=120)
    return job.returncode, events(out)


def stopped_at(job: subprocess.Popen, point: str) -> str:
    """Wait until ``job`` reports it stopped at ``point``; the version it was publishing."""
    line = ""
    for line in job.stdout:
        if not line.startswith("wrote "):
            break
    words = line.split()
    assert words[:1] == [point], f"the job did not reach {point}: {words} (exit {job.poll()})"
    return words[1]


def latest_copy(root: str) -> str:
    publisher = Publisher(root)
    return publisher.fs.cat_file(f"{publisher.root}/{LATEST}").decode()


# -- 1: paused while another commits -------------------------------------------------------------


@ROOTS
@pytest.mark.fault_scenario(1)
def test_a_publisher_paused_before_its_commit_loses_to_the_other_and_rebuilds_on_it(root):
    """Paused after reading the log (its parent is the base), it wakes after another publisher
    committed on the same base: its create of the same commit number fails, it rebuilds on the
    winner. No lock or lease exists, so no pause is long enough to let two commits through."""
    base = publish_files(Publisher(root), BASE)
    job = start_job(root, "pause-before-commit", FILES)
    try:
        paused = stopped_at(job, "pause-before-commit")
        theirs = publish_files(Publisher(root), THEIRS)  # the whole publish happens inside the pause
        assert Publisher(root).versions() == [base, theirs]
    finally:
        job.send_signal(signal.SIGCONT)
    out, _ = job.communicate(timeout=60)
    lines = events(out)
    assert job.returncode == 0
    assert lines[0][:2] == ["conflict", paused] and f"version {theirs} was committed as #1 first" in out
    assert lines[1][0] == "published"
    rebuilt = lines[1][1]
    fresh = Publisher(root)
    assert fresh.versions() == [base, theirs, rebuilt] and fresh.manifest(rebuilt).parent == theirs
    assert not any(fresh.fs.isfile(p) for p in fresh.fs.find(fresh.version_path(paused)))  # its attempt discarded (SeaweedFS may keep the directory)
    for version, files in ((base, BASE), (theirs, THEIRS), (rebuilt, FILES)):
        assert_holds(root, version, files)


@ROOTS
@pytest.mark.fault_scenario(1)
def test_a_publisher_paused_after_its_commit_is_published_and_the_other_builds_on_it(root):
    """Paused between its commit and the LATEST copy, its version is already the latest for every
    reader; another publisher builds on it. When the paused one wakes, its late copy of LATEST
    changes nothing readers see: they go by the log, and the next publish refreshes the copy."""
    base = publish_files(Publisher(root), BASE)
    job = start_job(root, "pause-after-commit", FILES)
    try:
        mine = stopped_at(job, "pause-after-commit")
        assert Publisher(root).latest() == mine and latest_copy(root) == base  # committed: published, the copy not yet updated
        theirs = publish_files(Publisher(root), THEIRS)
    finally:
        job.send_signal(signal.SIGCONT)
    out, _ = job.communicate(timeout=60)
    assert job.returncode == 0 and out.split()[-2:] == ["published", mine]
    fresh = Publisher(root)
    assert fresh.versions() == [base, mine, theirs] and fresh.latest() == theirs and fresh.manifest(theirs).parent == mine
    for version, files in ((base, BASE), (mine, FILES), (theirs, THEIRS)):
        assert_holds(root, version, files)
    following = publish_files(fresh, BASE)
    assert latest_copy(root) == following == Publisher(root).latest()


# -- 2: killed between publish steps --------------------------------------------------------------


@ROOTS
@pytest.mark.fault_scenario(2)
@pytest.mark.parametrize("point", ["crash-after-data", "crash-after-manifest", "crash-after-commit"])
def test_a_publisher_killed_between_publish_steps_loses_nothing_and_its_rerun_completes(root, point):
    base = publish_files(Publisher(root), BASE)
    code, lines = run_job(root, point, FILES)
    assert code == -signal.SIGKILL and lines[0][0] == point
    attempt = lines[0][1]
    fresh = Publisher(root)
    if point == "crash-after-commit":
        # Its commit exists: the version is published, whole; only the LATEST copy lags.
        assert fresh.versions() == [base, attempt] and fresh.latest() == attempt and latest_copy(root) == base
        assert_holds(root, attempt, FILES)
    else:
        # No commit: the attempt's files (and manifest) are no version; the base is intact and latest.
        assert fresh.versions() == [base] and fresh.latest() == base
        with pytest.raises(FileNotFoundError, match="is not published"):
            fresh.manifest(attempt)
    assert_holds(root, base, BASE)

    # The rerun publishes on the latest version exactly what an undisturbed run publishes.
    code, lines = run_job(root, "none", FILES)
    assert code == 0 and lines[-1][0] == "published"
    rerun = lines[-1][1]
    fresh = Publisher(root)
    assert fresh.latest() == rerun == latest_copy(root) and fresh.manifest(rerun).parent == fresh.versions()[-2]
    assert_holds(root, rerun, FILES)


# -- 3: files no publisher wrote under the commit prefix -------------------------------------------


def _commit_record(number: int, version: str, parent: str | None) -> bytes:
    return json.dumps(asdict(Commit(number, version, parent, datetime.now(timezone.utc).isoformat()))).encode()


@ROOTS
@pytest.mark.fault_scenario(3)
def test_files_not_named_like_commits_are_ignored_and_publishing_goes_on(root):
    publisher = Publisher(root)
    base = publish_files(publisher, BASE)
    strays = {
        "notes.txt": b"operator notes",  # foreign
        "garbage.bin": bytes(range(256)),  # garbage
        ".keep": b"",  # empty
        "00000000000000000001.json.5f3a.tmp": b'{"number": 1, "vers',  # another writer's half-written temporary
        "1.json": _commit_record(1, "not-a-version", base),  # a commit under a name the log does not use
        "00000000000000000000.json.bak": _commit_record(0, base, None),  # a backup copy
    }
    for name, data in strays.items():
        publisher.fs.pipe_file(f"{publisher.root}/{COMMITS}/{name}", data)
    fresh = Publisher(root)
    assert fresh.versions() == [base] and fresh.latest() == base
    assert_holds(root, base, BASE)
    new = publish_files(fresh, FILES)
    assert Publisher(root).versions() == [base, new]
    assert_holds(root, new, FILES)
    listed = {p.rsplit("/", 1)[-1] for p in fresh.fs.ls(f"{fresh.root}/{COMMITS}", detail=False)}
    assert set(strays) <= listed  # left as they were


NOT_COMMITS = {
    "empty": (1, b"", "00000000000000000001.json is empty"),
    "garbage": (1, b"\x00\x01 not json", "00000000000000000001.json is not a commit record"),
    "foreign json": (1, b'{"tool": "backup", "state": "ok"}', "00000000000000000001.json is not a commit record"),
    "wrong number": (1, None, "00000000000000000001.json is not a commit record of #1"),
    "a gap": (5, None, r"commit #1 is missing \(the next file is 00000000000000000005.json\)"),
}


@ROOTS
@pytest.mark.fault_scenario(3)
@pytest.mark.parametrize("case", list(NOT_COMMITS))
def test_a_commit_named_file_that_is_not_a_commit_stops_readers_and_publishers_naming_it(root, case):
    publisher = Publisher(root)
    base = publish_files(publisher, BASE)
    number, data, problem = NOT_COMMITS[case]
    if data is None:  # a well-formed commit record under the wrong number (copied, or renumbered by hand)
        data = _commit_record(0 if case == "wrong number" else number, base, None if case == "wrong number" else base)
    stray = f"{publisher.root}/{COMMITS}/{number:020d}.json"
    publisher.fs.pipe_file(stray, data)
    message = f"the commit log {Publisher(root).root_url}/{COMMITS} is damaged: {problem}"
    with pytest.raises(CommitLogError, match=message):
        Publisher(root).latest()
    attempt = Publisher(root).new_version()
    with pytest.raises(CommitLogError, match=message):
        Publisher(root).publish(attempt, parent=base)
    assert publisher.fs.cat_file(stray) == data  # nothing committed over it, nothing repaired
    # Once an operator moves it out of the log, the log is whole again and a publish goes through.
    publisher.fs.rm(stray)
    assert Publisher(root).versions() == [base]
    new = publish_files(Publisher(root), FILES)
    assert Publisher(root).versions() == [base, new]
    assert_holds(root, base, BASE)


@pytest.mark.fault_scenario(3)
def test_versions_list_on_a_damaged_log_exits_4_naming_the_file(tmp_path, capsys):
    publisher = Publisher(str(tmp_path / "store" / "sids"))
    publish_files(publisher, BASE)
    Path(publisher.root, COMMITS, f"{1:020d}.json").write_bytes(b"")
    assert main(["versions", "list", "--root", str(tmp_path / "store")]) == VERIFY_FAILED
    error = capsys.readouterr().err
    assert error.startswith(f"error: the commit log {publisher.root_url}/{COMMITS} is damaged: 00000000000000000001.json is empty")
    assert "Traceback" not in error


# -- 4: the S3 server stopped mid-write and restarted ----------------------------------------------


@contextmanager
def reaching(endpoint: str):
    """This process's S3 clients reach ``endpoint`` (and subprocesses inherit it); the previous one afterwards."""
    previous = os.environ.get(ENDPOINT_ENV)
    set_endpoint(endpoint)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(ENDPOINT_ENV, None)
            fsspec.get_filesystem_class("s3").clear_instance_cache()
        else:
            set_endpoint(previous)


@pytest.mark.fault_scenario(4)
@pytest.mark.slow_fault
@pytest.mark.timeout(240)
def test_an_s3_server_killed_mid_write_and_restarted_keeps_the_previous_version_and_the_rerun_completes(tmp_path, monkeypatch):
    for name, value in _LOCAL_SERVER_ENV.items():  # what a job sets for its local server
        monkeypatch.setenv(name, value)
    root = "s3://restarted/sids"
    many = {f"part-{i:02d}.txt": f"rows of part {i}\n" for i in range(40)}  # 40 files of ~0.8 MB: a write takes a while
    repeat = 50_000
    server = LocalS3Server(tmp_path / "object-store")
    try:
        with reaching(server.start()):
            ensure_bucket(root)
            base = publish_files(Publisher(root), BASE)
            job = start_job(root, "none", many, repeat, stderr=subprocess.PIPE)
            assert job.stdout.readline().startswith("wrote ")  # a version is half written...
            server._process.kill()  # ...when the server dies (SIGKILL: no chance to flush anything)
            out, err = job.communicate(timeout=120)
    finally:
        server.stop()
    # The job fails on its next request, naming the endpoint it could not reach; nothing is committed.
    assert job.returncode == 1 and "published" not in out
    assert "Could not connect to the endpoint URL" in err or "Cannot connect to host" in err, err[-2000:]

    restarted = LocalS3Server(tmp_path / "object-store")  # the same directory, a new port
    try:
        with reaching(restarted.start()):
            fresh = Publisher(root)
            assert fresh.versions() == [base] and fresh.latest() == base
            assert_holds(root, base, BASE)
            code, lines = run_job(root, "none", many, repeat)
            assert code == 0 and lines[-1][0] == "published"
            rerun = lines[-1][1]
            assert Publisher(root).versions() == [base, rerun] and Publisher(root).manifest(rerun).parent == base
            assert_holds(root, rerun, {name: text * repeat for name, text in many.items()})
    finally:
        restarted.stop()

