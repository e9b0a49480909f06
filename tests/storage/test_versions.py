"""Inspecting a store (sa2crq/storage/versions.py): versions listed from the commit log, verification
that names every damaged, missing or unlisted file, and the SID diff between two published tables."""

from __future__ import annotations

import numpy as np
import pytest

from sa2crq.storage import layout
from sa2crq.storage.publish import LATEST, MANIFEST, Publisher
from sa2crq.storage.versions import (
    diff_sid_versions,
    format_check,
    format_sid_diff,
    format_version_detail,
    format_version_list,
    list_versions,
    show_version,
    verify_version,
)
from tests.storage.conftest import FILES, publish_files, publish_sid_table

@pytest.mark.timeout(120)
def test_list_shows_every_published_version_with_its_parent_and_marks_latest(root):
    publisher = Publisher(root)
    first = publish_files(publisher, FILES, meta={"job": "recode", "items": 3})
    second = publish_files(publisher, {"sid_table/part-0.parquet": b"x" * 2000}, meta={"job": "ingest", "items": 4})
    publisher.new_version()  # an unpublished attempt: not a version

    summaries = list_versions(Publisher(root))
    assert [(s.commit, s.version, s.parent, s.latest) for s in summaries] == [(0, first, None, False), (1, second, first, True)]
    assert [(s.job, s.items, s.files) for s in summaries] == [("recode", 3, 3), ("ingest", 4, 1)]
    assert summaries[0].size == sum(len(data) for data in FILES.values()) and summaries[1].size == 2000
    rows = format_version_list(summaries).splitlines()
    assert first in rows[2] and "LATEST" not in rows[2]
    assert second in rows[3] and first in rows[3] and "LATEST" in rows[3] and "2.0 KiB" in rows[3]


@pytest.mark.timeout(120)
def test_show_gives_the_manifest_by_part_the_meta_and_the_report(root):
    publisher = Publisher(root)
    version = publish_files(publisher, FILES, meta={"job": "recode", "items": 3})
    detail = show_version(publisher, LATEST)
    assert detail.summary.version == version and detail.summary.latest
    assert [(p.name, p.files, p.size) for p in detail.parts] == [("catalog", 2, 12), (layout.REPORT, 1, len(FILES[layout.REPORT]))]
    assert detail.report == {"curve": [1, 2, 3, 4, 5, 6, 7, 8]}
    text = format_version_detail(detail)
    assert "catalog/ (2 files)" in text and '"items": 3' in text and "... 2 more" in text  # the list abridged
    assert "catalog/_SUCCESS" in format_version_detail(detail, every_file=True)
    with pytest.raises(ValueError, match="not a published version"):
        show_version(publisher, "no-such-version")


@pytest.mark.timeout(120)
def test_verify_passes_on_an_untouched_version(root):
    publisher = Publisher(root)
    version = publish_files(publisher, FILES)
    check = verify_version(Publisher(root), version)
    assert check.ok and check.checked == 3 and format_check(check).startswith("ok ")


@pytest.mark.fault_scenario(7)
@pytest.mark.timeout(120)
def test_verify_names_each_file_changed_deleted_or_added_after_publish(root):
    publisher = Publisher(root)
    version = publish_files(publisher, FILES)
    base = publisher.version_path(version)
    publisher.fs.pipe_file(f"{base}/catalog/part-00000.parquet", b"catalog ROWS")  # same size, other bytes
    publisher.fs.pipe_file(f"{base}/{layout.REPORT}", b"{}")  # other size
    publisher.fs.rm(f"{base}/catalog/_SUCCESS")
    publisher.fs.pipe_file(f"{base}/catalog/part-00001.parquet", b"smuggled")

    check = verify_version(publisher, version)
    assert not check.ok
    assert {(p.path, p.kind) for p in check.problems} == {
        ("catalog/part-00000.parquet", "sha256"),
        (layout.REPORT, "size"),
        ("catalog/_SUCCESS", "missing"),
        ("catalog/part-00001.parquet", "unlisted"),
    }
    text = format_check(check)
    assert text.startswith(f"FAILED {version}: 4 problems")
    assert "catalog/part-00001.parquet: present (8 bytes) but not in the manifest" in text


@pytest.mark.timeout(120)
def test_verify_reports_a_lost_manifest_and_refuses_an_unpublished_version(root):
    publisher = Publisher(root)
    version = publish_files(publisher, FILES)
    attempt = publisher.new_version()
    with pytest.raises(ValueError, match="not a published version"):
        verify_version(publisher, attempt)
    publisher.fs.rm(f"{publisher.version_path(version)}/{MANIFEST}")
    check = verify_version(publisher, version)
    assert [(p.path, p.kind) for p in check.problems] == [(MANIFEST, "manifest")]


@pytest.mark.timeout(120)
def test_diff_counts_added_removed_kept_and_changed_sids(root):
    publisher = Publisher(root)
    codes = np.array([[i // 8, i % 8] for i in range(10)])  # ten distinct paths: no digits
    old = publish_sid_table(publisher, np.arange(10), codes)
    # Items 0 and 1 leave, 100-102 arrive (new paths), and item 5 moves onto item 6's path: both now
    # need a digit, so both change SID and grow by one token; the other six keep theirs.
    new_codes = codes[2:].copy()
    new_codes[5 - 2] = codes[6]
    new_ids = np.concatenate([np.arange(2, 10), [100, 101, 102]])
    new = publish_sid_table(publisher, new_ids, np.concatenate([new_codes, [[5, 0], [5, 1], [5, 2]]]))

    diff = diff_sid_versions(publisher, old, new)
    counts = {k: diff.counts[k] for k in ("previous", "current", "common", "added", "removed", "unchanged", "changed")}
    assert counts == {"previous": 10, "current": 11, "common": 8, "added": 3, "removed": 2, "unchanged": 6, "changed": 2}
    assert diff.counts["churn"] == pytest.approx(2 / 8)
    assert (diff.longer, diff.shorter) == (2, 0)
    assert sorted(zip(diff.remap.column("item_id").to_pylist(), diff.remap.column("change").to_pylist())) == [
        (0, "removed"), (1, "removed"), (5, "changed"), (6, "changed"), (100, "added"), (101, "added"), (102, "added"),
    ]  # fmt: skip
    text = format_sid_diff(diff, examples=3)
    assert "added 3, removed 2, in both 8: same SID 6, changed SID 2 (churn 25.00%; 2 longer, 0 shorter" in text
    assert "first 3 of 7 rows" in text
