"""Parquet shard by shard on a Ray Data actor pool: stable shard names, one output per shard, resume, S3."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray.cloudpickle

from ray_workers.shards import Shard, input_fingerprint, list_shards, map_shards

# (relative path, rows, rows per row group) of the input files; the hidden ones must be ignored.
LAYOUT = [("part-0.parquet", 25, 10), ("part-1.parquet", 7, 10), ("more/part-0.parquet", 12, 4)]
HIDDEN = [".part-9.parquet.tmp", "_SUCCESS", "_temporary/part-5.parquet", ".staging.parquet"]

# pytest imports this file as the top-level module `test_shards` (tests/ has no __init__.py), which Ray's
# workers cannot import: ship its stage factories by value instead of by reference.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def scaled_stage(factor: int, failing_item: int | None = None, seconds: float = 0.0) -> Callable[[pa.Table], pa.Table]:
    """A stand-in stage: adds ``value * factor`` as ``scaled``, taking ``seconds`` a shard; fails on
    the shard holding ``failing_item``."""

    def scale(table: pa.Table) -> pa.Table:
        time.sleep(seconds)
        if failing_item in table["item_id"].to_pylist():
            raise RuntimeError(f"item {failing_item} is bad")
        return table.append_column("scaled", pc.multiply(table["value"], factor))

    return scale


def _items(first: int, rows: int) -> pa.Table:
    ids = np.arange(first, first + rows, dtype=np.int64)
    return pa.table({"item_id": ids, "value": ids * 3, "tag": [f"t{i % 4}" for i in ids]})


def _write_inputs(write: Callable[[pa.Table, str, int], None]) -> pa.Table:
    """Writes LAYOUT (and junk that must be skipped) through ``write(table, relative_path, row_group_size)``."""
    tables, first = [], 0
    for relative, rows, group in LAYOUT:
        tables.append(_items(first, rows))
        write(tables[-1], relative, group)
        first += rows
    for relative in HIDDEN:
        write(_items(10_000, 3), relative, 3)
    return pa.concat_tables(tables)


def _write_local(root: Path) -> Callable[[pa.Table, str, int], None]:
    def write(table: pa.Table, relative: str, group: int) -> None:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, root / relative, row_group_size=group)

    return write


def _expected_names() -> list[str]:
    names = []
    for relative, rows, group in LAYOUT:
        stem = relative.removesuffix(".parquet").replace("/", "-")
        names += [f"{stem}-rg{g:05d}" for g in range(-(-rows // group))]
    return sorted(names)


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.glob("*.parquet"))}


def test_list_shards_names_every_row_group_stably_and_in_order(tmp_path):
    _write_inputs(_write_local(tmp_path))
    shards = list_shards(str(tmp_path))

    assert [s.name for s in shards] == _expected_names()
    assert shards == list_shards(f"file://{tmp_path}")
    assert Shard("more-part-0-rg00002", str(tmp_path / "more/part-0.parquet"), 2) in shards
    rows = sum(pq.ParquetFile(s.path).metadata.row_group(s.row_group).num_rows for s in shards)
    assert rows == sum(r for _, r, _ in LAYOUT)
    assert [s.name for s in list_shards(str(tmp_path / "part-1.parquet"))] == ["part-1-rg00000"]
    with pytest.raises(FileNotFoundError):
        list_shards(str(tmp_path / "missing"))


def test_input_fingerprint_covers_the_content_and_paths_list_shards_reads(tmp_path):
    _write_inputs(_write_local(tmp_path / "a"))
    _write_inputs(_write_local(tmp_path / "b"))
    fingerprint = input_fingerprint(str(tmp_path / "a"))
    assert fingerprint.startswith("sha256:") and fingerprint == input_fingerprint(str(tmp_path / "b"))  # where it lies does not count
    (tmp_path / "a" / "_SUCCESS").write_bytes(b"marker")  # hidden files are not input
    assert input_fingerprint(str(tmp_path / "a")) == fingerprint
    pq.write_table(_items(0, 25).set_column(1, "value", pa.array(np.zeros(25, np.int64))), tmp_path / "b" / "part-0.parquet", row_group_size=10)
    assert input_fingerprint(str(tmp_path / "b")) != fingerprint  # one file's content changed
    (tmp_path / "a" / "more").rename(tmp_path / "a" / "other")
    assert input_fingerprint(str(tmp_path / "a")) != fingerprint  # same bytes, other shard names


@pytest.mark.timeout(180)
def test_map_shards_writes_each_shard_once_and_resumes_after_a_failure(tmp_path, ray_local):
    expected = _write_inputs(_write_local(tmp_path / "in"))
    out = tmp_path / "out"
    names = [f"{n}.parquet" for n in _expected_names()]

    def run(**failing):
        return map_shards(str(tmp_path / "in"), str(out), scaled_stage, {"factor": 2, **failing}, actors=2, desc="scale")

    with pytest.raises(Exception, match="item 30 is bad"):
        run(failing_item=30)
    assert not (out / "part-1-rg00000.parquet").exists()  # item 30's shard

    # Which other shards the failed run finished depends on timing; the rerun does exactly the rest.
    resumed = run()
    assert resumed.shards_total == len(names) and resumed.shards_done >= 1
    assert resumed.shards_done + resumed.shards_skipped == len(names)
    assert resumed.rows_in == resumed.rows_out
    # Dot-named temporaries of actors killed with the failed run may remain; readers skip them.
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == names
    got = pq.read_table(out).sort_by("item_id")
    assert got.column_names == ["item_id", "value", "tag", "scaled"]
    assert got.select(["item_id", "value", "tag"]).equals(expected)
    assert got["scaled"].to_pylist() == [2 * v for v in expected["value"].to_pylist()]

    written = _snapshot(out)
    again = run()
    assert (again.shards_done, again.shards_skipped, again.rows_in) == (0, len(names), 0)
    assert _snapshot(out) == written

    redo = "more-part-0-rg00001.parquet"
    (out / redo).unlink()
    third = run()
    assert (third.shards_done, third.shards_skipped, third.rows_in, third.rows_out) == (1, len(names) - 1, 4, 4)
    after = _snapshot(out)
    assert {name: v for name, v in after.items() if name != redo} == {n: v for n, v in written.items() if n != redo}
    assert after[redo][1] == written[redo][1]  # the same bytes again: the output is a function of the shard


@pytest.mark.fault_scenario(5)
@pytest.mark.slow_fault
@pytest.mark.timeout(240)
def test_map_shards_survives_an_actor_killed_mid_shard(tmp_path, ray_local):
    """Ray Data restarts a dead pool actor and retries its shard (its actors run with max_restarts and
    max_task_retries -1 unless told otherwise): the stage completes, every shard counted once, with
    the output of an undisturbed run. The stages embed, encode and generate all run on map_shards."""
    from ray._private.state import actors  # the GCS's actor table: works without the dashboard

    expected = _write_inputs(_write_local(tmp_path / "in"))
    names = [f"{n}.parquet" for n in _expected_names()]
    out = tmp_path / "out"
    killed: list[int] = []

    def kill_an_actor_mid_shard() -> None:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.parquet")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # both actors are half-way through their next shard (a second each)
        pool = [a["Pid"] for a in actors(actor_state_name="ALIVE").values() if a["ActorClassName"].startswith("MapWorker(")]
        if pool and time.monotonic() < deadline:
            os.kill(pool[0], signal.SIGKILL)
            killed.append(pool[0])

    killer = threading.Thread(target=kill_an_actor_mid_shard, daemon=True)
    killer.start()
    result = map_shards(str(tmp_path / "in"), str(out), scaled_stage, {"factor": 2, "seconds": 1.0}, actors=2, desc="scale")
    killer.join()

    assert killed, "no pool actor was killed while the stage ran"
    assert (result.shards_total, result.shards_done, result.shards_skipped) == (len(names), len(names), 0)
    assert result.rows_in == result.rows_out == expected.num_rows  # each shard counted once
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == names
    undisturbed = scaled_stage(2)  # what each shard's output is, the stage applied to it in this process
    for shard in list_shards(str(tmp_path / "in")):
        assert pq.read_table(out / f"{shard.name}.parquet").equals(undisturbed(pq.ParquetFile(shard.path).read_row_group(shard.row_group))), shard.name


@pytest.mark.timeout(180)
def test_map_shards_on_s3(s3_endpoint, ray_local):
    import fsspec

    s3 = fsspec.filesystem("s3")
    bucket = f"shards-{uuid.uuid4().hex[:8]}"
    s3.mkdir(bucket)

    def write(table: pa.Table, relative: str, group: int) -> None:
        with s3.open(f"{bucket}/in/{relative}", "wb") as f:
            pq.write_table(table, f, row_group_size=group)

    expected = _write_inputs(write)
    # The actors learn the endpoint as a job's do: AWS_ENDPOINT_URL, set before Ray started (ray_local
    # depends on s3_endpoint), inherited by every worker.
    in_url, out_url = f"s3://{bucket}/in", f"s3://{bucket}/out"

    def run():
        return map_shards(in_url, out_url, scaled_stage, {"factor": 5}, actors=2, desc="scale-s3")

    total = len(_expected_names())
    first = run()
    assert (first.shards_done, first.rows_in, first.rows_out) == (total, expected.num_rows, expected.num_rows)
    listed = sorted(p.rsplit("/", 1)[-1] for p in s3.ls(f"{bucket}/out", refresh=True))
    assert listed == [f"{n}.parquet" for n in _expected_names()]
    got = pq.read_table(f"{bucket}/out", filesystem=s3).sort_by("item_id")
    assert got["scaled"].to_pylist() == [5 * v for v in expected["value"].to_pylist()]

    assert run().shards_skipped == total
    # Deleted by another process: this process's s3fs has the listing cached and must not trust it.
    fsspec.filesystem("s3", skip_instance_cache=True).rm(f"{bucket}/out/part-0-rg00002.parquet")
    third = run()
    assert (third.shards_done, third.shards_skipped, third.rows_in) == (1, total - 1, 5)
