"""From generated SIDs to ranked items: the one hybrid item scorer every variant uses (DESIGN §3.4).

For one request and a catalog item ``i`` with SID ``s(i)``::

    score(i) = log p(s(i))                       the SID's beam log-probability
             + log p(i | s(i))                   in-bucket term
             + dense_weight   * log p_dense(i)   the retriever's dense head (if it has one)
             + content_weight * cos(r, e_i)      content similarity to the request embedding r

* **In-bucket term:** a softmax, over the members of ``s(i)`` that are *not in the request's
  history*, of ``cos(r, e_j) / temperature``. History items are masked before the softmax, so a
  history item sharing a bucket with a candidate leaves the candidate's term exactly as if it were
  absent. A bucket of one contributes 0.
* **Candidates** are the items of the generated SIDs (buckets expanded) plus up to
  ``dense_candidates`` items admitted by the dense path (the best by the two dense terms, cold items
  included: this is how items no SID reaches enter). An admitted item whose SID was not generated
  gets the request's lowest beam log-probability as ``log p(s(i))``: beam search found nothing of
  it above that, so that is the most it could claim.
* **Every history item** (the whole history, not only the encoder's window) is excluded; duplicates
  cannot arise (one score per catalog item). The best ``k`` remain.
* **TIGER's cold-start rule** (its baseline, DESIGN §3.5) plugs in through :class:`ItemSIDs`: a cold
  item whose first ``prefix_levels`` codes equal those of a generated SID is a candidate with that
  SID's log-probability, and at most ``ceil(cold_cap * k)`` cold items may enter a top-K.

The weights and the temperature are tuned on the validation split only
(:meth:`sa2crq.retrieval.candidates.CandidateGenerator.tune`). Everything is vectorised over a
batch of requests and the whole catalog: (B, N) scores per batch. That bounds the catalog one
generation batch can score (B x N floats); a catalog far beyond ~10^7 items needs an approximate
dense path, which is not built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ItemSIDs:
    """Item -> SID map for the scorer: ``item_sid`` (N,) the trie SID index of every item (dense
    index order), ``bucket_size`` (N,) the items sharing it; for TIGER's cold rule, the code-prefix
    key of every item and SID (None without the rule) and which items are cold."""

    item_sid: torch.Tensor
    bucket_size: torch.Tensor
    num_sids: int
    item_prefix: torch.Tensor | None = None
    sid_prefix: torch.Tensor | None = None
    item_is_cold: torch.Tensor | None = None
    cold_cap: float | None = None

    @classmethod
    def build(
        cls,
        item_sid: np.ndarray,
        *,
        codes: np.ndarray | None = None,
        prefix_levels: int = 0,
        item_is_cold: np.ndarray | None = None,
        cold_cap: float | None = None,
    ) -> "ItemSIDs":
        """``item_sid[i]`` is item i's SID (``SIDTrie.row_sid``). ``codes`` (N, L) full-depth codes,
        ``prefix_levels``, ``item_is_cold`` and ``cold_cap`` switch on TIGER's cold rule."""
        item_sid = np.asarray(item_sid, dtype=np.int64)
        num_sids = int(item_sid.max()) + 1 if len(item_sid) else 0
        bucket_size = np.bincount(item_sid, minlength=num_sids)[item_sid]
        if codes is None:
            return cls(torch.from_numpy(item_sid), torch.from_numpy(bucket_size), num_sids)
        if item_is_cold is None or cold_cap is None or prefix_levels < 1:
            raise ValueError("TIGER's cold rule needs codes, prefix_levels >= 1, item_is_cold and cold_cap")
        item_prefix = np.unique(codes[:, :prefix_levels], axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)
        sid_prefix = np.zeros(num_sids, dtype=np.int64)
        sid_prefix[item_sid] = item_prefix
        return cls(
            torch.from_numpy(item_sid), torch.from_numpy(bucket_size), num_sids,
            torch.from_numpy(item_prefix), torch.from_numpy(sid_prefix), torch.as_tensor(item_is_cold, dtype=torch.bool), cold_cap,
        )  # fmt: skip

    def to(self, device: torch.device | str) -> "ItemSIDs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ItemSIDs(
            move(self.item_sid), move(self.bucket_size), self.num_sids, move(self.item_prefix), move(self.sid_prefix),
            move(self.item_is_cold), self.cold_cap,
        )  # fmt: skip


@dataclass(frozen=True)
class ScorerWeights:
    """The item scorer's free parameters (module docstring), tuned on validation."""

    temperature: float = 0.05
    dense_weight: float = 1.0
    content_weight: float = 10.0
    dense_candidates: int = 50

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"scorer temperature must be positive, got {self.temperature}")
        if self.dense_weight < 0 or self.content_weight < 0 or self.dense_candidates < 0:
            raise ValueError("scorer dense_weight, content_weight and dense_candidates must be >= 0")


@dataclass(frozen=True)
class RequestFeatures:
    """What the scorer needs of a batch of B requests, computed once and re-scored under any weights."""

    sid_index: torch.Tensor  # (B, W) generated SIDs, -1 = none
    sid_log_probs: torch.Tensor  # (B, W) their beam log-probabilities
    content_sim: torch.Tensor  # (B, N) cosine of the request embedding with every item
    dense_log_probs: torch.Tensor | None  # (B, N) dense head log-probabilities, None without a head
    excluded: torch.Tensor  # (B, E) history items to exclude, -1 padded


