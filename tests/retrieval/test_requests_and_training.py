"""Requests from interactions, batches for the retriever, and a deterministic training loop."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from sa2crq.ids.trie import EOS, PAD
from sa2crq.retrieval.data import ItemIndex, Requests, Sequences, evaluation_requests, training_requests, user_token
from sa2crq.retrieval.model import GenerativeRetriever, ItemFeatures, RetrieverConfig
from sa2crq.retrieval.checkpoint import load_training_state, save_training_state
from sa2crq.retrieval.training import RetrieverTrainConfig, _lr_factor, batch_losses, make_batch, train_retriever

# Tiny models gain nothing from intra-op threads; on busy shared cores their spin-waits cost 100x.
pytestmark = pytest.mark.usefixtures("one_thread")

INDEX = ItemIndex(np.array([30, 10, 20]))
INTERACTIONS = pa.table({"user_id": [1, 1, 1, 2, 2], "item_id": [10, 20, 30, 30, 10], "timestamp": [0, 1, 2, 0, 1]})
SID_TOKENS = torch.tensor([[5, EOS, PAD], [6, 7, EOS], [8, EOS, PAD]])


def test_item_index_maps_ids_and_names_unknown_ones():
    assert INDEX.lookup(np.array([10, 20, 30])).tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match=r"\[99\]"):
        INDEX.lookup(np.array([10, 99]))


def test_training_requests_cut_each_sequence_into_windows_from_its_end():
    seq = Sequences.from_interactions(INTERACTIONS, INDEX)  # user 1: items 1, 2, 0; user 2: 0, 1
    requests = training_requests(seq, max_history=2)
    assert requests.history.tolist() == [[1, 2], [-1, 0]]
    assert requests.target.tolist() == [0, 1]
    assert requests.user_ids.tolist() == [1, 2]
    one = training_requests(seq, max_history=1)
    assert one.history.tolist() == [[2], [1], [0]] and one.target.tolist() == [0, 2, 1]


@pytest.mark.parametrize("max_history", [1, 2, 3, 5, 8])
def test_every_position_of_every_sequence_is_a_target_once_with_the_items_before_it(max_history):
    lengths = np.random.default_rng(max_history).integers(1, 15, 40)
    users = np.repeat(np.arange(40), lengths)
    # Item i is the i-th interaction, so a target names its position.
    inter = pa.table({"user_id": users, "item_id": np.arange(len(users)), "timestamp": np.arange(len(users))})
    requests = training_requests(Sequences.from_interactions(inter, ItemIndex(np.arange(len(users)))), max_history)
    every = make_batch(requests, np.arange(len(requests)), torch.zeros((len(users), 2), dtype=torch.long), user_offset=0, buckets=4, every_position=True)
    firsts = np.r_[0, np.cumsum(lengths)[:-1]]
    assert sorted(every.target_index.tolist()) == sorted(set(range(len(users))) - set(firsts.tolist()))
    for request, slot, target in zip(every.target_request.tolist(), every.target_slot.tolist(), every.target_index.tolist()):
        visible = [i for i in requests.history[request, : slot + 1].tolist() if i >= 0]
        assert 1 <= len(visible) <= max_history
        assert visible == list(range(target - len(visible), target))  # the items just before it
        assert users[target] == users[visible[0]] == requests.user_ids[request]


def test_evaluation_requests_use_the_whole_history_and_tolerate_unknown_users():
    seq = Sequences.from_interactions(INTERACTIONS, INDEX)
    targets = pa.table({"user_id": [2, 5, 1], "item_id": [20, 20, 10]})
    requests = evaluation_requests(seq, targets, INDEX, max_history=3)
    assert requests.history.tolist() == [[-1, 0, 1], [-1, -1, -1], [1, 2, 0]]
    assert requests.target.tolist() == [2, 2, 1]
    # A window shorter than the history: the encoder reads the last items, exclusion covers all of them.
    short = evaluation_requests(seq, targets, INDEX, max_history=1)
    assert short.history.tolist() == [[1], [-1], [0]]
    indptr, items = short.history_csr()
    assert indptr.tolist() == [0, 2, 2, 5] and items.tolist() == [0, 1, 1, 2, 0]
    assert short.excluded_matrix(np.arange(3)).tolist() == [[0, 1, -1], [-1, -1, -1], [1, 2, 0]]
    assert short.excluded_matrix(np.array([1])).tolist() == [[-1]]  # nothing to exclude: one padding slot
    picked = short.subset(np.array([2, 0]))
    assert picked.history.tolist() == [[0], [1]] and picked.target.tolist() == [1, 2]
    assert picked.excluded_matrix(np.arange(2)).tolist() == [[1, 2, 0], [0, 1, -1]]


def test_requests_without_an_exclusion_list_exclude_their_window():
    requests = Requests(np.array([1, 2]), np.array([[-1, 3, 4], [-1, -1, -1]]), np.array([0, 1]))
    assert requests.excluded_matrix(np.arange(2)).tolist() == [[3, 4], [-1, -1]]
    assert requests.subset(np.array([0])).excluded is None
    with pytest.raises(ValueError, match="excluded must be a CSR over R=2"):
        Requests(np.array([1, 2]), np.zeros((2, 1), dtype=np.int64), np.array([0, 1]), excluded=(np.array([0, 1]), np.array([3])))


def test_unsorted_interactions_are_refused():
    with pytest.raises(ValueError, match="sorted"):
        Sequences.from_interactions(INTERACTIONS.take(pa.array([3, 0, 4, 1, 2])), INDEX)


def test_batches_carry_the_history_items_and_hashed_user_tokens():
    requests = training_requests(Sequences.from_interactions(INTERACTIONS, INDEX), max_history=2)
    batch = make_batch(requests, np.array([1, 0]), SID_TOKENS, user_offset=9, buckets=4)
    # A batch carries the history items' dense indices, -1 padded on the left; the encoder spells out their SID tokens.
    assert batch.history.tolist() == [[-1, 0], [1, 2]]
    assert batch.users.tolist() == user_token(np.array([2, 1]), 4, 9).tolist()
    # One target per request, decoded from its whole history (the last slot).
    assert batch.target_index.tolist() == [1, 0] and batch.query is None
    assert batch.target_request.tolist() == [0, 1] and batch.target_slot.tolist() == [1, 1]
    assert batch.target.tolist() == [[6, 7, EOS], [5, EOS, PAD]]
    # Every position: each history item's successor too, decoded from the history up to that item.
    every = make_batch(requests, np.array([1, 0]), SID_TOKENS, user_offset=9, buckets=4, every_position=True)
    assert every.target_request.tolist() == [0, 1, 1] and every.target_slot.tolist() == [1, 0, 1]
    assert every.target_index.tolist() == [1, 2, 0]
    assert every.target.tolist() == SID_TOKENS[[1, 2, 0]].tolist()
    assert every.decoder_input[:, 0].eq(PAD).all()


def test_user_tokens_are_stable_and_in_range():
    a = user_token(np.array([1, 2, 3, 10**12]), 7, 50)
    assert ((a >= 50) & (a < 57)).all()
    assert np.array_equal(a, user_token(np.array([1, 2, 3, 10**12]), 7, 50))
    assert user_token(np.array(["u1", "u2"]), 7, 50).shape == (2,)


def test_batches_shift_the_target_right_with_pad_as_start():
    requests = training_requests(Sequences.from_interactions(INTERACTIONS, INDEX), max_history=2)
    batch = make_batch(requests, np.array([1]), SID_TOKENS, user_offset=9, buckets=4)
    assert batch.target.tolist() == [[6, 7, EOS]]
    assert batch.decoder_input.tolist() == [[PAD, 6, 7]]


TINY = dict(vocab_size=20, encoder_vocab_size=28, d_model=16, num_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=1)


def _data() -> tuple[Requests, ItemFeatures]:
    """30 users of 6 random items each over a 40-item catalog with 2-token SIDs."""
    rng = np.random.default_rng(0)
    ids = np.arange(40)
    users = np.repeat(np.arange(30), 6)
    inter = pa.table({"user_id": users, "item_id": rng.integers(0, 40, len(users)), "timestamp": np.tile(np.arange(6), 30)})
    seq = Sequences.from_interactions(inter, ItemIndex(ids))
    tokens = torch.as_tensor(np.stack([2 + ids % 5, 7 + ids // 5, np.full(40, EOS)], 1))
    return training_requests(seq, 4), ItemFeatures(tokens)


def _train(seed: int) -> dict[str, torch.Tensor]:
    requests, items = _data()
    torch.manual_seed(seed)
    model = GenerativeRetriever(RetrieverConfig(**TINY))
    # 30 users x 5 targets in 2 windows each (4 targets, then the first), in batches of 20 windows.
    cfg = RetrieverTrainConfig(epochs=2, batch_size=20, warmup_steps=2, max_history=4, user_buckets=8, seed=seed)
    history = train_retriever(model, requests, requests, items, cfg, user_offset=20)
    curve = history["curve"]
    assert len(curve) == 2 and [p["step"] for p in curve] == [3, 6]  # evaluated once per epoch of 3 steps
    assert [p["examples"] for p in curve] == [150, 300]  # every target once an epoch
    assert curve[-1]["valid_loss"] < curve[0]["valid_loss"] or history["best_step"] > curve[0]["step"]
    # Without ``select`` checkpoints are selected by the negated validation loss.
    assert history["selected_by"] == "negative validation loss"
    assert all(p["metric"] == -p["valid_loss"] for p in curve)
    assert history["best_metric"] == max(p["metric"] for p in curve) == -history["best_valid_loss"]
    assert history["steps"] == 6 and history["examples"] == 300 and history["examples_per_second"] > 0
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_under_a_seed():
    first, second, other = _train(0), _train(0), _train(1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def _without_timings(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in point.items() if k != "train_seconds"} for point in curve]


def test_a_run_resumed_from_an_evaluations_state_ends_as_the_uninterrupted_run(tmp_path):
    """Each evaluation's state, stored as safetensors + JSON, takes a fresh model to the end of the
    same run: mid-epoch (the epoch's order drawn again), with dropout and sampled dense negatives."""
    requests, items = _data()
    # 60 requests in batches of 16: 4 steps an epoch; evaluations at steps 3, 6 and 9 fall mid-epoch.
    config = RetrieverTrainConfig(epochs=3, batch_size=16, warmup_steps=2, schedule="cosine", max_history=4, user_buckets=8,
                                  dense_negatives=8, eval_every_steps=3, patience=10, seed=0)  # fmt: skip

    def run(seed: int, resume=None):
        torch.manual_seed(seed)
        model = GenerativeRetriever(RetrieverConfig(**TINY, dense_head=True))  # dropout 0.1
        states = []
        history = train_retriever(model, requests, requests, items, config, user_offset=20, on_evaluation=states.append, resume=resume)
        return model.state_dict(), history, states

    weights, history, states = run(seed=0)
    assert [state.steps for state in states] == [3, 6, 9, 12] and history["resumed_at"] == []
    for state in states:
        directory = tmp_path / f"state-{state.steps}"
        save_training_state(directory, state)
        assert sorted(os.listdir(directory)) == ["checkpoint.json", "model.safetensors"]
        stored = load_training_state(directory)
        assert all(torch.equal(stored.model[k], state.model[k]) and torch.equal(stored.best_model[k], state.best_model[k]) for k in state.model)
        assert torch.equal(stored.generators, state.generators) and stored.curve == state.curve
        # Another initialisation: everything the run continues with comes from the state.
        resumed_weights, resumed, later_states = run(seed=1, resume=stored)
        assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights), f"resumed at step {state.steps}"
        assert _without_timings(resumed["curve"]) == _without_timings(history["curve"])
        assert (resumed["best_step"], resumed["steps"], resumed["examples"]) == (history["best_step"], history["steps"], history["examples"])
        assert resumed["resumed_at"] == [state.steps]
        assert [s.steps for s in later_states] == [s.steps for s in states if s.steps > state.steps]


