"""The single item scorer (DESIGN §3.4) and TIGER's cold-start rule, on hand-built beams and buckets,
and whole-history exclusion from requests through the candidate generator."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.candidates import CandidateGenerator, GenerationConfig
from sa2crq.retrieval.catalog_vectors import CatalogShard, CatalogVectors
from sa2crq.retrieval.data import ItemIndex, Requests, Sequences, evaluation_requests
from sa2crq.retrieval.model import GenerativeRetriever, ItemFeatures, RetrieverConfig
from sa2crq.retrieval.beam import beam_search
from sa2crq.retrieval.scorer import ItemSIDs, RequestFeatures, ScorerWeights, admits, request_embeddings, score_items

pytestmark = pytest.mark.usefixtures("one_thread")


def unit(*rows):
    x = torch.tensor(rows, dtype=torch.float32)
    return x / x.norm(dim=1, keepdim=True)


ITEMS = unit([1, 0], [0, 1], [1, 1], [-1, 0], [1, -0.2])
# Item 0 alone in SID 0; items 1, 2, 3 share SID 1 (a bucket); item 4 alone in SID 2.
SIDS = ItemSIDs.build(np.array([0, 1, 1, 1, 2]))
# Generation alone: no dense term, no content term, no dense admission.
SID_ONLY = ScorerWeights(temperature=0.5, dense_weight=0.0, content_weight=0.0, dense_candidates=0)


def features(sid_index, sid_log_probs, request, excluded, *, items=ITEMS, dense=None) -> RequestFeatures:
    """One batch of requests: beams, content similarity of ``request`` (B, D) with ``items``, exclusions."""
    return RequestFeatures(
        torch.tensor(sid_index), torch.tensor(sid_log_probs, dtype=torch.float32), request @ items.T,
        dense, torch.tensor(excluded),
    )  # fmt: skip


def scores_of(out, row: int = 0) -> dict[int, float]:
    return {i: s for i, s in zip(out.items[row].tolist(), out.scores[row].tolist()) if i >= 0}


def test_item_sids_count_bucket_members_and_check_the_cold_rule_arguments():
    assert SIDS.bucket_size.tolist() == [1, 3, 3, 3, 1] and SIDS.num_sids == 3 and SIDS.item_prefix is None
    with pytest.raises(ValueError, match="TIGER's cold rule needs"):
        ItemSIDs.build(np.array([0, 1]), codes=np.array([[1, 2], [1, 3]]), prefix_levels=1)
    with pytest.raises(ValueError, match="TIGER's cold rule needs"):
        ItemSIDs.build(np.array([0, 1]), codes=np.array([[1, 2], [1, 3]]), item_is_cold=np.array([False, True]), cold_cap=1.0)


def test_scorer_weights_are_validated():
    for bad in (dict(temperature=0.0), dict(dense_weight=-1.0), dict(content_weight=-0.1), dict(dense_candidates=-1)):
        with pytest.raises(ValueError, match="scorer"):
            ScorerWeights(**bad)


def test_score_is_beam_log_prob_plus_in_bucket_log_prob():
    request = unit([1, 0])
    out = score_items(features([[1, 0]], [[-0.5, -1.0]], request, [[-1]]), SIDS, SID_ONLY, k=4)
    sims = (ITEMS[[1, 2, 3]] @ request[0]) / 0.5
    in_bucket = torch.log_softmax(sims, 0)
    expected = {0: -1.0, 1: -0.5 + in_bucket[0].item(), 2: -0.5 + in_bucket[1].item(), 3: -0.5 + in_bucket[2].item()}
    got = scores_of(out)
    assert got.keys() == expected.keys()
    for item, score in expected.items():
        assert math.isclose(got[item], score, rel_tol=1e-5)
    assert out.items[0].tolist() == sorted(expected, key=expected.get, reverse=True)
    # A bucket of one contributes 0; bucket members are flagged; nothing came from the dense path.
    assert dict(zip(out.items[0].tolist(), out.from_bucket[0].tolist())) == {0: False, 1: True, 2: True, 3: True}
    assert not out.from_dense.any()


def test_score_adds_the_weighted_dense_log_prob_and_content_similarity():
    request = unit([1, 0.3])
    dense = torch.log_softmax(torch.tensor([[0.2, 1.5, -0.3, 0.9, 2.0]]), dim=1)
    weights = ScorerWeights(temperature=0.2, dense_weight=0.7, content_weight=3.0, dense_candidates=0)
    out = score_items(features([[1, 0]], [[-0.5, -1.0]], request, [[-1]], dense=dense), SIDS, weights, k=5)
    sim = (ITEMS @ request[0])
    in_bucket = torch.zeros(5)
    in_bucket[[1, 2, 3]] = torch.log_softmax(sim[[1, 2, 3]] / 0.2, 0)
    beam = torch.tensor([-1.0, -0.5, -0.5, -0.5, -math.inf])
    expected = beam + in_bucket + 0.7 * dense[0] + 3.0 * sim
    got = scores_of(out)
    assert got.keys() == {0, 1, 2, 3}  # item 4's SID was not generated and nothing is admitted densely
    for item, score in got.items():
        assert math.isclose(score, float(expected[item]), rel_tol=1e-5, abs_tol=1e-6)
    assert out.items[0, 4] == -1 and out.scores[0, 4] == -math.inf


def test_history_is_excluded_duplicates_removed_and_short_lists_padded():
    out = score_items(features([[1, 1, -1]], [[-0.1, -0.2, -math.inf]], unit([0, 1]), [[2, -1]]), SIDS, SID_ONLY, k=5)
    items = out.items[0].tolist()
    assert 2 not in items and sorted(i for i in items if i >= 0) == [1, 3]
    assert items[2:] == [-1, -1, -1] and torch.isinf(out.scores[0, 2:]).all()
    # One score per item: a SID generated twice counts with its best beam.
    in_bucket = torch.log_softmax(ITEMS[[1, 3]] @ unit([0, 1])[0] / 0.5, 0)
    got = scores_of(out)
    assert math.isclose(got[1], -0.1 + in_bucket[0].item(), rel_tol=1e-5)
    assert math.isclose(got[3], -0.1 + in_bucket[1].item(), rel_tol=1e-5)


def test_a_history_item_in_the_bucket_leaves_the_others_terms_as_if_it_were_absent():
    """The scorer fix: the in-bucket softmax runs over the bucket's non-history members only."""
    request = unit([0.3, 1])
    beams = ([[1, 0]], [[-0.4, -1.3]])
    with_history = score_items(features(*beams, request, [[2]]), SIDS, SID_ONLY, k=5)
    # The same catalog without item 2 in the bucket (moved to a SID nobody generates), no history.
    without = ItemSIDs.build(np.array([0, 1, 3, 1, 2]))
    absent = score_items(features(*beams, request, [[-1]]), without, SID_ONLY, k=5)
    assert with_history.items[0].tolist() == absent.items[0].tolist() and 2 not in absent.items[0].tolist()
    torch.testing.assert_close(with_history.scores, absent.scores, rtol=0, atol=0)
    # By hand: the log-softmax over the non-history members {1, 3} only.
    in_bucket = torch.log_softmax(ITEMS[[1, 3]] @ request[0] / 0.5, 0)
    got = scores_of(with_history)
    assert math.isclose(got[1], -0.4 + in_bucket[0].item(), rel_tol=1e-6)
    assert math.isclose(got[3], -0.4 + in_bucket[1].item(), rel_tol=1e-6)
    # A bucket whose other members are all history is a bucket of one: the term is 0.
    alone = scores_of(score_items(features(*beams, request, [[2, 3]]), SIDS, SID_ONLY, k=5))
    assert alone[1] == pytest.approx(-0.4, abs=1e-6)


