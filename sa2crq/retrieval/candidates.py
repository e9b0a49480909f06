"""Candidate generation: requests -> constrained beam search -> hybrid item scorer -> top-K items.

One object holds what a retriever needs at serving time (model, item tokens, trie, the item -> SID
map, and the catalog's vectors: in its process or in catalog shards held elsewhere), so the
benchmark, the evaluation and the ``generate`` job share it. It needs only torch and numpy.

Per batch of B requests, the dense path's admissions come from one streaming pass over the catalog's
vectors in chunks (B x chunk scores, running top-m per request; :mod:`sa2crq.retrieval.catalog_vectors`),
and the scorer then works on the slice of the catalog those admissions and the generated SIDs reach
(:meth:`ItemSIDs.reachable`), with the vectors of those items only. Neither matrix holds more than
``max_batch_scores`` scores, whatever the catalog size (README "Catalog scale").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch

from sa2crq import distributed
from sa2crq.ids.trie import SIDTrie
from sa2crq.progress import Progress
from sa2crq.retrieval.beam import beam_search
from sa2crq.retrieval.catalog_vectors import CatalogShard, CatalogVectors
from sa2crq.retrieval.data import Requests, user_token
from sa2crq.retrieval.model import GenerativeRetriever, ItemFeatures, mixed_precision
from sa2crq.retrieval.scorer import ItemSIDs, RequestFeatures, ScoredItems, ScorerWeights, admits, request_embeddings, score_items
from sa2crq.retrieval.training import RetrieverTrainConfig

# Coordinate-ascent grid of :meth:`CandidateGenerator.tune`, one axis per scorer parameter.
TUNING_GRID: dict[str, tuple[float, ...]] = {
    "temperature": (0.02, 0.05, 0.1, 0.2),
    "dense_weight": (0.0, 0.25, 0.5, 1.0, 2.0),
    "content_weight": (0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0),
    "dense_candidates": (0, 20, 50, 200),
}


@dataclass(frozen=True)
class GenerationConfig:
    beam_width: int = 20
    k: int = 10
    # The hybrid item scorer (sa2crq.retrieval.scorer): in-bucket softmax temperature over cosine
    # similarities, weights of the dense head and of content similarity, dense-path admission cap.
    temperature: float = 0.05
    dense_weight: float = 1.0
    content_weight: float = 10.0
    dense_candidates: int = 50
    # Serving a published retriever: use the scorer weights its training tuned on validation
    # (recorded in its checkpoint) instead of the four above.
    tuned_scorer: bool = True
    # Request embedding: mean of the last n history items' text embeddings (1 = the last item).
    request_last_n: int = 1
    batch_size: int = 256
    # Scores one batch holds at once (2^24: 64 MiB in float32), in the streaming pass over the
    # catalog (batch x chunk) and in the scorer's slice (batch x slice): chunks shrink with the
    # batch, and batches shrink where batch x slice could pass it (CandidateGenerator.batch_size).
    max_batch_scores: int = 2**24
    # A generated SID expands to at most this many items (in catalog order): only a group of
    # near-duplicates sharing one full-depth code path comes near it.
    max_bucket_members: int = 1024

    def __post_init__(self) -> None:
        if min(self.beam_width, self.k, self.batch_size, self.request_last_n, self.max_batch_scores, self.max_bucket_members) < 1:
            raise ValueError(
                "generation beam_width, k, batch_size, request_last_n, max_batch_scores and max_bucket_members must be >= 1"
            )
        self.weights  # validates the scorer fields

    @property
    def weights(self) -> ScorerWeights:
        return ScorerWeights(**{f.name: getattr(self, f.name) for f in fields(ScorerWeights)})

    def with_weights(self, weights: ScorerWeights) -> "GenerationConfig":
        return replace(self, **asdict(weights))

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidates:
    items: np.ndarray  # (R, K) dense item indices, -1 = empty
    scores: np.ndarray  # (R, K)
    from_bucket: np.ndarray  # (R, K) bool
    from_dense: np.ndarray  # (R, K) bool: entered through the dense path only
    invalid_beams: int  # constrained beams that are not a valid SID (must be 0)
    beams: int

    @classmethod
    def concat(cls, parts: list[ScoredItems], invalid_beams: int, beams: int, k: int) -> "Candidates":
        """The candidates of every batch, in request order."""
        if not parts:
            empty = np.zeros((0, k))
            return cls(empty.astype(np.int64), empty.astype(np.float32), empty.astype(bool), empty.astype(bool), invalid_beams, beams)
        return cls(
            items=torch.cat([p.items for p in parts]).cpu().numpy(),
            scores=torch.cat([p.scores for p in parts]).float().cpu().numpy(),
            from_bucket=torch.cat([p.from_bucket for p in parts]).cpu().numpy(),
            from_dense=torch.cat([p.from_dense for p in parts]).cpu().numpy(),
            invalid_beams=invalid_beams,
            beams=beams,
        )


@dataclass(frozen=True, eq=False)
class ScoringBatch:
    """A batch of requests over the slice of the catalog its scores can involve
    (:meth:`ItemSIDs.reachable` for the admission weights it was built for): re-scored under any of
    those weights."""

    features: RequestFeatures  # item columns are the slice's
    sids: ItemSIDs  # the slice's item -> SID map
    rows: torch.Tensor  # (U,) the catalog row of each slice item
    invalid_beams: int  # constrained beams that are not a valid SID (must be 0)

    def score(self, weights: ScorerWeights, k: int) -> ScoredItems:
        """The top-``k`` catalog items of every request under ``weights``."""
        scored = score_items(self.features, self.sids, weights, k=k)
        return replace(scored, items=torch.where(scored.items >= 0, self.rows[scored.items.clamp_min(0)], -1))


class CandidateGenerator:
    def __init__(
        self,
        model: GenerativeRetriever,
        sid_tokens: np.ndarray,
        trie: SIDTrie,
        sids: ItemSIDs,
        item_embeddings: np.ndarray | CatalogVectors,
        config: GenerationConfig,
        *,
        user_offset: int,
        user_buckets: int,
        device: torch.device | str = "cpu",
        path_tokens: np.ndarray | None = None,
    ) -> None:
        """``item_embeddings``: every item's embedding (N, D), held here, the dense head's item
        vectors taken from the model as it is at each :meth:`features` call (a model in training);
        or :class:`CatalogVectors` built for this model, possibly held by other processes.
        ``path_tokens``: every item's full code path (:class:`ItemFeatures`); None when every SID is one."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        held = not isinstance(item_embeddings, CatalogVectors)
        content = torch.as_tensor(item_embeddings, device=self.device) if held else None
        path = None if path_tokens is None else torch.as_tensor(path_tokens, device=self.device)
        self.items = ItemFeatures(torch.as_tensor(sid_tokens, device=self.device), content, path).to(self.device)
        self._vectors = None if held else item_embeddings
        self.trie = trie.to(self.device)
        self.sids = sids.to(self.device)
        self.config = config
        self.user_offset = user_offset
        self.user_buckets = user_buckets

    @property
    def embedding_dim(self) -> int:
        """D of the catalog's content embeddings (a query must be embedded in the same space)."""
        return self.items.content.shape[1] if self._vectors is None else self._vectors.dim

    def vectors(self, dense: bool) -> CatalogVectors:
        """The catalog's vectors for the model as it is now: the dense head's item vectors (a pass
        over the catalog to compute) only where ``dense``."""
        if self._vectors is not None:
            return self._vectors
        if not dense:
            return CatalogVectors.local(CatalogShard(0, self.items.content, None, self.config.max_batch_scores))
        return CatalogVectors.local(CatalogShard.for_model(self.model, 0, self.items, self.config.max_batch_scores))

    @torch.no_grad()
    def _encode(self, requests: Requests, rows: np.ndarray, vectors: CatalogVectors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(request embedding for content similarity, memory, memory mask) for some requests."""
        if requests.query is not None:
            query = torch.as_tensor(requests.query[rows], device=self.device)
            memory, mask = self.model.encode(query=query)
            return torch.nn.functional.normalize(query.float(), dim=1), memory, mask
        history = torch.as_tensor(requests.history[rows], device=self.device)
        users = torch.as_tensor(user_token(requests.user_ids[rows], self.user_buckets, self.user_offset), device=self.device)
        # The encoder reads the history items only: their features, gathered, with the history renumbered.
        held, local = torch.unique(history[history >= 0], return_inverse=True)
        local_history = torch.full_like(history, -1).masked_scatter_(history >= 0, local)
        embeddings, _ = vectors.gather(held)
        items = ItemFeatures(self.items.tokens[held], embeddings if self.model.config.item_content_dim else None,
                             None if self.items.path_tokens is None else self.items.path_tokens[held])  # fmt: skip
        memory, mask = self.model.encode(local_history, users, items)
        return request_embeddings(local_history, embeddings, self.config.request_last_n), memory, mask

    def batch_size(self, admitted_per_request: int) -> int:
        """Requests per batch: the config's, fewer where batch x slice could pass ``max_batch_scores``.
        A slice holds at most the catalog and at most (beam_width + admitted_per_request) items per
        request (buckets of one item; larger ones are capped by ``max_bucket_members``)."""
        cap, catalog = self.config.max_batch_scores, len(self.items)
        fits = max(cap // max(1, catalog), math.isqrt(cap // (self.config.beam_width + admitted_per_request)))
        return max(1, min(self.config.batch_size, fits))

    def _admission(self, weights: Sequence[ScorerWeights]) -> tuple[list[tuple[float, float]], int]:
        """The dense path's rankings that ``weights`` use, as (content, dense) weight pairs scaled to
        sum 1 (the ranking is the same), and how many items the most admitting of them admits."""
        dense_head = self.model.config.dense_head
        pairs: dict[float, tuple[float, float]] = {}
        for w in weights:
            if admits(w, dense_head):
                dense_weight = w.dense_weight if dense_head else 0.0
                total = w.content_weight + dense_weight
                pairs.setdefault(round(w.content_weight / total, 12), (w.content_weight / total, dense_weight / total))
        admitted = max((w.dense_candidates for w in weights if admits(w, dense_head)), default=0)
        return list(pairs.values()), admitted

    @torch.no_grad()
    def features(self, requests: Requests, weights: Sequence[ScorerWeights]) -> Iterator[ScoringBatch]:
        """Per batch of requests: beams, the dense path's admissions under every one of ``weights``,
        and what the scorer needs over the slice of the catalog they reach."""
        pairs, admitted_per_pair = self._admission(weights)
        batch_size = self.batch_size(len(pairs) * admitted_per_pair)
        # The dense head's log-probabilities (and their normaliser, a pass over the catalog) only where a weight uses them.
        dense_term = self.model.config.dense_head and any(w.dense_weight > 0 for w in weights)
        vectors = self.vectors(dense=dense_term)
        progress = Progress("generation", total=len(requests), unit="request")
        for start in range(0, len(requests), batch_size):
            rows = np.arange(start, min(start + batch_size, len(requests)))
            with mixed_precision(self.device):
                request, memory, mask = self._encode(requests, rows, vectors)
                beams = beam_search(
                    self.model, memory, mask, beam_width=self.config.beam_width, max_length=self.trie.max_length, trie=self.trie
                )
                dense_request = self.model.dense_request(memory, mask) if dense_term else None
            excluded = torch.as_tensor(requests.excluded_matrix(rows), device=self.device)
            passed = vectors.dense_pass(request, dense_request, excluded, pairs, admitted_per_pair)
            reached = self.sids.reachable(beams.sid_index, passed.admitted, self.config.max_bucket_members)
            sids, sid_of = self.sids.restrict(reached)
            embeddings, item_vectors = vectors.gather(reached)
            dense = None
            if dense_request is not None:
                with mixed_precision(self.device):
                    logits = dense_request @ item_vectors.T
                dense = logits.float() - passed.log_norm[:, None]
            generated = beams.sid_index >= 0
            local_sids = torch.where(generated, torch.searchsorted(sid_of, beams.sid_index.clamp_min(0)), -1)
            features = RequestFeatures(local_sids, beams.log_probs, request @ embeddings.T, dense, _positions(reached, excluded))
            progress.update(len(rows))
            yield ScoringBatch(features, sids, reached, int((torch.isfinite(beams.log_probs) & ~generated).sum()))
        progress.close()

    @torch.no_grad()
    def generate(self, requests: Requests, weights: ScorerWeights | None = None) -> Candidates:
        """Top-K items per request under ``weights`` (default: the config's), history excluded."""
        weights = weights or self.config.weights
        parts: list[ScoredItems] = []
        invalid, produced = 0, 0
        for batch in self.features(requests, [weights]):
            invalid += batch.invalid_beams
            produced += int(torch.isfinite(batch.features.sid_log_probs).sum())
            parts.append(batch.score(weights, self.config.k))
        return Candidates.concat(parts, invalid, produced, self.config.k)

    @torch.no_grad()
    def tune(self, requests: Requests, grid: dict[str, tuple[float, ...]] = TUNING_GRID, rounds: int = 2) -> tuple[ScorerWeights, list[dict]]:
        """Scorer weights that maximise Recall@K on ``requests`` (validation only), by coordinate
        ascent over ``grid`` from the config's weights; beams are searched once. Returns the best
        weights and every point tried with its recall."""
        best = self.config.weights
        # Every dense ranking coordinate ascent could reach, admitting as many items as any point.
        admitting = max([best.dense_candidates, *grid.get("dense_candidates", ())])
        reachable = [
            replace(best, content_weight=float(c), dense_weight=float(d), dense_candidates=int(admitting))
            for c in {best.content_weight, *grid.get("content_weight", ())}
            for d in {best.dense_weight, *grid.get("dense_weight", ())}
        ]  # fmt: skip
        batches = list(self.features(requests, reachable))
        targets = torch.as_tensor(requests.target, device=self.device)

        def recall(weights: ScorerWeights) -> float:
            items = torch.cat([batch.score(weights, self.config.k).items for batch in batches])
            return float((items == targets[:, None]).any(1).float().mean())

        tried: dict[ScorerWeights, float] = {best: recall(best)}
        for _ in range(rounds):
            for name, values in grid.items():
                for value in values:
                    candidate = replace(best, **{name: type(getattr(best, name))(value)})
                    if candidate not in tried:
                        tried[candidate] = recall(candidate)
                best = max(tried, key=lambda w: (tried[w], w == best))
        return best, [asdict(w) | {"recall": r} for w, r in tried.items()]

    @torch.no_grad()
    def hallucination_rate(self, requests: Requests) -> float:
        """Share of unconstrained beam outputs (finished beams) that are not a valid SID."""
        invalid, total = 0, 0
        vectors = self.vectors(dense=False)  # the encoder reads content embeddings only
        for start in range(0, len(requests), self.config.batch_size):
            rows = np.arange(start, min(start + self.config.batch_size, len(requests)))
            with mixed_precision(self.device):
                _, memory, mask = self._encode(requests, rows, vectors)
                beams = beam_search(
                    self.model, memory, mask, beam_width=self.config.beam_width, max_length=self.trie.max_length,
                    trie=None, validity_trie=self.trie,
                )
            produced = torch.isfinite(beams.log_probs)
            invalid += int((produced & (beams.sid_index < 0)).sum())
            total += int(produced.sum())
        return invalid / total if total else 0.0


def _positions(rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Where each of ``items`` (any shape, -1 = none) sits in the sorted ``rows``; -1 where absent."""
    if len(rows) == 0:
        return torch.full_like(items, -1)
    at = torch.searchsorted(rows, items.clamp_min(0)).clamp_max(len(rows) - 1)
    return torch.where((items >= 0) & (rows[at] == items), at, -1)


def validation_recall(generator: CandidateGenerator, requests: Requests) -> float:
    """Recall@K of the generator's top-K (its config's scorer weights) on held-out validation
    requests, pooled over ranks: the checkpoint-selection metric (DESIGN §5)."""
    candidates = generator.generate(requests)
    hits = (candidates.items == requests.target[:, None]).any(1).sum()
    total = distributed.all_reduce_sum_(torch.tensor([float(hits), float(len(requests))], dtype=torch.float64))
    return float(total[0] / total[1]) if total[1] > 0 else 0.0


def validation_samples(valid: Requests, config: RetrieverTrainConfig, *, seed: int) -> tuple[Requests, Requests]:
    """(checkpoint-selection requests, scorer-tuning requests): seeded samples of the validation
    requests, the first nested in the second."""
    sample = np.random.default_rng(seed).permutation(len(valid))
    return valid.subset(np.sort(sample[: config.select_users])), valid.subset(np.sort(sample[: config.tune_users]))