def test_a_resumed_run_keeps_the_patience_it_had_spent():
    requests, items = _data()
    metrics = [0.1, 0.3, 0.2, 0.15, 0.9]  # patience 2: stops after the 4th evaluation, the 2nd the best
    config = RetrieverTrainConfig(epochs=20, batch_size=16, warmup_steps=0, max_history=4, user_buckets=8, eval_every_steps=1,
                                  patience=2, seed=0)  # fmt: skip

    def run(resume=None):
        scripted = iter(metrics[len(resume.curve) if resume else 0 :])
        torch.manual_seed(0)
        model = GenerativeRetriever(RetrieverConfig(**TINY))
        states = []
        history = train_retriever(model, requests, requests, items, config, user_offset=20, select=lambda _: next(scripted),
                                  on_evaluation=states.append, resume=resume)  # fmt: skip
        return model.state_dict(), history, states

    weights, history, states = run()
    assert [s.steps for s in states] == [1, 2, 3, 4] and history["steps"] == 4 and history["best_step"] == 2
    # After the 3rd evaluation one more is due; after the 4th the patience is spent and nothing is trained.
    for state in states[2:]:
        resumed_weights, resumed, _ = run(resume=state)
        assert (resumed["steps"], resumed["best_step"]) == (4, 2)
        assert _without_timings(resumed["curve"]) == _without_timings(history["curve"])
        assert all(torch.equal(resumed_weights[k], weights[k]) for k in weights)


