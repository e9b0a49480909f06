"""Resolve a local path or any fsspec URL to a filesystem pyarrow can read and write through."""

from __future__ import annotations

import os

import pyarrow.fs as pafs

PathLike = str | os.PathLike[str]


def resolve_filesystem(path: PathLike) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path_within_it)`` for a local path or a URL such as ``s3://bucket/key``.

    Local paths get pyarrow's native filesystem (memory-mapped, multi-threaded reads) without
    importing fsspec, so the model path runs on machines that have only torch, numpy and pyarrow;
    anything else goes through fsspec, so every protocol it knows (s3fs, memory://, ...) works.
    """
    text = os.fspath(path)
    if "://" not in text:
        return pafs.LocalFileSystem(), os.path.abspath(text)
    if text.startswith("file://"):
        return pafs.LocalFileSystem(), text[len("file://") :]
    fs, inner = fsspec_filesystem(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner


# Object stores whose fsspec implementations cache directory listings.
_LISTING_CACHE_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "abfs", "az")


def fsspec_filesystem(url: str):
    """``(fsspec filesystem, path)`` for a URL, with listing caches off: other processes (Ray workers,
    concurrent jobs) write the same prefixes, and a cached listing would hide their files."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = {"use_listings_cache": False} if protocol in _LISTING_CACHE_PROTOCOLS else {}
    return fsspec.core.url_to_fs(url, **options)


def read_parquet(path: PathLike, columns: list[str] | None = None):
    """A parquet file or a directory of parquet files (local or any fsspec URL) as one pyarrow Table.

    Files whose names start with ``_`` or ``.`` (Spark's markers, manifests) are ignored.
    """
    import pyarrow.parquet as pq

    fs, inner = resolve_filesystem(path)
    # Drop pandas' schema metadata: it describes the writer's index, which means nothing downstream.
    return pq.read_table(inner, filesystem=fs, columns=columns).replace_schema_metadata(None)


def parquet_dataset(path: PathLike):
    """A parquet file or a directory of parquet files as a ``pyarrow.dataset.Dataset``, whose schema
    and row count come from the footers (files named ``_*`` or ``.*``, such as a writer's
    temporaries, are not part of it)."""
    import pyarrow.dataset as ds

    fs, inner = resolve_filesystem(path)
    return ds.dataset(inner, filesystem=fs, format="parquet")


def parquet_rows(path: PathLike) -> int:
    """Rows of a parquet file or a directory of parquet files, from their footers."""
    return parquet_dataset(path).count_rows()


def write_parquet(table, path: PathLike) -> None:
    """One parquet file at ``path`` (local or any fsspec URL), parent directories created."""
    import pyarrow.parquet as pq

    fs, inner = resolve_filesystem(path)
    if "/" in inner:
        fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    pq.write_table(table, inner, filesystem=fs)