@dataclass(frozen=True)
class ScoredItems:
    items: torch.Tensor  # (B, K) dense item indices, -1 where fewer than K candidates
    scores: torch.Tensor  # (B, K), -inf where empty
    from_bucket: torch.Tensor  # (B, K) bool: the item came from a generated bucket of more than one item
    from_dense: torch.Tensor  # (B, K) bool: the item entered through the dense path only


def request_embeddings(history: torch.Tensor, item_embeddings: torch.Tensor, last_n: int = 1) -> torch.Tensor:
    """The request embedding of a history: the mean of its last ``last_n`` items' embeddings,
    L2-normalised (zero for an empty history). DESIGN §3.4: on Beauty the last item alone is best."""
    recent = history[:, -last_n:]
    weights = (recent >= 0).to(item_embeddings.dtype)
    summed = (item_embeddings[recent.clamp_min(0)] * weights[:, :, None]).sum(1)
    return torch.nn.functional.normalize(summed, dim=1)


def _scatter_max(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size): the max of ``values`` (B, M) per ``index`` (B, M) bucket, -inf where none."""
    out = torch.full((values.shape[0], size), -math.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(1, index, values, reduce="amax", include_self=True)


def score_items(features: RequestFeatures, sids: ItemSIDs, weights: ScorerWeights, *, k: int) -> ScoredItems:
    """The top-``k`` items of every request of a batch under ``weights`` (module docstring)."""
    sim = features.content_sim.float()
    b, n = sim.shape
    rows = torch.arange(b, device=sim.device)[:, None]
    # Padding (-1) scatters into a spare column n, dropped after.
    slots = torch.where(features.excluded >= 0, features.excluded, n)
    history = torch.zeros(b, n + 1, dtype=torch.bool, device=sim.device).scatter_(1, slots, True)[:, :n]
    item_sid = sids.item_sid[None, :].expand(b, n)

    # log p(s(i)) of the generated SIDs, as a (B, N) map over items.
    beams = features.sid_index >= 0
    beam_logp = features.sid_log_probs.float().masked_fill(~beams, -math.inf)
    sid_logp = _scatter_max(beam_logp, features.sid_index.clamp_min(0), sids.num_sids).gather(1, item_sid)
    if sids.item_prefix is not None:
        # TIGER's rule: a cold item inherits the best generated SID sharing its code prefix.
        num_prefixes = int(sids.item_prefix.max()) + 1
        by_prefix = _scatter_max(beam_logp, sids.sid_prefix[features.sid_index.clamp_min(0)], num_prefixes)
        inherited = by_prefix.gather(1, sids.item_prefix[None, :].expand(b, n))
        sid_logp = torch.where(sids.item_is_cold[None, :], torch.maximum(sid_logp, inherited), sid_logp)
    generated = torch.isfinite(sid_logp) & ~history

    # log p(i | s(i)): a softmax over the bucket's non-history members.
    logits = (sim / weights.temperature).masked_fill(history, -math.inf)
    peak = _scatter_max(logits, item_sid, sids.num_sids)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    mass = torch.zeros(b, sids.num_sids, dtype=sim.dtype, device=sim.device)
    mass = mass.scatter_add(1, item_sid, torch.exp(logits - peak.gather(1, item_sid)))
    in_bucket = logits - peak.gather(1, item_sid) - torch.log(mass.gather(1, item_sid))

    dense = weights.content_weight * sim
    if features.dense_log_probs is not None and weights.dense_weight > 0:
        dense = dense + weights.dense_weight * features.dense_log_probs.float()
    admitted = torch.zeros_like(history)
    if weights.dense_candidates > 0:
        top = dense.masked_fill(history, -math.inf).topk(min(weights.dense_candidates, n), dim=1).indices
        admitted[rows.expand_as(top), top] = True
        admitted &= ~history
    floor = beam_logp.masked_fill(~torch.isfinite(beam_logp), math.inf).amin(1, keepdim=True)
    floor = torch.where(torch.isfinite(floor), floor, torch.zeros_like(floor))
    sid_term = torch.where(generated, sid_logp, floor.expand(b, n))
    score = (sid_term + in_bucket + dense).masked_fill(~(generated | admitted), -math.inf)

    if sids.item_is_cold is not None and sids.cold_cap is not None:
        cold = sids.item_is_cold[None, :].expand(b, n) & torch.isfinite(score)
        order = score.argsort(dim=1, descending=True, stable=True)
        cold_sorted = cold.gather(1, order)
        over = cold_sorted & (cold_sorted.cumsum(1) > math.ceil(sids.cold_cap * k))
        score = score.masked_fill(torch.zeros_like(over).scatter(1, order, over), -math.inf)

    top = score.topk(min(k, n), dim=1)
    found = torch.isfinite(top.values)
    items = torch.where(found, top.indices, -1)
    from_bucket = (sids.bucket_size[top.indices] > 1) & generated.gather(1, top.indices) & found
    from_dense = ~generated.gather(1, top.indices) & found
    pad = k - items.shape[1]
    if pad > 0:
        items = torch.nn.functional.pad(items, (0, pad), value=-1)
        from_bucket = torch.nn.functional.pad(from_bucket, (0, pad), value=False)
        from_dense = torch.nn.functional.pad(from_dense, (0, pad), value=False)
        values = torch.nn.functional.pad(top.values, (0, pad), value=-math.inf)
    else:
        values = top.values
    return ScoredItems(items, values, from_bucket, from_dense)