def test_item_zero_in_a_padded_history_is_excluded():
    # Request 0's history is item 0 then padding (request 1's longer history pads the matrix).
    out = score_items(
        features([[0, 1], [0, 1]], [[-0.1, -0.5], [-0.1, -0.5]], unit([1, 0], [1, 0]), [[0, -1, -1], [4, 2, 3]]), SIDS, SID_ONLY, k=5
    )
    assert 0 not in out.items[0].tolist()


def test_cold_rule_admits_cold_items_by_code_prefix_and_caps_them():
    # Items 0..2 warm, 3 and 4 cold; item 5 warm. Every item has its own SID.
    codes = np.array([[1, 1, 0], [1, 1, 1], [2, 2, 0], [1, 1, 5], [1, 1, 7], [1, 1, 9]])
    item_sid = np.arange(6)
    is_cold = np.array([False, False, False, True, True, False])
    items = unit([1, 0], [0, 1], [1, 1], [1, 0.1], [1, 0.2], [1, 0.05])
    beams = ([[0, 1]], [[-0.1, -0.2]])

    def run(cold_cap: float, k: int = 5):
        sids = ItemSIDs.build(item_sid, codes=codes, prefix_levels=2, item_is_cold=is_cold, cold_cap=cold_cap)
        return score_items(features(*beams, unit([1, 0]), [[-1]], items=items), sids, SID_ONLY, k=k)

    uncapped = run(cold_cap=1.0)
    # Cold items 3 and 4 share prefix (1, 1) with generated SIDs 0 and 1 and inherit the best of
    # them (-0.1; buckets of one add 0). Warm item 5 shares it too but is not cold: no SID of its.
    assert scores_of(uncapped) == pytest.approx({0: -0.1, 3: -0.1, 4: -0.1, 1: -0.2})
    assert not uncapped.from_dense.any() and not uncapped.from_bucket.any()
    # Without the rule only the generated SIDs' items are candidates.
    plain = score_items(features(*beams, unit([1, 0]), [[-1]], items=items), ItemSIDs.build(item_sid), SID_ONLY, k=5)
    assert set(scores_of(plain)) == {0, 1}
    # cold_cap 0 removes every cold item; ceil(0.25 * 4) = 1 keeps only the first one.
    assert set(scores_of(run(cold_cap=0.0))) == {0, 1}
    capped = scores_of(run(cold_cap=0.25, k=4))
    assert set(capped) & {3, 4} in ({3}, {4}) and {0, 1} <= set(capped)
    # A cold item in the history is not admitted by its prefix either.
    sids = ItemSIDs.build(item_sid, codes=codes, prefix_levels=2, item_is_cold=is_cold, cold_cap=1.0)
    assert set(scores_of(score_items(features(*beams, unit([1, 0]), [[3]], items=items), sids, SID_ONLY, k=5))) == {0, 1, 4}