def test_a_training_state_resumes_only_on_as_many_ranks():
    requests, items = _data()
    config = RetrieverTrainConfig(epochs=1, batch_size=16, max_history=4, user_buckets=8, seed=0)
    states = []
    torch.manual_seed(0)
    train_retriever(GenerativeRetriever(RetrieverConfig(**TINY)), requests, requests, items, config, user_offset=20, on_evaluation=states.append)
    two_ranks = dataclasses.replace(states[0], generators=states[0].generators.repeat(2, 1, 1))
    with pytest.raises(ValueError, match="2 ranks cannot resume on 1"):
        train_retriever(GenerativeRetriever(RetrieverConfig(**TINY)), requests, requests, items, config, user_offset=20, resume=two_ranks)


def _select_run(metrics: list[float], **config) -> tuple[dict, list[dict[str, torch.Tensor]], GenerativeRetriever]:
    """Train with ``select`` returning the scripted ``metrics`` in turn; the model's weights at each call."""
    requests, items = _data()
    torch.manual_seed(0)
    model = GenerativeRetriever(RetrieverConfig(**TINY))
    seen: list[dict[str, torch.Tensor]] = []

    def select(m: GenerativeRetriever) -> float:
        assert m is model
        seen.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return metrics[len(seen) - 1]

    cfg = RetrieverTrainConfig(**{**dict(epochs=20, batch_size=16, warmup_steps=0, max_history=4, user_buckets=8, seed=0), **config})
    history = train_retriever(model, requests, requests, items, cfg, user_offset=20, select=select)
    return history, seen, model


