"""Job reports are written where asked, creating the local directory they need."""

from __future__ import annotations

from jobs.publishing import read_json, write_json


def test_write_json_creates_a_missing_local_directory(tmp_path):
    target = tmp_path / "candidates" / "nested" / "_RUN.json"
    write_json(str(target), {"retriever": "v1", "rows": 3})
    assert read_json(str(target)) == {"retriever": "v1", "rows": 3}
    write_json(f"file://{target}", {"rows": 4})  # and again, over it, through a file:// URL
    assert read_json(str(target)) == {"rows": 4}
