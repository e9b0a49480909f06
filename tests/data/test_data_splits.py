"""Leave-one-out and cold-start splits, and training popularity."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sa2crq.data.splits import Split, cold_start_split, leave_one_out, popularity
from sa2crq.data.validation import InputError


def interactions(rows: list[tuple[object, int, int]]) -> pa.Table:
    users, items, times = zip(*rows, strict=True)
    return pa.table(
        {"user_id": list(users), "item_id": pa.array(items, pa.int64()), "timestamp": pa.array(times, pa.int64())}
    )


def triples(table: pa.Table) -> list[tuple]:
    columns = (table[name].to_pylist() for name in ("user_id", "item_id", "timestamp"))
    return list(zip(*columns, strict=True))


def test_leave_one_out_by_hand() -> None:
    table = interactions(
        [
            ("a", 3, 30), ("b", 7, 5), ("a", 1, 10), ("a", 4, 40), ("c", 9, 1),
            ("a", 2, 20), ("b", 8, 6), ("c", 10, 2), ("b", 6, 4), ("c", 11, 3),
        ]  # fmt: skip
    )
    split = leave_one_out(table)
    assert triples(split.train) == [("a", 1, 10), ("a", 2, 20), ("b", 6, 4), ("c", 9, 1)]
    assert triples(split.valid) == [("a", 3, 30), ("b", 7, 5), ("c", 10, 2)]
    assert triples(split.test) == [("a", 4, 40), ("b", 8, 6), ("c", 11, 3)]
    assert split.cold_item_ids.size == 0 and split.cold_item_ids.dtype == np.int64


def test_short_users_stay_in_train_and_ties_keep_input_order() -> None:
    table = interactions(
        [(1, 1, 5), (2, 2, 1), (2, 3, 2), (3, 4, 7), (3, 5, 7), (3, 6, 7), (3, 7, 7)]
    )
    split = leave_one_out(table)
    # Users 1 and 2 have fewer than 3 interactions: everything in train, nothing evaluated.
    assert triples(split.train) == [(1, 1, 5), (2, 2, 1), (2, 3, 2), (3, 4, 7), (3, 5, 7)]
    # User 3's timestamps all tie: input order decides.
    assert triples(split.valid) == [(3, 6, 7)]
    assert triples(split.test) == [(3, 7, 7)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 20), st.integers(0, 5)), min_size=1, max_size=60))
def test_leave_one_out_properties(rows: list[tuple[int, int, int]]) -> None:
    split = leave_one_out(interactions(rows))
    assert sorted(triples(split.train) + triples(split.valid) + triples(split.test)) == sorted(rows)
    by_user: dict[int, list[int]] = {}
    for user, _, time in rows:
        by_user.setdefault(user, []).append(time)
    evaluated = sorted(u for u, times in by_user.items() if len(times) >= 3)
    assert split.valid["user_id"].to_pylist() == evaluated == split.test["user_id"].to_pylist()
    for (user, _, t_valid), (_, _, t_test) in zip(triples(split.valid), triples(split.test), strict=True):
        assert t_valid <= t_test
        assert all(t <= t_valid for u, _, t in triples(split.train) if u == user)


def make_catalog(n_items: int = 50, n_users: int = 40, per_user: int = 8) -> tuple[np.ndarray, pa.Table]:
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(n_users), per_user)
    return np.arange(100, 100 + n_items), pa.table(
        {
            "user_id": users,
            "item_id": rng.integers(100, 100 + n_items, size=users.size),
            "timestamp": np.tile(np.arange(per_user), n_users),
        }
    )


def test_cold_start_split() -> None:
    item_ids, table = make_catalog()
    split = cold_start_split(item_ids, table, fraction=0.1, seed=3)
    cold = split.cold_item_ids
    assert cold.size == 5 and np.all(np.isin(cold, item_ids)) and np.all(np.diff(cold) > 0)
    assert not np.isin(split.train["item_id"].to_numpy(), cold).any()

    # valid/test are exactly leave-one-out's; train is leave-one-out's minus held-out items.
    plain = leave_one_out(table)
    assert split.valid.equals(plain.valid) and split.test.equals(plain.test)
    keep = ~np.isin(plain.train["item_id"].to_numpy(), cold)
    assert split.train.equals(plain.train.filter(pa.array(keep)))

    cold_test = split.cold_test
    assert np.isin(cold_test["item_id"].to_numpy(), cold).all()
    assert cold_test.num_rows == np.isin(split.test["item_id"].to_numpy(), cold).sum()


def test_cold_start_is_deterministic_per_seed_and_order_free() -> None:
    item_ids, table = make_catalog()
    first = cold_start_split(item_ids, table, seed=7)
    again = cold_start_split(item_ids[::-1].copy(), table, seed=7)
    other = cold_start_split(item_ids, table, seed=8)
    assert np.array_equal(first.cold_item_ids, again.cold_item_ids)
    assert first.train.equals(again.train)
    assert not np.array_equal(first.cold_item_ids, other.cold_item_ids)
    with pytest.raises(ValueError, match="read-only"):
        first.cold_item_ids[0] = 0


@pytest.mark.parametrize(("fraction", "expected"), [(0.0, 0), (0.1, 5), (0.25, 13), (1.0, 50)])
def test_cold_fraction(fraction: float, expected: int) -> None:
    item_ids, table = make_catalog()
    assert cold_start_split(item_ids, table, fraction=fraction).cold_item_ids.size == expected


def test_cold_start_with_string_ids() -> None:
    table = pa.table({"user_id": [1, 1, 1, 1], "item_id": ["a", "b", "c", "d"], "timestamp": [1, 2, 3, 4]})
    split = cold_start_split(pa.array(["a", "b", "c", "d"]), table, fraction=0.5, seed=0)
    assert set(split.cold_item_ids.tolist()) <= {"a", "b", "c", "d"} and split.cold_item_ids.size == 2
    assert not set(split.train["item_id"].to_pylist()) & set(split.cold_item_ids.tolist())


def test_popularity() -> None:
    train = pa.table({"user_id": [1, 1, 2, 2, 3], "item_id": [5, 7, 5, 9, 5], "timestamp": [0, 1, 0, 1, 0]})
    counts = popularity(np.array([9, 5, 6, 7]), train)
    assert counts.dtype == np.int64 and counts.tolist() == [1, 3, 0, 1]
    empty = train.slice(0, 0)
    assert popularity(np.array([5]), empty).tolist() == [0]
    strings = pa.table({"item_id": pa.array(["x", "y", "x"], pa.large_string())})
    assert popularity(np.array(["y", "x", "z"], dtype=object), strings).tolist() == [1, 2, 0]


def test_split_is_frozen() -> None:
    split = leave_one_out(interactions([(1, 1, 1)]))
    assert isinstance(split, Split)
    with pytest.raises(AttributeError):
        split.train = split.test  # type: ignore[misc]


def test_splits_refuse_unvalidated_input() -> None:
    with pytest.raises(InputError, match="'timestamp' has nulls"):
        leave_one_out(pa.table({"user_id": [1], "item_id": [1], "timestamp": pa.array([None], pa.int64())}))
    with pytest.raises(InputError, match="'user_id'"):
        leave_one_out(pa.table({"item_id": [1], "timestamp": [1]}))