def test_dense_path_admits_an_item_no_generated_sid_reaches():
    # Item 4 (SID 2) is never generated: it can only enter through the dense path.
    request = unit([0, 1])
    dense = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0, 6.0]]), dim=1)
    beams = ([[1, 0]], [[-0.3, -2.0]])
    weights = ScorerWeights(temperature=0.5, dense_weight=1.0, content_weight=0.0, dense_candidates=1)
    out = score_items(features(*beams, request, [[-1]], dense=dense), SIDS, weights, k=3)
    assert out.items[0, 0] == 4
    assert out.from_dense[0].tolist() == [True, False, False] and not out.from_bucket[0, 0]
    # Its SID term is the request's lowest beam log-probability; a bucket of one adds 0.
    assert out.scores[0, 0].item() == pytest.approx(-2.0 + dense[0, 4].item(), rel=1e-6)
    # Without dense admission it never appears, however long the list.
    closed = ScorerWeights(temperature=0.5, dense_weight=1.0, content_weight=0.0, dense_candidates=0)
    shut = score_items(features(*beams, request, [[-1]], dense=dense), SIDS, closed, k=5)
    assert 4 not in shut.items[0].tolist() and not shut.from_dense.any()
    assert shut.items[0].tolist()[:4] != [-1] * 4 and sorted(i for i in shut.items[0].tolist() if i >= 0) == [0, 1, 2, 3]
    # A history item is never admitted, however high its dense score.
    excluded = score_items(features(*beams, request, [[4]], dense=dense), SIDS, weights, k=5)
    assert 4 not in excluded.items[0].tolist() and not excluded.from_dense.any()


def test_a_dense_path_weighting_neither_term_admits_nothing():
    request = unit([1, 0])
    unweighted = ScorerWeights(temperature=0.5, dense_weight=0.0, content_weight=0.0, dense_candidates=3)
    out = score_items(features([[1]], [[-0.3]], request, [[-1]]), SIDS, unweighted, k=5)
    assert sorted(scores_of(out)) == [1, 2, 3] and not out.from_dense.any()
    dense = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0, 0.0, 6.0]]), dim=1)
    assert not admits(unweighted, dense_head=True) and not admits(replace(unweighted, dense_weight=1.0), dense_head=False)
    assert admits(replace(unweighted, dense_weight=1.0), dense_head=True)
    assert 4 in score_items(features([[1]], [[-0.3]], request, [[-1]], dense=dense), SIDS, replace(unweighted, dense_weight=1.0), k=5).items


