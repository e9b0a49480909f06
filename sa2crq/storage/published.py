"""Reading a published version: only the files its manifest lists, each checked against the manifest.

A published version never changes (:mod:`sa2crq.storage.publish`), so a listed file that is missing
or whose size or sha256 differs from the manifest is damage or tampering after the commit: reading
it raises :class:`ManifestMismatchError`, naming the version, the file, what the manifest records
and what was found. A file the manifest does not list (added after the commit) is not part of the
version and is never read: every read starts from the manifest, never from a directory listing.

A listed file may be held by another published version (the manifest entry names it: an ingest's
delta references its parent's embeddings); it is read from there and checked the same way.

Checking costs no extra read where this process reads the bytes itself (the sha256 is taken over
the bytes read); an engine that reads the files itself (Spark) gets their URLs after a checking
read. Each reader checks each file once. Only pyarrow filesystems are used, so a local version
reads without fsspec; a reader pickles (Ray actors and Train workers get one as an argument).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from sa2crq.storage.filesystem import resolve_filesystem
from sa2crq.storage.publish import Publisher, stream_sha256

PARQUET_SUFFIX = ".parquet"


class ManifestMismatchError(RuntimeError):
    """A file of a published version is missing, or differs from what its manifest records."""

    def __init__(self, version: str, path: str, kind: str, expected: str, found: str) -> None:
        # kind: "missing", "size" or "sha256"
        self.version, self.path, self.kind, self.expected, self.found = version, path, kind, expected, found
        super().__init__(
            f"published version {version}: {path} does not match its manifest: expected {expected}, found {found} "
            f"(a published version never changes; `sa2crq versions verify {version}` checks all of its files)"
        )

    def __reduce__(self):  # rebuilt from its fields when it crosses processes (Ray actors, Train workers)
        return type(self), (self.version, self.path, self.kind, self.expected, self.found)


class PublishedVersion:
    """The files of one published version as its manifest lists them (relative to the version's directory)."""

    def __init__(self, url: str, version: str, files: dict[str, dict[str, Any]], meta: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        if not self.url.endswith(f"/versions/{version}"):
            raise ValueError(f"{url} is not the directory of version {version} (ROOT/versions/{version})")
        self.version = version
        self.files = files
        self.meta = meta or {}  # what the publishing job recorded (a SID version: its vocabulary, ...)
        self._checked: set[str] = set()  # files this reader has found matching the manifest
        self._fs = None

    @classmethod
    def open(cls, publisher: Publisher, version: str) -> "PublishedVersion":
        """A published version of ``publisher``'s store; FileNotFoundError when no commit names it."""
        manifest = publisher.manifest(version)
        return cls(publisher.version_url(version), version, manifest.files, manifest.meta)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fs": None}  # a filesystem is resolved again in each process

    # -- which files ------------------------------------------------------------------------------
    def listed(self, part: str) -> list[str]:
        """The listed files of ``part`` (a file, or every file under a directory), sorted."""
        return sorted(path for path in self.files if path == part or path.startswith(f"{part}/"))

    def parquet_files(self, part: str) -> list[str]:
        """The listed parquet files of ``part``, as a pyarrow dataset of its directory would take
        them (names starting with ``_`` or ``.``, Spark's markers and temporaries, are not data)."""
        files = [p for p in self.listed(part) if p.endswith(PARQUET_SUFFIX) and not any(name.startswith(("_", ".")) for name in p[len(part) :].split("/"))]
        if not files:
            raise FileNotFoundError(f"published version {self.version} lists no parquet files under {part}")
        return files

    def file_url(self, path: str) -> str:
        """A listed file's URL, in the directory of the version that holds it; any other path (a
        part's directory, for messages) under this version's."""
        return self._held_at(self.url, path)

    def references(self, part: str) -> dict[str, dict[str, Any]]:
        """Manifest entries for another version that lists ``part``'s files without copying them
        (:meth:`Publisher.publish`), each naming the version that holds the file; markers starting
        with ``_`` or ``.`` left out, as :meth:`copy` leaves them."""
        return {
            path: {"size": self.files[path]["size"], "sha256": self.files[path]["sha256"], "version": self.files[path].get("version", self.version)}
            for path in self.listed(part)
            if not any(name.startswith(("_", ".")) for name in (path[len(part) + 1 :] or path).split("/"))
        }

    def holds(self, path: str) -> bool:
        """Whether ``path`` lies in this version's own directory (not referenced from another version)."""
        return "version" not in self._recorded(path)

    # -- reading ----------------------------------------------------------------------------------
    def read_bytes(self, path: str) -> bytes:
        """A listed file's bytes, checked against the manifest (the hash is taken over the bytes read)."""
        with self._open(path) as f:
            data = f.read()
        self._check(path, len(data), lambda: hashlib.sha256(data).hexdigest())
        return data

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def read_parquet(self, part: str, columns: list[str] | None = None) -> pa.Table:
        """The listed parquet files of ``part`` as one table, in file-name order (as a dataset of the
        directory reads them), schema metadata dropped (it describes the writer's index)."""
        return pa.concat_tables(list(self.iter_parquet(part, columns)), promote_options="permissive")

    def iter_parquet(self, part: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """:meth:`read_parquet` one file at a time, for a reader that keeps only some rows of each."""
        import pyarrow.parquet as pq

        for path in self.parquet_files(part):
            yield pq.read_table(pa.BufferReader(self.read_bytes(path)), columns=columns).replace_schema_metadata(None)

    def parquet_schema(self, part: str) -> pa.Schema:
        """The schema of ``part``'s first listed parquet file (a dataset of the directory takes the first file's)."""
        import pyarrow.parquet as pq

        return pq.read_schema(pa.BufferReader(self.read_bytes(self.parquet_files(part)[0])))

    def checked_urls(self, part: str) -> list[str]:
        """URLs of ``part``'s listed parquet files, each checked first, for an engine that reads
        them itself (Spark): give it exactly these, never the directory. Checking is a read of its
        own here, the one place a file is read twice."""
        paths = self.parquet_files(part)
        for path in paths:
            self.check(path)
        return [self.file_url(path) for path in paths]

    def check(self, path: str) -> None:
        """Check one listed file against the manifest without keeping its bytes (a file of another
        size is not hashed); raise :class:`ManifestMismatchError` if it differs."""
        if path in self._checked:
            return
        recorded = self._recorded(path)
        fs, inner = self._filesystem()
        info = fs.get_file_info(self._held_at(inner, path))
        if info.type == pafs.FileType.NotFound:
            raise ManifestMismatchError(self.version, path, "missing", f"{recorded['size']:,} bytes", "no such file")
        if info.size != recorded["size"]:
            raise ManifestMismatchError(self.version, path, "size", f"{recorded['size']:,} bytes", f"{info.size:,} bytes")
        with self._open(path) as f:
            size, digest = stream_sha256(f)
        self._check(path, size, lambda: digest)

    def copy(self, part: str, destination: str) -> None:
        """Copy ``part``'s listed files (checked; markers starting with ``_`` or ``.`` left out) to the
        directory ``destination`` (a local path or URL), keeping their paths under ``part``."""
        out_fs, out_root = resolve_filesystem(destination)
        for path in self.listed(part):
            relative = path[len(part) + 1 :] or path.rsplit("/", 1)[-1]
            if any(name.startswith(("_", ".")) for name in relative.split("/")):
                continue
            data = self.read_bytes(path)
            target = f"{out_root}/{relative}"
            out_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with out_fs.open_output_stream(target) as f:
                f.write(data)

    # -- checking ---------------------------------------------------------------------------------
    def _open(self, path: str):
        """A listed file, open for reading; a missing one is a mismatch like any other."""
        recorded = self._recorded(path)
        fs, inner = self._filesystem()
        try:
            return fs.open_input_stream(self._held_at(inner, path))
        except FileNotFoundError:
            raise ManifestMismatchError(self.version, path, "missing", f"{recorded['size']:,} bytes", "no such file") from None

    def _recorded(self, path: str) -> dict[str, Any]:
        if path not in self.files:
            raise FileNotFoundError(f"published version {self.version} does not list {path}: it is not part of the version")
        return self.files[path]

    def _check(self, path: str, size: int, sha256) -> None:
        """Raise unless ``size`` and (computed only when the size matches) ``sha256()`` are the manifest's."""
        if path in self._checked:
            return
        recorded = self._recorded(path)
        if size != recorded["size"]:
            raise ManifestMismatchError(self.version, path, "size", f"{recorded['size']:,} bytes", f"{size:,} bytes")
        digest = sha256()
        if digest != recorded["sha256"]:
            raise ManifestMismatchError(self.version, path, "sha256", f"sha256 {recorded['sha256']}", f"sha256 {digest} (same size)")
        self._checked.add(path)

    def _held_at(self, directory: str, path: str) -> str:
        """``path`` under ``directory`` (this version's directory, as a URL or as a path inside its
        filesystem), in the directory of the version that holds it (a sibling, or this one)."""
        holder = self.files.get(path, {}).get("version", self.version)
        return f"{directory[: -len(self.version)]}{holder}/{path}"

    def _filesystem(self):
        if self._fs is None:
            self._fs = resolve_filesystem(self.url)
        return self._fs
