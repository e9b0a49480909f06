"""Tests for sa2crq.retrieval.beam: trie-constrained batched beam search (DESIGN §3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.beam import BeamResult, beam_search, reference_beam_search, score_sequences, search_beams
from sa2crq.retrieval.model import GenerativeRetriever, IncrementalDecoder, ItemFeatures, RetrieverConfig

ENCODER_VOCAB = 24
# A catalog the encoder reads histories from: 10 items of two random tokens and EOS. Only the
# encoder reads these tokens, so any token below ENCODER_VOCAB will do.
N_ITEMS = 10
ITEMS = ItemFeatures(
    torch.cat([torch.randint(2, ENCODER_VOCAB, (N_ITEMS, 2), generator=torch.Generator().manual_seed(0)), torch.full((N_ITEMS, 1), EOS)], 1)
)


# Tiny models gain nothing from intra-op threads; on busy shared cores their spin-waits cost 100x.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(vocab_size: int, seed: int, decoder_layers: int = 1) -> GenerativeRetriever:
    """Random untrained model in float64, so near-ties cannot flip between equivalent computations."""
    torch.manual_seed(seed)
    config = RetrieverConfig(
        vocab_size=vocab_size, encoder_vocab_size=max(ENCODER_VOCAB, vocab_size), d_model=16, num_heads=2,
        head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=decoder_layers, dropout=0.0,
    )  # fmt: skip
    return GenerativeRetriever(config).double().eval()


def build_trie(sids: list[tuple[int, ...]], vocab_size: int) -> SIDTrie:
    width = max(len(s) for s in sids)
    tokens = np.full((len(sids), width), PAD, dtype=np.int64)
    for i, s in enumerate(sids):
        tokens[i, : len(s)] = s
    return SIDTrie.build(tokens, np.array([len(s) for s in sids]), vocab_size)


def encode_random(model: GenerativeRetriever, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    history = torch.randint(0, N_ITEMS, (batch, 5), generator=g)
    history[:, :2] = torch.where(torch.randint(0, 2, (batch, 2), generator=g).bool(), history[:, :2], -1)  # ragged: some rows padded
    users = torch.randint(2, ENCODER_VOCAB, (batch,), generator=g)
    return model.encode(history, users, ITEMS)


def rows(result: BeamResult, b: int) -> list[tuple[tuple[int, ...], float, int, bool]]:
    """(tokens up to the PAD tail, log-prob, sid_index, finished) of request b's non-empty slots."""
    out = []
    for w in range(result.tokens.shape[1]):
        lp = float(result.log_probs[b, w])
        if lp == float("-inf"):
            continue
        toks = tuple(int(t) for t in result.tokens[b, w] if t != PAD)
        out.append((toks, lp, int(result.sid_index[b, w]), bool(result.finished[b, w])))
    return out


@st.composite
def tries(draw) -> tuple[SIDTrie, list[tuple[int, ...]]]:
    """Random SID sets over a small vocabulary, including short IDs and IDs extending them."""
    v = draw(st.integers(3, 9))
    content = st.lists(st.integers(2, v - 1), min_size=1, max_size=4)
    base = draw(st.lists(content, min_size=1, max_size=10))
    sids = {tuple(c) + (EOS,) for c in base}
    for c in draw(st.lists(st.sampled_from(base), max_size=4)):
        cut = draw(st.integers(1, len(c)))
        sids.add(tuple(c[:cut]) + (EOS,))
    sids = sorted(sids)
    return build_trie(sids, v), sids


# -- (a) constrained outputs are valid SIDs ------------------------------------------------
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tries(), extra_vocab=st.integers(0, 2), beam_width=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_constrained_outputs_are_valid_sids(data, extra_vocab, beam_width, seed):
    trie, sids = data
    model = tiny_model(trie.vocab_size + extra_vocab, seed)  # a larger model vocab is masked too
    memory, mask = encode_random(model, batch=3, seed=seed)
    res = beam_search(model, memory, mask, beam_width=beam_width, max_length=trie.max_length, trie=trie)

    assert res.tokens.shape == (3, beam_width, trie.max_length)
    assert torch.all(res.log_probs[:, :-1] >= res.log_probs[:, 1:])  # best first
    for b in range(3):
        kept = rows(res, b)
        # Every live prefix leads to a SID, so beams are never lost: exactly min(W, n_sids) results.
        assert len(kept) == min(beam_width, len(sids))
        assert len({t for t, *_ in kept}) == len(kept)  # no duplicates
        for toks, lp, sid, finished in kept:
            assert finished and trie.accepts(toks) and lp <= 0
            assert sid == int(trie.lookup(np.array([toks]), np.array([len(toks)]))[0]) >= 0
    empty = res.log_probs == float("-inf")
    assert torch.all(res.sid_index[empty] == -1) and not res.finished[empty].any()
    assert torch.all(res.tokens[empty] == PAD)
    # The reported log-probs are the teacher-forced scores of the reported sequences.
    lengths = res.lengths
    scored = score_sequences(model, memory, mask, res.tokens, lengths)
    torch.testing.assert_close(scored[~empty], res.log_probs[~empty])