def test_reachable_items_are_the_generated_buckets_and_the_admitted_items_with_their_buckets():
    # SIDs: 0 -> {0}, 1 -> {1, 2, 3}, 2 -> {4}, 3 -> {5, 6}.
    sids = ItemSIDs.build(np.array([0, 1, 1, 1, 2, 3, 3]))
    assert sids.members.tolist() == [0, 1, 2, 3, 4, 5, 6] and sids.member_start.tolist() == [0, 1, 4, 5, 7]
    reached = sids.reachable(torch.tensor([[1, -1], [1, 0]]), torch.tensor([[6, -1]]), max_members=10)
    assert reached.tolist() == [0, 1, 2, 3, 5, 6]  # SID 1 twice, item 6 admitted brings its bucket mate 5
    # A bucket expands to its first max_members members; an admitted item beyond them is still in.
    assert sids.reachable(torch.tensor([[1]]), torch.tensor([[3]]), max_members=1).tolist() == [1, 3]
    assert sids.reachable(torch.tensor([[-1]]), torch.zeros(1, 0, dtype=torch.int64), max_members=1).tolist() == []
    # The slice's own map: SIDs renumbered in catalog order, the catalog's bucket sizes kept.
    restricted, sid_of = sids.restrict(reached)
    assert sid_of.tolist() == [0, 1, 3] and restricted.item_sid.tolist() == [0, 1, 1, 1, 2, 2]
    assert restricted.bucket_size.tolist() == [1, 3, 3, 3, 2, 2] and restricted.num_sids == 3


def test_reachable_items_include_cold_items_sharing_a_generated_prefix():
    codes = np.array([[1, 1, 0], [1, 1, 1], [2, 2, 0], [1, 1, 5], [1, 1, 7], [2, 2, 9]])
    is_cold = np.array([False, False, False, True, True, True])
    sids = ItemSIDs.build(np.arange(6), codes=codes, prefix_levels=2, item_is_cold=is_cold, cold_cap=1.0)
    assert sids.reachable(torch.tensor([[0]]), torch.zeros(1, 0, dtype=torch.int64), max_members=10).tolist() == [0, 3, 4]
    restricted, _ = sids.restrict(torch.tensor([0, 3, 4]))
    assert restricted.item_prefix.tolist() == [0, 0, 0] and restricted.item_is_cold.tolist() == [False, True, True]
    assert restricted.cold_members.tolist() == [1, 2] and restricted.cold_start.tolist() == [0, 2]


def test_dense_admission_takes_the_best_dense_items_cold_ones_by_content_alone():
    # No beams at all (an empty search): only the dense path fills the list, best dense first.
    request = unit([1, 0])
    weights = ScorerWeights(temperature=0.5, dense_weight=0.0, content_weight=5.0, dense_candidates=2)
    out = score_items(features([[-1]], [[-math.inf]], request, [[0]]), SIDS, weights, k=4)
    sim = ITEMS @ request[0]
    best = [i for i in sim.argsort(descending=True).tolist() if i != 0][:2]
    assert out.items[0, :2].tolist() == best and out.items[0, 2:].tolist() == [-1, -1]
    assert out.from_dense[0, :2].all()


def test_request_embedding_is_the_normalised_mean_of_the_last_items():
    emb = unit([1, 0], [0, 1], [3, 4])
    history = torch.tensor([[-1, 0, 1], [-1, -1, 2], [-1, -1, -1]])
    last = request_embeddings(history, emb, last_n=1)
    assert torch.allclose(last[0], emb[1]) and torch.allclose(last[1], emb[2])
    assert torch.equal(last[2], torch.zeros(2))
    two = request_embeddings(history, emb, last_n=2)
    assert torch.allclose(two[0], unit([1, 1])[0])


# -- whole-history exclusion, from requests ---------------------------------------------------------
# Eight items (ids 0, 10, ..., 70); user 1 saw items 1..5 and user 2 items 6 and 7, oldest first.
# Item 0 is left out of every history (see test_item_zero_in_a_padded_history_is_excluded).
N = 8
INDEX = ItemIndex(np.arange(N) * 10)
HISTORY = Sequences.from_interactions(
    pa.table({"user_id": [1, 1, 1, 1, 1, 2, 2], "item_id": [10, 20, 30, 40, 50, 60, 70], "timestamp": [0, 1, 2, 3, 4, 0, 1]}), INDEX
)
TARGETS = pa.table({"user_id": [1, 2], "item_id": [0, 0]})


