"""Versioned publishing (DESIGN §4): a version is visible whole or not at all, and no commit is lost.

Layout under a root (a local path or any fsspec URL)::

    ROOT/versions/<version>/...             the version's files, written by the job
    ROOT/versions/<version>/_MANIFEST.json  names, sizes and sha256 of every file, written before the commit
    ROOT/_commits/<n>.json                  commit n (20 digits): version, parent, time
    ROOT/LATEST                             the newest commit's version, a copy for people and tools

The commit log is the truth: a version is published when a commit names it, and the latest version
is the one the highest commit names. Commit n + 1 is created only if it does not exist (an exclusive
create: a hard link locally, a conditional ``PUT`` with ``If-None-Match: *`` on S3), and only by a
publisher whose parent is the version commit n names. Of two publishers that built on the same
version exactly one creates n + 1; the other gets :class:`ConcurrentPublishError` and rebuilds on
the winner, so no update is lost (the optimistic concurrency of Delta Lake's and Iceberg's logs).
There is no lock, no lease and no clock to compare: a publisher killed at any point leaves no
commit (its files are an unpublished attempt) or a whole one. A storage error other than "already
exists" is raised as itself, never reported as a conflict.

A manifest may also list files another published version holds (an ingest's delta version lists
the parent's embeddings instead of copying them): such an entry names that ``version`` and the
file lives under its directory. A reference always names the version that holds the file, never a
version that references it in turn, and never a version that is not published; a published
version's directory is therefore never deleted.

The log holds only what publishers write: files not named like a commit (another tool's notes, a
temporary) are ignored, but a commit-named file that is not a whole commit record, a missing
number or a commit whose parent is not the previous commit's version is damage no publisher
causes (each commit is created whole, in one step). Readers and publishers then stop with
:class:`CommitLogError` naming the file, rather than guess which versions are published.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from sa2crq.storage.filesystem import fsspec_filesystem

log = logging.getLogger(__name__)

MANIFEST = "_MANIFEST.json"
LATEST = "LATEST"
COMMITS = "_commits"
_COMMIT_NAME = re.compile(r"^(\d{20})\.json$")


class ConcurrentPublishError(RuntimeError):
    """Another publisher committed since this one read the latest version: rebuild on it and publish again."""


class CommitLogError(RuntimeError):
    """The commit log holds a file named like a commit that is not one, or its commits do not chain."""


@dataclass(frozen=True)
class Manifest:
    version: str
    parent: str | None  # the version this one was built on
    created_at: str
    # relative path -> {"size": int, "sha256": str}, plus "version" where another version holds the file
    files: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Commit:
    number: int
    version: str
    parent: str | None
    committed_at: str


class Publisher:
    def __init__(self, root: str) -> None:
        # Object stores need fsspec; exclusive create ("xb") is what a commit relies on.
        self.root_url = root.rstrip("/")
        self.fs, self.root = fsspec_filesystem(root)
        self.root = self.root.rstrip("/")
        self._commits: dict[int, Commit] = {}  # commits never change once written: read each once

    # -- reading -----------------------------------------------------------------------------
    def version_path(self, version: str) -> str:
        return f"{self.root}/versions/{version}"

    def version_url(self, version: str) -> str:
        """The version's directory as a URL (or local path) other engines can open."""
        return f"{self.root_url}/versions/{version}"

    def commits(self) -> list[Commit]:
        """The commit log, oldest first."""
        base = f"{self.root}/{COMMITS}"
        if not self.fs.exists(base):
            return []
        numbers = sorted(int(m.group(1)) for p in self.fs.ls(base, detail=False) if (m := _COMMIT_NAME.match(p.rstrip("/").rsplit("/", 1)[-1])))
        for number in numbers:
            if number not in self._commits:
                self._commits[number] = self._read_commit(number)
        history = [self._commits[n] for n in numbers]
        for expected, commit in enumerate(history):
            if commit.number != expected:
                self._damaged(f"commit #{expected} is missing (the next file is {self._commit_name(commit.number)})")
            previous = history[expected - 1].version if expected else None
            if commit.parent != previous:
                self._damaged(f"{self._commit_name(commit.number)} names parent {commit.parent}, but the commit before it names {previous}")
        return history

    def latest(self) -> str | None:
        """The version the newest commit names, or None before the first publish."""
        history = self.commits()
        return history[-1].version if history else None

    def versions(self) -> list[str]:
        """Published versions, oldest first."""
        return [c.version for c in self.commits()]

    def unpublished(self) -> list[str]:
        """Version directories no commit names (jobs in flight, and attempts that failed, were
        killed or were refused), oldest first."""
        base = f"{self.root}/versions"
        if not self.fs.exists(base):
            return []
        published = set(self.versions())
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        return [name for name in names if name not in published]

    def manifest(self, version: str) -> Manifest:
        """The manifest of a published version."""
        # A version a commit already read names is published for good (commits never change): only
        # an unknown one costs a listing of the log.
        if version not in {c.version for c in self._commits.values()} and version not in self.versions():
            raise FileNotFoundError(f"version {version} is not published (no commit names it)")
        return Manifest(**json.loads(self.fs.cat_file(f"{self.version_path(version)}/{MANIFEST}")))

    # -- writing -----------------------------------------------------------------------------
    def new_version(self) -> str:
        """A fresh, sortable version id; its directory is where the job writes its files."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        version = f"{stamp}-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.version_path(version), exist_ok=True)
        return version

    def publish(
        self,
        version: str,
        *,
        parent: str | None,
        meta: dict[str, Any] | None = None,
        references: dict[str, dict[str, Any]] | None = None,
        hash_files: Callable[[list[str], list[int]], list[str]] | None = None,
    ) -> Manifest:
        """Write the manifest of ``version`` (built on ``parent``), then commit it if ``parent`` is
        still the latest version; otherwise raise :class:`ConcurrentPublishError` having committed
        nothing, so the caller can discard the attempt and rebuild on the newer version.

        ``references``: files of published versions the new one lists without holding them
        (:meth:`PublishedVersion.references`), each entry naming the ``version`` that holds it.
        ``hash_files(urls, sizes)``: the hex sha256 of each file, in order; by default this process
        reads every file (jobs pass ``ray_workers.hashing.file_hashes``, which reads a large version
        on the cluster's workers)."""
        base = self.version_path(version)
        listing = self.fs.find(base, detail=True)  # sizes from the listing: no request per file
        found = sorted(path for path in listing if path[len(base) + 1 :] != MANIFEST)
        relatives = [path[len(base) + 1 :] for path in found]
        if hash_files is None:
            digests = [file_sha256(self.fs, path) for path in found]
        else:
            digests = hash_files([f"{self.version_url(version)}/{relative}" for relative in relatives],
                                 [int(listing[path]["size"]) for path in found])  # fmt: skip
            if len(digests) != len(found):
                raise RuntimeError(f"hash_files returned {len(digests)} hashes for {len(found)} files of version {version}")
        files = {relative: {"size": int(listing[path]["size"]), "sha256": digest} for relative, path, digest in zip(relatives, found, digests)}
        published = set(self.versions()) if references else set()
        for relative, entry in sorted((references or {}).items()):
            if relative in files:
                raise ValueError(f"version {version} writes {relative} and also references it from version {entry.get('version')}")
            if entry.get("version") not in published:
                raise ValueError(f"{relative} references version {entry.get('version')!r}, which is not published")
            files[relative] = {"size": int(entry["size"]), "sha256": entry["sha256"], "version": entry["version"]}
        manifest = Manifest(version, parent, datetime.now(timezone.utc).isoformat(), files, dict(meta or {}))
        # Unpublished until a commit names it, so the manifest is written without any coordination.
        self.fs.pipe_file(f"{base}/{MANIFEST}", json.dumps(asdict(manifest), indent=2, sort_keys=True).encode())
        history = self.commits()
        current = history[-1].version if history else None
        if current != parent:
            raise ConcurrentPublishError(f"the latest version is {current}, not {parent}: rebuild on {current} and publish again")
        commit = Commit(len(history), version, parent, datetime.now(timezone.utc).isoformat())
        self._create_commit(commit)
        self._commits[commit.number] = commit
        try:  # a convenience copy: readers go by the log, so a failure here loses nothing
            self.fs.pipe_file(f"{self.root}/{LATEST}", version.encode())
        except OSError as err:
            log.warning("version %s is committed but %s/%s was not updated: %s", version, self.root_url, LATEST, err)
        return manifest

    def discard(self, version: str) -> None:
        """Delete an unpublished version's files (a refused or superseded attempt); published ones are kept."""
        if version in self.versions():
            raise ValueError(f"version {version} is published; it is not discarded")
        if self.fs.exists(self.version_path(version)):
            self.fs.rm(self.version_path(version), recursive=True)

    def _commit_path(self, number: int) -> str:
        return f"{self.root}/{COMMITS}/{self._commit_name(number)}"

    @staticmethod
    def _commit_name(number: int) -> str:
        return f"{number:020d}.json"

    def _read_commit(self, number: int) -> Commit:
        """Commit ``number`` as its file holds it; :class:`CommitLogError` when the file is not a commit record."""
        data = self.fs.cat_file(self._commit_path(number))
        try:
            record = json.loads(data)
            commit = Commit(**record)
        except (ValueError, TypeError):  # empty, not JSON (ValueError), not a commit's fields (TypeError)
            what = "empty" if not data else f"not a commit record ({len(data):,} bytes: {data[:60]!r})"
            self._damaged(f"{self._commit_name(number)} is {what}")
        if commit.number != number or not isinstance(commit.version, str):
            self._damaged(f"{self._commit_name(number)} is not a commit record of #{number}: {record}")
        return commit

    def _damaged(self, problem: str):
        raise CommitLogError(
            f"the commit log {self.root_url}/{COMMITS} is damaged: {problem}. A publisher creates each commit whole, "
            f"so another tool or a damaged store wrote this; nothing is read or published from this log until it is repaired "
            f"by hand (move a file that is not a commit out of {COMMITS}/, keeping it to inspect)"
        )

    def _create_commit(self, commit: Commit) -> None:
        path = self._commit_path(commit.number)
        self.fs.makedirs(f"{self.root}/{COMMITS}", exist_ok=True)
        try:
            self._exclusive_write(path, json.dumps(asdict(commit), sort_keys=True).encode())
        except OSError as err:
            # The log decides: our own create may have landed before the error (a lost reply, retried).
            winner = self._read_commit(commit.number).version if self.fs.exists(path) else None
            if winner == commit.version:
                return
            if _already_exists(err):
                raise ConcurrentPublishError(
                    f"version {winner} was committed as #{commit.number} first: rebuild on it and publish again"
                ) from err
            raise

    def _exclusive_write(self, path: str, data: bytes) -> None:
        """Create ``path`` holding ``data`` if it does not exist, in one step a reader cannot see half
        of: on S3 a conditional PUT; locally a hard link of a finished temporary file (``O_EXCL`` and
        then writing would show a concurrent reader an empty file, and leave one after a crash)."""
        from fsspec.implementations.local import LocalFileSystem

        if not isinstance(self.fs, LocalFileSystem):
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return
        staged = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(staged, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(staged, path)  # atomic; FileExistsError when the number is taken
        finally:
            os.unlink(staged)


def _already_exists(err: OSError) -> bool:
    """An exclusive create found the file: FileExistsError locally (and from s3fs when the server
    names the failed condition), else S3's 412 Precondition Failed, which s3fs raises as EINVAL."""
    if isinstance(err, FileExistsError):
        return True
    code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")  # s3fs chains botocore's error
    return err.errno == errno.EINVAL and (code in ("PreconditionFailed", "412") or "precondition" in str(err).lower().replace("-", ""))


def file_sha256(fs, path: str) -> str:
    """Hex sha256 of one file on an fsspec filesystem (what a manifest records, and what verifying checks)."""
    with fs.open(path, "rb") as f:
        return stream_sha256(f)[1]


def stream_sha256(stream) -> tuple[int, str]:
    """Bytes read and hex sha256 of what is left of an open binary stream (fsspec or pyarrow), read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return size, digest.hexdigest()
