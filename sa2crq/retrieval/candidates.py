"""Candidate generation: requests -> constrained beam search -> item scorer -> top-K items.

One object holds everything a retriever needs at serving time (model, SID tokens, trie, buckets,
item embeddings) on one device, so the benchmark, the evaluation and the ``generate`` job share it.
It needs only torch and numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from sa2crq.ids.trie import SIDTrie
from sa2crq.retrieval.beam import beam_search
from sa2crq.retrieval.data import Requests, encoder_tokens, user_token
from sa2crq.retrieval.model import GenerativeRetriever
from sa2crq.retrieval.scorer import BucketIndex, ScoredItems, request_embeddings, score_items


@dataclass(frozen=True)
class GenerationConfig:
    beam_width: int = 20
    k: int = 10
    # Softmax temperature of the in-bucket item scorer (cosine similarities are in [-1, 1]).
    temperature: float = 0.05
    # Request embedding: mean of the last n history items' text embeddings (1 = the last item).
    request_last_n: int = 1
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.beam_width < 1 or self.k < 1 or self.batch_size < 1 or self.request_last_n < 1:
            raise ValueError("generation beam_width, k, batch_size and request_last_n must be >= 1")
        if self.temperature <= 0:
            raise ValueError("generation temperature must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Candidates:
    items: np.ndarray  # (R, K) dense item indices, -1 = empty
    scores: np.ndarray  # (R, K)
    from_bucket: np.ndarray  # (R, K) bool
    invalid_beams: int  # constrained beams that are not a valid SID (must be 0)
    beams: int


class CandidateGenerator:
    def __init__(
        self,
        model: GenerativeRetriever,
        sid_tokens: np.ndarray,
        trie: SIDTrie,
        buckets: BucketIndex,
        item_embeddings: np.ndarray,
        config: GenerationConfig,
        *,
        user_offset: int,
        user_buckets: int,
        device: torch.device | str = "cpu",
        item_is_cold: np.ndarray | None = None,
        cold_cap: float | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.sid_tokens = torch.as_tensor(sid_tokens, device=self.device)
        self.trie = trie.to(self.device)
        self.buckets = buckets.to(self.device)
        self.item_embeddings = torch.as_tensor(item_embeddings, device=self.device)
        self.config = config
        self.user_offset = user_offset
        self.user_buckets = user_buckets
        self.item_is_cold = None if item_is_cold is None else torch.as_tensor(item_is_cold, device=self.device)
        self.cold_cap = cold_cap

    @torch.no_grad()
    def _encode(self, requests: Requests, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(history to exclude, memory, memory mask) for some requests."""
        if requests.query is not None:
            memory, mask = self.model.encode(None, torch.as_tensor(requests.query[rows], device=self.device))
            # A query has no history: nothing to exclude from its top-K.
            return torch.full((len(rows), 1), -1, dtype=torch.long, device=self.device), memory, mask
        history = torch.as_tensor(requests.history[rows], device=self.device)
        users = torch.as_tensor(user_token(requests.user_ids[rows], self.user_buckets, self.user_offset), device=self.device)
        memory, mask = self.model.encode(encoder_tokens(history, users, self.sid_tokens))
        return history, memory, mask

    def _request_embeddings(self, requests: Requests, rows: np.ndarray, history: torch.Tensor) -> torch.Tensor:
        """The scorer's request embedding (DESIGN §3.4): the L2-normalised query embedding, or the history's."""
        if requests.query is not None:
            query = torch.as_tensor(requests.query[rows], device=self.device).to(self.item_embeddings.dtype)
            return torch.nn.functional.normalize(query, dim=1)
        return request_embeddings(history, self.item_embeddings, self.config.request_last_n)

    @torch.no_grad()
    def generate(self, requests: Requests) -> Candidates:
        """Top-K items per request, history excluded (query requests have none)."""
        parts: list[ScoredItems] = []
        invalid, produced = 0, 0
        for start in range(0, len(requests), self.config.batch_size):
            rows = np.arange(start, min(start + self.config.batch_size, len(requests)))
            history, memory, mask = self._encode(requests, rows)
            beams = beam_search(
                self.model, memory, mask, beam_width=self.config.beam_width, max_length=self.trie.max_length, trie=self.trie
            )
            live = torch.isfinite(beams.log_probs)
            invalid += int((live & (beams.sid_index < 0)).sum())
            produced += int(live.sum())
            parts.append(
                score_items(
                    beams.sid_index,
                    beams.log_probs,
                    self._request_embeddings(requests, rows, history),
                    self.item_embeddings,
                    self.buckets,
                    history,
                    k=self.config.k,
                    temperature=self.config.temperature,
                    item_is_cold=self.item_is_cold,
                    cold_cap=self.cold_cap,
                )
            )
        return Candidates(
            items=torch.cat([p.items for p in parts]).cpu().numpy(),
            scores=torch.cat([p.scores for p in parts]).float().cpu().numpy(),
            from_bucket=torch.cat([p.from_bucket for p in parts]).cpu().numpy(),
            invalid_beams=invalid,
            beams=produced,
        )

    @torch.no_grad()
    def hallucination_rate(self, requests: Requests) -> float:
        """Share of unconstrained beam outputs (finished beams) that are not a valid SID."""
        invalid, total = 0, 0
        for start in range(0, len(requests), self.config.batch_size):
            rows = np.arange(start, min(start + self.config.batch_size, len(requests)))
            _, memory, mask = self._encode(requests, rows)
            beams = beam_search(
                self.model, memory, mask, beam_width=self.config.beam_width, max_length=self.trie.max_length,
                trie=None, validity_trie=self.trie,
            )
            produced = torch.isfinite(beams.log_probs)
            invalid += int((produced & (beams.sid_index < 0)).sum())
            total += int(produced.sum())
        return invalid / total if total else 0.0