# -- (b) a wide enough beam is exhaustive ----------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=tries(), extra_width=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_wide_beam_equals_exhaustive_enumeration(data, extra_width, seed):
    trie, sids = data
    model = tiny_model(trie.vocab_size, seed)
    memory, mask = encode_random(model, batch=2, seed=seed + 1)
    width = len(sids) + extra_width
    res = beam_search(model, memory, mask, beam_width=width, max_length=trie.max_length + 1, trie=trie)

    all_tokens, all_lengths = trie.to_padded()  # SID-index order
    tokens = torch.from_numpy(all_tokens).long().expand(2, -1, -1)
    lengths = torch.from_numpy(all_lengths).expand(2, -1)
    exhaustive = score_sequences(model, memory, mask, tokens, lengths)  # (2, n_sids)
    for b in range(2):
        kept = rows(res, b)
        assert sorted(sid for _, _, sid, _ in kept) == list(range(len(sids)))
        beam_lp = torch.tensor([lp for _, lp, _, _ in kept], dtype=exhaustive.dtype)
        sid_order = torch.tensor([sid for _, _, sid, _ in kept])
        torch.testing.assert_close(beam_lp, exhaustive[b, sid_order])
        torch.testing.assert_close(beam_lp, exhaustive[b].sort(descending=True).values)
        for toks, _, sid, _ in kept:
            assert toks == sids[sid]


# -- (c) unconstrained decoding and hallucination ----------------------------------------------
def test_unconstrained_can_emit_invalid_sequences_labelled_minus_one():
    vocab = 6
    trie = build_trie([(2, EOS), (2, 3, EOS), (4, 5, 5, EOS)], vocab)
    model = tiny_model(vocab, seed=0)
    memory, mask = encode_random(model, batch=2, seed=0)
    free = beam_search(model, memory, mask, beam_width=16, max_length=5, trie=None, validity_trie=trie)
    lengths = free.lengths

    valid_rows = []
    for b in range(2):
        for w in range(16):
            toks = free.tokens[b, w, : lengths[b, w]].tolist()
            expected = int(trie.lookup(np.array([toks]), np.array([len(toks)]))[0]) if free.finished[b, w] else -1
            assert int(free.sid_index[b, w]) == expected
            if free.finished[b, w]:
                assert toks[-1] == EOS and EOS not in toks[:-1]
            valid_rows.append(expected >= 0)
    assert not all(valid_rows), "an untrained unconstrained model should hallucinate"
    assert free.finished.any() and (~free.finished).any()  # some hit EOS, some ran out of length
    assert torch.all(free.log_probs > float("-inf"))  # the unconstrained space is never exhausted

    # Without a validity trie nothing can be labelled.
    unlabelled = beam_search(model, memory, mask, beam_width=16, max_length=5, trie=None)
    assert torch.all(unlabelled.sid_index == -1) and torch.equal(unlabelled.tokens, free.tokens)

    # The constrained search on the same model only returns valid SIDs.
    constrained = beam_search(model, memory, mask, beam_width=16, max_length=5, trie=trie)
    assert torch.all((constrained.sid_index >= 0) == (constrained.log_probs > float("-inf")))
    assert int((constrained.sid_index >= 0).sum()) == 2 * 3


def test_validity_trie_walk_agrees_with_constraint_tracking():
    vocab = 8
    trie = build_trie([(2, EOS), (2, 3, EOS), (4, 5, EOS), (6, 7, 7, EOS), (6, EOS)], vocab)
    model = tiny_model(vocab, seed=5)
    memory, mask = encode_random(model, batch=3, seed=5)
    tracked = beam_search(model, memory, mask, beam_width=4, max_length=4, trie=trie)
    same_sids = build_trie(trie.enumerate(), vocab)  # a distinct object: sid_index comes from walking tokens
    walked = beam_search(model, memory, mask, beam_width=4, max_length=4, trie=trie, validity_trie=same_sids)
    assert torch.equal(tracked.sid_index, walked.sid_index)


