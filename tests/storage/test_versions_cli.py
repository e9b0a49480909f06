"""``sa2crq versions list|show|diff|verify`` end to end through the command line's ``main``: output,
and exit codes (0 ok, 2 bad input, 4 verification failed), on a local root and an s3:// one."""

from __future__ import annotations

import uuid

import fsspec
import numpy as np
import pytest

from jobs.cli import VERIFY_FAILED, main
from sa2crq.storage import layout
from sa2crq.storage.publish import Publisher
from tests.storage.conftest import FILES, publish_files, publish_sid_table


@pytest.fixture
def store(tmp_path) -> str:
    """A storage root (``storage.root``): SID versions live under ROOT/sids."""
    return str(tmp_path / "store")


def versions(capsys, *args: str) -> tuple[int, str]:
    code = main(["versions", *args])
    return code, capsys.readouterr().out


@pytest.mark.timeout(120)
def test_list_and_show(store, capsys):
    sids = Publisher(f"{store}/sids")
    first = publish_files(sids, FILES, meta={"job": "recode", "items": 3})
    second = publish_files(sids, FILES, meta={"job": "ingest", "items": 5})

    code, out = versions(capsys, "list", "--root", store)
    assert code == 0
    rows = [line for line in out.splitlines() if first in line or second in line]
    assert len(rows) == 2 and "LATEST" in rows[1] and first in rows[1] and "| 5 |" in rows[1]
    code, out = versions(capsys, "list", "--root", store, "--kind", "retrievers")
    assert code == 0 and "no retrievers version is published" in out

    code, out = versions(capsys, "show", "--root", store, "LATEST")
    assert code == 0 and out.startswith(f"version {second} (LATEST)") and f"parent {first}" in out and layout.REPORT in out
    code, _ = versions(capsys, "show", "--root", store, "no-such-version")
    assert code == 2


def test_show_copies_a_versions_report_page_to_a_local_file(store, tmp_path, capsys):
    sids = Publisher(f"{store}/sids")
    without = publish_files(sids, FILES)
    page = b"<!DOCTYPE html><html><body><img alt='SID length by segment'></body></html>"
    with_page = publish_files(sids, {**FILES, layout.REPORT_PAGE: page})
    code, out = versions(capsys, "show", "--root", store, with_page, "--page", str(tmp_path / "pages" / "sids.html"))
    assert code == 0 and out.splitlines()[-1] == f"report page: {tmp_path / 'pages' / 'sids.html'}"
    assert (tmp_path / "pages" / "sids.html").read_bytes() == page
    code, _ = versions(capsys, "show", "--root", store, without, "--page", str(tmp_path / "none.html"))
    assert code == 2 and not (tmp_path / "none.html").exists()


@pytest.mark.fault_scenario(7)
@pytest.mark.timeout(120)
def test_verify_exits_non_zero_naming_the_damaged_file(store, capsys):
    sids = Publisher(f"{store}/sids")
    damaged, intact = publish_files(sids, FILES), publish_files(sids, FILES)
    assert versions(capsys, "verify", "--root", store, "--all")[0] == 0

    sids.fs.pipe_file(f"{sids.version_path(damaged)}/catalog/part-00000.parquet", b"catalog ROWS")
    code, out = versions(capsys, "verify", "--root", store, damaged)
    assert code == VERIFY_FAILED and "sha256  catalog/part-00000.parquet" in out
    code, out = versions(capsys, "verify", "--root", store, intact)
    assert code == 0 and out.startswith(f"ok {intact}")
    code, out = versions(capsys, "verify", "--root", store, "--all")
    assert code == VERIFY_FAILED and f"FAILED {damaged}" in out and f"ok {intact}" in out

    sids.fs.rm(f"{sids.version_path(intact)}/{layout.REPORT}")
    code, out = versions(capsys, "verify", "--root", store, intact)
    assert code == VERIFY_FAILED and f"missing  {layout.REPORT}" in out

    assert versions(capsys, "verify", "--root", store, "no-such-version")[0] == 2  # bad input, not a failed check


@pytest.mark.timeout(120)
def test_diff(store, capsys):
    sids = Publisher(f"{store}/sids")
    codes = np.array([[i, 0] for i in range(4)])
    old = publish_sid_table(sids, np.arange(4), codes)
    new = publish_sid_table(sids, np.arange(1, 6), np.array([[1, 0], [2, 0], [3, 1], [4, 0], [5, 0]]))
    code, out = versions(capsys, "diff", "--root", store, old, new)
    assert code == 0
    assert "added 2, removed 1, in both 3: same SID 2, changed SID 1" in out and "changed  item 3" in out


@pytest.mark.timeout(120)
def test_an_s3_root_through_the_configured_endpoint(s3_endpoint, capsys):
    bucket = f"versions-{uuid.uuid4().hex[:12]}"
    fsspec.filesystem("s3").mkdir(bucket)
    store = f"s3://{bucket}/catalog"
    sids = Publisher(f"{store}/sids")
    version = publish_files(sids, FILES)
    code, out = versions(capsys, "list", "--root", store, "--endpoint-url", s3_endpoint)
    assert code == 0 and version in out and "LATEST" in out
    sids.fs.pipe_file(f"{sids.version_path(version)}/extra.txt", b"x")
    code, out = versions(capsys, "verify", "--root", store, "LATEST")
    assert code == VERIFY_FAILED and "unlisted  extra.txt" in out
    # A reader never creates what it inspects: a mistyped bucket is reported empty, not made.
    missing = f"missing-{uuid.uuid4().hex[:12]}"
    code, out = versions(capsys, "list", "--root", f"s3://{missing}/catalog")
    assert code == 0 and "no sids version is published" in out
    assert not fsspec.filesystem("s3").exists(missing)