def test_checkpoint_selection_restores_the_best_scoring_weights_and_stops_on_patience():
    history, seen, model = _select_run([0.1, 0.3, 0.2, 0.15, 0.9, 0.9], eval_every_steps=1, patience=2)
    # Two evaluations without improving on the 2nd: stopped after the 4th, before the 0.9 could come.
    assert len(seen) == 4 and history["steps"] == 4
    assert [p["step"] for p in history["curve"]] == [1, 2, 3, 4]
    assert [p["metric"] for p in history["curve"]] == [0.1, 0.3, 0.2, 0.15]
    assert history["selected_by"] == "select"
    assert history["best_step"] == 2 and history["best_metric"] == 0.3
    assert history["best_valid_loss"] == history["curve"][1]["valid_loss"]
    assert history["converged"] is True
    # The weights seen at the best call are restored; training had moved them since.
    restored = model.state_dict()
    assert all(torch.equal(restored[k], seen[1][k]) for k in restored)
    assert not all(torch.equal(seen[1][k], seen[3][k]) for k in restored)
    assert all(math.isfinite(p["valid_loss"]) and p["train_seconds"] >= 0 for p in history["curve"])


def test_a_still_rising_selection_metric_is_not_converged():
    history, seen, model = _select_run([0.1, 0.2, 0.3, 0.4], eval_every_steps=1, patience=2, max_steps=4)
    assert len(seen) == 4 and history["steps"] == 4
    assert history["best_step"] == 4 and history["best_metric"] == 0.4
    assert history["converged"] is False
    restored = model.state_dict()
    assert all(torch.equal(restored[k], seen[3][k]) for k in restored)


