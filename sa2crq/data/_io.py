"""Resolve a local path or any fsspec URL to a filesystem pyarrow can read and write through."""

from __future__ import annotations

import os

import fsspec
import pyarrow.fs as pafs
from fsspec.implementations.local import LocalFileSystem as FsspecLocalFileSystem

PathLike = str | os.PathLike[str]


def resolve_filesystem(path: PathLike) -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path_within_it)`` for a local path or a URL such as ``s3://bucket/key``.

    Local paths get pyarrow's native filesystem (memory-mapped, multi-threaded reads); anything else goes
    through fsspec, so every protocol fsspec knows (s3fs, gcsfs, memory://, ...) works unchanged.
    """
    fs, inner = fsspec.core.url_to_fs(os.fspath(path))
    if isinstance(fs, FsspecLocalFileSystem):
        return pafs.LocalFileSystem(), inner
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), inner
