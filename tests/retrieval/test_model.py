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
    ItemFeatures,
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
    assert (c.item_content_dim, c.dense_head) == (0, False)
    with_content = RetrieverConfig(vocab_size=1100, item_content_dim=384, dense_head=True)
    assert RetrieverConfig.from_dict(with_content.to_dict()) == with_content
    assert RetrieverConfig.from_dict(c.to_dict()) == c
    assert RetrieverConfig(vocab_size=50).encoder_vocab_size == 50
    with pytest.raises(ValueError, match="unknown retriever config field"):
        RetrieverConfig.from_dict({**c.to_dict(), "n_layers": 2})
    bad = [
        dict(vocab_size=2),
        dict(vocab_size=10, encoder_vocab_size=9),
        dict(vocab_size=10, query_dim=-1),
        dict(vocab_size=10, query_tokens=0),
        dict(vocab_size=10, item_content_dim=-1),
        dict(vocab_size=10, item_content_dim=8.0),
        dict(vocab_size=10, dense_head=1),
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
# Six catalog items: SIDs of one to three code tokens, EOS-terminated, PAD-filled.
ITEM_TOKENS = torch.tensor([
    [3, 4, EOS, PAD], [5, EOS, PAD, PAD], [6, 7, 8, EOS], [9, 10, EOS, PAD], [11, 2, EOS, PAD], [4, EOS, PAD, PAD],
])  # fmt: skip
ITEMS = ItemFeatures(ITEM_TOKENS)
USERS = torch.tensor([12, 15, 19])


def random_history(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(ITEM_TOKENS), (batch, length), generator=g)


def spelled_out(history: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per request, the (token, item) pairs the encoder should read from its history: the real
    items' SID tokens, oldest item first, EOS kept, PAD and padding items dropped."""
    return [
        [(t, i) for i in row if i >= 0 for t in ITEM_TOKENS[i].tolist() if t != PAD] for row in history.tolist()
    ]


def contiguous_mask(lengths: list[int], width: int) -> torch.Tensor:
    """(B, width) True on each row's first ``lengths[b]`` positions: padding only at the right."""
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def encode_with_input(m: GenerativeRetriever, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first encoder layer's input, memory, mask) of ``m.encode(*args, **kwargs)``."""
    seen = []
    handle = m.encoder_layers[0].register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach().clone()))
    try:
        memory, mask = m.encode(*args, **kwargs)
    finally:
        handle.remove()
    return seen[0], memory, mask


def manual_input(m: GenerativeRetriever, history: torch.Tensor, users=None, content=None) -> list[torch.Tensor]:
    """Per request, the encoder input written out by hand: the user token's embedding, then per
    history token its embedding plus, with ``content``, its own item's projected content."""
    emb = m.encoder_embedding.weight
    rows = []
    for b, pairs in enumerate(spelled_out(history)):
        vectors = [] if users is None else [emb[users[b]]]
        for token, item in pairs:
            vectors.append(emb[token] if content is None else emb[token] + m.content_projection.weight @ content[item])
        rows.append(torch.stack(vectors))
    return rows


def test_shapes_and_shift_right():
    m = tiny_model()
    history = random_history(3, 5)
    history[2, :2] = -1  # left padding, as requests carry it
    target = torch.tensor([[4, 5, EOS, PAD], [6, EOS, PAD, PAD], [7, 8, 9, EOS]])
    dec_in = shift_right(target)
    assert dec_in[:, 0].eq(PAD).all() and torch.equal(dec_in[:, 1:], target[:, :-1])
    logits = m(dec_in, history=history, users=USERS, items=ITEMS)
    assert logits.shape == (3, 4, 12)
    memory, mask = m.encode(history, USERS, ITEMS)
    # One position per SID token of the real history items (EOS included), after the user token;
    # the batch is as wide as its longest request, padding only at the right.
    lengths = [1 + len(pairs) for pairs in spelled_out(history)]
    assert len(set(lengths)) > 1  # the rows differ in length, so some are padded
    assert memory.shape == (3, max(lengths), 16) and mask.dtype == torch.bool
    assert torch.equal(mask, contiguous_mask(lengths, max(lengths)))
    torch.testing.assert_close(m.decode(memory, mask, dec_in), logits)


def test_encoder_reads_the_history_token_by_token():
    m = tiny_model()
    # Left padding, items of one to three code tokens, an item twice, a request with no real item.
    history = torch.tensor([[-1, 0, 2, 1], [3, 3, -1, 5], [-1, -1, -1, -1]])
    x, _, mask = encode_with_input(m, history, USERS, ITEMS)
    expected = manual_input(m, history, USERS)
    lengths = [len(rows) for rows in expected]
    assert lengths == [1 + 3 + 4 + 2, 1 + 3 + 3 + 2, 1]
    assert x.shape == (3, max(lengths), 16) and torch.equal(mask, contiguous_mask(lengths, max(lengths)))
    for b, rows in enumerate(expected):
        # [user][item tokens, oldest first, each item's EOS kept, its PAD and the padding items gone]
        assert torch.equal(x[b, : lengths[b]], rows)
    # Without a user token the history starts at position 0.
    x, _, mask = encode_with_input(m, history[:2], items=ITEMS)
    expected = manual_input(m, history[:2])
    assert torch.equal(mask, contiguous_mask([len(rows) for rows in expected], x.shape[1]))
    for b, rows in enumerate(expected):
        assert torch.equal(x[b, : len(rows)], rows)


def test_decoder_is_causal():
    m = tiny_model()
    history = random_history(2, 6)
    dec = torch.randint(2, 12, (2, 5))
    dec[:, 0] = PAD
    changed = dec.clone()
    changed[:, 3:] = torch.randint(2, 12, (2, 2))
    a = m(dec, history=history, users=USERS[:2], items=ITEMS)
    b = m(changed, history=history, users=USERS[:2], items=ITEMS)
    torch.testing.assert_close(a[:, :3], b[:, :3])
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_encoder_is_causal_over_history_items():
    """A position sees the user token, its own item's tokens and earlier items', never a later item's:
    changing the last item leaves every earlier position's encoding as it was."""
    m = tiny_model(item_content_dim=5)
    content = torch.randn(len(ITEM_TOKENS), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    items = ItemFeatures(ITEM_TOKENS, content)
    history = torch.tensor([[0, 2, 1], [3, 5, 4]])
    changed = history.clone()
    changed[:, -1] = torch.tensor([2, 0])
    memory, mask, slots = m.encode_with_slots(history, USERS[:2], items)
    other, other_mask, other_slots = m.encode_with_slots(changed, USERS[:2], items)
    # Slots: -1 for the user token, then each token's history column, H at padding.
    expected = [[-1] + [c for c, i in enumerate(row) for t in ITEM_TOKENS[i].tolist() if t != PAD] for row in history.tolist()]
    for b, row in enumerate(expected):
        assert slots[b, : len(row)].tolist() == row and slots[b, len(row) :].eq(3).all()
        assert torch.equal(mask[b], slots[b] < 3)
    for b in range(2):
        earlier = int((slots[b] < 2).sum())  # the user token and the first two items
        assert torch.equal(slots[b, :earlier], other_slots[b, :earlier])
        torch.testing.assert_close(memory[b, :earlier], other[b, :earlier], rtol=1e-12, atol=1e-12)
        assert not torch.allclose(memory[b, earlier], other[b, earlier])  # the last item's first token


# Float64 models: a request encodes to the same numbers whatever its padding, up to summation order.
TIGHT = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_user", [False, True], ids=["no_user", "user"])
@pytest.mark.parametrize("with_content", [False, True], ids=["tokens", "content"])
def test_padding_items_change_nothing(with_user, with_content):
    m = tiny_model(item_content_dim=5 if with_content else 0)
    content = torch.randn(len(ITEM_TOKENS), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    items = ItemFeatures(ITEM_TOKENS, content if with_content else None)
    users = USERS[:2] if with_user else None
    history = random_history(2, 4, seed=1)
    dec = shift_right(torch.randint(2, 12, (2, 3)))
    pad = torch.full((2, 3), -1)
    ref_memory, ref_mask = m.encode(history, users, items)
    ref = m(dec, history=history, users=users, items=items)
    # Left padding (as requests carry it), right padding, any negative index: the padding items are
    # squeezed out, so the memory is the very same, with or without a user token in front.
    for padded in (torch.cat([pad, history], 1), torch.cat([history, pad], 1), torch.cat([pad - 6, history, pad], 1)):
        memory, mask = m.encode(padded, users, items)
        assert torch.equal(mask, ref_mask)
        torch.testing.assert_close(memory, ref_memory, **TIGHT)
        torch.testing.assert_close(m(dec, history=padded, users=users, items=items), ref, **TIGHT)
    # A request in a ragged batch (a shorter one, padded at the right of the memory) encodes and
    # decodes exactly as it does alone without padding.
    ragged = torch.cat([pad, history], 1)
    ragged[1, :5] = -1
    memory, mask = m.encode(ragged, users, items)
    lengths = [int(with_user) + len(pairs) for pairs in spelled_out(ragged)]
    assert lengths[1] < lengths[0] and torch.equal(mask, contiguous_mask(lengths, lengths[0]))
    alone_users = None if users is None else users[1:]
    alone, alone_mask = m.encode(history[1:, 2:], alone_users, items)
    assert alone.shape[1] == lengths[1] and alone_mask.all()
    torch.testing.assert_close(memory[1:, : lengths[1]], alone, **TIGHT)
    torch.testing.assert_close(
        m(dec, history=ragged, users=users, items=items)[1:],
        m(dec[1:], history=history[1:, 2:], users=alone_users, items=items),
        **TIGHT,
    )
    # Padding is masked out of the memory: what a padding position holds never reaches the decoder.
    noisy = memory.masked_fill(~mask[..., None], 1e3)
    torch.testing.assert_close(m.decode(noisy, mask, dec), m.decode(memory, mask, dec), **TIGHT)


def test_item_vectors_are_mean_code_embeddings_and_padding_is_zero():
    m = tiny_model()
    emb = m.encoder_embedding.weight
    vectors = m.item_vectors(ITEMS)
    assert vectors.shape == (len(ITEM_TOKENS), 16)
    for i, row in enumerate(ITEM_TOKENS.tolist()):
        codes = [t for t in row if t not in (PAD, EOS)]  # EOS and PAD left out of the mean
        torch.testing.assert_close(vectors[i], emb[codes].mean(0))
    rows = torch.tensor([[-1, 2, 0], [5, -1, -1]])
    picked = m.item_vectors(ITEMS, rows)
    assert picked.shape == (2, 3, 16)
    assert torch.equal(picked[rows < 0], torch.zeros(3, 16, dtype=picked.dtype))
    torch.testing.assert_close(picked[rows >= 0], vectors[rows[rows >= 0]])
    # An item with no code token (EOS alone) has a zero SID part, not a division by zero.
    assert torch.equal(m.item_vectors(ItemFeatures(torch.tensor([[EOS, PAD]]))), torch.zeros(1, 16, dtype=picked.dtype))


def test_item_vectors_add_the_projected_content():
    m = tiny_model(item_content_dim=5)
    content = torch.randn(len(ITEM_TOKENS), 5, dtype=torch.float64)
    items = ItemFeatures(ITEM_TOKENS, content)
    emb = m.encoder_embedding.weight
    vectors = m.item_vectors(items)
    for i, row in enumerate(ITEM_TOKENS.tolist()):
        codes = [t for t in row if t not in (PAD, EOS)]
        torch.testing.assert_close(vectors[i], emb[codes].mean(0) + m.content_projection.weight @ content[i])
    rows = torch.tensor([[-1, 3]])
    picked = m.item_vectors(items, rows)
    assert torch.equal(picked[0, 0], torch.zeros(16, dtype=picked.dtype))  # padding stays zero with content
    torch.testing.assert_close(picked[0, 1], vectors[3])
    with pytest.raises(ValueError, match="pass ItemFeatures.content"):
        m.item_vectors(ITEMS)


def test_each_history_token_carries_its_own_items_content():
    m = tiny_model(item_content_dim=5)
    content = torch.randn(len(ITEM_TOKENS), 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    items = ItemFeatures(ITEM_TOKENS, content)
    users = USERS[:2]
    # Items 0 ([3, 4, EOS]) and 5 ([4, EOS]) share code token 4; item 3 is read twice; left padding.
    history = torch.tensor([[-1, 0, 3, 5], [3, 1, 3, -1]])
    x, memory, mask = encode_with_input(m, history, users, items)
    expected = manual_input(m, history, users, content)
    for b, rows in enumerate(expected):
        torch.testing.assert_close(x[b, : len(rows)], rows, **TIGHT)
    # Token 4 at position 2 (item 0) and at position 7 (item 5): its embedding plus each its own item's content.
    assert [t for t, _ in spelled_out(history)[0]] == [3, 4, EOS, 9, 10, EOS, 4, EOS]
    torch.testing.assert_close(x[0, 7] - x[0, 2], m.content_projection.weight @ (content[5] - content[0]), **TIGHT)

    owners = torch.full(mask.shape, -1)
    for b, pairs in enumerate(spelled_out(history)):
        owners[b, 1 : 1 + len(pairs)] = torch.tensor([item for _, item in pairs])
    dec = shift_right(torch.randint(2, 12, (2, 3)))
    logits = m(dec, history=history, users=users, items=items)
    # Changing an item's content changes the input at exactly its own tokens, and the output.
    changed = content.clone()
    changed[3] += 1.0
    x2, memory2, _ = encode_with_input(m, history, users, ItemFeatures(ITEM_TOKENS, changed))
    own = owners == 3
    assert own.any(1).all() and torch.equal(x2[mask & ~own], x[mask & ~own])
    torch.testing.assert_close(x2[own] - x[own], (m.content_projection.weight @ (changed[3] - content[3])).expand(int(own.sum()), -1), **TIGHT)
    assert not torch.allclose(memory2, memory)
    assert not torch.allclose(m(dec, history=history, users=users, items=ItemFeatures(ITEM_TOKENS, changed)), logits)
    # The content of items no request holds is not read at all.
    assert set(range(len(ITEM_TOKENS))) - set(history[history >= 0].tolist()) == {2, 4}
    unread = content.clone()
    unread[[2, 4]] += 100.0
    memory3, mask3 = m.encode(history, users, ItemFeatures(ITEM_TOKENS, unread))
    assert torch.equal(mask3, mask) and torch.equal(memory3[mask], memory[mask])
    torch.testing.assert_close(m(dec, history=history, users=users, items=ItemFeatures(ITEM_TOKENS, unread)), logits, **TIGHT)
    with pytest.raises(ValueError, match="pass ItemFeatures.content"):
        m.encode(history, users, ITEMS)


def test_item_features_validate_their_shapes():
    with pytest.raises(ValueError, match=r"item tokens must be \(N, T\)"):
        ItemFeatures(torch.tensor([3, EOS]))
    with pytest.raises(ValueError, match="item content must be"):
        ItemFeatures(ITEM_TOKENS, torch.zeros(len(ITEM_TOKENS) - 1, 4))
    assert len(ITEMS) == len(ITEM_TOKENS)
    moved = ItemFeatures(ITEM_TOKENS, torch.zeros(len(ITEM_TOKENS), 4, dtype=torch.float64)).to("cpu")
    assert moved.content.dtype == torch.float32 and torch.equal(moved.tokens, ITEM_TOKENS)
    with pytest.raises(ValueError, match="item path tokens must be"):
        ItemFeatures(ITEM_TOKENS, path_tokens=ITEM_TOKENS[:-1])


def test_the_encoder_and_dense_head_read_full_code_paths_not_sids():
    """Items 1 and 5 share no SID here, but give them one short SID (a SARQ bucket) and distinct
    paths: the encoder and the item vectors read the paths, so the two stay apart; SIDs
    (``tokens``) are what training decodes, untouched."""
    sids = ITEM_TOKENS.clone()
    sids[5] = sids[1]  # one bucket: SID [5, EOS]
    paths = torch.cat([ITEM_TOKENS, torch.full((len(ITEM_TOKENS), 1), PAD)], dim=1)
    paths[1] = torch.tensor([5, 7, 10, EOS, PAD])
    paths[5] = torch.tensor([5, 8, 2, EOS, PAD])
    items = ItemFeatures(sids, path_tokens=paths)
    m = tiny_model()
    emb = m.encoder_embedding.weight
    vectors = m.item_vectors(items)
    torch.testing.assert_close(vectors[1], emb[[5, 7, 10]].mean(0))
    torch.testing.assert_close(vectors[5], emb[[5, 8, 2]].mean(0))
    torch.testing.assert_close(vectors, m.item_vectors(ItemFeatures(paths)))
    history = torch.tensor([[0, 1], [0, 5]])
    memory, mask = m.encode(history, items=items)
    expected, _ = m.encode(history, items=ItemFeatures(paths))
    torch.testing.assert_close(memory, expected)
    assert not torch.allclose(memory[0], memory[1])  # bucket mates stay apart in the encoder


def test_dense_head_scores_every_item_from_the_last_real_position():
    m = tiny_model(dense_head=True)
    history = torch.tensor([[-1, 0, 2], [1, 3, 4], [-1, -1, 5]])
    users = USERS
    memory, mask = m.encode(history, users, ITEMS)
    lengths = [1 + len(pairs) for pairs in spelled_out(history)]
    assert lengths == [1 + 3 + 4, 1 + 2 + 3 + 3, 1 + 2]  # ragged: rows 0 and 2 are padded at the right
    vectors = m.item_vectors(ITEMS)
    logits = m.dense_logits(memory, mask, vectors)
    assert logits.shape == (3, len(ITEM_TOKENS))
    # The request vector is the projected last REAL position: the most recent item's EOS.
    assert all(pairs[-1] == (EOS, row[-1]) for pairs, row in zip(spelled_out(history), history.tolist()))
    last = memory[torch.arange(3), torch.tensor(lengths) - 1]
    torch.testing.assert_close(m.dense_request(memory, mask), m.dense_projection(last))
    torch.testing.assert_close(logits, m.dense_projection(last) @ vectors.T)
    assert not torch.allclose(logits[[0, 2]], m.dense_projection(memory[[0, 2], -1]) @ vectors.T)  # a padding position would differ
    # Padding changes nothing: left or right padding items, or a row alone, score the same.
    pad = torch.full((3, 2), -1)
    for padded in (torch.cat([pad, history], 1), torch.cat([history, pad], 1)):
        torch.testing.assert_close(m.dense_logits(*m.encode(padded, users, ITEMS), vectors), logits, **TIGHT)
    for b in range(3):
        alone = m.dense_logits(*m.encode(history[b : b + 1], users[b : b + 1], ITEMS), vectors)
        torch.testing.assert_close(alone, logits[b : b + 1], **TIGHT)
    # Every item has a vector, including ones no history holds (cold items): all scores are finite.
    assert torch.isfinite(logits).all() and (vectors.norm(dim=1) > 0).all()
    with pytest.raises(ValueError, match="no dense head"):
        tiny_model().dense_logits(memory, mask, vectors)


def test_dense_request_takes_each_rows_last_real_position():
    m = tiny_model(dense_head=True, query_dim=7, query_tokens=3)
    memory = torch.randn(3, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mask = contiguous_mask([2, 5, 1], 5)
    expected = m.dense_projection(memory[torch.arange(3), torch.tensor([1, 4, 0])])
    torch.testing.assert_close(m.dense_request(memory, mask), expected)
    # What a padding position holds, or more padding after it, does not matter.
    noisy = torch.cat([memory.masked_fill(~mask[..., None], 1e3), torch.randn(3, 2, 16, dtype=torch.float64)], 1)
    torch.testing.assert_close(m.dense_request(noisy, torch.cat([mask, torch.zeros(3, 2, dtype=torch.bool)], 1)), expected)
    # A query request's last real position is its last query token, also when its history is all padding.
    query = torch.randn(2, 7, dtype=torch.float64)
    memory, mask = m.encode(query=query)
    torch.testing.assert_close(m.dense_request(memory, mask), m.dense_projection(memory[:, 2]))
    memory, mask = m.encode(torch.tensor([[-1, -1], [-1, 1]]), items=ITEMS, query=query)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    torch.testing.assert_close(m.dense_request(memory, mask), m.dense_projection(memory[[0, 1], [2, 4]]))


def test_query_path_with_and_without_history():
    m = tiny_model(query_dim=7, query_tokens=3)
    query = torch.randn(2, 7, dtype=torch.float64)
    history = torch.tensor([[-1, 0, 1, 2], [-1, -1, 3, 4]])
    users = USERS[:2]
    dec = shift_right(torch.randint(2, 12, (2, 3)))

    memory, mask = m.encode(query=query)
    assert memory.shape == (2, 3, 16) and mask.all()
    memory, mask = m.encode(history, users, ITEMS, query)
    # Query tokens first (always real), then the user token, then the items' SID tokens: rows 0
    # (items 0, 1, 2) and 1 (items 3, 4) hold 3 + 2 + 4 and 3 + 3 of them; padding only at the right.
    assert memory.shape == (2, 3 + 1 + 9, 16)
    assert mask[0].tolist() == [True] * 13
    assert mask[1].tolist() == [True] * 10 + [False] * 3
    # With a query in front too, more padding items change nothing.
    more = torch.cat([torch.full((2, 2), -1), history], 1)
    torch.testing.assert_close(m.encode(more, users, ITEMS, query)[0], memory, **TIGHT)

    both = m(dec, history=history, users=users, items=ITEMS, query=query)
    only_query = m(dec, query=query)
    only_history = m(dec, history=history, users=users, items=ITEMS)
    assert both.shape == only_query.shape == only_history.shape == (2, 3, 12)
    assert not torch.allclose(both, only_query) and not torch.allclose(both, only_history)
    assert not torch.allclose(m(dec, query=query + 1.0), only_query)  # the query matters

    with pytest.raises(ValueError, match="query input"):
        tiny_model().encode(history, users, ITEMS, query)
    with pytest.raises(ValueError, match="a history, a user token or a query"):
        m.encode()
    with pytest.raises(ValueError, match="query must be"):
        m.encode(history, users, ITEMS, torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the catalog's ItemFeatures"):
        m.encode(history, users)
    with pytest.raises(ValueError, match="users must be"):
        m.encode(history, users[:, None], ITEMS)
    with pytest.raises(ValueError, match="batch size mismatch"):
        m.encode(history, USERS, ITEMS)


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
    # Item content adds a bias-free projection to d_model, the dense head a bias-free d x d projection.
    torch.manual_seed(0)
    wide = GenerativeRetriever(RetrieverConfig(vocab_size=1100, encoder_vocab_size=3100, item_content_dim=384, dense_head=True))
    assert wide.num_parameters() == n + 384 * d + d * d


def test_construction_is_deterministic_given_the_global_seed():
    a, b = tiny_model(seed=3), tiny_model(seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    c = tiny_model(seed=4)
    assert not torch.equal(a.output.weight, c.output.weight)


def test_dropout_only_in_training():
    m = tiny_model(dropout=0.5)
    inputs = dict(history=random_history(2, 4), users=USERS[:2], items=ITEMS)
    dec = shift_right(torch.randint(2, 12, (2, 3)))
    torch.testing.assert_close(m(dec, **inputs), m(dec, **inputs))
    m.train()
    assert not torch.allclose(m(dec, **inputs), m(dec, **inputs))


# -- learning --------------------------------------------------------------------------------
def test_overfits_four_pairs_and_beam_recovers_them():
    torch.manual_seed(0)
    model = GenerativeRetriever(tiny_config())
    # Four requests: distinct users and histories (left-padded), as the requests carry them.
    inputs = dict(history=torch.tensor([[0, 1, 2], [-1, 3, 4], [-1, -1, 5], [2, 0, 1]]), users=torch.tensor([12, 13, 14, 15]), items=ITEMS)
    # Variable lengths, including a short ID and one extending it.
    targets = torch.tensor([[5, EOS, PAD, PAD], [5, 7, EOS, PAD], [8, 9, 10, EOS], [3, EOS, PAD, PAD]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(200):
        logits = model(shift_right(targets), **inputs)
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
    memory, mask = model.encode(**inputs)
    greedy = beam_search(model, memory, mask, beam_width=1, max_length=4, trie=None, validity_trie=trie)
    beam = beam_search(model, memory, mask, beam_width=3, max_length=4, trie=trie)
    assert torch.equal(greedy.tokens[:, 0], targets) and torch.equal(beam.tokens[:, 0], targets)
    expected_sid = torch.from_numpy(trie.lookup(targets.numpy(), lengths.numpy()))
    assert torch.equal(beam.sid_index[:, 0], expected_sid) and torch.equal(greedy.sid_index[:, 0], expected_sid)
    assert model.training is False