def test_evaluations_every_few_steps_and_one_at_the_budget():
    # 30 users x 2 windows = 60 requests, batches of 16: 4 steps an epoch; a budget of 7 steps.
    history, seen, _ = _select_run([0.5, 0.4, 0.3, 0.2], eval_every_steps=3, patience=5, max_steps=7)
    assert [p["step"] for p in history["curve"]] == [3, 6, 7]  # the last, partial interval is evaluated too
    assert history["best_step"] == 3 and history["converged"] is True
    examples = [p["examples"] for p in history["curve"]]
    assert 3 * 16 <= examples[0] < examples[1] < examples[2] <= 7 * 16 * 4  # targets, 1 to 4 per window


def test_batch_losses_add_the_dense_catalog_cross_entropy():
    requests, items = _data()
    torch.manual_seed(0)
    model = GenerativeRetriever(RetrieverConfig(**TINY, dense_head=True, dropout=0.0)).eval()
    batch = make_batch(requests, np.arange(8), items.tokens, user_offset=20, buckets=8)
    sid_loss, n_tokens, dense_loss, targets = batch_losses(model, batch, items)
    assert targets == 8
    memory, mask = model.encode(batch.history, batch.users, items)
    logits = model.decode(memory, mask, batch.decoder_input)
    assert n_tokens == 8 * 3  # two code tokens and EOS per target
    torch.testing.assert_close(sid_loss, F.cross_entropy(logits.reshape(-1, 20), batch.target.reshape(-1), ignore_index=PAD, reduction="sum"))
    # The rows' histories differ in SID tokens, so the memory is ragged (padding at the right): the
    # dense head reads each row at its own last real position.
    assert not mask.all() and torch.equal(mask, torch.arange(mask.shape[1]) < mask.sum(1, keepdim=True))
    request = model.dense_projection(memory[torch.arange(8), mask.sum(1) - 1])
    torch.testing.assert_close(model.dense_request(memory, mask), request)
    dense = model.dense_logits(memory, mask, model.item_vectors(items))
    torch.testing.assert_close(dense, request @ model.item_vectors(items).T)
    torch.testing.assert_close(dense_loss, F.cross_entropy(dense, batch.target_index, reduction="sum"))
    assert dense_loss > 0
    # With sampled negatives: column 0 the target, then the negatives, a negative that is the row's own target left out.
    negatives = torch.tensor([batch.target_index[0].item(), 39, 17])
    sampled = (request @ model.item_vectors(items, negatives).T).masked_fill(negatives[None, :] == batch.target_index[:, None], float("-inf"))
    scores = torch.cat([(request * model.item_vectors(items, batch.target_index)).sum(-1, keepdim=True), sampled], 1)
    torch.testing.assert_close(batch_losses(model, batch, items, negatives).dense, F.cross_entropy(scores, torch.zeros(8, dtype=torch.long), reduction="sum"))
    # Left out on request (validation): the same SID loss, no dense loss.
    sid_only = batch_losses(model, batch, items, dense_loss=False)
    assert sid_only.dense == 0 and torch.equal(sid_only.sid, sid_loss)
    # Without a dense head the dense loss is zero.
    torch.manual_seed(0)
    plain = GenerativeRetriever(RetrieverConfig(**TINY)).eval()
    assert batch_losses(plain, batch, items).dense == 0


