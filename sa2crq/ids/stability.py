"""SIDs consistent with a published SID table, and the churn between two tables (DESIGN §3.3a).

Retrievers are trained on SIDs, so a new version keeps every SID it can. Two jobs need that:

* **Recode with a reused tokenizer** (``pin_all_previous=False``): the whole catalog is re-encoded
  with the same tokenizer and its popularity recomputed. Hysteresis rule, on the quantity SARQ
  thresholds rather than on its output: with T the new keep threshold and h =
  ``sid.hysteresis_bits`` (default 1), an item present in the published table with identical
  full-depth codes keeps its published SID (code depth and digit) while that depth d lies in
  [D(T * 2^h), max(D(ceil(T / 2^h)), fresh)], where D(t) counts the depths whose prefix mass reaches
  t (clipped to [min_length, L]) and fresh is its SARQ depth on the new catalog, bucket cap included.
  In words: its kept prefix still carries at least 2^-h of the threshold (or SARQ's bucket cap
  puts it that deep), and the next prefix carries less than 2^h times the threshold. A depth rule
  (|fresh - d| <= k levels) would not do: below the top levels an item is alone in its prefixes,
  whose mass is its own weight, so a threshold that moves by one unit (the catalog grew a few
  percent) takes every item of that weight from a short SID to full depth at once. Fixed-length
  configs have no popularity-driven length: there an unchanged item keeps its SID iff its
  published depth is full. Items missing from the new catalog disappear.
* **Ingest** (``pin_all_previous=True``): every published item keeps its SID unconditionally and
  must come back with its published codes and popularity; only new items are placed. A new item
  may not reuse a published id: the ingest job drops exact re-sends before calling this.

Kept ("pinned") items never move. Every other item is *placed* against the occupancy they leave,
with the invariants of :func:`assign_sids` (distinct SIDs except truncated buckets, truncated
buckets of at most ``max_bucket`` items, digits unique in a full-depth group except the overflow
digit):

* Start from the fresh SARQ depth. For a recode that is :func:`sarq_lengths` on the new catalog; for
  an ingest it is computed on the prefix masses of the whole catalog (new items usually have
  popularity 0, i.e. weight epsilon) against the published keep threshold, which is
  :func:`keep_threshold` of the published table's own total mass and size, exactly as
  :func:`assign_sids` computed it.
* Bucket cap, shallow levels first: the free places of a truncated bucket (``max_bucket`` minus
  its pinned items) go to the placed items at that depth in ascending popularity, then item id; the
  rest go one level deeper. A deeper, more specific SID is worth more to an item with more traffic,
  as in SARQ itself.
* Digits, under the conditions of :func:`assign_sids` on the combined group: placed items take
  the smallest digits below ``digit_vocab - 1`` not held by pinned items of their group, in
  descending popularity, then item id; when none is left they share the last digit (overflow, an
  error under ``one_item_per_id``). A pinned item without a digit keeps none; a placed item joining
  its group still gets one, so the two SIDs differ.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sa2crq.config import SIDConfig
from sa2crq.data.columns import list_matrix
from sa2crq.ids.sid_table import (
    SIDTable,
    SIDVocabulary,
    build_sid_table,
    digit_required,
    rank_within_groups,
    sid_groups,
)
from sa2crq.quantize.sarq import (
    default_tau,
    item_weights,
    keep_threshold,
    prefix_group_ids,
    prefix_masses,
    sarq_lengths,
)


@dataclass(frozen=True)
class PublishedSIDs:
    """The columns of a published SID table that stability needs."""

    item_ids: np.ndarray
    codes: np.ndarray  # (N, L) full-depth codes
    code_depth: np.ndarray
    digit: np.ndarray  # -1 for none
    popularity: np.ndarray

    def __post_init__(self) -> None:
        codes = np.asarray(self.codes, dtype=np.int64)
        object.__setattr__(self, "item_ids", np.asarray(self.item_ids))
        object.__setattr__(self, "codes", codes)
        for name in ("code_depth", "digit", "popularity"):
            object.__setattr__(self, name, np.asarray(getattr(self, name), dtype=np.int64))
        if codes.ndim != 2 or codes.shape[0] == 0:
            raise ValueError(f"published codes must be a non-empty (items, levels) array, got shape {codes.shape}")
        n, levels = codes.shape
        if any(len(getattr(self, name)) != n for name in ("item_ids", "code_depth", "digit", "popularity")):
            raise ValueError("published columns must all have one entry per item")
        if ((self.code_depth < 1) | (self.code_depth > levels)).any() or (self.digit < -1).any():
            raise ValueError(f"published code_depth must lie in [1, {levels}] and digit be at least -1")
        _require_unique(self.item_ids, "the published table")

    @classmethod
    def from_arrow(cls, table: pa.Table) -> "PublishedSIDs":
        """From a published SID table (:meth:`SIDTable.to_arrow`, or the Spark job's, whose codes are
        variable-length lists)."""
        return cls(
            item_ids=table.column("item_id").to_numpy(),
            codes=list_matrix(table.column("codes")),
            code_depth=table.column("code_depth").to_numpy(),
            digit=table.column("digit").to_numpy(),
            popularity=table.column("popularity").to_numpy(),
        )


@dataclass(frozen=True)
class StabilityStats:
    pinned: int  # items that kept their published SID
    placed: int  # items given a SID against the pinned occupancy: new, codes changed, or past the hysteresis
    moved_by_hysteresis: int  # unchanged items placed because their depth moved past the hysteresis
    new_items: int
    removed_items: int  # published items absent from the new catalog

    def __post_init__(self) -> None:
        if min(self.pinned, self.placed, self.moved_by_hysteresis, self.new_items, self.removed_items) < 0:
            raise ValueError("stability counts must be non-negative")


def stable_assign_sids(
    previous: PublishedSIDs,
    item_ids: np.ndarray,
    codes: np.ndarray,
    popularity: np.ndarray,
    segments: np.ndarray,
    codebook_sizes: tuple[int, ...],
    config: SIDConfig,
    *,
    pin_all_previous: bool = False,
) -> tuple[SIDTable, StabilityStats]:
    """SIDs for the whole catalog that keep the published ones (see the module docstring).

    ``pin_all_previous=False`` is a recode, ``True`` an ingest, where the catalog is every published
    item (with its published codes and popularity) plus the new items.
    """
    item_ids = np.asarray(item_ids)
    codes = np.asarray(codes, dtype=np.int64)
    popularity = np.asarray(popularity, dtype=np.int64)
    n, levels = codes.shape
    if n == 0:
        raise ValueError("cannot assign SIDs to an empty catalog")
    if previous.codes.shape[1] != levels:
        raise ValueError(f"the published table has {previous.codes.shape[1]} code levels, the catalog {levels}")
    if previous.digit.max() >= config.digit_vocab:
        raise ValueError(
            f"the published table has digit {previous.digit.max()}, beyond sid.digit_vocab {config.digit_vocab}"
        )
    _require_unique(item_ids, "the catalog (an ingested item must not reuse a published id)")

    row = _rows_in(previous.item_ids, item_ids)
    known = row >= 0
    row = np.where(known, row, 0)
    unchanged = known & (previous.codes[row] == codes).all(axis=1)
    groups = prefix_group_ids(codes)
    if pin_all_previous:
        _check_ingest(previous, item_ids, known, unchanged & (previous.popularity[row] == popularity))
        fresh, tau, threshold = _ingest_depths(previous, groups, popularity, config)
        pinned = known
    else:
        if config.adaptive_length:
            fresh, tau, threshold = sarq_lengths(codes, popularity, config)
            shallowest, deepest = kept_depth_band(groups, popularity, threshold, fresh, config)
        else:
            fresh, tau, threshold = np.full(n, levels, dtype=np.int64), None, None
            shallowest = deepest = fresh
        published_depth = previous.code_depth[row]
        pinned = unchanged & (shallowest <= published_depth) & (published_depth <= deepest)

    start = np.where(pinned, previous.code_depth[row], fresh)
    depth = _place_depths(start, pinned, groups, popularity, item_ids, config)
    before_digit = sid_groups(groups, depth)
    digit = _place_digits(
        np.where(pinned, previous.digit[row], -1), pinned, before_digit, depth == levels, popularity, item_ids, config
    )
    vocab = SIDVocabulary(tuple(int(k) for k in codebook_sizes), config.digit_vocab)
    table = build_sid_table(item_ids, segments, popularity, codes, depth, digit, before_digit, vocab, tau, threshold)
    if config.one_item_per_id:
        shared = ~pinned & (table.bucket_size > 1)
        if shared.any():
            first = np.flatnonzero(shared)[0]
            raise ValueError(
                f"one_item_per_id: item {_first(item_ids, shared)!r} finds no free digit in the digit vocabulary of "
                f"{config.digit_vocab} and would share its SID with {table.bucket_size[first] - 1} items; "
                "raise sid.digit_vocab"
            )
    stats = StabilityStats(
        pinned=int(pinned.sum()),
        placed=int((~pinned).sum()),
        moved_by_hysteresis=int((unchanged & ~pinned).sum()),
        new_items=int((~known).sum()),
        removed_items=len(previous.item_ids) - int(known.sum()),
    )
    return table, stats


def kept_depth_band(
    groups: list[np.ndarray], popularity: np.ndarray, threshold: int, fresh: np.ndarray, config: SIDConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The depths an unchanged item may keep in a recode (the module docstring's hysteresis rule):
    from D(T * 2^h) to max(D(ceil(T / 2^h)), fresh), in exact integers."""
    levels = len(groups)
    masses = prefix_masses(groups, item_weights(popularity, config.epsilon))
    scale = 2**config.hysteresis_bits

    def depth_reaching(mass: int) -> np.ndarray:
        return np.clip((masses >= mass).sum(axis=1), config.min_length, levels).astype(np.int64)

    return depth_reaching(threshold * scale), np.maximum(depth_reaching(-(-threshold // scale)), fresh)


def _check_ingest(previous: PublishedSIDs, item_ids: np.ndarray, known: np.ndarray, identical: np.ndarray) -> None:
    """An ingest carries every published item exactly as published."""
    altered = known & ~identical
    if altered.any():
        raise ValueError(
            f"item {_first(item_ids, altered)!r} is already published with other codes or popularity: an ingest never "
            "changes a published item (drop exact re-sends before ingesting, or recode)"
        )
    missing = _rows_in(item_ids, previous.item_ids) < 0
    if missing.any():
        raise ValueError(
            f"published item {_first(previous.item_ids, missing)!r} is missing: an ingest carries every published item"
        )


def _ingest_depths(
    previous: PublishedSIDs, groups: list[np.ndarray], popularity: np.ndarray, config: SIDConfig
) -> tuple[np.ndarray, float | None, int | None]:
    """SARQ depths on the whole catalog's prefix masses against the published keep threshold, before the bucket cap."""
    levels = len(groups)
    if not config.adaptive_length:
        return np.full(len(popularity), levels, dtype=np.int64), None, None
    tau = config.tau if config.tau is not None else default_tau(len(previous.item_ids))
    threshold = keep_threshold(int(item_weights(previous.popularity, config.epsilon).sum()), tau)
    kept = (prefix_masses(groups, item_weights(popularity, config.epsilon)) >= threshold).sum(axis=1)
    return np.clip(kept, config.min_length, levels).astype(np.int64), float(tau), threshold


def _place_depths(
    depth: np.ndarray,
    pinned: np.ndarray,
    groups: list[np.ndarray],
    popularity: np.ndarray,
    item_ids: np.ndarray,
    config: SIDConfig,
) -> np.ndarray:
    """Bucket cap against the pinned occupancy, shallow levels first: placed items fill a truncated
    bucket's free places in ascending popularity, then item id, and the rest go one level deeper."""
    depth = depth.copy()
    for level in range(1, len(groups)):
        placed = np.flatnonzero(~pinned & (depth == level))
        if placed.size == 0:
            continue
        gid = groups[level - 1]
        occupied = np.bincount(gid[pinned & (depth == level)], minlength=int(gid.max()) + 1)
        rank = rank_within_groups(gid[placed], -popularity[placed], item_ids[placed])
        depth[placed[occupied[gid[placed]] + rank >= config.max_bucket]] = level + 1
    return depth


def _place_digits(
    digit: np.ndarray,
    pinned: np.ndarray,
    before_digit: np.ndarray,
    full: np.ndarray,
    popularity: np.ndarray,
    item_ids: np.ndarray,
    config: SIDConfig,
) -> np.ndarray:
    """Placed items that need a digit take, by descending popularity then item id, the smallest
    digits below the last one not held by pinned items of their group; the rest share the last digit.

    With u_0 < u_1 < ... the held digits of a group, the r-th free digit is r + #{j : u_j - j <= r}
    (u_j - j counts the free digits below u_j and never decreases), one searchsorted for all items.
    """
    last = config.digit_vocab - 1
    wants = ~pinned & digit_required(np.bincount(before_digit)[before_digit], full, config)
    held = pinned & (digit >= 0) & (digit < last)
    used = np.unique(before_digit[held] * last + digit[held])  # sorted by group, then digit
    used_group = used // last
    free_below = used % last - (np.arange(len(used)) - np.searchsorted(used_group, used_group))
    keys = used_group * last + free_below  # sorted: group first, then the non-decreasing free_below

    placed = np.flatnonzero(wants)
    group = before_digit[placed]
    rank = rank_within_groups(group, popularity[placed], item_ids[placed])
    # A rank past the regular digits lands on the last digit whatever the count adds.
    held_at_or_below = np.searchsorted(keys, group * last + rank, side="right") - np.searchsorted(keys, group * last)
    digit = digit.copy()
    digit[placed] = np.minimum(rank + held_at_or_below, last)
    return digit


def sid_churn(previous: pa.Table, current: pa.Table) -> tuple[dict, pa.Table]:
    """Share of the items in both SID tables whose ``sid`` differs (``churn``), item counts
    (``previous``, ``current``, ``common``, ``unchanged``, ``changed``, ``added``, ``removed``), and the remap table.

    The remap has one row per changed, added or removed item, by item id: ``item_id``, ``old_sid``
    (null if added), ``new_sid`` (null if removed), ``change`` ('changed', 'added' or 'removed').
    """
    for table, name in ((previous, "previous"), (current, "current")):
        if pc.count_distinct(table.column("item_id")).as_py() != table.num_rows:
            raise ValueError(f"the {name} SID table repeats item ids")
    joined = pa.table({"item_id": previous.column("item_id"), "old_row": np.arange(previous.num_rows)}).join(
        pa.table({"item_id": current.column("item_id"), "new_row": np.arange(current.num_rows)}),
        keys="item_id",
        join_type="full outer",
    )
    joined = joined.take(pc.sort_indices(joined, [("item_id", "ascending")]))
    old_sid = previous.column("sid").combine_chunks().take(joined.column("old_row").combine_chunks())
    new_sid = current.column("sid").combine_chunks().take(joined.column("new_row").combine_chunks())
    had = joined.column("old_row").is_valid().to_numpy(zero_copy_only=False)
    has = joined.column("new_row").is_valid().to_numpy(zero_copy_only=False)
    same = _same_lists(old_sid, new_sid)
    change = np.where(~had, "added", np.where(~has, "removed", np.where(same, "", "changed")))

    counts = {name: int((change == name).sum()) for name in ("changed", "added", "removed")}
    common = int((had & has).sum())
    stats = {
        "previous": previous.num_rows,
        "current": current.num_rows,
        "common": common,
        "unchanged": common - counts["changed"],
        **counts,
        "churn": counts["changed"] / common if common else 0.0,
    }
    moved = np.flatnonzero(change != "")
    remap = pa.table(
        {
            "item_id": joined.column("item_id").take(moved),
            "old_sid": old_sid.take(moved),
            "new_sid": new_sid.take(moved),
            "change": pa.array(change[moved], pa.string()),
        }
    )
    return stats, remap


def _same_lists(a: pa.Array, b: pa.Array) -> np.ndarray:
    """Row-wise equality of two list arrays; False where either side is null."""
    same_length = pc.fill_null(pc.equal(pc.list_value_length(a), pc.list_value_length(b)), False)
    rows = np.flatnonzero(same_length.to_numpy(zero_copy_only=False))
    a_rows, b_rows = a.take(rows), b.take(rows)
    differs = pc.list_flatten(a_rows).to_numpy() != pc.list_flatten(b_rows).to_numpy()
    mismatches = np.bincount(pc.list_parent_indices(a_rows).to_numpy()[differs], minlength=len(rows))
    same = np.zeros(len(a), dtype=bool)
    same[rows] = mismatches == 0
    return same


def _rows_in(reference: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row of each of ``ids`` in ``reference`` (unique ids), -1 where absent."""
    order = np.argsort(reference, kind="stable")
    ordered = reference[order]
    pos = np.minimum(np.searchsorted(ordered, ids), len(reference) - 1)
    return np.where(ordered[pos] == ids, order[pos], -1)


def _require_unique(item_ids: np.ndarray, where: str) -> None:
    values, counts = np.unique(item_ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"item id {_first(values, counts > 1)!r} appears more than once in {where}")


def _first(item_ids: np.ndarray, mask: np.ndarray):
    """The first masked id as a plain Python value, for error messages."""
    return item_ids[mask][:1].tolist()[0]