# -- (d) batching ------------------------------------------------------------------------------
@pytest.mark.parametrize("with_user", [False, True], ids=["no_user", "user"])
@pytest.mark.parametrize("constrained", [True, False])
def test_batched_equals_one_by_one(constrained, with_user):
    vocab = 10
    trie = build_trie([(2, EOS), (2, 3, EOS), (2, 3, 4, EOS), (5, 6, EOS), (7, EOS), (8, 9, 2, EOS), (9, EOS)], vocab)
    model = tiny_model(vocab, seed=11)
    # Left-padded histories, with or without a user token in front: the padding items are squeezed
    # out of the encoder input, so each row alone, unpadded, must give the same beams.
    history = torch.tensor([[0, 1, 2, 3, 4], [-1, -1, -1, 5, 6], [-1, -1, 7, 8, 9], [-1, -1, -1, -1, 2]])
    users = torch.tensor([20, 21, 22, 23]) if with_user else None
    kwargs = dict(beam_width=5, max_length=4, trie=trie if constrained else None, validity_trie=trie)
    memory, mask = model.encode(history, users, ITEMS)
    batched = beam_search(model, memory, mask, **kwargs)
    for b in range(history.shape[0]):
        padding = int((history[b] < 0).sum())
        mem1, mask1 = model.encode(history[b : b + 1, padding:], None if users is None else users[b : b + 1], ITEMS)
        single = beam_search(model, mem1, mask1, **kwargs)
        assert torch.equal(single.tokens[0], batched.tokens[b])
        torch.testing.assert_close(single.log_probs[0], batched.log_probs[b])
        assert torch.equal(single.sid_index[0], batched.sid_index[b])
        assert torch.equal(single.finished[0], batched.finished[b])


# -- (e) the fast path equals the straightforward oracle ------------------------------------------
def assert_same_beams(fast: BeamResult, oracle: BeamResult) -> None:
    assert torch.equal(fast.tokens, oracle.tokens)
    torch.testing.assert_close(fast.log_probs, oracle.log_probs)
    assert torch.equal(fast.sid_index, oracle.sid_index) and torch.equal(fast.finished, oracle.finished)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=tries(), extra_vocab=st.integers(0, 2), beam_width=st.integers(1, 12), extra_length=st.integers(0, 2),
    constrained=st.booleans(), layers=st.integers(1, 2), seed=st.integers(0, 2**16),
)  # fmt: skip
def test_fast_beam_search_equals_the_oracle(data, extra_vocab, beam_width, extra_length, constrained, layers, seed):
    """Variable-length IDs (a short ID and longer IDs extending it), beams wider than the trie, a
    larger model vocabulary, lengths past the deepest ID, and unconstrained decoding."""
    trie, _ = data
    model = tiny_model(trie.vocab_size + extra_vocab, seed, decoder_layers=layers)
    memory, mask = encode_random(model, batch=3, seed=seed)
    kwargs = dict(
        beam_width=beam_width, max_length=trie.max_length + extra_length, trie=trie if constrained else None, validity_trie=trie
    )  # fmt: skip
    assert_same_beams(beam_search(model, memory, mask, **kwargs), reference_beam_search(model, memory, mask, **kwargs))


def test_fast_beam_search_equals_the_oracle_on_a_catalog_with_buckets():
    """A 4-level catalog of 400 items where many items share a SID (buckets) and IDs have 2 to 4
    codes, searched at beam 20: the shape the product decodes."""
    g = np.random.default_rng(3)
    vocab, n_items = 40, 400
    codes = g.integers(2, vocab, size=(n_items, 4))
    lengths = g.integers(2, 5, size=n_items)
    tokens = np.full((n_items, 5), PAD)
    for i, (row, n) in enumerate(zip(codes, lengths)):
        tokens[i, :n] = row[:n]
        tokens[i, n] = EOS
    tokens[200:] = tokens[g.integers(0, 200, size=200)]  # half the items fall into shared buckets
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), vocab)
    assert trie.n_sids < n_items
    model = tiny_model(vocab, seed=7, decoder_layers=2)
    memory, mask = encode_random(model, batch=6, seed=7)
    kwargs = dict(beam_width=20, max_length=trie.max_length, trie=trie)
    fast = beam_search(model, memory, mask, **kwargs)
    assert_same_beams(fast, reference_beam_search(model, memory, mask, **kwargs))
    assert bool((fast.sid_index >= 0).all())


