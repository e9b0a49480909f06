"""Query requests end to end on a SYNTHETIC query set (DESIGN §3.4).

No real query log exists here. The queries come from item text (:func:`synthetic_queries`), and
their embeddings are SYNTHETIC too: the target item's embedding plus seeded noise, renormalised,
so no text model is needed. These tests check the plumbing (training, constrained decoding,
determinism, errors); they make no claim about retrieval quality.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.candidates import CandidateGenerator, GenerationConfig
from sa2crq.retrieval.data import ItemIndex, Requests, query_requests, synthetic_queries
from sa2crq.retrieval.model import GenerativeRetriever, ItemFeatures, RetrieverConfig
from sa2crq.retrieval.scorer import ItemSIDs
from sa2crq.retrieval.training import RetrieverTrainConfig, batch_losses, make_batch, train_retriever

# Tiny models gain nothing from intra-op threads; on busy shared cores their spin-waits cost 100x.
pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS, DIM, VOCAB = 40, 16, 15
WORDS = np.array(["rose", "matte", "gel", "serum", "gloss", "velvet", "ocean", "silk", "amber", "mint", "glow", "pearl"])
LEAVES = np.array(["Nails", "Lipstick", "Shampoo", "Perfume"])


def _catalog() -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """40 items with titles and categories, random unit embeddings, and SIDs (buckets of two)."""
    rng = np.random.default_rng(0)
    ids = np.arange(N_ITEMS)
    titles = [" ".join(rng.choice(WORDS, 4)) for _ in ids]
    titles[0] = "Rose &amp; Mint Gel"  # an HTML entity, as about 10% of Amazon titles carry
    items = pa.table({"item_id": ids * 10, "title": titles, "categories": [f"Beauty > Makeup > {LEAVES[i % 4]}" for i in ids]})
    embeddings = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    tokens = np.stack([2 + ids % 5, 7 + (ids // 5) % 4, np.full(N_ITEMS, EOS)], 1)
    return items, embeddings, tokens


def _synthetic_embeddings(embeddings: np.ndarray, target: np.ndarray, seed: int, noise: float = 0.3) -> np.ndarray:
    """SYNTHETIC query embeddings: the target item's embedding plus seeded noise, renormalised."""
    rng = np.random.default_rng(seed)
    query = embeddings[target] + noise * rng.normal(size=(len(target), embeddings.shape[1])).astype(np.float32)
    return query / np.linalg.norm(query, axis=1, keepdims=True)


def _query_requests(items: pa.Table, embeddings: np.ndarray, seed: int) -> Requests:
    index = ItemIndex(items.column("item_id").to_numpy())
    queries = synthetic_queries(items, seed=seed)
    target = index.lookup(queries.column("item_id").to_numpy())
    return query_requests(queries, _synthetic_embeddings(embeddings, target, seed), index)


def _model(query_dim: int) -> GenerativeRetriever:
    return GenerativeRetriever(
        RetrieverConfig(vocab_size=VOCAB, encoder_vocab_size=VOCAB + 8, query_dim=query_dim, query_tokens=2, d_model=32,
                        num_heads=2, head_dim=16, d_ff=64, encoder_layers=1, decoder_layers=1)
    )


def _train_and_generate(seed: int) -> tuple[dict, np.ndarray, int, float]:
    items, embeddings, tokens = _catalog()
    # Three synthetic query sets for training, a fourth for validation and generation.
    parts = [_query_requests(items, embeddings, s) for s in range(3)]
    train = Requests(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("user_ids", "history", "target", "query")))
    valid = _query_requests(items, embeddings, 3)
    torch.manual_seed(seed)
    model = _model(DIM)
    config = RetrieverTrainConfig(epochs=6, batch_size=32, learning_rate=3e-3, warmup_steps=2, user_buckets=8, patience=6, seed=seed)
    history = train_retriever(model, train, valid, ItemFeatures(torch.as_tensor(tokens)), config, user_offset=VOCAB)
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), VOCAB)
    generator = CandidateGenerator(
        model, tokens, trie, ItemSIDs.build(trie.row_sid), embeddings, GenerationConfig(beam_width=4, k=5, batch_size=16),
        user_offset=VOCAB, user_buckets=8,
    )
    candidates = generator.generate(valid)
    assert candidates.items.shape == (N_ITEMS, 5) and candidates.beams > 0
    return history, candidates.items, candidates.invalid_beams, generator.hallucination_rate(valid)


def test_synthetic_queries_are_one_per_item_nonempty_and_seeded():
    items, _, _ = _catalog()
    first, again, other = synthetic_queries(items, seed=0), synthetic_queries(items, seed=0), synthetic_queries(items, seed=1)
    assert first.column_names == ["query_id", "query", "item_id"]
    assert first.num_rows == items.num_rows and first.column("item_id").equals(items.column("item_id"))
    assert first.equals(again) and not first.equals(other)
    texts = first.column("query").to_pylist()
    assert all(texts) and all(t == t.lower() for t in texts)
    # The category leaf, then up to three title words in title order, HTML-unescaped.
    assert texts[1].startswith("lipstick ") and len(texts[1].split()) == 4
    assert "&amp;" not in texts[0] and texts[0].split()[0] == "nails"


def test_query_requests_refuse_a_history_beside_the_query():
    with pytest.raises(ValueError, match=r"\(R, 0\) history"):
        Requests(np.arange(2), np.zeros((2, 3), dtype=np.int64), np.zeros(2, dtype=np.int64), np.zeros((2, 4), np.float32))


def test_query_path_trains_decodes_valid_sids_and_is_deterministic():
    history, items, invalid, hallucination = _train_and_generate(0)
    train_loss = [point["train_loss"] for point in history["curve"]]
    assert len(train_loss) == 6 and train_loss[-1] < train_loss[0]  # evaluated once per epoch
    assert invalid == 0  # constrained decoding yields valid SIDs only
    assert ((items >= -1) & (items < N_ITEMS)).all() and (items[:, 0] >= 0).all()
    assert 0.0 <= hallucination <= 1.0
    again = _train_and_generate(0)
    assert [p["train_loss"] for p in again[0]["curve"]] == train_loss and np.array_equal(again[1], items)
    assert again[0]["best_step"] == history["best_step"]


def test_history_only_model_refuses_query_requests():
    items, embeddings, tokens = _catalog()
    requests = _query_requests(items, embeddings, 0)
    torch.manual_seed(0)
    model = _model(0)
    batch = make_batch(requests, np.arange(4), torch.as_tensor(tokens), user_offset=VOCAB, buckets=8)
    assert batch.history is None and batch.users is None and batch.query.shape == (4, DIM)
    with pytest.raises(ValueError, match="no query input"):
        batch_losses(model, batch, ItemFeatures(torch.as_tensor(tokens)))
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), VOCAB)
    generator = CandidateGenerator(
        model, tokens, trie, ItemSIDs.build(trie.row_sid), embeddings, GenerationConfig(), user_offset=VOCAB, user_buckets=8
    )
    with pytest.raises(ValueError, match="no query input"):
        generator.generate(requests)
