"""The catalog's vectors, held in row-range shards: what the generator's dense path and scorer read.

Per batch of requests a generator needs two things of the items' vectors (content embeddings and the
dense head's item vectors): one streaming pass over the whole catalog (the dense path's admissions
and the dense head's log-normaliser) and the vectors of the few items the batch's slice reaches.
Both split over row ranges: a pass over each range, merged (the top-m of the shards' top-m, the
log-sum-exp of their log-normalisers), is the pass over the whole catalog, and a gather is routed
to the shards holding the rows. So the vectors can live in the generator's process (one
:class:`CatalogShard` over every row) or in other processes, each holding a range
(``ray_workers.catalog_shards``), and the generator itself then holds only the trie-sized state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sa2crq.retrieval.model import GenerativeRetriever, ItemFeatures, mixed_precision


@dataclass(frozen=True)
class DensePass:
    """A streaming pass's result for B requests: per (content, dense) weight pair the best ``m``
    non-history items by content weight x cosine + dense weight x dense logit, and the dense
    head's log-normaliser over the items passed."""

    values: torch.Tensor  # (B, pairs, m) scores, -inf where fewer than m items
    items: torch.Tensor  # (B, pairs, m) catalog rows
    log_norm: torch.Tensor  # (B,) -inf without a dense head

    def to(self, device: torch.device | str) -> "DensePass":
        return DensePass(self.values.to(device), self.items.to(device), self.log_norm.to(device))

    @property
    def admitted(self) -> torch.Tensor:
        """(B, pairs x m) the admitted catalog rows, -1 where fewer."""
        return torch.where(torch.isfinite(self.values), self.items, -1).flatten(1)

    @staticmethod
    def merge(parts: Sequence["DensePass"], m: int) -> "DensePass":
        """The pass over the union of the parts' rows (the parts cover disjoint rows)."""
        if len(parts) == 1:
            return parts[0]
        values = torch.cat([p.values for p in parts], 2)
        top = values.topk(min(m, values.shape[2]), dim=2)
        items = torch.cat([p.items for p in parts], 2).gather(2, top.indices)
        log_norm = torch.stack([p.log_norm for p in parts]).logsumexp(0)
        return DensePass(top.values, items, log_norm)


