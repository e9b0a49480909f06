"""The catalog's vectors held by Ray actors, a row range each, for the generate job's actors.

A generate actor that held every item's embedding and dense-head vector would grow with the catalog
by 4·(D + d_model) bytes per item (1.5 KB with MiniLM). With ``ray.catalog_shards`` set, the job
starts that many :class:`CatalogShardActor` s, each reading only its row range of the embeddings
(:func:`sa2crq.retrieval.serving.load_catalog_shard`), and every generate actor reaches them through
:class:`RayCatalogVectors`: per batch one streaming pass on every shard at once, merged, and a
gather of the few rows its slice reaches. A shard actor that dies is restarted by Ray (it reads its
range again) and the calls it lost are retried: they change nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import torch

from sa2crq.retrieval.catalog_vectors import CatalogVectors, DensePass
from sa2crq.retrieval.serving import load_catalog_shard
from sa2crq.storage.published import PublishedVersion

__all__ = ["CatalogShards", "RayCatalogVectors", "start_catalog_shards"]

# Restarts of a shard actor that died (a lost node, out of memory); finite, since a shard that
# cannot load its rows fails every time.
MAX_RESTARTS = 2


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
class CatalogShardActor:
    """Rows ``[start, stop)`` of a SID version's vectors for one retriever."""

    def __init__(self, sids: PublishedVersion, retriever: PublishedVersion, start: int, stop: int, max_batch_scores: int) -> None:
        self.shard = load_catalog_shard(sids, retriever, start, stop, max_batch_scores)

    def dim(self) -> int:
        return int(self.shard.embeddings.shape[1])

    def dense_pass(self, *args) -> DensePass:
        return self.shard.dense_pass(*args).to("cpu")

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeddings, vectors = self.shard.gather(rows)
        return embeddings.cpu(), None if vectors is None else vectors.cpu()


@dataclass(frozen=True)
class CatalogShards:
    """Running shard actors and the rows each holds: what a generate actor is given."""

    actors: list
    bounds: list[int]  # the first row of every shard, then N
    dim: int

    def stop(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


class RayCatalogVectors(CatalogVectors):
    """:class:`CatalogVectors` whose shards are :class:`CatalogShardActor` s: every shard's call is
    started before any is waited for."""

    def __init__(self, shards: CatalogShards, device: torch.device | str) -> None:
        super().__init__(shards.actors, shards.bounds, shards.dim, device)

    def _call(self, shard, method: str, *args):
        return getattr(shard, method).remote(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))

    def _results(self, calls: list) -> list:
        return ray.get(calls)


def start_catalog_shards(
    sids: PublishedVersion, retriever: PublishedVersion, shards: int, *, items: int, max_batch_scores: int,
    cpus_per_shard: float,
) -> CatalogShards:  # fmt: skip
    """``shards`` actors holding ``items`` rows in equal ranges, started and loaded."""
    bounds = np.linspace(0, items, shards + 1).round().astype(int).tolist()
    actors = [
        CatalogShardActor.options(num_cpus=cpus_per_shard).remote(sids, retriever, a, b, max_batch_scores)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    dims = set(ray.get([actor.dim.remote() for actor in actors]))  # waits until every shard has loaded
    return CatalogShards(actors, bounds, dims.pop())