def test_incremental_decoder_equals_full_decode():
    """Logits of every step equal the full decoder over the prefix, including after beams are
    reordered (each beam's cache comes from its parent)."""
    model = tiny_model(12, seed=4, decoder_layers=2)
    memory, mask = encode_random(model, batch=2, seed=4)
    g = torch.Generator().manual_seed(4)
    decoder = IncrementalDecoder(model, memory, mask, max_length=4)
    prefix = torch.full((2, 1, 1), PAD)
    logits = decoder.step(prefix[..., -1], None)
    for _ in range(3):
        expected = model.decode(memory.repeat_interleave(prefix.shape[1], 0), mask.repeat_interleave(prefix.shape[1], 0), prefix.flatten(0, 1))
        torch.testing.assert_close(logits, expected[:, -1].view(2, prefix.shape[1], -1))
        parent = torch.randint(0, prefix.shape[1], (2, 3), generator=g)
        token = torch.randint(2, 12, (2, 3), generator=g)
        prefix = torch.cat([prefix[torch.arange(2)[:, None], parent], token[..., None]], dim=-1)
        logits = decoder.step(token, parent)


def test_search_replays_recorded_logits():
    """The loop depends on the model only through its logits: replaying a search's recorded logits
    reproduces its beams (how the benchmark times the search alone)."""
    trie = build_trie([(2, EOS), (2, 3, EOS), (2, 3, 4, EOS), (5, 6, EOS), (7, EOS), (8, 9, 2, EOS)], 10)
    model = tiny_model(10, seed=8)
    memory, mask = encode_random(model, batch=3, seed=8)
    decoder = IncrementalDecoder(model, memory, mask, max_length=4)
    recorded: list[torch.Tensor] = []

    def record(tokens, parent):
        recorded.append(decoder.step(tokens, parent))
        return recorded[-1]

    common = dict(batch=3, beam_width=4, max_length=4, trie=trie, device=memory.device, dtype=torch.float64)
    searched = search_beams(record, **common)
    replay = iter(recorded)
    assert_same_beams(search_beams(lambda tokens, parent: next(replay), **common), searched)


# -- details -----------------------------------------------------------------------------------
def test_empty_slots_train_mode_restored_and_argument_checks():
    vocab = 5
    trie = build_trie([(2, EOS), (3, 4, EOS)], vocab)
    model = tiny_model(vocab, seed=1).train()
    memory, mask = encode_random(model, batch=2, seed=1)
    res = beam_search(model, memory, mask, beam_width=4, max_length=3, trie=trie)
    assert model.training  # caller's mode restored
    assert torch.all(torch.isinf(res.log_probs[:, 2:])) and torch.all(res.sid_index[:, 2:] == -1)
    assert torch.all(res.tokens[:, 2:] == PAD) and res.finished[:, :2].all() and not res.finished[:, 2:].any()
    # A constraint shorter than the IDs leaves beams unfinished, hence unlabelled.
    short = beam_search(model, memory, mask, beam_width=2, max_length=2, trie=trie)
    assert torch.equal(short.finished, short.sid_index >= 0)
    assert int(short.finished.sum()) == 2
    with pytest.raises(ValueError, match="beam_width"):
        beam_search(model, memory, mask, beam_width=0, max_length=3, trie=trie)
    with pytest.raises(ValueError, match="exceeds the model"):
        beam_search(model, memory, mask, beam_width=2, max_length=3, trie=build_trie([(7, EOS)], 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    vocab = 10
    trie = build_trie([(2, EOS), (2, 3, EOS), (2, 3, 4, EOS), (5, 6, EOS), (7, EOS), (8, 9, 2, EOS)], vocab)
    model = tiny_model(vocab, seed=2)
    memory, mask = encode_random(model, batch=3, seed=2)
    cpu = beam_search(model, memory, mask, beam_width=4, max_length=4, trie=trie)
    gpu_model = model.cuda()
    gpu = beam_search(gpu_model, memory.cuda(), mask.cuda(), beam_width=4, max_length=4, trie=trie)
    assert gpu.tokens.device.type == "cuda"
    assert torch.equal(gpu.tokens.cpu(), cpu.tokens) and torch.equal(gpu.sid_index.cpu(), cpu.sid_index)
    torch.testing.assert_close(gpu.log_probs.cpu(), cpu.log_probs)