def test_history_outside_the_encoder_window_is_never_in_the_top_k():
    requests = evaluation_requests(HISTORY, TARGETS, INDEX, max_history=2)
    assert requests.history.tolist() == [[4, 5], [6, 7]]  # the encoder's window
    assert requests.excluded_matrix(np.arange(2)).tolist() == [[1, 2, 3, 4, 5], [6, 7, -1, -1, -1]]
    # Every item alone in its SID; the out-of-window items 1 and 2 are the best generated SIDs.
    sids = ItemSIDs.build(np.arange(N))
    emb = torch.nn.functional.normalize(torch.randn(N, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    beams = [[1, 2, 0, 3, 6], [1, 2, 0, 3, 6]]
    log_probs = [[-0.1, -0.2, -0.3, -0.4, -0.5]] * 2
    # Ranked by beam (a content term too small to reorder); every non-history item is also admitted by the dense path.
    weights = ScorerWeights(temperature=0.5, dense_weight=0.0, content_weight=1e-3, dense_candidates=N)

    def top(excluded: np.ndarray) -> list[list[int]]:
        scored = score_items(RequestFeatures(torch.tensor(beams), torch.tensor(log_probs), emb[[0, 1]] @ emb.T, None,
                                             torch.as_tensor(excluded)), sids, weights, k=N)  # fmt: skip
        for row in scored.items.tolist():  # the found items first, then -1 padding
            assert row == [i for i in row if i >= 0] + [-1] * row.count(-1)
        return [[i for i in row if i >= 0] for row in scored.items.tolist()]

    whole = top(requests.excluded_matrix(np.arange(2)))
    assert not {1, 2, 3, 4, 5} & set(whole[0]) and sorted(whole[0]) == [0, 6, 7]
    assert not {6, 7} & set(whole[1]) and sorted(whole[1]) == [0, 1, 2, 3, 4, 5]
    # Excluding the window alone would have let items 1 and 2 in at the top: the test can tell.
    window_only = Requests(requests.user_ids, requests.history, requests.target)
    assert top(window_only.excluded_matrix(np.arange(2)))[0][:2] == [1, 2]
    # A subset keeps each request's whole history.
    assert requests.subset(np.array([1, 0])).excluded_matrix(np.arange(2)).tolist() == [[6, 7, -1, -1, -1], [1, 2, 3, 4, 5]]


def _tiny_generator(config: GenerationConfig) -> CandidateGenerator:
    """A tiny random retriever over the N-item catalog (seeded: the same weights every call)."""
    ids = np.arange(N)
    tokens = np.stack([2 + ids % 4, 6 + ids // 4, np.full(N, EOS)], 1)
    vocab, buckets = 8, 4
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), vocab)
    torch.manual_seed(0)
    model = GenerativeRetriever(RetrieverConfig(vocab_size=vocab, encoder_vocab_size=vocab + buckets, dense_head=True, d_model=16,
                                                num_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=1, dropout=0.0))
    emb = np.random.default_rng(0).normal(size=(N, 4)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return CandidateGenerator(model, tokens, trie, ItemSIDs.build(trie.row_sid), emb, config, user_offset=vocab, user_buckets=buckets)


def test_batches_shrink_with_the_catalog_and_the_candidates_do_not_change():
    requests = evaluation_requests(HISTORY, TARGETS, INDEX, max_history=2)
    full = _tiny_generator(GenerationConfig(beam_width=N, k=N, batch_size=2))
    # At most N scores per batch: one request of N items at a time.
    bounded = _tiny_generator(GenerationConfig(beam_width=N, k=N, batch_size=2, max_batch_scores=N))
    assert (full.batch_size(50), bounded.batch_size(50)) == (2, 1)
    a, b = full.generate(requests), bounded.generate(requests)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5)


def _whole_catalog_candidates(generator: CandidateGenerator, requests: Requests, weights: ScorerWeights):
    """The scorer over every catalog item at once (one batch), the reference the generator's
    streaming pass and slices must reproduce."""
    rows = np.arange(len(requests))
    with torch.no_grad():
        request, memory, mask = generator._encode(requests, rows, generator.vectors(dense=False))
        beams = beam_search(generator.model, memory, mask, beam_width=generator.config.beam_width,
                            max_length=generator.trie.max_length, trie=generator.trie)  # fmt: skip
        dense = torch.log_softmax(generator.model.dense_logits(memory, mask, generator.model.item_vectors(generator.items)), 1)
        whole = RequestFeatures(beams.sid_index, beams.log_probs, request @ generator.items.content.T, dense,
                                torch.as_tensor(requests.excluded_matrix(rows)))  # fmt: skip
        return score_items(whole, generator.sids, weights, k=generator.config.k)


@pytest.mark.parametrize("tiger_rule", [False, True], ids=["buckets", "tiger-cold-rule"])
@pytest.mark.parametrize("max_batch_scores", [2**24, 40], ids=["one-chunk", "chunks-of-40"])
@pytest.mark.parametrize("shard_bounds", [None, [0, 7, 7, 33, 60]], ids=["vectors-held", "vectors-in-4-shards"])
def test_generation_over_catalog_slices_equals_the_scorer_over_the_whole_catalog(tiger_rule, max_batch_scores, shard_bounds):
    """60 items in 15 SIDs of 4 (the SID table of a truncated code path), a random retriever with a
    dense head: the streaming pass and the per-batch slices give the whole-catalog scorer's top-K,
    with the catalog's vectors held by the generator or in row-range shards (one of them empty)."""
    n, vocab, buckets = 60, 10, 4
    ids = np.arange(n)
    tokens = np.stack([2 + ids % 5, 7 + (ids // 5) % 3, np.full(n, EOS)], 1)
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), vocab)
    codes = np.stack([ids % 5, (ids // 5) % 3, ids], 1)
    sids = (ItemSIDs.build(trie.row_sid, codes=codes, prefix_levels=1, item_is_cold=ids % 7 == 0, cold_cap=0.3)
            if tiger_rule else ItemSIDs.build(trie.row_sid))  # fmt: skip
    torch.manual_seed(0)
    model = GenerativeRetriever(RetrieverConfig(vocab_size=vocab, encoder_vocab_size=vocab + buckets, dense_head=True, d_model=16,
                                                num_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=1, dropout=0.0))
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(n, 8)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    config = GenerationConfig(beam_width=3, k=12, batch_size=5, max_batch_scores=max_batch_scores)
    whole = CandidateGenerator(model, tokens, trie, sids, emb, config, user_offset=vocab, user_buckets=buckets)
    generator = whole
    if shard_bounds is not None:
        items = ItemFeatures(torch.as_tensor(tokens), torch.as_tensor(emb))
        shards = [CatalogShard.for_model(model, a, ItemFeatures(items.tokens[a:b], items.content[a:b]), max_batch_scores)
                  for a, b in itertools.pairwise(shard_bounds)]  # fmt: skip
        vectors = CatalogVectors(shards, shard_bounds, emb.shape[1], "cpu")
        generator = CandidateGenerator(model, tokens, trie, sids, vectors, config, user_offset=vocab, user_buckets=buckets)
    history = np.sort(rng.integers(-1, n, size=(9, 4)), axis=1)  # -1 padding on the left
    requests = Requests(np.arange(9), history, np.zeros(9, dtype=np.int64))
    for weights in (config.weights, ScorerWeights(0.1, 0.0, 5.0, 7), ScorerWeights(0.2, 2.0, 0.0, 3), ScorerWeights(0.05, 0.5, 0.0, 0)):
        reference = _whole_catalog_candidates(whole, requests, weights)
        candidates = generator.generate(requests, weights)
        np.testing.assert_array_equal(candidates.items, reference.items.numpy())
        np.testing.assert_allclose(candidates.scores, reference.scores.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(candidates.from_bucket, reference.from_bucket.numpy())
        np.testing.assert_array_equal(candidates.from_dense, reference.from_dense.numpy())
    if max_batch_scores == 40:
        # 60 items pass 40 scores a request, but a slice of 2 requests holds at most 2 x (3 + 7) items.
        assert generator.batch_size(7) == 2


def test_generate_excludes_the_whole_history_end_to_end():
    """A tiny random retriever whose beam covers every SID and k the whole catalog: the top-K is exactly
    the catalog less the request's whole history, under any scorer weights."""
    generator = _tiny_generator(GenerationConfig(beam_width=N, k=N, batch_size=1))
    requests = evaluation_requests(HISTORY, TARGETS, INDEX, max_history=2)
    for weights in (None, ScorerWeights(dense_weight=0.0, content_weight=0.0, dense_candidates=0)):
        candidates = generator.generate(requests, weights)
        assert candidates.invalid_beams == 0
        assert sorted(i for i in candidates.items[0] if i >= 0) == [0, 6, 7]
        assert sorted(i for i in candidates.items[1] if i >= 0) == [0, 1, 2, 3, 4, 5]
