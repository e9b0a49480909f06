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
(:meth:`sa2crq.retrieval.candidates.CandidateGenerator.tune`). :func:`score_items` is vectorised
over a batch of requests and a slice of the catalog: the items :meth:`ItemSIDs.reachable` finds
from the batch's generated SIDs and dense-path admissions (each of which the generator finds in one
streaming pass over the catalog), so a batch holds (B x slice) scores, not (B x catalog). With
neither dense term weighted the dense path admits nothing (:func:`admits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ItemSIDs:
    """Item -> SID map for the scorer: ``item_sid`` (N,) the trie SID index of every item (dense
    index order), ``bucket_size`` (N,) the catalog's items sharing it, and each SID's members
    (``members``, items ordered by SID, ``member_start`` (num_sids + 1,) offsets into it); for
    TIGER's cold rule, the code-prefix key of every item and SID (None without the rule), which
    items are cold, and the cold items of each prefix (``cold_members``, ``cold_start``)."""

    item_sid: torch.Tensor
    bucket_size: torch.Tensor
    num_sids: int
    members: torch.Tensor
    member_start: torch.Tensor
    item_prefix: torch.Tensor | None = None
    sid_prefix: torch.Tensor | None = None
    item_is_cold: torch.Tensor | None = None
    cold_cap: float | None = None
    cold_members: torch.Tensor | None = None
    cold_start: torch.Tensor | None = None

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
        item_sid = torch.as_tensor(np.asarray(item_sid, dtype=np.int64))
        num_sids = int(item_sid.max()) + 1 if len(item_sid) else 0
        counts = torch.bincount(item_sid, minlength=num_sids)
        members, member_start = _group_rows(item_sid, num_sids)
        if codes is None:
            return cls(item_sid, counts[item_sid], num_sids, members, member_start)
        if item_is_cold is None or cold_cap is None or prefix_levels < 1:
            raise ValueError("TIGER's cold rule needs codes, prefix_levels >= 1, item_is_cold and cold_cap")
        item_prefix = torch.as_tensor(np.unique(codes[:, :prefix_levels], axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64))
        sid_prefix = torch.zeros(num_sids, dtype=torch.int64)
        sid_prefix[item_sid] = item_prefix
        is_cold = torch.as_tensor(item_is_cold, dtype=torch.bool)
        cold_rows = torch.nonzero(is_cold).reshape(-1)
        cold_order, cold_start = _group_rows(item_prefix[cold_rows], int(item_prefix.max()) + 1)
        return cls(
            item_sid, counts[item_sid], num_sids, members, member_start,
            item_prefix, sid_prefix, is_cold, cold_cap, cold_rows[cold_order], cold_start,
        )  # fmt: skip

    def to(self, device: torch.device | str) -> "ItemSIDs":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return ItemSIDs(
            move(self.item_sid), move(self.bucket_size), self.num_sids, move(self.members), move(self.member_start),
            move(self.item_prefix), move(self.sid_prefix), move(self.item_is_cold), self.cold_cap,
            move(self.cold_members), move(self.cold_start),
        )  # fmt: skip

    def reachable(self, generated: torch.Tensor, admitted: torch.Tensor, max_members: int) -> torch.Tensor:
        """The sorted catalog rows a batch's scores can involve: the members of every ``generated``
        SID (``-1``: none), the ``admitted`` items (``-1``: none), the cold items sharing a code
        prefix with a generated SID (TIGER's rule), and every member of each such item's SID (its
        in-bucket softmax runs over them). A SID expands to at most ``max_members`` members, in
        catalog order; no bucket is that large unless many items share one full-depth code path."""
        sids = generated[generated >= 0].unique()
        seeds = [admitted[admitted >= 0]]
        if self.item_prefix is not None:
            prefixes = self.sid_prefix[sids].unique()
            seeds.append(self.cold_members[_ranges(self.cold_start[prefixes], self.cold_start[prefixes + 1], max_members)])
        seeds = torch.cat(seeds)
        sids = torch.cat([sids, self.item_sid[seeds]]).unique()
        expanded = self.members[_ranges(self.member_start[sids], self.member_start[sids + 1], max_members)]
        return torch.cat([seeds, expanded]).unique()

    def restrict(self, rows: torch.Tensor) -> tuple["ItemSIDs", torch.Tensor]:
        """The map of the catalog items at sorted ``rows`` alone, SIDs and prefixes renumbered from 0,
        and the catalog SID of each new SID number. ``bucket_size`` stays the catalog's."""
        sid_of, item_sid = self.item_sid[rows].unique(return_inverse=True)
        members, member_start = _group_rows(item_sid, len(sid_of))
        if self.item_prefix is None:
            return ItemSIDs(item_sid, self.bucket_size[rows], len(sid_of), members, member_start), sid_of
        prefix_of, item_prefix = self.item_prefix[rows].unique(return_inverse=True)
        sid_prefix = torch.zeros(len(sid_of), dtype=torch.int64, device=rows.device).index_copy_(0, item_sid, item_prefix)
        is_cold = self.item_is_cold[rows]
        cold_rows = torch.nonzero(is_cold).reshape(-1)
        cold_order, cold_start = _group_rows(item_prefix[cold_rows], len(prefix_of))
        restricted = ItemSIDs(
            item_sid, self.bucket_size[rows], len(sid_of), members, member_start,
            item_prefix, sid_prefix, is_cold, self.cold_cap, cold_rows[cold_order], cold_start,
        )  # fmt: skip
        return restricted, sid_of


def _group_rows(group: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows ordered by ``group``, stable; (num_groups + 1,) offsets of each group's run)."""
    order = torch.sort(group, stable=True).indices
    start = torch.zeros(num_groups + 1, dtype=torch.int64, device=group.device)
    start[1:] = torch.bincount(group, minlength=num_groups).cumsum(0)
    return order, start


def _ranges(starts: torch.Tensor, ends: torch.Tensor, cap: int) -> torch.Tensor:
    """The positions ``starts[j] .. min(ends[j], starts[j] + cap) - 1`` of every j, concatenated."""
    counts = (ends - starts).clamp(max=cap)
    owner = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return starts[owner] + torch.arange(len(owner), device=counts.device) - first[owner]


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


def admits(weights: ScorerWeights, dense_head: bool) -> bool:
    """Whether the dense path ranks anything: with neither term weighted every item ties at 0 and it
    admits nothing (any choice among equals would be arbitrary)."""
    return weights.dense_candidates > 0 and (weights.content_weight > 0 or (dense_head and weights.dense_weight > 0))


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
    if admits(weights, features.dense_log_probs is not None):
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
