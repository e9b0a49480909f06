"""Storage roots for the storage tests (each test runs on a local path and on a real S3 server), and
versions published on them as the jobs publish theirs."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

from sa2crq.config import SIDConfig
from sa2crq.ids.sid_table import assign_sids
from sa2crq.storage import layout
from sa2crq.storage.filesystem import write_parquet
from sa2crq.storage.publish import Publisher


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A fresh publisher root (a version kind's directory, as jobs give ``Publisher``)."""
    if request.param == "local":
        return str(tmp_path / "published")
    request.getfixturevalue("s3_endpoint")
    bucket = f"publish-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    return f"s3://{bucket}/sids"


FILES = {"catalog/part-00000.parquet": b"catalog rows", "catalog/_SUCCESS": b"", layout.REPORT: b'{"curve": [1, 2, 3, 4, 5, 6, 7, 8]}'}


def publish_files(publisher: Publisher, files: dict[str, bytes], *, meta: dict | None = None) -> str:
    """Publish a version holding ``files`` on top of LATEST, as a job would."""
    version = publisher.new_version()
    for name, data in files.items():
        path = f"{publisher.version_path(version)}/{name}"
        publisher.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        publisher.fs.pipe_file(path, data)
    publisher.publish(version, parent=publisher.latest(), meta=meta)
    return version


def publish_sid_table(publisher: Publisher, item_ids: np.ndarray, codes: np.ndarray) -> str:
    """Publish a version whose sid_table part is the library's own SID table of these items (fixed
    length: an item's SID is its code path, plus a digit where items share the path)."""
    version = publisher.new_version()
    n, levels = codes.shape
    table = assign_sids(item_ids, codes, np.ones(n, dtype=np.int64), np.zeros(n, dtype=np.int8), (8,) * levels,
                        SIDConfig(adaptive_length=False))  # fmt: skip
    write_parquet(table.to_arrow(), f"{publisher.version_url(version)}/{layout.SID_TABLE}/part-00000.parquet")
    publisher.publish(version, parent=publisher.latest(), meta={"job": "recode", "items": n})
    return version
