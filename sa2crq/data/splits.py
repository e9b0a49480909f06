"""Train / validation / test splits and training popularity (DESIGN §5).

Both splits order each user's interactions by ``timestamp``, ties broken by row order in the input
(a stable sort), and return every table sorted by (user, timestamp, input row order), which is the order a
sequence model reads histories in. Everything is one sort plus array arithmetic on run boundaries; no
Python loop runs per user.

**Leave-one-out** (run 1): per user, the last interaction is the test target, the second-last the
validation target, the rest training. A user with fewer than ``MIN_INTERACTIONS_FOR_EVAL`` (3)
interactions cannot give a training history *and* two targets, so all of their interactions stay in
training and they are not evaluated. (Every Beauty user has at least 5.)

**Cold start** (run 2): a seeded random ``fraction`` of the catalog's items is held out. Validation and
test are exactly the leave-one-out targets over each user's *full* sequence, held-out items included;
training is the leave-one-out training part with every interaction on a held-out item removed, so no
held-out item is ever seen in training and its SID must come from text alone. The cold evaluation set is
the test rows whose target is a held-out item (:attr:`Split.cold_test`). Held-out items may still appear
in validation rows and thus in test-time histories; only training is cold-blind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sa2crq.data.validation import InputError

__all__ = ["MIN_INTERACTIONS_FOR_EVAL", "Split", "cold_start_split", "leave_one_out", "popularity"]

MIN_INTERACTIONS_FOR_EVAL = 3

_TRAIN, _VALID, _TEST = 0, 1, 2


# eq=False: the generated __eq__ would compare numpy arrays elementwise and raise on truth-testing.
@dataclass(frozen=True, eq=False)
class Split:
    """One split of an interactions table. ``cold_item_ids`` is empty for plain leave-one-out."""

    train: pa.Table
    valid: pa.Table
    test: pa.Table
    cold_item_ids: np.ndarray

    @property
    def cold_test(self) -> pa.Table:
        """Test rows whose target item is held out: the cold-start evaluation set."""
        item_type = self.test.schema.field("item_id").type
        held_out = pc.is_in(self.test["item_id"], value_set=pa.array(self.cold_item_ids, type=item_type))
        return self.test.filter(held_out)


def leave_one_out(interactions: pa.Table) -> Split:
    """Per user: last interaction = test, second-last = validation, the rest = training."""
    order, role = _leave_one_out_roles(interactions)
    return Split(
        train=interactions.take(order[role == _TRAIN]),
        valid=interactions.take(order[role == _VALID]),
        test=interactions.take(order[role == _TEST]),
        cold_item_ids=_readonly(_empty_ids(interactions.schema.field("item_id").type)),
    )


def cold_start_split(
    items_ids: np.ndarray | pa.Array | pa.ChunkedArray,
    interactions: pa.Table,
    *,
    fraction: float = 0.1,
    seed: int = 0,
) -> Split:
    """Hold out ``round(fraction * n_items)`` items; see the module docstring for exactly what goes where.

    The held-out items are the first of ``np.random.default_rng(seed).permutation`` over the sorted
    distinct ``items_ids``, so the choice depends only on the catalog and the seed, never on input order.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    catalog = np.unique(_to_numpy(items_ids))
    n_cold = math.floor(fraction * catalog.size + 0.5)  # round half up, not Python's round-half-even
    permutation = np.random.default_rng(seed).permutation(catalog.size)
    cold = np.sort(catalog[permutation[:n_cold]])

    item_type = interactions.schema.field("item_id").type
    on_cold_item = _to_numpy(pc.is_in(interactions["item_id"], value_set=pa.array(cold, type=item_type)))
    order, role = _leave_one_out_roles(interactions)
    train_rows = order[(role == _TRAIN) & ~on_cold_item[order]]
    return Split(
        train=interactions.take(train_rows),
        valid=interactions.take(order[role == _VALID]),
        test=interactions.take(order[role == _TEST]),
        cold_item_ids=_readonly(cold),
    )


def popularity(item_ids: np.ndarray | pa.Array | pa.ChunkedArray, train_interactions: pa.Table) -> np.ndarray:
    """Interaction count of each of ``item_ids`` in ``train_interactions`` (0 if absent), int64, aligned."""
    column = train_interactions["item_id"]
    tallies = pc.value_counts(column)
    wanted = pa.array(_to_numpy(item_ids)).cast(column.type)
    slot = pc.index_in(wanted, value_set=tallies.field("values"))
    counts = np.zeros(len(wanted), dtype=np.int64)
    seen = _to_numpy(slot.is_valid())
    counts[seen] = tallies.field("counts").to_numpy()[_to_numpy(slot.drop_null())]
    return counts


# --------------------------------------------------------------------------------------------------------


def _leave_one_out_roles(interactions: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(order, role)``: row indices sorted by (user, timestamp, row), and each sorted row's role."""
    for column in ("user_id", "item_id", "timestamp"):
        if column not in interactions.column_names:
            raise InputError(f"interactions: missing required column '{column}'")
        if interactions[column].null_count:
            raise InputError(f"interactions: column '{column}' has nulls; run validate_interactions first")
    n = interactions.num_rows
    if n == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int8)

    # Dense ranks order string and integer user ids alike, by value, as small integers numpy can sort.
    users = _to_numpy(pc.rank(interactions["user_id"].combine_chunks(), tiebreaker="dense")).astype(np.int64)
    times = _to_numpy(pc.cast(interactions["timestamp"], pa.int64()))
    # lexsort's last key is primary; the row index as the least key makes ties stable and explicit.
    order = np.lexsort((np.arange(n), times, users))

    sorted_users = users[order]
    run_last = np.flatnonzero(np.r_[sorted_users[1:] != sorted_users[:-1], True])
    run_size = np.diff(np.r_[-1, run_last])
    position = np.arange(n)
    from_end = np.repeat(run_last, run_size) - position  # 0 = the user's last interaction
    evaluated = np.repeat(run_size, run_size) >= MIN_INTERACTIONS_FOR_EVAL

    role = np.full(n, _TRAIN, dtype=np.int8)
    role[evaluated & (from_end == 0)] = _TEST
    role[evaluated & (from_end == 1)] = _VALID
    return order, role


def _to_numpy(values: np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    if isinstance(values, np.ndarray):
        return values
    return np.asarray(values.to_numpy(zero_copy_only=False))


def _empty_ids(item_type: pa.DataType) -> np.ndarray:
    return _to_numpy(pa.array([], type=item_type))


def _readonly(array: np.ndarray) -> np.ndarray:
    # The dataclass is frozen; its array should be too, or a caller could edit the held-out set in place.
    array = array.copy()
    array.flags.writeable = False
    return array


def history_requests(interactions: pa.Table) -> pa.Table:
    """One generation request per user: ``request_id`` (= ``user_id``), ``user_id`` and ``history``,
    the user's item ids oldest first: the request format of the ``generate`` job."""
    ordered = interactions.sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    # Single-threaded grouping keeps each list in the sorted order.
    grouped = ordered.group_by("user_id", use_threads=False).aggregate([("item_id", "list")])
    users = grouped.column("user_id")
    return pa.table({"request_id": users, "user_id": users, "history": grouped.column("item_id_list")})
