"""Requests from interactions, batches for the retriever, and a deterministic training loop."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from sa2crq.ids.trie import EOS, PAD
from sa2crq.retrieval.data import ItemIndex, Sequences, encoder_tokens, evaluation_requests, training_requests, user_token
from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.retrieval.training import RetrieverTrainConfig, make_batch, train_retriever

INDEX = ItemIndex(np.array([30, 10, 20]))
INTERACTIONS = pa.table({"user_id": [1, 1, 1, 2, 2], "item_id": [10, 20, 30, 30, 10], "timestamp": [0, 1, 2, 0, 1]})
SID_TOKENS = torch.tensor([[5, EOS, PAD], [6, 7, EOS], [8, EOS, PAD]])


def test_item_index_maps_ids_and_names_unknown_ones():
    assert INDEX.lookup(np.array([10, 20, 30])).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"\[99\]"):
        INDEX.lookup(np.array([10, 99]))


def test_training_requests_slide_over_every_position():
    requests = training_requests(Sequences.from_interactions(INTERACTIONS, INDEX), max_history=2)
    assert requests.history.tolist() == [[-1, 1], [1, 2], [-1, 0]]
    assert requests.target.tolist() == [2, 0, 1]
    assert requests.user_ids.tolist() == [1, 1, 2]


def test_evaluation_requests_use_the_whole_history_and_tolerate_unknown_users():
    seq = Sequences.from_interactions(INTERACTIONS, INDEX)
    requests = evaluation_requests(seq, pa.table({"user_id": [2, 5, 1], "item_id": [20, 20, 10]}), INDEX, max_history=3)
    assert requests.history.tolist() == [[-1, 0, 1], [-1, -1, -1], [1, 2, 0]]
    assert requests.target.tolist() == [2, 2, 1]


def test_unsorted_interactions_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        Sequences.from_interactions(INTERACTIONS.take(pa.array([3, 0, 4, 1, 2])), INDEX)


def test_encoder_input_is_user_token_then_history_sids_without_padding():
    tokens = encoder_tokens(torch.tensor([[-1, 0, 1], [-1, -1, -1]]), torch.tensor([100, 101]), SID_TOKENS)
    assert tokens.tolist() == [[100, 5, EOS, 6, 7, EOS], [101, PAD, PAD, PAD, PAD, PAD]]


def test_user_tokens_are_stable_and_in_range():
    a = user_token(np.array([1, 2, 3, 10**12]), 7, 50)
    assert ((a >= 50) & (a < 57)).all()
    assert np.array_equal(a, user_token(np.array([1, 2, 3, 10**12]), 7, 50))
    assert user_token(np.array(["u1", "u2"]), 7, 50).shape == (2,)


def test_batches_shift_the_target_right_with_pad_as_start():
    requests = training_requests(Sequences.from_interactions(INTERACTIONS, INDEX), max_history=2)
    batch = make_batch(requests, np.array([0]), SID_TOKENS, user_offset=9, buckets=4)
    assert batch.target.tolist() == [[8, EOS, PAD]]
    assert batch.decoder_input.tolist() == [[PAD, 8, EOS]]


def _train(seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    ids = np.arange(40)
    users = np.repeat(np.arange(30), 6)
    inter = pa.table({"user_id": users, "item_id": rng.integers(0, 40, len(users)), "timestamp": np.tile(np.arange(6), 30)})
    index = ItemIndex(ids)
    seq = Sequences.from_interactions(inter, index)
    tokens = torch.as_tensor(np.stack([2 + ids % 5, 7 + ids // 5, np.full(40, EOS)], 1))
    torch.manual_seed(seed)
    model = GenerativeRetriever(RetrieverConfig(vocab_size=20, encoder_vocab_size=28, d_model=16, num_heads=2, head_dim=8,
                                                d_ff=32, encoder_layers=1, decoder_layers=1))
    cfg = RetrieverTrainConfig(epochs=2, batch_size=32, warmup_steps=2, max_history=4, user_buckets=8, seed=seed)
    requests = training_requests(seq, cfg.max_history)
    history = train_retriever(model, requests, requests, tokens, cfg, user_offset=20)
    assert history["valid_loss"][-1] < history["valid_loss"][0] or history["best_epoch"] >= 1
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_under_a_seed():
    first, second, other = _train(0), _train(0), _train(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
