"""Faults injected into whole jobs on the real engines (issue 11, scenarios 8 and 9): local Spark,
local Ray and a real S3 server, on a store whose first SID version a real recode published.

8. Two ingests and a recode at once: each publishes on a consistent parent or refuses cleanly
   (a conflict, the churn guard), the commit log stays one chain, and no published item is lost.
9. The local staging disk full: the job, run as a separate process whose file-size limit
   (RLIMIT_FSIZE, with SIGXFSZ ignored, so writes fail with EFBIG) stands in for a full disk, exits
   with a clear error naming the staging directory, publishes nothing, and the previous version
   stays latest and whole; rerun with room, the same job publishes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.cli import REFUSED, STAGING_DISK_FULL, main
from jobs.config import load_job_config
from jobs.ingest import run_ingest
from jobs.recode import run_recode
from sa2crq.storage import layout
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion

from tests.conftest import make_catalog

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow_fault, pytest.mark.usefixtures("s3_endpoint", "spark", "ray_local")]

REPO = Path(__file__).resolve().parents[2]
ROOT = "s3://jobs-faults/catalog"
SIDS = f"{ROOT}/sids"
N_ITEMS, DIM, BATCH = 300, 16, 5
TOKENIZER = {
    "method": "sa2crq",
    "rqvae": {"codebook_size": 16, "latent_dim": 8, "hidden_dims": [32], "epochs": 6, "batch_size": 128},
    "acrq": {"epochs_per_stage": 2},
}
# One actor per pool: three jobs at once must fit the suite's two Ray CPUs beside their read stages.
COMMON = {"storage.root": ROOT, "ray.train_workers": 2, "ray.cpus_per_train_worker": 0.5, "ray.actors": 1, "ray.cpus_per_actor": 0.5}


def _assign(overrides: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in {**COMMON, **overrides}.items()]


def _items(first_id: int, n: int, seed: int, prefix: str) -> pa.Table:
    catalog = make_catalog(n=n, dim=DIM, clusters=10, seed=seed)
    return pa.table({
        "item_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "title": [f"{prefix} {i}" for i in range(n)],
        "embedding": pa.array([list(map(float, row)) for row in catalog.embeddings], pa.list_(pa.float32())),
    })  # fmt: skip


def _sid_table(version: str) -> pa.Table:
    return PublishedVersion.open(Publisher(SIDS), version).read_parquet(layout.SID_TABLE).sort_by("item_id")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    """The store's first SID version, published by a real recode, and the inputs it came from."""
    work = tmp_path_factory.mktemp("job-faults")
    items = _items(0, N_ITEMS, seed=4, prefix="item")
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(100), 10)
    interactions = pa.table({"user_id": users, "item_id": rng.integers(0, N_ITEMS, len(users)), "timestamp": np.tile(np.arange(10), 100)})
    paths = {"items": str(work / "items.parquet"), "interactions": str(work / "interactions.parquet")}
    pq.write_table(items, paths["items"])
    pq.write_table(interactions, paths["interactions"])
    done = run_recode(load_job_config("recode", None, _assign({**paths, "tokenizer": TOKENIZER})))
    assert done.published
    return {"version": done.version, "work": work, **paths}


def _version_dirs(publisher: Publisher) -> set[str]:
    """Versions (published or not) with files under the store."""
    return {p.split("/versions/", 1)[1].split("/", 1)[0] for p in publisher.fs.find(f"{publisher.root}/versions")}


def _batch(base: dict, name: str, first_id: int, seed: int) -> str:
    """A day's batch of new items: few beside the catalog, as in production."""
    path = str(base["work"] / f"{name}.parquet")
    pq.write_table(_items(first_id, BATCH, seed=seed, prefix=name), path)
    return path


