"""Typed configuration of the jobs: one frozen dataclass per job, sections shared between them.

Precedence, lowest to highest: the dataclass defaults, a YAML or JSON config file (``--config``), then
``--set section.field=value`` on the command line. An unknown field is an error that names it; each
section validates its values where they are given. The ``tokenizer`` section is a
:class:`sa2crq.config.TokenizerConfig`: its ``method`` preset applies first, the other fields
override it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from sa2crq.config import TokenizerConfig, layered_config
from sa2crq.retrieval.candidates import GenerationConfig
from sa2crq.retrieval.training import RetrieverTrainConfig


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _absolute_paths(config: object, *names: str) -> None:
    """Make local paths absolute where they are given: Ray workers do not share the driver's
    working directory. URLs (``s3://``, ``file://``) are left as they are."""
    for name in names:
        value = getattr(config, name)
        if value and "://" not in value:
            object.__setattr__(config, name, os.path.abspath(value))


@dataclass(frozen=True)
class StorageConfig:
    """Where versions live. ``root`` is a local path, ``file://`` or ``s3://bucket/prefix``."""

    root: str = "s3://sa2crq/catalog"
    # None (and no AWS_ENDPOINT_URL in the environment): an s3:// root is served by a local
    # SeaweedFS the job starts over ``local_server_dir``. For AWS itself, name its endpoint.
    endpoint_url: str | None = None
    local_server_dir: str = ".cache/object-store"

    def __post_init__(self) -> None:
        _require(bool(self.root), "storage.root must name a location")
        _absolute_paths(self, "root", "local_server_dir")

    @property
    def sids(self) -> str:
        """Root of the published SID versions."""
        return f"{self.root.rstrip('/')}/sids"

    @property
    def retrievers(self) -> str:
        """Root of the published retriever versions."""
        return f"{self.root.rstrip('/')}/retrievers"

    @property
    def runs(self) -> str:
        """Ray Train run state and checkpoints."""
        return f"{self.root.rstrip('/')}/runs"


@dataclass(frozen=True)
class SparkConfig:
    # local[*] starts an embedded Spark; a cluster master (or spark-submit) runs it at scale.
    master: str = "local[*]"
    shuffle_partitions: int = 8
    driver_memory: str = "1g"
    # Embedded Spark has no S3 connector (hadoop-aws): it reads and writes parquet in this local
    # directory, staged to and from object storage. A cluster with s3a configured sets
    # ``direct_object_store`` and Spark reads and writes s3a:// itself.
    staging_dir: str = ".cache/spark-staging"
    direct_object_store: bool = False

    def __post_init__(self) -> None:
        _require(self.shuffle_partitions >= 1, "spark.shuffle_partitions must be >= 1")
        _absolute_paths(self, "staging_dir")


@dataclass(frozen=True)
class RayConfig:
    # None: RAY_ADDRESS from the environment, else a local Ray started by the job.
    address: str | None = None
    # Local Ray only: CPUs it may use (None = all).
    num_cpus: int | None = None
    train_workers: int = 2
    cpus_per_train_worker: float = 1.0
    # Restarts of a Ray Train worker group after a worker dies (killed, out of memory, lost node);
    # finite, because an error in the code or the data fails every attempt.
    train_max_failures: int = 2
    use_gpu: bool = False
    # Ray Data actor pools (embedding, code assignment, generation). Actors that claim every CPU
    # starve the read stage: leave room (DEVELOPERS.md).
    actors: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    # generate: actors holding the catalog's vectors (embeddings and dense-head item vectors), a row
    # range each, so no generation actor holds them (ray_workers/catalog_shards.py); 0: every
    # generation actor holds them all (a catalog whose vectors fit one actor's memory many times).
    catalog_shards: int = 0
    cpus_per_catalog_shard: float = 0.5

    @property
    def actor_pool(self) -> dict[str, Any]:
        """The keyword arguments of :func:`ray_workers.shards.map_shards` that size its actor pool."""
        return {"actors": self.actors, "cpus_per_actor": self.cpus_per_actor, "gpus_per_actor": self.gpus_per_actor}

    @property
    def train_group(self) -> dict[str, Any]:
        """The keyword arguments of :class:`ray_workers.training.TrainRun` that size its worker group."""
        return {"workers": self.train_workers, "use_gpu": self.use_gpu, "cpus_per_worker": self.cpus_per_train_worker,
                "max_failures": self.train_max_failures}  # fmt: skip

    def __post_init__(self) -> None:
        _require(self.train_workers >= 1 and self.actors >= 1, "ray.train_workers and ray.actors must be >= 1")
        _require(self.cpus_per_train_worker > 0 and self.cpus_per_actor > 0 and self.cpus_per_catalog_shard > 0,
                 "ray CPU shares must be positive")  # fmt: skip
        _require(self.catalog_shards >= 0, "ray.catalog_shards must be >= 0")
        _require(self.gpus_per_actor >= 0, "ray.gpus_per_actor must be >= 0")
        _require(self.train_max_failures >= 0, "ray.train_max_failures must be >= 0")


@dataclass(frozen=True)
class RecodeConfig:
    """``sa2crq recode``: split -> embed -> train (or reuse) the tokenizer -> assign -> SIDs -> publish."""

    items: str = ""
    interactions: str = ""  # training interactions only: popularity, segments and SARQ see nothing else
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # A published SID version whose tokenizer is reused (encode only); SIDs then stay stable (DESIGN §3.3a).
    reuse_tokenizer: str | None = None
    # Refuse to publish when more than this share of items changed SID (``--force`` overrides).
    churn_limit: float = 0.05
    # Refuse to publish when more than this share of the previous version's items is gone: a truncated
    # or stale item snapshot would otherwise publish at low churn (``--force`` overrides).
    removed_limit: float = 0.10
    # Popularity window [start, end) on the interactions' timestamp; None leaves a side open.
    window_start: int | None = None
    window_end: int | None = None
    shards: int = 4
    max_reject_fraction: float = 0.05
    embedding_cache: str | None = ".cache/embeddings"
    storage: StorageConfig = field(default_factory=StorageConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _require(bool(self.items) and bool(self.interactions), "recode needs items and interactions (their parquet paths)")
        _require(0.0 <= self.churn_limit <= 1.0, "churn_limit must be in [0, 1]")
        _require(0.0 <= self.removed_limit <= 1.0, "removed_limit must be in [0, 1]")
        _require(self.shards >= 1, "shards must be >= 1")
        _require(0.0 <= self.max_reject_fraction <= 1.0, "max_reject_fraction must be in [0, 1]")
        _absolute_paths(self, "items", "interactions", "embedding_cache")


@dataclass(frozen=True)
class IngestConfig:
    """``sa2crq ingest``: new items -> embed -> encode with the published tokenizer -> SIDs -> publish the delta."""

    items: str = ""
    max_reject_fraction: float = 0.05
    embedding_cache: str | None = ".cache/embeddings"
    storage: StorageConfig = field(default_factory=StorageConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _require(bool(self.items), "ingest needs items (their parquet path)")
        _absolute_paths(self, "items", "embedding_cache")


@dataclass(frozen=True)
class RetrieverShape:
    """The retriever's architecture; the SID vocabulary comes from the SID version."""

    d_model: int = 128
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.1
    # Read the items' content embeddings (the SID version's) beside their SID tokens.
    item_content: bool = True
    # A dense request-item head trained beside the SID loss, used by the item scorer.
    dense_head: bool = True


@dataclass(frozen=True)
class TrainRetrieverConfig:
    """``sa2crq train-retriever``: train on a published SID version, publish the retriever."""

    # "history": ``interactions`` are training interactions and ``valid`` one validation target per
    # user. "query": both are query logs (``query_id``, ``query``, ``item_id``); the query text is
    # embedded with all-MiniLM-L6-v2, as ``generate`` embeds query requests.
    request_kind: str = "history"
    interactions: str = ""
    valid: str = ""  # for early stopping
    sid_version: str | None = None  # None: the latest
    # Both inputs are validated against the SID version's items: more rejected rows than this share
    # refuses the run (sa2crq.data.validation).
    max_reject_fraction: float = 0.05
    embedding_cache: str | None = ".cache/embeddings"
    model: RetrieverShape = field(default_factory=RetrieverShape)
    train: RetrieverTrainConfig = field(default_factory=RetrieverTrainConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    spark: SparkConfig = field(default_factory=SparkConfig)  # input validation
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _require(bool(self.interactions) and bool(self.valid), "train-retriever needs interactions and valid (parquet paths)")
        _require(self.request_kind in ("history", "query"), "request_kind must be history or query")
        _require(0.0 <= self.max_reject_fraction <= 1.0, "max_reject_fraction must be in [0, 1]")
        _absolute_paths(self, "interactions", "valid", "embedding_cache")


@dataclass(frozen=True)
class GenerateConfig:
    """``sa2crq generate``: requests -> constrained beam search -> candidate parquet."""

    # Parquet of request_id + history (item ids, oldest first; optional user_id), or of
    # request_id + query (text). Each row group is a shard of work.
    requests: str = ""
    request_kind: str = "history"
    out: str = ""  # the candidate store: a version per run, committed whole; a rerun reuses finished parts
    retriever_version: str | None = None  # None: the latest
    # The SID version served; None: the latest. It must be the one the retriever was trained on.
    sid_version: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    embedding_cache: str | None = ".cache/embeddings"  # query requests: query text embeddings
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        _require(bool(self.requests) and bool(self.out), "generate needs requests and out")
        _require(self.request_kind in ("history", "query"), "request_kind must be history or query")
        _absolute_paths(self, "requests", "out", "embedding_cache")


@dataclass(frozen=True)
class EvaluateConfig:
    """``sa2crq evaluate``: the retrieval metrics of a published retriever on held-out targets."""

    history: str = ""  # interactions forming the histories (training + validation)
    targets: str = ""  # one held-out target per user
    retriever_version: str | None = None
    sid_version: str | None = None  # None: the latest; it must be the one the retriever was trained on
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    hallucination_requests: int = 500
    out: str | None = None  # where the JSON report goes (default: beside the retriever)
    # Refuse an input whose rejected share (validation against the SID version's items) is above this.
    max_reject_fraction: float = 0.05
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        _require(bool(self.history) and bool(self.targets), "evaluate needs history and targets (parquet paths)")
        _require(0.0 <= self.max_reject_fraction <= 1.0, "max_reject_fraction must be in [0, 1]")
        _absolute_paths(self, "history", "targets", "out")


JOB_CONFIGS: dict[str, type] = {
    "recode": RecodeConfig,
    "ingest": IngestConfig,
    "train-retriever": TrainRetrieverConfig,
    "generate": GenerateConfig,
    "evaluate": EvaluateConfig,
}


def load_job_config(job: str, config_file: str | None, assignments: list[str]) -> Any:
    return layered_config(JOB_CONFIGS[job], config_file, assignments)


def config_dict(config: Any) -> dict[str, Any]:
    """JSON-able form, for manifests and reports."""
    return dataclasses.asdict(config)
