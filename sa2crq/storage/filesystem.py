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
    import fsspec

    fs, inner = fsspec.core.url_to_fs(text)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