@pytest.mark.fault_scenario(8)
def test_two_ingests_and_a_recode_at_once_publish_one_chain_and_lose_nothing(base, capsys):
    parent = Publisher(SIDS).latest()
    batches = {"a": _batch(base, "batch-a", 10_000, 21), "b": _batch(base, "batch-b", 20_000, 22)}
    # The nightly recode's snapshot already holds the day's new items; it reuses the published tokenizer.
    snapshot = str(base["work"] / "snapshot.parquet")
    pq.write_table(pa.concat_tables([pq.read_table(p) for p in (base["items"], *batches.values())]), snapshot)
    recode = _assign({"items": snapshot, "interactions": base["interactions"], "tokenizer": TOKENIZER, "reuse_tokenizer": parent})
    summary = base["work"] / "recode-summary.json"
    ingests: dict[str, object] = {}
    recode_exit: list[int] = []
    start = threading.Barrier(3)

    def ingest(name: str) -> None:
        start.wait()
        try:
            ingests[name] = run_ingest(load_job_config("ingest", None, _assign({"items": batches[name]})))
        except BaseException as err:  # judged below
            ingests[name] = err

    def recode_as_an_operator_would() -> None:  # the command line: its exit code and message are what is promised
        start.wait()
        recode_exit.append(main(["recode", *(arg for a in recode for arg in ("--set", a)), "--summary-json", str(summary)]))

    threads = [threading.Thread(target=ingest, args=(name,)) for name in batches] + [threading.Thread(target=recode_as_an_operator_would)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # The ingests rebuild on whatever committed first: each publishes (or finds its items published by the recode).
    for name, outcome in ingests.items():
        assert not isinstance(outcome, BaseException), f"ingest {name}: {outcome!r}"
    published = [o.version for o in ingests.values() if o.published]
    # The recode, which does not rebuild, publishes or is refused cleanly: exit 3 naming why, nothing published.
    assert recode_exit in ([0], [REFUSED]), recode_exit
    if recode_exit == [0]:
        published.append(json.loads(summary.read_text())["version"])
    else:
        refusal = capsys.readouterr().err
        assert "refused: " in refusal and ("was committed as" in refusal or "the latest version is" in refusal or "exceeds the limit" in refusal)
    commits = Publisher(SIDS).commits()
    # One chain: each commit's parent is the version the commit before it names, and nothing published was lost.
    versions = [c.version for c in commits]
    assert versions[0] == base["version"] and set(published) <= set(versions) and len(set(versions)) == len(versions)
    assert [c.parent for c in commits[1:]] == versions[:-1]
    assert all(Publisher(SIDS).manifest(c.version).parent == c.parent for c in commits)

    if recode_exit == [REFUSED]:  # its rerun publishes on the new latest
        rerun = run_recode(load_job_config("recode", None, recode))
        assert rerun.published and Publisher(SIDS).manifest(rerun.version).parent == versions[-1]
    latest = _sid_table(Publisher(SIDS).latest())
    ids = set(latest.column("item_id").to_pylist())
    assert set(range(N_ITEMS)) | set(range(10_000, 10_000 + BATCH)) | set(range(20_000, 20_000 + BATCH)) <= ids
    before = _sid_table(base["version"])  # the base version is intact, and read whole
    assert before.num_rows == N_ITEMS


# A job with the local disk "full": Ray (the suite's, attached to) and Spark are up before the
# file-size limit, so the limit meets the job's own writes to the staging directory, not the
# engines' start. SIGXFSZ is ignored (Python does so itself; said here for the reader), so a write
# past the limit fails with EFBIG instead of killing the process.
FULL_DISK_JOB = r"""
import resource, signal, sys
import ray
from pyspark.sql import SparkSession
from jobs.cli import main

ray_address, config, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
ray.init(address=ray_address, log_to_driver=False)
SparkSession.builder.master("local[1]").config("spark.ui.enabled", "false").getOrCreate()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["ingest", "--config", config]))
"""


@pytest.mark.fault_scenario(9)
def test_a_full_staging_disk_stops_the_ingest_clearly_and_publishes_nothing(base, tmp_path):
    import ray

    publisher = Publisher(SIDS)
    before, latest, written = publisher.versions(), publisher.latest(), _version_dirs(publisher)
    staging = tmp_path / "staging"
    overrides = {"items": _batch(base, "batch-full", 30_000, 23), "storage": {"root": ROOT}, "spark": {"staging_dir": str(staging)},
                 "ray": {"actors": 1, "cpus_per_actor": 0.5}}  # fmt: skip
    config = tmp_path / "ingest.json"
    config.write_text(json.dumps(overrides))
    job = subprocess.run([sys.executable, "-c", FULL_DISK_JOB, ray.get_runtime_context().gcs_address, str(config), "512"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert job.returncode == STAGING_DISK_FULL, job.stderr[-3000:]
    # One error line, no traceback (Ray's driver also complains that its log file may not grow).
    [error] = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in job.stderr
    assert error.startswith(f"error: the local disk under the Spark staging directory {staging} (spark.staging_dir) is full (File too large)")
    assert error.endswith("then run the job again; nothing was published")
    fresh = Publisher(SIDS)
    assert fresh.versions() == before and fresh.latest() == latest
    assert _version_dirs(fresh) == written  # its attempt discarded
    assert not [p for p in staging.rglob("*") if p.is_file()]  # its staged files removed
    table = _sid_table(latest)  # the previous version is whole

    # With room again the same ingest publishes on it, every published item's SID unchanged.
    done = run_ingest(load_job_config("ingest", str(config), []))
    assert done.published and fresh.manifest(done.version).parent == latest
    after = _sid_table(done.version)
    kept = after.filter(pc.is_in(after.column("item_id"), value_set=table.column("item_id")))
    assert kept.column("sid").to_pylist() == table.column("sid").to_pylist()
    assert after.num_rows == table.num_rows + BATCH
