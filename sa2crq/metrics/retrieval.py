"""Item-level retrieval metrics (DESIGN §5), streamed over batches of requests.

Every request has exactly one relevant item (its leave-one-out target), and hits are checked at
*item* level: a retriever's top-K is a list of item ids (generated SIDs already expanded to items,
deduplicated and cut to K; empty slots are ``-1``). With ``rank`` the 0-based position of the
target in the top-K list (no rank when it is absent):

* ``recall@K``: 1 if the target is among the first K slots (``rank < K``), else 0; averaged over
  requests. With one relevant item this is also the hit rate.
* ``ndcg@K``: ``1 / log2(rank + 2)`` for a hit at ``rank < K``, else 0; averaged over requests. The
  ideal DCG of a single relevant item is 1, so DCG is already normalised.
* ``segments``: the same metrics restricted to requests whose *target* item is in each segment
  (head / torso / tail / cold by training popularity, :mod:`sa2crq.data.segments`), with the number of
  requests in each slice. A slice without requests reports ``None`` for its metrics.
* ``tail_coverage``: the number of distinct items of segment TAIL that appear in anyone's top-K,
  ``K = max(ks)`` (DESIGN §5, coverage).
* ``bucket_share_at_k``: the share of *filled* top-K slots (``K = max(ks)``) whose item came from
  expanding a bucket SID (``from_bucket``); it shows whether short, shared IDs win by construction.
  An update without ``from_bucket`` (e.g. the dense k-NN row) contributes filled slots and no bucket
  slots. ``None`` before any slot was filled.
* ``dense_share_at_k``: the same share for slots whose item entered through the item scorer's dense
  path only (no generated SID reached it, ``from_dense``): how much of a hybrid top-K generation
  did not find.
* ``requests``: the number of requests seen.

Per-request values (:meth:`RetrievalAccumulator.per_request`) are kept, in update order, so that two
variants evaluated on the same requests can be compared with a paired bootstrap
(:mod:`sa2crq.metrics.bootstrap`).

:func:`hallucination_rate` is the share of *unconstrained* beam outputs that are not a valid ID
(DESIGN §3.4, §5): it is taken over every finished beam of every request, so a request with a wider
beam counts more.

Everything is array arithmetic over the batch; no Python loop runs per request.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sa2crq.data.segments import SEGMENT_NAMES, TAIL

__all__ = [
    "DEFAULT_KS",
    "RetrievalAccumulator",
    "hallucination_rate",
    "ndcg_at_k",
    "recall_at_k",
    "target_ranks",
]

DEFAULT_KS: tuple[int, ...] = (5, 10)
EMPTY_SLOT = -1


def target_ranks(topk_item_ids: np.ndarray, target_item_ids: np.ndarray) -> np.ndarray:
    """0-based position of each request's target in its top-K row, ``-1`` where it is absent.

    Raises ``ValueError`` when a row holds the same item twice (the caller must deduplicate) or when
    the shapes do not match.
    """
    topk = _as_topk(topk_item_ids)
    targets = np.asarray(target_item_ids)
    if targets.shape != (topk.shape[0],):
        raise ValueError(f"target_item_ids has shape {targets.shape}, expected ({topk.shape[0]},)")
    _check_no_duplicates(topk)
    match = (topk == targets[:, None]) & (topk != EMPTY_SLOT)
    return np.where(match.any(axis=1), match.argmax(axis=1), -1).astype(np.int64)


def recall_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-request Recall@K (0.0 or 1.0) from :func:`target_ranks`."""
    ranks = np.asarray(ranks)
    return ((ranks >= 0) & (ranks < k)).astype(np.float64)


