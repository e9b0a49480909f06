"""The single item scorer (DESIGN §3.4) and TIGER's cold-start rule, on hand-built beams and buckets."""

from __future__ import annotations

import math

import numpy as np
import torch

from sa2crq.retrieval.scorer import BucketIndex, cold_prefix_extension, request_embeddings, score_items


def unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


ITEMS = unit([1, 0], [0, 1], [1, 1], [-1, 0], [1, -0.2])
# Item 0 alone in SID 0; items 1, 2, 3 share SID 1 (a bucket); item 4 alone in SID 2.
BUCKETS = BucketIndex.build(np.array([0, 1, 1, 1, 2]))


def test_score_is_beam_log_prob_plus_in_bucket_log_prob():
    request = unit([1, 0])
    out = score_items(
        torch.tensor([[1, 0]]), torch.tensor([[-0.5, -1.0]]), request, ITEMS, BUCKETS,
        torch.full((1, 1), -1), k=4, temperature=0.5,
    )
    sims = (ITEMS[[1, 2, 3]] @ request[0]) / 0.5
    in_bucket = torch.log_softmax(sims, 0)
    expected = {0: -1.0, 1: -0.5 + in_bucket[0].item(), 2: -0.5 + in_bucket[1].item(), 3: -0.5 + in_bucket[2].item()}
    got = dict(zip(out.items[0].tolist(), out.scores[0].tolist()))
    assert got.keys() == expected.keys()
    for item, score in expected.items():
        assert math.isclose(got[item], score, rel_tol=1e-5)
    assert out.items[0].tolist() == sorted(expected, key=expected.get, reverse=True)
    # A bucket of one contributes 0; bucket members are flagged.
    assert dict(zip(out.items[0].tolist(), out.from_bucket[0].tolist())) == {0: False, 1: True, 2: True, 3: True}


def test_history_is_excluded_duplicates_removed_and_short_lists_padded():
    out = score_items(
        torch.tensor([[1, 1, -1]]), torch.tensor([[-0.1, -0.2, -math.inf]]), unit([0, 1]), ITEMS, BUCKETS,
        torch.tensor([[2, -1]]), k=5, temperature=1.0,
    )
    items = out.items[0].tolist()
    assert 2 not in items and sorted(i for i in items if i >= 0) == [1, 3]
    assert items[2:] == [-1, -1, -1] and torch.isinf(out.scores[0, 2:]).all()


def test_cold_rule_widens_buckets_by_prefix_and_caps_cold_items():
    codes = np.array([[1, 1, 0], [1, 1, 1], [2, 2, 0], [1, 1, 5]])
    sid_index = np.array([0, 1, 2, 3])
    is_cold = np.array([False, False, False, True])
    extra_sid, extra_item = cold_prefix_extension(codes, sid_index, is_cold, prefix_levels=2)
    # Cold item 3 shares prefix (1, 1) with SIDs 0 and 1 (not SID 2), and is not re-added to its own SID.
    assert sorted(zip(extra_sid.tolist(), extra_item.tolist())) == [(0, 3), (1, 3)]
    buckets = BucketIndex.build(sid_index, (extra_sid, extra_item))
    items = unit([1, 0], [0, 1], [1, 1], [1, 0.1])
    args = (torch.tensor([[0, 1]]), torch.tensor([[-0.1, -0.2]]), unit([1, 0]), items, buckets, torch.full((1, 1), -1))
    uncapped = score_items(*args, k=3, temperature=0.1)
    assert 3 in uncapped.items[0].tolist()
    capped = score_items(*args, k=3, temperature=0.1, item_is_cold=torch.tensor(is_cold), cold_cap=0.0)
    assert 3 not in capped.items[0].tolist()


def test_request_embedding_is_the_normalised_mean_of_the_last_items():
    emb = unit([1, 0], [0, 1], [3, 4])
    history = torch.tensor([[-1, 0, 1], [-1, -1, 2], [-1, -1, -1]])
    last = request_embeddings(history, emb, last_n=1)
    assert torch.allclose(last[0], emb[1]) and torch.allclose(last[1], emb[2])
    assert torch.equal(last[2], torch.zeros(2))
    two = request_embeddings(history, emb, last_n=2)
    assert torch.allclose(two[0], unit([1, 1])[0])
