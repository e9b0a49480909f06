"""Versioned publishing (DESIGN §4): nothing is visible until its manifest is written, last.

Layout under a root (a local path or any fsspec URL)::

    ROOT/versions/<version>/...             the version's files, written by the job
    ROOT/versions/<version>/_MANIFEST.json  written last: names, sizes and sha256 of every file
    ROOT/LATEST                             the version readers should use

A version without a manifest does not exist for readers, so a job killed mid-write leaves the
previous version readable and LATEST untouched. LATEST moves by compare-and-swap: the publisher
names the version it built on, and the switch happens under an exclusive lock object (created
only if absent) only if LATEST still names that version; otherwise :class:`ConcurrentPublishError`
tells the caller to rebuild on top of the newer version, so two jobs publishing at once cannot
lose an update. The manifest is written under the same lock, just before the pointer moves, so a
refused attempt leaves no manifest behind and can be discarded.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterator

from sa2crq.storage.filesystem import fsspec_filesystem

MANIFEST = "_MANIFEST.json"
LATEST = "LATEST"
LOCK = "LATEST.lock"


class ConcurrentPublishError(RuntimeError):
    """LATEST moved since the publisher read it: rebuild on the new version and publish again."""


@dataclass(frozen=True)
class Manifest:
    version: str
    parent: str | None  # the version this one was built on
    created_at: str
    files: dict[str, dict[str, Any]]  # relative path -> {"size": int, "sha256": str}
    meta: dict[str, Any] = field(default_factory=dict)


class Publisher:
    def __init__(self, root: str, *, lock_timeout_s: float = 30.0, stale_lock_s: float = 600.0) -> None:
        # Object stores need fsspec; exclusive create ("xb") is what the lock relies on.
        self.root_url = root.rstrip("/")
        self.fs, self.root = fsspec_filesystem(root)
        self.root = self.root.rstrip("/")
        self.lock_timeout_s = lock_timeout_s
        self.stale_lock_s = stale_lock_s

    # -- reading -----------------------------------------------------------------------------
    def version_path(self, version: str) -> str:
        return f"{self.root}/versions/{version}"

    def version_url(self, version: str) -> str:
        """The version's directory as a URL (or local path) other engines can open."""
        return f"{self.root_url}/versions/{version}"

    def latest(self) -> str | None:
        """The version LATEST names, or None before the first publish."""
        path = f"{self.root}/{LATEST}"
        if not self.fs.exists(path):
            return None
        return self.fs.cat_file(path).decode().strip() or None

    def manifest(self, version: str) -> Manifest:
        path = f"{self.version_path(version)}/{MANIFEST}"
        if not self.fs.exists(path):
            raise FileNotFoundError(f"version {version} is not published (no {MANIFEST})")
        return Manifest(**json.loads(self.fs.cat_file(path)))

    def versions(self) -> list[str]:
        """Published versions (those with a manifest), oldest first."""
        base = f"{self.root}/versions"
        if not self.fs.exists(base):
            return []
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(base, detail=False))
        return [v for v in names if self.fs.exists(f"{base}/{v}/{MANIFEST}")]

    # -- writing -----------------------------------------------------------------------------
    def new_version(self) -> str:
        """A fresh, sortable version id; its directory is where the job writes its files."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        version = f"{stamp}-{uuid.uuid4().hex[:8]}"
        self.fs.makedirs(self.version_path(version), exist_ok=True)
        return version

    def publish(self, version: str, *, parent: str | None, meta: dict[str, Any] | None = None) -> Manifest:
        """Write the manifest of ``version`` (built on ``parent``) and move LATEST to it, if LATEST
        still names ``parent``; otherwise raise :class:`ConcurrentPublishError` and write nothing, so
        the caller can discard the attempt and rebuild on the newer version."""
        base = self.version_path(version)
        files = {}
        for path in sorted(self.fs.find(base)):
            relative = path[len(base) + 1 :]
            if relative == MANIFEST:
                continue
            files[relative] = {"size": self.fs.size(path), "sha256": _sha256(self.fs, path)}
        manifest = Manifest(version, parent, datetime.now(timezone.utc).isoformat(), files, dict(meta or {}))
        with self._lock():
            current = self.latest()
            if current != parent:
                raise ConcurrentPublishError(f"LATEST is {current}, not {parent}: rebuild on {current} and publish again")
            # Manifest first, then the pointer: a crash between leaves a complete version nobody points at.
            with self.fs.open(f"{base}/{MANIFEST}", "wb") as f:
                f.write(json.dumps(asdict(manifest), indent=2, sort_keys=True).encode())
            self._write_pointer(version)
        return manifest

    def discard(self, version: str) -> None:
        """Delete an unpublished version's files (a refused or superseded attempt); published ones are kept."""
        if self.fs.exists(f"{self.version_path(version)}/{MANIFEST}"):
            raise ValueError(f"version {version} is published; it is not discarded")
        if self.fs.exists(self.version_path(version)):
            self.fs.rm(self.version_path(version), recursive=True)

    def _write_pointer(self, version: str) -> None:
        # Write beside, then move: a reader sees the old pointer or the new one, never half of one.
        tmp = f"{self.root}/.{LATEST}.{uuid.uuid4().hex}"
        self.fs.pipe_file(tmp, version.encode())
        self.fs.mv(tmp, f"{self.root}/{LATEST}")

    @contextmanager
    def _lock(self) -> Iterator[None]:
        path = f"{self.root}/{LOCK}"
        deadline = time.monotonic() + self.lock_timeout_s
        while True:
            try:
                with self.fs.open(path, "xb") as f:
                    f.write(str(time.time()).encode())
                break
            except OSError as err:  # FileExistsError locally; s3fs reports the failed precondition as OSError
                # The holder may release between our failed create and this check: just try again.
                self._break_if_stale(path)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"could not take {path} within {self.lock_timeout_s:.0f} s") from err
                time.sleep(0.05)
        try:
            yield
        finally:
            self.fs.rm_file(path)

    def _break_if_stale(self, path: str) -> None:
        """A lock older than ``stale_lock_s`` belongs to a killed job: remove it."""
        try:
            taken = float(self.fs.cat_file(path).decode())
        except (FileNotFoundError, ValueError):  # gone, or its holder is still writing the timestamp
            return
        if time.time() - taken > self.stale_lock_s:
            self.fs.rm_file(path)


def _sha256(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
