"""TextEmbedder: real MiniLM vectors (loaded once), and a disk cache that really spares the model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sa2crq.data.embed import EMBEDDING_DIM, MODEL_ID, TextEmbedder, embed_items, text_key
from sa2crq.data.text import item_text

TEXTS = ["Red nail polish | Beauty > Makeup > Nails", "Lip balm", "Argan oil for hair", "Lip balm"]


@pytest.fixture(scope="module")
def model() -> TextEmbedder:
    """An uncached embedder whose model is loaded once for the module."""
    return TextEmbedder(cache_dir=None, batch_size=8)


class CountingEncode:
    """Stands in for ``TextEmbedder._encode``: delegates to the real model and records what it was asked."""

    def __init__(self, encode: Callable[[list[str]], np.ndarray]) -> None:
        self.encode = encode
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return self.encode(texts)


def refuse(texts: list[str]) -> np.ndarray:
    raise AssertionError(f"the model was asked to embed {texts}")


def cached(cache_dir: Path, model: TextEmbedder) -> tuple[TextEmbedder, CountingEncode]:
    embedder = TextEmbedder(cache_dir=cache_dir, batch_size=8)
    counter = CountingEncode(model._encode)
    embedder._encode = counter  # type: ignore[method-assign]
    return embedder, counter


def test_vectors_are_unit_norm_384d_and_meaningful(model: TextEmbedder) -> None:
    vectors = model.embed(TEXTS)
    assert vectors.shape == (4, EMBEDDING_DIM) == (4, model.embedding_dim) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(vectors[1], vectors[3])
    lipstick, chapstick, engine = model.embed(["red lipstick", "lip balm", "diesel engine oil filter"])
    assert lipstick @ chapstick > lipstick @ engine
    assert model.embed([]).shape == (0, EMBEDDING_DIM)
    assert model.model_id == MODEL_ID == "all-MiniLM-L6-v2"


def test_cache_hit_is_identical_and_skips_the_model(tmp_path: Path, model: TextEmbedder) -> None:
    embedder, counter = cached(tmp_path, model)
    first = embedder.embed(TEXTS)
    # Each distinct text embedded exactly once, in one call.
    assert len(counter.calls) == 1 and sorted(counter.calls[0]) == sorted(set(TEXTS))
    np.testing.assert_allclose(first, model.embed(TEXTS), atol=1e-6)

    embedder._encode = refuse  # type: ignore[method-assign]
    assert np.array_equal(embedder.embed(TEXTS[::-1]), first[::-1])

    # A fresh embedder (another process, another day) reads the same cache from disk.
    fresh = TextEmbedder(cache_dir=tmp_path)
    fresh._encode = refuse  # type: ignore[method-assign]
    assert np.array_equal(fresh.embed(TEXTS), first)
    assert fresh._model is None  # a fully cached call never loads the model


def test_only_missing_texts_are_embedded(tmp_path: Path, model: TextEmbedder) -> None:
    embedder, counter = cached(tmp_path, model)
    embedder.embed(TEXTS[:2])
    mixed = embedder.embed([TEXTS[0], "Vitamin C serum", TEXTS[1], "Vitamin C serum"])
    assert counter.calls[-1] == ["Vitamin C serum"]
    assert np.array_equal(mixed[1], mixed[3])


def test_cache_files_are_keyed_parquet(tmp_path: Path, model: TextEmbedder) -> None:
    embedder, _ = cached(tmp_path, model)
    embedder.log_every_batches = 1  # one cache file per batch of 8
    texts = [f"item number {i}" for i in range(20)]
    vectors = embedder.embed(texts)

    directory = tmp_path / MODEL_ID
    files = sorted(directory.iterdir())
    assert len(files) == 3 and all(f.name.startswith("part-") and f.suffix == ".parquet" for f in files)
    table = pa.concat_tables(pq.read_table(f) for f in files)
    assert table.schema.field("text_sha256").type == pa.string()
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), EMBEDDING_DIM)
    stored = dict(zip(table["text_sha256"].to_pylist(), table["embedding"].to_pylist(), strict=True))
    assert set(stored) == {text_key(t) for t in texts}
    assert np.array_equal(np.array(stored[text_key(texts[5])], dtype=np.float32), vectors[5])
    assert text_key("a") != text_key("a", model_id="another-model")


def test_uncached_embedder_writes_nothing(
    tmp_path: Path, model: TextEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # so that a stray relative write would land here
    assert model.cache_path is None
    model.embed(["anything"])
    assert list(tmp_path.iterdir()) == []


def test_embed_items_uses_item_text(model: TextEmbedder) -> None:
    items = pa.table({"item_id": [1, 2], "title": ["Rose &amp; Oud", "Nail file"], "categories": ["Fragrance", None]})
    np.testing.assert_allclose(embed_items(items, model), model.embed(item_text(items)), atol=1e-6)
    assert item_text(items)[0] == "Rose & Oud | Fragrance"


def test_duplicate_cache_entries_are_harmless(tmp_path: Path, model: TextEmbedder) -> None:
    # Two processes that embed the same text at once both append it.
    embedder, _ = cached(tmp_path, model)
    first = embedder.embed(TEXTS)
    (part,) = (tmp_path / MODEL_ID).iterdir()
    (tmp_path / MODEL_ID / "part-copy.parquet").write_bytes(part.read_bytes())
    embedder._encode = refuse  # type: ignore[method-assign]
    assert np.array_equal(embedder.embed(TEXTS), first)