def ndcg_at_k(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-request NDCG@K with one relevant item: ``1 / log2(rank + 2)`` for a hit within K, else 0."""
    ranks = np.asarray(ranks)
    hit = (ranks >= 0) & (ranks < k)
    return np.where(hit, 1.0 / np.log2(np.maximum(ranks, 0) + 2.0), 0.0)


def hallucination_rate(valid: np.ndarray) -> float:
    """Share of unconstrained beam outputs that are not a valid ID.

    ``valid`` is a boolean array of any shape, typically ``(B, beams)``: one flag per finished beam of
    every request. The rate is taken over all of them together.
    """
    valid = np.asarray(valid)
    if valid.dtype != np.bool_:
        raise ValueError(f"valid must be a boolean array, got dtype {valid.dtype}")
    if valid.size == 0:
        raise ValueError("hallucination_rate of no beam outputs is undefined")
    return float(1.0 - valid.mean())


class RetrievalAccumulator:
    """Streaming item-level metrics over batches of requests (see the module docstring).

    ``item_index`` is the sorted array of the catalog's item ids (int64); the dense index of an item
    is its position there, and ``item_segments[i]`` is the segment code of the item at dense index
    ``i``. Item ids in :meth:`update` are catalog ids, not dense indices (pass
    ``item_index=np.arange(n_items)`` when they are the same thing).

    State: per-request target ranks and segments (from which every per-request metric is derived
    exactly), kept as a growing list of per-batch arrays and consolidated on read; a boolean mask over
    the catalog for tail coverage; two slot counters for the bucket share.
    """

    def __init__(
        self,
        *,
        item_index: np.ndarray,
        item_segments: np.ndarray,
        ks: Sequence[int] = DEFAULT_KS,
    ) -> None:
        item_index = np.asarray(item_index)
        item_segments = np.asarray(item_segments)
        if item_index.ndim != 1 or not np.issubdtype(item_index.dtype, np.integer):
            raise ValueError("item_index must be a 1-d integer array of item ids")
        if item_index.size > 1 and not np.all(item_index[1:] > item_index[:-1]):
            raise ValueError("item_index must be sorted ascending without duplicates")
        if item_segments.shape != item_index.shape:
            raise ValueError(f"item_segments has shape {item_segments.shape}, item_index {item_index.shape}")
        ks = tuple(int(k) for k in ks)
        if not ks or min(ks) < 1 or len(set(ks)) != len(ks):
            raise ValueError(f"ks must be distinct positive integers, got {ks}")

        self.ks: tuple[int, ...] = tuple(sorted(ks))
        self.k_max: int = self.ks[-1]
        self._item_index = item_index.astype(np.int64, copy=False)
        self._item_segments = item_segments.astype(np.int8, copy=False)
        self._ranks: list[np.ndarray] = []
        self._segments: list[np.ndarray] = []
        self._tail_seen = np.zeros(item_index.size, dtype=bool)
        self._filled_slots = 0
        self._bucket_slots = 0
        self._dense_slots = 0

    # ---------------------------------------------------------------------------------------- update

    def update(
        self,
        topk_item_ids: np.ndarray,
        target_item_ids: np.ndarray,
        from_bucket: np.ndarray | None = None,
        from_dense: np.ndarray | None = None,
    ) -> None:
        """Add a batch: ``topk_item_ids`` (B, Kmax) int64 with ``-1`` for empty slots, best first;
        ``target_item_ids`` (B,); ``from_bucket`` (B, Kmax) bool, True where the slot's item came from
        expanding a bucket SID, or None when no slot did; ``from_dense`` likewise for items that
        entered through the dense path only. ``Kmax`` must be at least ``max(ks)``; slots beyond it
        are checked for duplicates but otherwise ignored.
        """
        topk = _as_topk(topk_item_ids)
        if topk.shape[1] < self.k_max:
            raise ValueError(
                f"topk_item_ids has {topk.shape[1]} columns but ks needs {self.k_max}; pad with {EMPTY_SLOT}"
            )
        for name, flags in (("from_bucket", from_bucket), ("from_dense", from_dense)):
            if flags is not None and (np.shape(flags) != topk.shape or np.asarray(flags).dtype != np.bool_):
                raise ValueError(f"{name} must be a bool array of shape {topk.shape}")
        ranks = target_ranks(topk, target_item_ids)  # validates shapes and duplicates
        target_dense = self._dense(np.asarray(target_item_ids), what="target_item_ids")

        top = topk[:, : self.k_max]
        filled = top != EMPTY_SLOT
        top_dense = self._dense(top[filled], what="topk_item_ids")
        is_tail = self._item_segments[top_dense] == TAIL
        bucket_slots = int(np.asarray(from_bucket)[:, : self.k_max][filled].sum()) if from_bucket is not None else 0
        dense_slots = int(np.asarray(from_dense)[:, : self.k_max][filled].sum()) if from_dense is not None else 0

        # All checks passed: only now mutate state, so a rejected batch leaves the accumulator as it was.
        self._tail_seen[top_dense[is_tail]] = True
        self._filled_slots += int(filled.sum())
        self._bucket_slots += bucket_slots
        self._dense_slots += dense_slots
        self._ranks.append(np.where(ranks < self.k_max, ranks, -1))
        self._segments.append(self._item_segments[target_dense])

    # --------------------------------------------------------------------------------------- results

    @property
    def requests(self) -> int:
        return sum(len(r) for r in self._ranks)

    def metric_names(self) -> tuple[str, ...]:
        return tuple(f"{name}@{k}" for k in self.ks for name in ("recall", "ndcg"))

    def per_request(self, metric: str) -> np.ndarray:
        """Per-request values of ``metric`` (``"recall@K"`` or ``"ndcg@K"`` for K in ``ks``), float64,
        in update order."""
        name, _, k_text = metric.partition("@")
        if name not in ("recall", "ndcg") or not k_text.isdigit() or int(k_text) not in self.ks:
            raise KeyError(f"unknown metric {metric!r}; known: {', '.join(self.metric_names())}")
        fn = recall_at_k if name == "recall" else ndcg_at_k
        return fn(self.ranks(), int(k_text))

    def ranks(self) -> np.ndarray:
        """Per-request 0-based rank of the target within the top ``max(ks)``, ``-1`` for a miss."""
        self._ranks = [_concat(self._ranks, np.int64)]
        return self._ranks[0]

    def request_segments(self) -> np.ndarray:
        """Per-request segment code of the target item (int8), in update order."""
        self._segments = [_concat(self._segments, np.int8)]
        return self._segments[0]

    def result(self) -> dict[str, Any]:
        ranks = self.ranks()
        segments = self.request_segments()
        values = {name: self.per_request(name) for name in self.metric_names()}
        out: dict[str, Any] = {"requests": int(len(ranks))}
        out.update({name: _mean(v) for name, v in values.items()})
        out["segments"] = {}
        for code, segment_name in enumerate(SEGMENT_NAMES):  # four slices, not a loop over requests
            mask = segments == code
            out["segments"][segment_name] = {
                "requests": int(mask.sum()),
                **{name: _mean(v[mask]) for name, v in values.items()},
            }
        out["k"] = self.k_max
        out["tail_coverage"] = int(self._tail_seen.sum())
        out["filled_slots"] = self._filled_slots
        out["bucket_slots"] = self._bucket_slots
        out["bucket_share_at_k"] = self._bucket_slots / self._filled_slots if self._filled_slots else None
        out["dense_slots"] = self._dense_slots
        out["dense_share_at_k"] = self._dense_slots / self._filled_slots if self._filled_slots else None
        return out

    # -------------------------------------------------------------------------------------- internals

    def _dense(self, item_ids: np.ndarray, *, what: str) -> np.ndarray:
        """Dense catalog index of each id; ``ValueError`` for ids outside the catalog."""
        item_ids = item_ids.astype(np.int64, copy=False)
        pos = np.searchsorted(self._item_index, item_ids)
        known = np.zeros(item_ids.shape, dtype=bool)
        inside = pos < self._item_index.size
        known[inside] = self._item_index[pos[inside]] == item_ids[inside]
        if not known.all():
            missing = np.unique(item_ids[~known])[:5]
            raise ValueError(f"{what}: {int((~known).sum())} ids not in the catalog, e.g. {missing.tolist()}")
        return pos


def _as_topk(topk_item_ids: np.ndarray) -> np.ndarray:
    topk = np.asarray(topk_item_ids)
    if topk.ndim != 2 or not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"topk_item_ids must be a 2-d integer array, got {topk.dtype} of shape {topk.shape}")
    return topk.astype(np.int64, copy=False)


def _check_no_duplicates(topk: np.ndarray) -> None:
    ordered = np.sort(topk, axis=1)
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != EMPTY_SLOT)
    if repeated.any():
        rows = np.flatnonzero(repeated.any(axis=1))
        raise ValueError(
            f"topk_item_ids: {len(rows)} rows repeat an item (first: row {int(rows[0])}); deduplicate before scoring"
        )


def _concat(parts: list[np.ndarray], dtype: type) -> np.ndarray:
    """One read-only array of the parts (the accumulator hands it out without copying)."""
    if not parts:
        whole = np.empty(0, dtype=dtype)
    elif len(parts) == 1:
        whole = parts[0]  # already consolidated, or a batch array the accumulator owns
    else:
        whole = np.concatenate(parts)
    whole.flags.writeable = False
    return whole


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None
