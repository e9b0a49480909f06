"""The jobs on clusters, submitted as users submit them, against the same jobs run embedded.

On this machine, on loopback: a Ray cluster of a head and a worker node (separate ``ray start``
process trees; the head runs the drivers, the worker node the tasks), a Spark standalone master and worker, and the SeaweedFS S3 server.
The Ray jobs go through ``ray job submit`` with a runtime environment (the repository as its
working_dir, the S3 endpoint and credentials as env_vars: the nodes themselves have neither); the
recode's Spark part goes through ``infra/spark/submit-recode.sh`` (spark-submit), run as that Ray
job's entrypoint. Every input is an s3:// URL and every setting a ``--set``, so nothing reaches a
job through the submitting machine's disk. Each cluster run is compared with the embedded run
(``sa2crq <job>``: its own local Ray and local Spark) on the same input and seed.

The module's tests run in file order, as the jobs do: recode, train-retriever, generate, ingest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.generate import PARTS
from jobs.object_store import ensure_bucket
from sa2crq.data.splits import history_requests
from sa2crq.storage import layout
from sa2crq.storage.filesystem import fsspec_filesystem
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion

from tests.conftest import make_catalog  # (this directory has a conftest of its own)
from harness import BIN, REPO, base_environment

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

BUCKET = "s3://cluster-jobs"
EMBEDDED, CLUSTER = f"{BUCKET}/embedded", f"{BUCKET}/cluster"
N_ITEMS, DIM = 400, 16
JOB_TIMEOUT_S = 420
# The job's entrypoint on the cluster: the CLI of the working_dir the job ships (``sa2crq``, the
# console script, would import the copy installed on the nodes; the images' RayJobs use it).
CLI = ["python", "-m", "jobs.cli"]
TOKENIZER = {
    "method": "sa2crq",
    "rqvae": {"codebook_size": 16, "latent_dim": 8, "hidden_dims": [32], "epochs": 8, "batch_size": 128},
    "acrq": {"epochs_per_stage": 3},
}
# Two CPUs in both modes (the embedded Ray's, the cluster's worker node's): the same shards and
# worker groups, so the same results.
RAY = {"ray.train_workers": 2, "ray.cpus_per_train_worker": 0.5, "ray.actors": 2, "ray.cpus_per_actor": 0.5}
RETRIEVER = {
    "model": {"d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "encoder_layers": 1, "decoder_layers": 1},
    "train": {"epochs": 2, "batch_size": 64, "warmup_steps": 5, "max_history": 5, "user_buckets": 50},
}


def _sets(settings: dict) -> list[str]:
    """``--set`` arguments: the whole config on the command line, none of it in a local file."""
    args = []
    for key, value in {"embedding_cache": None, **RAY, **settings}.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    return args


@pytest.fixture(scope="module")
def inputs(s3_endpoint, tmp_path_factory) -> dict[str, str]:
    """The end-to-end tests' catalog (items with their embeddings, heavy-tailed interactions, a
    validation target per user), uploaded: the jobs read s3:// URLs only. The requests come in 30
    row groups (30 generation shards), so the generate stage is long enough to lose a node in."""
    local = tmp_path_factory.mktemp("cluster-inputs")
    catalog = make_catalog(n=N_ITEMS, dim=DIM, clusters=12, seed=3)
    items = pa.table({"item_id": catalog.item_ids, "title": [f"item {i}" for i in catalog.item_ids],
                      "embedding": pa.array([list(map(float, row)) for row in catalog.embeddings], pa.list_(pa.float32()))})  # fmt: skip
    rng = np.random.default_rng(0)
    weights = (catalog.popularity + 0.2) / (catalog.popularity + 0.2).sum()
    users = np.repeat(np.arange(150), 12)
    timestamps = np.tile(np.arange(12), 150)
    interactions = pa.table({"user_id": users, "item_id": rng.choice(catalog.item_ids, size=len(users), p=weights), "timestamp": timestamps})
    new_catalog = make_catalog(n=30, dim=DIM, clusters=12, seed=11)
    new_items = pa.table({"item_id": np.arange(10_000, 10_030, dtype=np.int64), "title": [f"new {i}" for i in range(30)],
                          "embedding": pa.array([list(map(float, row)) for row in new_catalog.embeddings], pa.list_(pa.float32()))})  # fmt: skip
    tables = {
        "items": (items, None),
        "train": (interactions.filter(pa.array(timestamps < 10)), None),
        "valid": (interactions.filter(pa.array(timestamps == 10)), None),
        "requests": (history_requests(interactions.filter(pa.array(timestamps < 11))), 5),
        "new-items": (new_items, None),
    }
    ensure_bucket(BUCKET)
    fs, base = fsspec_filesystem(f"{BUCKET}/input")
    urls = {}
    for name, (table, row_group_size) in tables.items():
        path = local / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        fs.put_file(str(path), f"{base}/{name}.parquet")
        urls[name] = f"{BUCKET}/input/{name}.parquet"
    return urls


def run_embedded(job: str, settings: dict) -> None:
    """``sa2crq <job>`` on this machine as one process: its own local Ray and local Spark (``-m`` so
    that this checkout's code runs, not the venv's editable install)."""
    started = time.monotonic()
    env = {**os.environ, "RAY_ADDRESS": "", "PATH": f"{BIN}:{os.environ['PATH']}", "SPARK_LOCAL_IP": "127.0.0.1"}
    spark_jobs = ("recode", "ingest", "train-retriever")
    done = subprocess.run([sys.executable, "-m", "jobs.cli", job, *_sets({"spark.master": "local[1]", **settings} if job in spark_jobs else settings)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, f"embedded {job} failed ({done.returncode}):\n{done.stderr[-6000:]}"
    print(f"embedded {job}: {time.monotonic() - started:.0f} s")


def runtime_environment(tmp_path: Path, **env_vars: str) -> str:
    """The job's runtime environment as a file for ``ray job submit --runtime-env``: the repository
    (the code the driver and every worker import) and the environment the nodes lack."""
    spec = {
        "working_dir": str(REPO),
        "excludes": [".git", ".venv", ".cache", "out", "*.pyc"],
        "env_vars": {
            "AWS_ENDPOINT_URL": os.environ["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
            "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"], "AWS_DEFAULT_REGION": os.environ["AWS_DEFAULT_REGION"],
            "AWS_EC2_METADATA_DISABLED": "true", "HF_HUB_OFFLINE": "1", **env_vars,
        },
    }  # fmt: skip
    path = tmp_path / f"runtime-env-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return str(path)


def ray_job_submit(ray_cluster, runtime_env: str, entrypoint: list[str]) -> list[str]:
    """The ``ray job submit`` command line (it waits for the job and exits non-zero when it fails)."""
    return [str(BIN / "ray"), "job", "submit", "--address", ray_cluster.dashboard_url, "--runtime-env", runtime_env,
            "--submission-id", f"sa2crq-{uuid.uuid4().hex[:12]}", "--", *entrypoint]  # fmt: skip


def submit(ray_cluster, runtime_env: str, entrypoint: list[str]) -> str:
    started = time.monotonic()
    done = subprocess.run(ray_job_submit(ray_cluster, runtime_env, entrypoint), env=base_environment(), cwd=REPO,
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S)  # fmt: skip
    assert done.returncode == 0, f"{entrypoint[:3]} failed ({done.returncode}):\n{done.stdout[-8000:]}\n{done.stderr[-3000:]}"
    print(f"ray job submit {' '.join(entrypoint[:4])}: {time.monotonic() - started:.0f} s")
    return done.stdout


def staging(spark_cluster) -> dict:
    """Spark's parquet staging (no S3A here: infra/spark/standalone-loopback.conf) on the disk the
    driver and the executor share, and outside the job's working_dir, which Ray may unpack again
    under a running driver (DEVELOPERS.md)."""
    return {"spark.staging_dir": f"{spark_cluster.work_dir}/staging"}


def sid_table(root: str) -> pa.Table:
    publisher = Publisher(f"{root}/sids")
    return PublishedVersion.open(publisher, publisher.latest()).read_parquet(layout.SID_TABLE).sort_by("item_id")


def assert_same_sid_tables(cluster: pa.Table, embedded: pa.Table) -> None:
    assert cluster.num_rows == embedded.num_rows > 0
    assert cluster.column_names == embedded.column_names
    for column in embedded.column_names:  # values and types, bit for bit
        assert cluster.column(column).equals(embedded.column(column)), column


# ------------------------------------------------------------------------------------------------------


def test_recode_through_spark_submit_and_ray_job_submit_publishes_the_embedded_sids(inputs, ray_cluster, spark_cluster, tmp_path):
    """The embedded recode trains a tokenizer and publishes the first version; the cluster recode
    reuses that tokenizer on the same inputs in a copy of the store. A recode that reuses the latest
    version's tokenizer on that version's inputs publishes exactly its SID table (fault scenario 10
    relies on it), so the cluster's table must equal the embedded one bit for bit. (A freshly
    trained tokenizer is not bit-reproducible across runs, embedded or not.)"""
    settings = {"items": inputs["items"], "interactions": inputs["train"], "tokenizer": TOKENIZER}
    run_embedded("recode", {**settings, "storage.root": EMBEDDED})
    first = Publisher(f"{EMBEDDED}/sids").latest()
    fs, embedded_store = fsspec_filesystem(f"{EMBEDDED}/sids")
    fs.copy(embedded_store, fsspec_filesystem(f"{CLUSTER}/sids")[1], recursive=True)

    # The RayJob's shape: the job's driver runs on the Ray head, under spark-submit (client mode).
    runtime_env = runtime_environment(
        tmp_path, SPARK_MASTER=spark_cluster.url, CONFIG="", PROPERTIES="infra/spark/standalone-loopback.conf",
        DIRECT_OBJECT_STORE="false", DRIVER_MEMORY="1g", SPARK_LOCAL_IP="127.0.0.1",
    )  # fmt: skip
    cluster_settings = {**settings, "storage.root": CLUSTER, "reuse_tokenizer": first, **staging(spark_cluster)}
    submit(ray_cluster, runtime_env, ["bash", "infra/spark/submit-recode.sh", *_sets(cluster_settings)])

    publisher = Publisher(f"{CLUSTER}/sids")
    assert publisher.latest() != first and publisher.manifest(publisher.latest()).parent == first
    assert_same_sid_tables(sid_table(CLUSTER), sid_table(EMBEDDED))
    # The Spark stages ran on the standalone cluster's executor, not in the driver.
    assert list(Path(spark_cluster.work_dir, "work").glob("app-*/*/stderr")), "no executor ran on the Spark worker"


def test_train_retriever_through_ray_job_submit_matches_the_embedded_metrics(inputs, ray_cluster, spark_cluster, tmp_path):
    """Its input validation runs on the Spark cluster (the job's own session), its training on the Ray cluster."""
    settings = {"interactions": inputs["train"], "valid": inputs["valid"], **RETRIEVER}
    run_embedded("train-retriever", {**settings, "storage.root": EMBEDDED})
    cluster_settings = {**settings, "storage.root": CLUSTER, "spark.master": spark_cluster.url, **staging(spark_cluster)}
    submit(ray_cluster, runtime_environment(tmp_path, SPARK_LOCAL_IP="127.0.0.1"), [*CLI, "train-retriever", *_sets(cluster_settings)])

    def history(root: str) -> dict:
        publisher = Publisher(f"{root}/retrievers")
        fs, path = fsspec_filesystem(f"{publisher.version_url(publisher.latest())}/{layout.TRAIN_REPORT}")
        return json.loads(fs.cat_file(path))["history"]

    assert_close(history(CLUSTER), history(EMBEDDED), "history")


def assert_close(got, expected, where: str) -> None:
    """Equal structure and values, floats within tolerance; wall times are not results."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for key in expected:
            if "second" not in key:  # wall times and rates
                assert_close(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for k, (a, b) in enumerate(zip(got, expected)):
            assert_close(a, b, f"{where}[{k}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), where
    else:
        assert got == expected, where


def test_generate_survives_losing_a_ray_node_and_publishes_the_embedded_candidates(inputs, ray_cluster, tmp_path):
    """The worker node, where every generation actor runs, is killed outright (its whole process
    tree) once the first shard is written; a replacement node joins, as KubeRay replaces a lost pod,
    and Ray restarts the actors and retries the lost shards. Both runs serve the embedded root's
    retriever, so their candidates must be equal bit for bit."""
    settings = {"requests": inputs["requests"], "storage.root": EMBEDDED, "generation": {"beam_width": 5, "k": 10}}
    run_embedded("generate", {**settings, "out": f"{EMBEDDED}/candidates"})

    out = f"{CLUSTER}/candidates"
    fs, base = fsspec_filesystem(out)
    command = ray_job_submit(ray_cluster, runtime_environment(tmp_path), [*CLI, "generate", *_sets({**settings, "out": out})])
    job = subprocess.Popen(command, env=base_environment(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not fs.glob(f"{base}/versions/*/{PARTS}/*"):
            assert job.poll() is None, f"generate ended before it wrote a shard:\n{job.stdout.read()[-6000:]}"
            assert time.monotonic() < deadline, "generate wrote no shard"
            time.sleep(0.05)
        lost = ray_cluster.kill_worker()
        parts_at_kill = len(fs.glob(f"{base}/versions/*/{PARTS}/*"))
        assert job.poll() is None and parts_at_kill < 30, f"the stage was over when the node was lost ({parts_at_kill} of 30 shards)"
        ray_cluster.add_worker()
        logs, _ = job.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode == 0, f"generate failed after the node was lost:\n{logs[-8000:]}"
    deadline = time.monotonic() + 120
    while not lost <= ray_cluster.worker_nodes("DEAD"):  # the head saw the node go
        assert time.monotonic() < deadline, f"the head never marked {lost} dead"
        time.sleep(1)
    print(f"generate: {parts_at_kill} of 30 shards written when the worker node was killed")

    def candidates(store_url: str) -> pa.Table:
        store = Publisher(store_url)
        return PublishedVersion.open(store, store.latest()).read_parquet(PARTS).sort_by("request_id")

    cluster, embedded = candidates(out), candidates(f"{EMBEDDED}/candidates")
    assert cluster.num_rows == embedded.num_rows == 150
    assert cluster.equals(embedded)


def test_ingest_through_ray_job_submit_on_the_spark_cluster_publishes_the_embedded_sids(inputs, ray_cluster, spark_cluster, tmp_path):
    """The RayJob's shape without spark-submit: the job's own Spark session submits to the cluster master."""
    settings = {"items": inputs["new-items"]}
    run_embedded("ingest", {**settings, "storage.root": EMBEDDED})
    runtime_env = runtime_environment(tmp_path, SPARK_LOCAL_IP="127.0.0.1")
    submit(ray_cluster, runtime_env, [*CLI, "ingest", *_sets({**settings, "storage.root": CLUSTER, "spark.master": spark_cluster.url, **staging(spark_cluster)})])

    cluster, embedded = sid_table(CLUSTER), sid_table(EMBEDDED)
    assert pc.sum(pc.greater_equal(cluster.column("item_id"), 10_000)).as_py() == 30
    assert_same_sid_tables(cluster, embedded)
