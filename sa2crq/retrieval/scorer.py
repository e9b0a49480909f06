"""From generated SIDs to ranked items: the one item scorer every variant uses (DESIGN §3.4).

An item's score is its SID's beam log-probability plus the log-probability of the item within its
bucket: a softmax, over the bucket's items, of the similarity between the request embedding and
the item embeddings (divided by a temperature). A bucket of one contributes exactly 0. Items in
the request's history are excluded, duplicates keep their best score, and the rest is cut to K.

TIGER's cold-start rule plugs in here, not in the model: its buckets are widened with the cold
items that share a generated SID's code prefix, and at most ``cold_cap * K`` cold items may
enter a top-K.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class BucketIndex:
    """The items behind every SID, as a padded (S, M) tensor of dense item indices (-1 = none)."""

    members: torch.Tensor

    @classmethod
    def build(cls, sid_index: np.ndarray, extra: tuple[np.ndarray, np.ndarray] | None = None) -> "BucketIndex":
        """``sid_index[i]`` is item i's SID. ``extra`` = (sid, item) pairs to add to buckets (cold rule)."""
        sids = np.asarray(sid_index, dtype=np.int64)
        items = np.arange(len(sids), dtype=np.int64)
        if extra is not None:
            sids = np.concatenate([sids, extra[0]])
            items = np.concatenate([items, extra[1]])
        order = np.lexsort((items, sids))
        sids, items = sids[order], items[order]
        n_sids = int(sid_index.max()) + 1 if len(sid_index) else 0
        counts = np.bincount(sids, minlength=n_sids)
        starts = np.r_[0, np.cumsum(counts)[:-1]]
        slot = np.arange(len(sids)) - starts[sids]
        members = np.full((n_sids, int(counts.max(initial=1))), -1, dtype=np.int64)
        members[sids, slot] = items
        return cls(torch.from_numpy(members))

    def to(self, device: torch.device | str) -> "BucketIndex":
        return BucketIndex(self.members.to(device))


def cold_prefix_extension(codes: np.ndarray, sid_index: np.ndarray, is_cold: np.ndarray, prefix_levels: int) -> tuple[np.ndarray, np.ndarray]:
    """TIGER's rule as bucket extension: every SID gains the cold items whose first ``prefix_levels``
    codes equal its own (a cold item is not added to its own SID twice)."""
    keys = np.unique(codes[:, :prefix_levels], axis=0, return_inverse=True)[1].reshape(-1)
    n_sids = int(sid_index.max()) + 1
    sid_key = np.zeros(n_sids, dtype=np.int64)
    sid_key[sid_index] = keys
    cold_items = np.flatnonzero(is_cold)
    # Pair each SID with every cold item of the same prefix: sort both sides by key, then join.
    sid_order = np.argsort(sid_key, kind="stable")
    cold_order = cold_items[np.argsort(keys[cold_items], kind="stable")]
    cold_keys = keys[cold_order]
    lo = np.searchsorted(cold_keys, sid_key[sid_order], side="left")
    hi = np.searchsorted(cold_keys, sid_key[sid_order], side="right")
    n_pairs = hi - lo
    pair_sid = np.repeat(sid_order, n_pairs)
    pair_item = cold_order[np.repeat(lo, n_pairs) + (np.arange(n_pairs.sum()) - np.repeat(np.cumsum(n_pairs) - n_pairs, n_pairs))]
    own = sid_index[pair_item] == pair_sid
    return pair_sid[~own], pair_item[~own]


def request_embeddings(history: torch.Tensor, item_embeddings: torch.Tensor, last_n: int = 1) -> torch.Tensor:
    """The request embedding of a history: the mean of its last ``last_n`` items' embeddings,
    L2-normalised (zero for an empty history). DESIGN §3.4: on Beauty the last item alone is best."""
    recent = history[:, -last_n:]
    weights = (recent >= 0).to(item_embeddings.dtype)
    summed = (item_embeddings[recent.clamp_min(0)] * weights[:, :, None]).sum(1)
    return torch.nn.functional.normalize(summed, dim=1)


