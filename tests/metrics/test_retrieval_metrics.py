"""Item-level retrieval metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sa2crq.data.segments import COLD, HEAD, TAIL, TORSO
from sa2crq.metrics.retrieval import (
    RetrievalAccumulator,
    hallucination_rate,
    ndcg_at_k,
    recall_at_k,
    target_ranks,
)

# A catalog of 8 items with sparse ids; segment per dense index.
ITEM_IDS = np.array([10, 20, 30, 40, 50, 60, 70, 80], dtype=np.int64)
SEGMENTS = np.array([HEAD, HEAD, TORSO, TORSO, TAIL, TAIL, TAIL, COLD], dtype=np.int8)

# K = (2, 4). Targets: hit at rank 0, hit at rank 3, miss, hit at rank 1.
TOPK = np.array(
    [
        [10, 20, 30, 40],
        [20, 30, 50, 40],
        [10, 60, -1, -1],
        [30, 80, 20, -1],
    ],
    dtype=np.int64,
)
TARGETS = np.array([10, 40, 50, 80], dtype=np.int64)  # segments: head, torso, tail, cold
FROM_BUCKET = np.array(
    [
        [False, False, True, False],
        [False, True, True, False],
        [True, False, False, False],  # the empty slots are never counted
        [False, False, False, True],
    ]
)


def _accumulator(ks=(2, 4)) -> RetrievalAccumulator:
    return RetrievalAccumulator(item_index=ITEM_IDS, item_segments=SEGMENTS, ks=ks)


def test_ranks_recall_and_ndcg_by_hand():
    ranks = target_ranks(TOPK, TARGETS)
    np.testing.assert_array_equal(ranks, [0, 3, -1, 1])
    np.testing.assert_array_equal(recall_at_k(ranks, 2), [1, 0, 0, 1])
    np.testing.assert_array_equal(recall_at_k(ranks, 4), [1, 1, 0, 1])
    np.testing.assert_allclose(ndcg_at_k(ranks, 2), [1.0, 0.0, 0.0, 1 / math.log2(3)])
    np.testing.assert_allclose(ndcg_at_k(ranks, 4), [1.0, 1 / math.log2(5), 0.0, 1 / math.log2(3)])


def test_result_overall_slices_coverage_and_bucket_share():
    acc = _accumulator()
    acc.update(TOPK, TARGETS, FROM_BUCKET)
    res = acc.result()

    assert res["requests"] == 4
    assert res["k"] == 4
    assert res["recall@2"] == pytest.approx(2 / 4)
    assert res["recall@4"] == pytest.approx(3 / 4)
    assert res["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert res["ndcg@4"] == pytest.approx((1 + 1 / math.log2(5) + 1 / math.log2(3)) / 4)

    seg = res["segments"]
    assert {name: s["requests"] for name, s in seg.items()} == {"head": 1, "torso": 1, "tail": 1, "cold": 1}
    assert seg["head"]["recall@2"] == 1.0 and seg["head"]["ndcg@4"] == 1.0
    assert seg["torso"]["recall@2"] == 0.0 and seg["torso"]["recall@4"] == 1.0
    assert seg["torso"]["ndcg@4"] == pytest.approx(1 / math.log2(5))
    assert seg["tail"]["recall@4"] == 0.0 and seg["tail"]["ndcg@4"] == 0.0
    assert seg["cold"]["ndcg@2"] == pytest.approx(1 / math.log2(3))

    # Tail items (50, 60, 70) appearing in anyone's top-4: 50 and 60.
    assert res["tail_coverage"] == 2
    # Filled slots: 4 + 4 + 2 + 3 = 13; bucket slots among them: 1 + 2 + 1 + 0 = 4 (row 3's True is empty).
    assert res["filled_slots"] == 13
    assert res["bucket_slots"] == 4
    assert res["bucket_share_at_k"] == pytest.approx(4 / 13)


def test_empty_segment_slice_reports_none():
    acc = _accumulator()
    acc.update(TOPK[:1], TARGETS[:1])
    res = acc.result()
    empty = {"requests": 0, "recall@2": None, "ndcg@2": None, "recall@4": None, "ndcg@4": None}
    assert res["segments"]["tail"] == empty
    assert res["bucket_share_at_k"] == 0.0  # no from_bucket: no slot came from a bucket


def test_slots_beyond_max_k_are_ignored():
    acc = _accumulator(ks=(2,))
    acc.update(TOPK, TARGETS)
    res = acc.result()
    assert res["recall@2"] == pytest.approx(2 / 4)
    np.testing.assert_array_equal(acc.ranks(), [0, -1, -1, 1])  # the hit at rank 3 is outside top-2
    assert res["tail_coverage"] == 1  # 50 sits at rank 2 of row 1: outside top-2; 60 at rank 1 of row 2
    assert res["filled_slots"] == 8


def test_duplicates_within_a_row_raise_and_leave_state_untouched():
    acc = _accumulator()
    acc.update(TOPK[:2], TARGETS[:2])
    with pytest.raises(ValueError, match="repeat"):
        acc.update(np.array([[10, 20, 10, -1]]), np.array([20]))
    assert acc.requests == 2
    # Repeated empty slots are not duplicates.
    acc.update(np.array([[10, -1, -1, -1]]), np.array([10]))
    assert acc.requests == 3


def test_invalid_inputs_raise():
    acc = _accumulator()
    with pytest.raises(ValueError, match="columns"):
        acc.update(TOPK[:, :3], TARGETS)
    with pytest.raises(ValueError, match="not in the catalog"):
        acc.update(TOPK, np.array([10, 40, 50, 99]))
    with pytest.raises(ValueError, match="not in the catalog"):
        acc.update(np.array([[10, 99, -1, -1]]), np.array([10]))
    with pytest.raises(ValueError, match="from_bucket"):
        acc.update(TOPK, TARGETS, FROM_BUCKET[:, :2])
    with pytest.raises(ValueError, match="sorted"):
        RetrievalAccumulator(item_index=ITEM_IDS[::-1], item_segments=SEGMENTS)
    with pytest.raises(KeyError):
        acc.per_request("recall@3")
    assert acc.requests == 0


def test_per_request_in_update_order():
    acc = _accumulator()
    acc.update(TOPK[2:], TARGETS[2:])
    acc.update(TOPK[:2], TARGETS[:2])
    np.testing.assert_array_equal(acc.per_request("recall@4"), [0, 1, 1, 1])
    np.testing.assert_array_equal(acc.request_segments(), [TAIL, COLD, HEAD, TORSO])


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), split=st.integers(0, 60))
def test_streaming_in_two_updates_equals_one(seed: int, split: int):
    rng = np.random.default_rng(seed)
    n_items, batch, width = 40, 60, 12
    item_ids = np.sort(rng.choice(10_000, n_items, replace=False)).astype(np.int64)
    segments = rng.integers(0, 4, n_items).astype(np.int8)
    topk = np.stack([rng.permutation(item_ids)[:width] for _ in range(batch)])
    topk[rng.random(topk.shape) < 0.1] = -1
    targets = item_ids[rng.integers(0, n_items, batch)]
    bucket = rng.random(topk.shape) < 0.3

    whole = RetrievalAccumulator(item_index=item_ids, item_segments=segments, ks=(5, 10))
    whole.update(topk, targets, bucket)
    parts = RetrievalAccumulator(item_index=item_ids, item_segments=segments, ks=(5, 10))
    parts.update(topk[:split], targets[:split], bucket[:split])
    parts.update(topk[split:], targets[split:], bucket[split:])

    assert parts.result() == whole.result()
    for name in whole.metric_names():
        np.testing.assert_array_equal(parts.per_request(name), whole.per_request(name))


def test_hallucination_rate():
    valid = np.array([[True, False, True, True], [False, False, True, True]])
    assert hallucination_rate(valid) == pytest.approx(3 / 8)
    assert hallucination_rate(np.ones(5, dtype=bool)) == 0.0
    with pytest.raises(ValueError):
        hallucination_rate(np.array([], dtype=bool))
    with pytest.raises(ValueError):
        hallucination_rate(np.array([1, 0]))


def test_per_request_arrays_cannot_corrupt_the_accumulator():
    acc = _accumulator()
    acc.update(TOPK, TARGETS)
    with pytest.raises(ValueError):
        acc.ranks()[0] = 3
    acc.per_request("recall@2")[:] = 0  # a fresh array: harmless
    assert acc.result()["recall@2"] == pytest.approx(0.5)
