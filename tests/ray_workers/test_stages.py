"""The per-shard stages: full-depth encoding on an actor pool, item embedding (own vectors kept, text via MiniLM)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_workers.shards import map_shards
from ray_workers.stages import embed_stage, encode_stage
from sa2crq.data.embed import EMBEDDING_DIM, TextEmbedder
from sa2crq.data.segments import SEGMENT_NAMES, assign_segments
from sa2crq.data.text import item_text
from sa2crq.quantize.tokenizer import build_tokenizer, load_tokenizer
from tests.conftest import make_catalog, small_config


def _refuse_to_load(embedder: TextEmbedder):
    raise AssertionError("MiniLM loaded where every text should have been served without it")


def _fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


@pytest.mark.timeout(180)
def test_encode_stage_on_two_actors_matches_the_tokenizer_in_process(tmp_path, ray_local, one_thread):
    catalog = make_catalog(n=600, dim=16, clusters=8, seed=3)
    config = small_config(**{"rqvae.epochs": 5, "acrq.epochs_per_stage": 2})
    segments = assign_segments(catalog.item_ids, catalog.popularity, config.segments)
    fitted = build_tokenizer(config, catalog.embeddings.shape[1])
    fitted.fit(catalog.embeddings, segments)
    fitted.save(str(tmp_path / "tokenizer"))
    items = pa.table({
        "item_id": catalog.item_ids,
        "popularity": catalog.popularity,
        "segment": np.asarray(SEGMENT_NAMES)[segments],
        "embedding": _fixed_size_list(catalog.embeddings),
    })
    for part, rows in enumerate(np.array_split(np.arange(len(catalog.item_ids)), 3)):  # 3 files, 2 row groups each
        (tmp_path / "embeddings").mkdir(exist_ok=True)
        pq.write_table(items.take(rows), tmp_path / "embeddings" / f"part-{part}.parquet", row_group_size=100)

    result = map_shards(str(tmp_path / "embeddings"), str(tmp_path / "codes"), encode_stage,
                        {"tokenizer_url": str(tmp_path / "tokenizer")}, actors=2, cpus_per_actor=0.5, desc="encode")

    assert (result.shards_total, result.shards_done) == (6, 6)
    assert result.rows_in == result.rows_out == len(catalog.item_ids)
    codes = pq.read_table(tmp_path / "codes").sort_by("item_id")
    levels = config.rqvae.levels
    assert codes.schema.field("codes").type == pa.list_(pa.int32(), levels)
    assert codes.column_names == ["item_id", "popularity", "segment", "codes"]
    assert codes.select(["item_id", "popularity", "segment"]).equals(items.select(["item_id", "popularity", "segment"]))
    got = codes["codes"].combine_chunks().flatten().to_numpy().reshape(-1, levels)
    np.testing.assert_array_equal(got, fitted.encode(catalog.embeddings))
    np.testing.assert_array_equal(got, load_tokenizer(str(tmp_path / "tokenizer")).encode(catalog.embeddings))


def test_embed_stage_keeps_own_embeddings_normalised_without_loading_minilm(monkeypatch):
    monkeypatch.setattr(TextEmbedder, "_load_model", _refuse_to_load)
    vectors = np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32) * 3
    items = pa.table({
        "item_id": pa.array([11, 12, 13, 14, 15], pa.int64()),
        "title": ["a", "b", None, "d", "e"],
        "categories": ["x", "y", "z", "w", "v"],
        "popularity": pa.array([4, 0, 1, 9, 2], pa.int64()),
        "embedding": _fixed_size_list(vectors),
    })

    out = embed_stage(cache_dir=None)(items)

    assert out.column_names == ["item_id", "popularity", "embedding"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), 8)
    assert out.select(["item_id", "popularity"]).equals(items.select(["item_id", "popularity"]))
    got = out["embedding"].combine_chunks().flatten().to_numpy().reshape(5, 8)
    np.testing.assert_allclose(got, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), rtol=1e-6)


@pytest.mark.timeout(120)
def test_embed_stage_embeds_text_items_with_minilm(tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    items = pa.table({
        "item_id": pa.array([1, 2, 3, 4], pa.int64()),
        "title": ["Red nail polish", "Crimson nail lacquer", "Stainless steel chef knife", "Moisturising face cream"],
        "categories": ["Beauty > Nails", "Beauty > Nails", "Kitchen > Knives", "Beauty > Skin Care"],
        "segment": ["head", "tail", "cold", "torso"],
    })

    out = embed_stage(cache_dir=str(tmp_path / "cache"), batch_size=4)(items)

    assert out.column_names == ["item_id", "segment", "embedding"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), EMBEDDING_DIM)
    got = out["embedding"].combine_chunks().flatten().to_numpy().reshape(4, EMBEDDING_DIM)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    similarity = got @ got.T
    assert similarity[0, 1] > similarity[0, 2] and similarity[0, 1] > similarity[0, 3]  # the two nail polishes
    monkeypatch.setattr(TextEmbedder, "_load_model", _refuse_to_load)
    cached = TextEmbedder(tmp_path / "cache").embed(item_text(items))  # so served from the cache the stage wrote
    np.testing.assert_allclose(got, cached, atol=1e-6)