def test_every_position_losses_equal_decoding_each_target_from_its_own_cut_history():
    """The item-causal encoder makes one pass over a window the same as encoding each target's
    history separately: the SID logits and the dense request of every target agree."""
    requests, items = _data()
    torch.manual_seed(0)
    model = GenerativeRetriever(RetrieverConfig(**TINY, dense_head=True, dropout=0.0)).eval()
    batch = make_batch(requests, np.arange(6), items.tokens, user_offset=20, buckets=8, every_position=True)
    memory, mask, slots = model.encode_with_slots(batch.history, batch.users, items)
    visible = mask[batch.target_request] & (slots[batch.target_request] <= batch.target_slot[:, None])
    logits = model.decode(memory, visible, batch.decoder_input, batch.target_request)
    request = model.dense_request(memory, visible, batch.target_request)
    assert len(batch.target_index) > 6
    for n, (row, slot) in enumerate(zip(batch.target_request.tolist(), batch.target_slot.tolist())):
        cut = batch.history[row : row + 1, : slot + 1]
        alone_memory, alone_mask = model.encode(cut, batch.users[row : row + 1], items)
        torch.testing.assert_close(logits[n : n + 1], model.decode(alone_memory, alone_mask, batch.decoder_input[n : n + 1]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(request[n : n + 1], model.dense_request(alone_memory, alone_mask), rtol=1e-5, atol=1e-5)
    losses = batch_losses(model, batch, items)
    expected = F.cross_entropy(logits.reshape(-1, 20), batch.target.reshape(-1), ignore_index=PAD, reduction="sum")
    torch.testing.assert_close(losses.sid, expected)
    assert losses.targets == len(batch.target_index) and losses.tokens == int((batch.target != PAD).sum())


def test_train_config_is_validated():
    for bad in (dict(schedule="linear"), dict(decay_fraction=0.0), dict(select_users=0), dict(tune_users=0), dict(dense_loss_weight=-1.0), dict(eval_every_steps=-1)):
        with pytest.raises(ValueError, match="retriever"):
            RetrieverTrainConfig(**bad)
    defaults = RetrieverTrainConfig()
    assert (defaults.max_history, defaults.learning_rate, defaults.schedule, defaults.eval_every_steps) == (8, 2e-3, "constant", 0)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "stable-decay"])
def test_learning_rate_schedules(schedule):
    config = RetrieverTrainConfig(schedule=schedule, warmup_steps=10, decay_fraction=0.25)
    factors = np.array([_lr_factor(step, config, 100) for step in range(100)])
    np.testing.assert_allclose(factors[:10], np.arange(1, 11) / 10)  # linear warm-up
    assert np.all(np.diff(factors[10:]) <= 1e-12)  # never rises after the warm-up
    if schedule == "constant":
        assert np.all(factors[10:] == 1.0)
    elif schedule == "stable-decay":
        assert np.all(factors[10:75] == 1.0)  # stable until the last quarter
        assert factors[76] < 1.0 and factors[99] == pytest.approx(0.1 + 0.9 / 25)
    else:
        assert factors[99] == pytest.approx(0.1, abs=1e-3)
