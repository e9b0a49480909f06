"""Session fixtures of the cluster tests: a Ray cluster and a Spark standalone cluster on loopback,
started once and stopped at the end of the session, also when a test or a start fails."""

from __future__ import annotations

import pytest

from harness import RayCluster, SparkCluster


@pytest.fixture(scope="session")
def cluster_logs(tmp_path_factory):
    """Every node's output, for the failure messages."""
    return tmp_path_factory.mktemp("cluster-logs")


@pytest.fixture(scope="session")
def ray_cluster(cluster_logs):
    """A head (no CPUs: the drivers) and a worker node of 2 CPUs (``ray start``); the job server on the head's dashboard."""
    cluster = RayCluster(cluster_logs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def spark_cluster(cluster_logs):
    """A Spark standalone master and one worker of one core."""
    cluster = SparkCluster(cluster_logs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