class CatalogShard:
    """Rows ``[start, start + n)`` of the catalog: their content embeddings (n, D) and, for a
    retriever with a dense head, their item vectors (n, d_model), on one device."""

    def __init__(self, start: int, embeddings: torch.Tensor, item_vectors: torch.Tensor | None, max_batch_scores: int) -> None:
        if item_vectors is not None and len(item_vectors) != len(embeddings):
            raise ValueError(f"{len(item_vectors)} item vectors for {len(embeddings)} embeddings")
        self.start, self.stop = start, start + len(embeddings)
        self.embeddings, self.item_vectors = embeddings, item_vectors
        self.max_batch_scores = max_batch_scores

    @classmethod
    def for_model(cls, model: GenerativeRetriever, start: int, items: ItemFeatures, max_batch_scores: int) -> "CatalogShard":
        """The shard of rows ``start + i`` for the items of ``items`` (their content is the embeddings),
        with ``model``'s current dense-head vectors of them."""
        if items.content is None:
            raise ValueError("a catalog shard needs the items' content embeddings")
        with torch.no_grad():
            vectors = model.item_vectors(items) if model.config.dense_head else None
        return cls(start, items.content, vectors, max_batch_scores)

    def __len__(self) -> int:
        return self.stop - self.start

    @torch.no_grad()
    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings and item vectors of catalog ``rows`` (all inside this shard; any device),
        on the shard's device."""
        local = rows.to(self.embeddings.device) - self.start
        return self.embeddings[local], None if self.item_vectors is None else self.item_vectors[local]

    @torch.no_grad()
    def dense_pass(
        self,
        request: torch.Tensor,
        dense_request: torch.Tensor | None,
        excluded: torch.Tensor,
        pairs: Sequence[tuple[float, float]],
        m: int,
    ) -> DensePass:
        """One pass over the shard in chunks of ``max_batch_scores // B`` rows: ``request`` (B, D)
        unit vectors; ``dense_request`` (B, d_model), or None where no weight uses the dense term
        (no log-normaliser then); ``excluded`` (B, E) catalog rows never admitted, -1 padded. The
        inputs may be on any device; the pass runs on the shard's."""
        device = self.embeddings.device
        request, excluded = request.to(device), excluded.to(device)
        dense_request = None if dense_request is None else dense_request.to(device)
        b = len(request)
        log_norm = torch.full((b,), -math.inf, device=device)
        best = [(torch.zeros(b, 0, device=device), torch.zeros(b, 0, dtype=torch.int64, device=device)) for _ in pairs]
        dense = dense_request is not None and self.item_vectors is not None
        chunk = max(1, self.max_batch_scores // max(1, b))
        for start in range(self.start, self.stop if pairs or dense else self.start, chunk):
            end = min(self.stop, start + chunk)
            logits = None
            if dense:
                with mixed_precision(device):
                    logits = (dense_request @ self.item_vectors[start - self.start : end - self.start].T).float()
                log_norm = torch.logaddexp(log_norm, logits.logsumexp(1))
            if not pairs:
                continue
            sim = (request @ self.embeddings[start - self.start : end - self.start].T).float()
            inside = (excluded >= start) & (excluded < end)
            slots = torch.where(inside, excluded - start, end - start)  # outside: a spare column, dropped
            history = torch.zeros(b, end - start + 1, dtype=torch.bool, device=device).scatter_(1, slots, True)[:, :-1]
            index = torch.arange(start, end, device=device).expand(b, -1)
            for j, (content_weight, dense_weight) in enumerate(pairs):
                score = content_weight * sim if logits is None or dense_weight == 0 else content_weight * sim + dense_weight * logits
                values = torch.cat([best[j][0], score.masked_fill(history, -math.inf)], 1)
                top = values.topk(min(m, values.shape[1]), dim=1)
                best[j] = (top.values, torch.cat([best[j][1], index], 1).gather(1, top.indices))
        if not pairs:
            return DensePass(torch.zeros(b, 0, 0, device=device), torch.zeros(b, 0, 0, dtype=torch.int64, device=device), log_norm)
        return DensePass(torch.stack([v for v, _ in best], 1), torch.stack([i for _, i in best], 1), log_norm)


class CatalogVectors:
    """Every catalog row's vectors, as shards covering ``[0, N)`` in order, held in this process.
    :meth:`dense_pass` and :meth:`gather` ask every shard concerned and merge; a subclass that
    holds its shards elsewhere overrides :meth:`_call` and :meth:`_results` only."""

    def __init__(self, shards: Sequence, bounds: Sequence[int], dim: int, device: torch.device | str) -> None:
        """``bounds`` (S + 1,) the first row of every shard, then N; ``dim`` the embeddings' D."""
        self.shards, self.bounds = list(shards), np.asarray(bounds, dtype=np.int64)
        if len(self.bounds) != len(self.shards) + 1 or self.bounds[0] != 0 or (np.diff(self.bounds) < 0).any():
            raise ValueError(f"catalog shard bounds {self.bounds.tolist()} do not cover [0, N) in order for {len(self.shards)} shards")
        self.dim, self.device = dim, torch.device(device)

    @classmethod
    def local(cls, shard: CatalogShard) -> "CatalogVectors":
        return cls([shard], [0, len(shard)], shard.embeddings.shape[1], shard.embeddings.device)

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _call(self, shard, method: str, *args):
        """Start ``method(*args)`` on one shard; :meth:`_results` waits for the started calls."""
        return getattr(shard, method)(*args)

    def _results(self, calls: list) -> list:
        return calls

    def dense_pass(self, request: torch.Tensor, dense_request: torch.Tensor | None, excluded: torch.Tensor,
                   pairs: Sequence[tuple[float, float]], m: int) -> DensePass:  # fmt: skip
        """:meth:`CatalogShard.dense_pass` over the whole catalog, on this object's device."""
        parts = self._results([self._call(s, "dense_pass", request, dense_request, excluded, pairs, m) for s in self.shards])
        return DensePass.merge([p.to(self.device) for p in parts], m)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The embeddings (n, D) and dense item vectors (n, d_model) or None of catalog ``rows`` (n,)."""
        shard_of = np.searchsorted(self.bounds, rows.cpu().numpy(), side="right") - 1
        held = [int(s) for s in np.unique(shard_of)] or [0]  # no rows: shard 0 gives the empty shapes
        picks = [torch.as_tensor(np.flatnonzero(shard_of == s), device=self.device) for s in held]
        parts = self._results([self._call(self.shards[s], "gather", rows[pick]) for s, pick in zip(held, picks, strict=True)])
        order = torch.cat(picks).argsort()
        embeddings = torch.cat([e.to(self.device) for e, _ in parts])[order]
        vectors = None if parts[0][1] is None else torch.cat([v.to(self.device) for _, v in parts])[order]
        return embeddings, vectors
