"""A recode's run key and the attempt a rerun resumes (jobs.recode_attempts), on a local store: no engines."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.config import load_job_config
from jobs.recode_attempts import open_attempt, run_key
from sa2crq.storage import layout
from sa2crq.storage.publish import Publisher


def _config(tmp_path, *assignments: str):
    return load_job_config("recode", None, [f"items={tmp_path / 'items.parquet'}", f"interactions={tmp_path / 'train.parquet'}",
                                            f"storage.root={tmp_path / 'store'}", *assignments])  # fmt: skip


def _write_inputs(tmp_path, users: int = 5) -> None:
    pq.write_table(pa.table({"item_id": [1, 2, 3], "title": ["a", "b", "c"]}), tmp_path / "items.parquet")
    pq.write_table(pa.table({"user_id": list(range(users)), "item_id": [1] * users, "timestamp": [0] * users}), tmp_path / "train.parquet")


def test_the_run_key_changes_with_what_decides_the_output_and_only_with_that(tmp_path):
    _write_inputs(tmp_path)
    key = run_key(_config(tmp_path), parent="v1")
    assert key.startswith("sha256:") and run_key(_config(tmp_path), parent="v1") == key
    # Where and how the engines run, and the publish limits, do not decide a stage's output.
    same = ["spark.driver_memory=4g", "ray.actors=4", "ray.num_cpus=8", "embedding_cache=/elsewhere", "churn_limit=0.5"]
    for setting in same:
        assert run_key(_config(tmp_path, setting), parent="v1") == key, setting
    for setting in ["tokenizer.rqvae.seed=7", "shards=8", "window_start=5", "reuse_tokenizer=v0", "ray.train_workers=1"]:
        assert run_key(_config(tmp_path, setting), parent="v1") != key, setting
    assert run_key(_config(tmp_path), parent="v2") != key
    _write_inputs(tmp_path, users=6)  # the same paths, other interactions
    assert run_key(_config(tmp_path), parent="v1") != key


def test_a_rerun_resumes_the_attempt_of_its_key_and_another_key_starts_fresh(tmp_path):
    publisher = Publisher(str(tmp_path / "store" / "sids"))
    first = open_attempt(publisher, "sha256:a", parent=None)
    assert first.resumed == () and publisher.unpublished() == [first.version]
    first.complete("split", {"items": {"rows_out": 3}})
    first.complete("embed", {"rows": 3})
    publisher.fs.pipe_file(f"{publisher.version_path(first.version)}/{layout.STAGES}/tokenizer.json", b'{"fit": ')  # killed mid-write

    again = open_attempt(publisher, "sha256:a", parent=None)
    assert again.version == first.version and again.resumed == ("split", "embed")
    assert again.record("split") == {"items": {"rows_out": 3}} and not again.done("tokenizer")

    other = open_attempt(publisher, "sha256:b", parent=None)  # another config or input
    assert other.version != first.version and other.resumed == ()
    assert publisher.unpublished() == [first.version, other.version]  # another run's attempt is left alone


def test_attempts_that_can_never_publish_are_discarded_and_published_versions_kept(tmp_path):
    publisher = Publisher(str(tmp_path / "store" / "sids"))
    stale = open_attempt(publisher, "sha256:a", parent=None)
    in_flight = publisher.new_version()  # no run record: another job's (an ingest's) directory
    published = publisher.new_version()
    publisher.fs.pipe_file(f"{publisher.version_path(published)}/report.json", b"{}")
    publisher.publish(published, parent=None)

    fresh = open_attempt(publisher, "sha256:a", parent=published)  # the same config on the new latest version
    assert fresh.version not in (stale.version, published) and fresh.resumed == ()
    assert publisher.unpublished() == [in_flight, fresh.version]  # the attempt on the old parent is gone
    assert publisher.versions() == [published] and publisher.fs.cat_file(f"{publisher.version_path(published)}/report.json") == b"{}"

    # Two attempts of one key (a rerun that missed the first): the newest is resumed, the older discarded.
    duplicate = publisher.new_version()
    publisher.fs.makedirs(f"{publisher.version_path(duplicate)}/{layout.STAGES}")
    publisher.fs.pipe_file(f"{publisher.version_path(duplicate)}/{layout.STAGES}/run.json", b'{"key": "sha256:a", "parent": "%s"}' % published.encode())
    resumed = open_attempt(publisher, "sha256:a", parent=published)
    assert resumed.version == duplicate and publisher.unpublished() == [in_flight, duplicate]


def test_an_input_rewritten_with_the_same_content_starts_a_fresh_attempt(tmp_path):
    import os

    _write_inputs(tmp_path)
    key = run_key(_config(tmp_path), parent="v1")
    stat = os.stat(tmp_path / "train.parquet")
    os.utime(tmp_path / "train.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten, same bytes
    assert run_key(_config(tmp_path), parent="v1") != key
    assert run_key(_config(tmp_path, "ray.train_max_failures=0"), parent="v1") == run_key(_config(tmp_path), parent="v1")
