"""Tests for sa2crq.retrieval.model: the T5-style generative retriever (DESIGN §3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.beam import beam_search
from sa2crq.retrieval.model import (
    GenerativeRetriever,
    RetrieverConfig,
    relative_position_bucket,
    shift_right,
)


# Tiny models gain nothing from intra-op threads; on busy shared cores their spin-waits cost 100x.
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> RetrieverConfig:
    base = dict(
        vocab_size=12, encoder_vocab_size=20, d_model=16, num_heads=2, head_dim=8, d_ff=32,
        encoder_layers=1, decoder_layers=1, dropout=0.0,
    )  # fmt: skip
    base.update(overrides)
    return RetrieverConfig(**base)


def tiny_model(seed: int = 0, **overrides) -> GenerativeRetriever:
    torch.manual_seed(seed)
    return GenerativeRetriever(tiny_config(**overrides)).double().eval()


# -- config --------------------------------------------------------------------------------
def test_config_defaults_roundtrip_and_validation():
    c = RetrieverConfig(vocab_size=1100, encoder_vocab_size=3100)
    assert (c.d_model, c.num_heads, c.head_dim, c.inner_dim, c.d_ff) == (128, 6, 64, 384, 1024)
    assert (c.encoder_layers, c.decoder_layers, c.query_dim, c.query_tokens) == (4, 4, 0, 4)
    assert RetrieverConfig.from_dict(c.to_dict()) == c
    assert RetrieverConfig(vocab_size=50).encoder_vocab_size == 50
    with pytest.raises(ValueError, match="unknown retriever config field"):
        RetrieverConfig.from_dict({**c.to_dict(), "n_layers": 2})
    bad = [
        dict(vocab_size=2),
        dict(vocab_size=10, encoder_vocab_size=9),
        dict(vocab_size=10, query_dim=-1),
        dict(vocab_size=10, query_tokens=0),
        dict(vocab_size=10, num_heads=0),
        dict(vocab_size=10, dropout=1.0),
        dict(vocab_size=10, relative_attention_buckets=2),
        dict(vocab_size=10, relative_attention_buckets=32, relative_attention_max_distance=16),
        dict(vocab_size=10.0),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match="retriever"):
            RetrieverConfig(**kwargs)


def test_relative_position_bucket_matches_t5():
    rel = torch.tensor([0, -1, 1, -7, -8, -1000, 1000])
    bi = relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    assert bi.tolist() == [0, 1, 17, 7, 8, 15, 31]
    causal = relative_position_bucket(rel, bidirectional=False, num_buckets=32, max_distance=128)
    assert causal.tolist() == [0, 1, 0, 7, 8, 31, 0]  # the future all shares bucket 0 (masked)


# -- shapes, masking, causality ------------------------------------------------------------
def test_shapes_and_shift_right():
    m = tiny_model()
    enc = torch.randint(2, 20, (3, 5))
    target = torch.tensor([[4, 5, EOS, PAD], [6, EOS, PAD, PAD], [7, 8, 9, EOS]])
    dec_in = shift_right(target)
    assert dec_in[:, 0].eq(PAD).all() and torch.equal(dec_in[:, 1:], target[:, :-1])
    logits = m(enc, dec_in)
    assert logits.shape == (3, 4, 12)
    memory, mask = m.encode(enc)
    assert memory.shape == (3, 5, 16) and mask.dtype == torch.bool and mask.all()
    torch.testing.assert_close(m.decode(memory, mask, dec_in), logits)


def test_decoder_is_causal():
    m = tiny_model()
    enc = torch.randint(2, 20, (2, 6))
    dec = torch.randint(2, 12, (2, 5))
    dec[:, 0] = PAD
    changed = dec.clone()
    changed[:, 3:] = torch.randint(2, 12, (2, 2))
    a, b = m(enc, dec), m(enc, changed)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_encoder_padding_is_ignored():
    m = tiny_model()
    enc = torch.randint(2, 20, (2, 4))
    dec = shift_right(torch.randint(2, 12, (2, 3)))
    ref = m(enc, dec)
    pad = torch.zeros(2, 3, dtype=torch.long)
    # Right and left padding: relative positions between real tokens are unchanged either way.
    torch.testing.assert_close(m(torch.cat([enc, pad], 1), dec), ref)
    torch.testing.assert_close(m(torch.cat([pad, enc], 1), dec), ref)
    # A padded batch row gives the same logits as the row alone.
    ragged = torch.cat([enc, pad], 1)
    ragged[1, 2:] = PAD
    torch.testing.assert_close(m(ragged, dec)[1:], m(enc[1:, :2], dec[1:]))


def test_query_path_with_and_without_tokens():
    m = tiny_model(query_dim=7, query_tokens=3)
    query = torch.randn(2, 7, dtype=torch.float64)
    enc = torch.tensor([[3, 4, 5, PAD], [6, 7, PAD, PAD]])
    dec = shift_right(torch.randint(2, 12, (2, 3)))

    memory, mask = m.encode(None, query)
    assert memory.shape == (2, 3, 16) and mask.all()
    memory, mask = m.encode(enc, query)
    assert memory.shape == (2, 7, 16)
    # Query tokens first (always real), then the tokens with their padding.
    assert mask[0].tolist() == [True] * 6 + [False] and mask[1].tolist() == [True] * 5 + [False] * 2

    both, only_query, only_tokens = m(enc, dec, query), m(None, dec, query), m(enc, dec)
    assert both.shape == only_query.shape == only_tokens.shape == (2, 3, 12)
    assert not torch.allclose(both, only_query) and not torch.allclose(both, only_tokens)
    assert not torch.allclose(m(None, dec, query + 1.0), only_query)  # the query matters

    with pytest.raises(ValueError, match="query input"):
        tiny_model().encode(enc, query)
    with pytest.raises(ValueError, match="encoder_tokens, a query"):
        m.encode(None, None)
    with pytest.raises(ValueError, match="query must be"):
        m.encode(enc, torch.randn(2, 5, dtype=torch.float64))


# -- construction ----------------------------------------------------------------------------
def test_default_parameter_count():
    torch.manual_seed(0)
    m = GenerativeRetriever(RetrieverConfig(vocab_size=1100, encoder_vocab_size=3100))
    n = m.num_parameters()
    print(f"default retriever (vocab 1100, encoder vocab 3100): {n:,} parameters")
    assert n == sum(p.numel() for p in m.parameters()) > 0
    # embeddings + output + 4 encoder layers + 4 decoder layers + 2 bias tables + 2 final norms
    d, inner, ff = 128, 384, 1024
    enc_layer = 4 * d * inner + 2 * d * ff + 2 * d
    dec_layer = 8 * d * inner + 2 * d * ff + 3 * d
    assert n == (3100 + 1100 + 1100) * d + 4 * enc_layer + 4 * dec_layer + 2 * 32 * 6 + 2 * d == 5_138_048


def test_construction_is_deterministic_given_the_global_seed():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    c = tiny_model(seed=4)
    assert not torch.equal(a.output.weight, c.output.weight)


def test_dropout_only_in_training():
    m = tiny_model(dropout=0.5)
    enc = torch.randint(2, 20, (2, 4))
    dec = shift_right(torch.randint(2, 12, (2, 3)))
    torch.testing.assert_close(m(enc, dec), m(enc, dec))
    m.train()
    assert not torch.allclose(m(enc, dec), m(enc, dec))


# -- learning --------------------------------------------------------------------------------
def test_overfits_four_pairs_and_beam_recovers_them():
    torch.manual_seed(0)
    model = GenerativeRetriever(tiny_config())
    enc = torch.tensor([[12, 13, 14], [15, 16, PAD], [17, PAD, PAD], [18, 19, 13]])
    # Variable lengths, including a short ID and one extending it.
    targets = torch.tensor([[5, EOS, PAD, PAD], [5, 7, EOS, PAD], [8, 9, 10, EOS], [3, EOS, PAD, PAD]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        logits = model(enc, shift_right(targets))
        loss = F.cross_entropy(logits.reshape(-1, 12), targets.reshape(-1), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05

    model.eval()
    lengths = (targets != PAD).sum(1)
    distractors = np.array([[5, 8, EOS, PAD], [3, 4, EOS, PAD], [9, EOS, PAD, PAD]])
    all_sids = np.concatenate([targets.numpy(), distractors])
    trie = SIDTrie.build(all_sids, (all_sids != PAD).sum(1), 12)
    memory, mask = model.encode(enc)
    greedy = beam_search(model, memory, mask, beam_width=1, max_length=4, trie=None, validity_trie=trie)
    beam = beam_search(model, memory, mask, beam_width=3, max_length=4, trie=trie)
    assert torch.equal(greedy.tokens[:, 0], targets) and torch.equal(beam.tokens[:, 0], targets)
    expected_sid = torch.from_numpy(trie.lookup(targets.numpy(), lengths.numpy()))
    assert torch.equal(beam.sid_index[:, 0], expected_sid) and torch.equal(greedy.sid_index[:, 0], expected_sid)
    assert model.training is False
