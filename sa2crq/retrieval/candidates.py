"""Candidate generation: requests -> constrained beam search -> hybrid item scorer -> top-K items.

One object holds everything a retriever needs at serving time (model, item features, trie, the
item -> SID map, item embeddings) on one device, so the benchmark, the evaluation and the
``generate`` job share it. It needs only torch and numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Iterator

import numpy as np
import torch

from sa2crq import distributed
from sa2crq.ids.trie import SIDTrie
from sa2crq.progress import Progress
from sa2crq.retrieval.beam import beam_search
from sa2crq.retrieval.data import Requests, user_token
from sa2crq.retrieval.model import GenerativeRetriever, ItemFeatures, mixed_precision
from sa2crq.retrieval.scorer import ItemSIDs, RequestFeatures, ScoredItems, ScorerWeights, request_embeddings, score_items
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
    # The item scorer holds (batch x catalog) score matrices: batches shrink so that one holds at
    # most this many scores (2^24: 64 MiB in float32), whatever the catalog size; 16 requests a
    # batch at 10^6 items, the full batch_size below ~65,000 items.
    max_batch_scores: int = 2**24

    def __post_init__(self) -> None:
        if min(self.beam_width, self.k, self.batch_size, self.request_last_n, self.max_batch_scores) < 1:
            raise ValueError("generation beam_width, k, batch_size, request_last_n and max_batch_scores must be >= 1")
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


class CandidateGenerator:
    def __init__(
        self,
        model: GenerativeRetriever,
        sid_tokens: np.ndarray,
        trie: SIDTrie,
        sids: ItemSIDs,
        item_embeddings: np.ndarray,
        config: GenerationConfig,
        *,
        user_offset: int,
        user_buckets: int,
        device: torch.device | str = "cpu",
        path_tokens: np.ndarray | None = None,
    ) -> None:
        """``path_tokens``: every item's full code path (:class:`ItemFeatures`); None when every SID is one."""
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.item_embeddings = torch.as_tensor(item_embeddings, device=self.device)
        content = self.item_embeddings if model.config.item_content_dim else None
        path = None if path_tokens is None else torch.as_tensor(path_tokens, device=self.device)
        self.items = ItemFeatures(torch.as_tensor(sid_tokens, device=self.device), content, path)
        self.trie = trie.to(self.device)
        self.sids = sids.to(self.device)
        self.config = config
        self.user_offset = user_offset
        self.user_buckets = user_buckets

    @torch.no_grad()
    def _encode(self, requests: Requests, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(request embedding for content similarity, memory, memory mask) for some requests."""
        if requests.query is not None:
            query = torch.as_tensor(requests.query[rows], device=self.device)
            memory, mask = self.model.encode(query=query)
            return torch.nn.functional.normalize(query.to(self.item_embeddings.dtype), dim=1), memory, mask
        history = torch.as_tensor(requests.history[rows], device=self.device)
        users = torch.as_tensor(user_token(requests.user_ids[rows], self.user_buckets, self.user_offset), device=self.device)
        memory, mask = self.model.encode(history, users, self.items)
        return request_embeddings(history, self.item_embeddings, self.config.request_last_n), memory, mask

    @property
    def batch_size(self) -> int:
        """Requests per batch: the config's, fewer where the catalog is large (``max_batch_scores``)."""
        return max(1, min(self.config.batch_size, self.config.max_batch_scores // max(1, len(self.item_embeddings))))

    def _batches(self, requests: Requests) -> Iterator[np.ndarray]:
        for start in range(0, len(requests), self.batch_size):
            yield np.arange(start, min(start + self.batch_size, len(requests)))

    @torch.no_grad()
    def features(self, requests: Requests) -> Iterator[tuple[RequestFeatures, int]]:
        """Per batch of requests: what the scorer needs (beams, similarities, dense log-probs,
        exclusions), and how many constrained beams were invalid (must be 0)."""
        item_vectors = self.model.item_vectors(self.items) if self.model.config.dense_head else None
        progress = Progress("generation", total=len(requests), unit="request")
        for rows in self._batches(requests):
            with mixed_precision(self.device):
                request, memory, mask = self._encode(requests, rows)
                beams = beam_search(
                    self.model, memory, mask, beam_width=self.config.beam_width, max_length=self.trie.max_length, trie=self.trie
                )
                dense = None if item_vectors is None else self.model.dense_logits(memory, mask, item_vectors)
            live = torch.isfinite(beams.log_probs)
            if dense is not None:
                dense = torch.log_softmax(dense.float(), dim=1)
            excluded = torch.as_tensor(requests.excluded_matrix(rows), device=self.device)
            features = RequestFeatures(beams.sid_index, beams.log_probs, request @ self.item_embeddings.T, dense, excluded)
            progress.update(len(rows))
            yield features, int((live & (beams.sid_index < 0)).sum())
        progress.close()

    @torch.no_grad()
    def generate(self, requests: Requests, weights: ScorerWeights | None = None) -> Candidates:
        """Top-K items per request under ``weights`` (default: the config's), history excluded."""
        weights = weights or self.config.weights
        parts: list[ScoredItems] = []
        invalid, produced = 0, 0
        for features, bad in self.features(requests):
            invalid += bad
            produced += int(torch.isfinite(features.sid_log_probs).sum())
            parts.append(score_items(features, self.sids, weights, k=self.config.k))
        return Candidates.concat(parts, invalid, produced, self.config.k)

    @torch.no_grad()
    def tune(self, requests: Requests, grid: dict[str, tuple[float, ...]] = TUNING_GRID, rounds: int = 2) -> tuple[ScorerWeights, list[dict]]:
        """Scorer weights that maximise Recall@K on ``requests`` (validation only), by coordinate
        ascent over ``grid`` from the config's weights; beams are searched once. Returns the best
        weights and every point tried with its recall."""
        batches = [features for features, _ in self.features(requests)]
        targets = torch.as_tensor(requests.target, device=self.device)

        def recall(weights: ScorerWeights) -> float:
            items = torch.cat([score_items(f, self.sids, weights, k=self.config.k).items for f in batches])
            return float((items == targets[:, None]).any(1).float().mean())

        best = self.config.weights
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
        for rows in self._batches(requests):
            with mixed_precision(self.device):
                _, memory, mask = self._encode(requests, rows)
                beams = beam_search(
                    self.model, memory, mask, beam_width=self.config.beam_width, max_length=self.trie.max_length,
                    trie=None, validity_trie=self.trie,
                )
            produced = torch.isfinite(beams.log_probs)
            invalid += int((produced & (beams.sid_index < 0)).sum())
            total += int(produced.sum())
        return invalid / total if total else 0.0


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
