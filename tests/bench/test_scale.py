"""The scale benchmark's own parts: the seeded synthetic catalog and the peak-memory probe.
(The jobs it runs are tested end to end in tests/jobs.)"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs.bench_scale import PeakMemory, write_synthetic_catalog


def test_synthetic_catalog_is_seeded_and_consistent(tmp_path):
    first = write_synthetic_catalog(tmp_path / "a", 3000, seed=4, requests=200)
    again = write_synthetic_catalog(tmp_path / "b", 3000, seed=4, requests=200)
    tables = {name: pq.read_table(path) for name, path in first["paths"].items()}
    for name, path in again["paths"].items():
        assert pq.read_table(path).equals(tables[name]), name
    assert {name: table.num_rows for name, table in tables.items()} == first["rows"]

    items, train, valid = tables["items"], tables["train"], tables["valid"]
    embeddings = np.stack(items.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # Zipf traffic: a few items carry much of it, many are never seen (cold).
    counts = np.bincount(train.column("item_id").to_numpy(), minlength=3000)
    assert np.sort(counts)[-30:].sum() > 0.2 * counts.sum() and (counts == 0).mean() > 0.3
    # One validation item per user, after all of that user's training items.
    assert valid.num_rows == len(np.unique(valid.column("user_id").to_numpy()))
    last_train = {u: t for u, t in zip(train.column("user_id").to_pylist(), train.column("timestamp").to_pylist())}
    assert all(t > last_train[u] for u, t in zip(valid.column("user_id").to_pylist(), valid.column("timestamp").to_pylist()))
    # New items are new; request histories are the users' last (up to 8) training items.
    new_ids = tables["new_items"].column("item_id").to_numpy()
    assert len(new_ids) == 30 and new_ids.min() >= 3000
    by_user: dict[int, list[int]] = {}
    for u, i in zip(train.column("user_id").to_pylist(), train.column("item_id").to_pylist()):
        by_user.setdefault(u, []).append(i)
    for user, history in zip(tables["requests"].column("user_id").to_pylist(), tables["requests"].column("history").to_pylist()):
        assert history == by_user[user][-8:]


@pytest.mark.timeout(60)
def test_peak_memory_sees_the_process_and_its_largest_child():
    # A parent holding ~10 MiB starts a child that holds ~200 MiB, then both exit.
    script = (
        "import subprocess, sys\n"
        "held = bytearray(10 << 20)\n"
        "subprocess.run([sys.executable, '-c', 'import time; x = bytearray(200 << 20); time.sleep(1.0)'], check=True)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script])
    with PeakMemory(process.pid, every=0.05) as memory:
        process.wait()
    assert process.returncode == 0
    assert 10 < memory.driver_mib < 150
    assert memory.largest_child_mib > 200 and memory.largest_child.startswith("python")
    assert memory.child_mib_by_name == {memory.largest_child: memory.largest_child_mib}