@dataclass(frozen=True)
class ScoredItems:
    items: torch.Tensor  # (B, K) dense item indices, -1 where fewer than K candidates
    scores: torch.Tensor  # (B, K), -inf where empty
    from_bucket: torch.Tensor  # (B, K) bool: the item came from a bucket of more than one item


def score_items(
    sid_index: torch.Tensor,
    sid_log_probs: torch.Tensor,
    request_embeddings: torch.Tensor,
    item_embeddings: torch.Tensor,
    buckets: BucketIndex,
    history: torch.Tensor,
    *,
    k: int,
    temperature: float,
    item_is_cold: torch.Tensor | None = None,
    cold_cap: float | None = None,
) -> ScoredItems:
    """Vectorised over requests (B), beams (W) and bucket members (M).

    ``sid_index`` / ``sid_log_probs`` (B, W): generated SIDs (-1 = not a valid SID) and their beam
    log-probabilities; ``history`` (B, H) dense indices to exclude (-1 padding).
    """
    b, w = sid_index.shape
    members = buckets.members[sid_index.clamp_min(0)]  # (B, W, M)
    real = (members >= 0) & (sid_index >= 0)[:, :, None]
    emb = item_embeddings[members.clamp_min(0)]  # (B, W, M, D)
    sims = torch.einsum("bd,bwmd->bwm", request_embeddings, emb) / temperature
    in_bucket = torch.log_softmax(sims.masked_fill(~real, -math.inf), dim=-1)
    score = (sid_log_probs[:, :, None] + in_bucket).masked_fill(~real, -math.inf)
    from_bucket = (real.sum(-1, keepdim=True) > 1).expand_as(real)

    flat_items = members.reshape(b, -1)
    flat_score = score.reshape(b, -1)
    flat_bucket = from_bucket.reshape(b, -1)
    excluded = (flat_items[:, :, None] == history[:, None, :]).any(-1) & (flat_items >= 0)
    flat_score = flat_score.masked_fill(excluded, -math.inf)

    # Best score first; then drop later copies of an item (a stable sort by item keeps score order).
    order = flat_score.argsort(dim=1, descending=True, stable=True)
    flat_items, flat_score, flat_bucket = (t.gather(1, order) for t in (flat_items, flat_score, flat_bucket))
    by_item = flat_items.argsort(dim=1, stable=True)
    sorted_items = flat_items.gather(1, by_item)
    repeat_sorted = torch.zeros_like(sorted_items, dtype=torch.bool)
    repeat_sorted[:, 1:] = sorted_items[:, 1:] == sorted_items[:, :-1]
    repeat = torch.zeros_like(repeat_sorted).scatter(1, by_item, repeat_sorted)
    flat_score = flat_score.masked_fill(repeat, -math.inf)

    if item_is_cold is not None and cold_cap is not None:
        cold = item_is_cold[flat_items.clamp_min(0)] & torch.isfinite(flat_score)
        # Positions are in descending score order; re-sort after the masking above first.
        order = flat_score.argsort(dim=1, descending=True, stable=True)
        flat_items, flat_score, flat_bucket, cold = (t.gather(1, order) for t in (flat_items, flat_score, flat_bucket, cold))
        over_cap = cold & (cold.cumsum(1) > math.ceil(cold_cap * k))
        flat_score = flat_score.masked_fill(over_cap, -math.inf)

    top = flat_score.topk(min(k, flat_score.shape[1]), dim=1)
    items = flat_items.gather(1, top.indices)
    found = torch.isfinite(top.values)
    pad = k - items.shape[1]
    items = torch.where(found, items, torch.full_like(items, -1))
    bucket = flat_bucket.gather(1, top.indices) & found
    if pad > 0:
        items = torch.nn.functional.pad(items, (0, pad), value=-1)
        bucket = torch.nn.functional.pad(bucket, (0, pad), value=False)
        values = torch.nn.functional.pad(top.values, (0, pad), value=-math.inf)
    else:
        values = top.values
    return ScoredItems(items, values, bucket)
