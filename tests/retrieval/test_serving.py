"""Serving a published retriever over a published SID version: version check, request building, candidate rows."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest
import torch

from sa2crq.config import SegmentConfig, SIDConfig
from sa2crq.data.segments import assign_segments
from sa2crq.ids.sid_table import assign_sids
from sa2crq.ids.trie import SIDTrie
from sa2crq.retrieval.candidates import GenerationConfig
from sa2crq.retrieval.checkpoint import load_published_retriever, load_retriever, save_retriever
from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.retrieval.scorer import ScorerWeights
from sa2crq.retrieval.catalog_vectors import CatalogVectors
from sa2crq.retrieval.serving import VersionMismatchError, load_catalog_shard, load_server
from sa2crq.storage import layout
from sa2crq.storage.checkpoint import META_FILE
from sa2crq.storage.filesystem import write_parquet
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion

N, LEVELS, K = 60, 3, 4

# Tiny models gain nothing from intra-op threads; on busy shared cores their spin-waits cost 100x.
pytestmark = pytest.mark.usefixtures("one_thread")


def _publish_retriever(root, model, sid_version: str, meta: dict) -> PublishedVersion:
    retrievers = Publisher(f"{root}/retrievers")
    version = retrievers.new_version()
    save_retriever(f"{retrievers.version_url(version)}/{layout.RETRIEVER}", model, sid_version=sid_version, meta=meta)
    retrievers.publish(version, parent=retrievers.latest())
    return PublishedVersion.open(retrievers, version)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A published SID version as recode writes it (rows shuffled: serving must sort by item id) and a
    published retriever trained on it."""
    root = tmp_path_factory.mktemp("serving")
    sids = Publisher(f"{root}/sids")
    name = sids.new_version()
    rng = np.random.default_rng(0)
    item_ids = rng.permutation(np.arange(100, 100 + N)).astype(np.int64)
    popularity = rng.integers(0, 20, N)
    segments = assign_segments(item_ids, popularity, SegmentConfig())
    table = assign_sids(item_ids, rng.integers(0, K, (N, LEVELS)), popularity, segments, (K,) * LEVELS, SIDConfig(max_bucket=4))
    sid_version = sids.version_url(name)
    write_parquet(table.to_arrow(), f"{sid_version}/{layout.SID_TABLE}/part-0.parquet")
    vectors = rng.normal(size=(N, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = pa.table({"item_id": item_ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)})
    write_parquet(embeddings.take(rng.permutation(N)), f"{sid_version}/{layout.EMBEDDINGS}/part-0.parquet")
    order = np.argsort(item_ids)
    SIDTrie.build(table.tokens[order], table.sid_len[order] + 1, table.vocab.size).save(f"{sid_version}/{layout.TRIE}")
    torch_model = GenerativeRetriever(RetrieverConfig(
        vocab_size=table.vocab.size, encoder_vocab_size=table.vocab.size + 10, d_model=16, num_heads=2, head_dim=8,
        d_ff=32, encoder_layers=1, decoder_layers=1,
    ))  # fmt: skip
    sids.publish(name, parent=None, meta={"vocab": table.vocab.to_dict()})
    retriever = _publish_retriever(root, torch_model, name, {"train_config": {"user_buckets": 10, "max_history": 3}})
    return PublishedVersion.open(sids, name), retriever, table


@pytest.fixture()
def version(published):
    return published[:2]


def test_serving_reads_every_items_full_code_path(published):
    """The catalog a server reads holds each item's SID (what it generates) and its full code path
    (what its encoder and dense head read), both in item-id order, from the published SID table."""
    sids, retriever, table = published
    server = load_server(sids, retriever, GenerationConfig(), device="cpu")
    order = np.argsort(table.item_ids)
    np.testing.assert_array_equal(server.catalog.items.sid_tokens, table.tokens[order][:, : server.catalog.items.sid_tokens.shape[1]])
    np.testing.assert_array_equal(server.catalog.items.path_tokens, table.path_tokens[order])
    assert (table.code_depth < LEVELS).any()  # some SIDs are short, so path and SID differ
    np.testing.assert_array_equal(server.generator.items.read_tokens.numpy(), table.path_tokens[order])


def test_a_retriever_is_refused_on_another_sid_version(version, tmp_path):
    sids, retriever = version
    other = _publish_retriever(tmp_path, load_published_retriever(retriever).model, "v0", {"train_config": {"user_buckets": 10, "max_history": 3}})
    with pytest.raises(VersionMismatchError, match=f"retriever version {other.version} was trained on SID version v0, not {sids.version}"):
        load_server(sids, other, GenerationConfig(), device="cpu")


@pytest.mark.parametrize("key", ["encoder_attention", "item_tokens"])
def test_a_retriever_of_an_earlier_input_format_is_refused(version, tmp_path, key):
    """Checkpoints from before the item-causal encoder, or reading SIDs instead of full code paths,
    would load and rank differently: refused."""
    _, retriever = version
    old = tmp_path / "old"
    shutil.copytree(retriever.file_url(layout.RETRIEVER), old)
    meta = json.loads((old / META_FILE).read_text())
    del meta[key]
    (old / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"trained with {key} unrecorded .an earlier release.; this release reads {key} .*: retrain"):
        load_retriever(str(old))
    assert load_published_retriever(retriever).sid_version == version[0].version


def test_history_requests_keep_the_last_known_items_oldest_first_and_count_unknown_ones(version):
    sid_version, retriever = version
    server = load_server(sid_version, retriever, GenerationConfig(beam_width=4, k=5), device="cpu")
    requests = pa.table({
        "request_id": pa.array([7, 8, 9], pa.int64()),
        "history": pa.array([[100, 101, 999, 102, 103], [104], []], pa.list_(pa.int64())),
    })  # fmt: skip
    built, unknown = server.history_requests(requests)
    rows = server.catalog.index.lookup(np.array([101, 102, 103, 104]))
    np.testing.assert_array_equal(built.history[0], rows[:3])  # the last 3 known items, oldest first
    np.testing.assert_array_equal(built.history[1], [-1, -1, rows[3]])
    np.testing.assert_array_equal(built.history[2], [-1, -1, -1])
    np.testing.assert_array_equal(unknown, [1, 0, 0])

    out = server.candidates(requests.column("request_id").to_numpy(), built)
    assert out.column("request_id").to_pylist() == [7, 8, 9]
    for ids, scores, history in zip(out.column("item_ids").to_pylist(), out.column("scores").to_pylist(), [[100, 101, 102, 103], [104], []]):
        assert 1 <= len(ids) <= 5 and len(ids) == len(set(ids)) == len(scores)
        assert set(ids) <= set(range(100, 100 + N)) and not set(ids) & set(history[-3:])
        assert scores == sorted(scores, reverse=True)


def test_history_requests_exclude_the_whole_history_not_only_the_window(version):
    sid_version, retriever = version
    probe = load_server(sid_version, retriever, GenerationConfig(), device="cpu")
    # A beam over every SID and k = the catalog: the candidates are every item the request does not exclude.
    server = load_server(sid_version, retriever, GenerationConfig(beam_width=probe.catalog.trie.n_sids, k=N), device="cpu")
    # Item 100 (dense index 0) stays out of it, so this does not hinge on the scorer's item-0 bug
    # (test_scorer.py::test_item_zero_in_a_padded_history_is_excluded).
    requests = pa.table({"request_id": pa.array([7], pa.int64()), "history": pa.array([[101, 102, 999, 103, 104]], pa.list_(pa.int64()))})
    built, _ = server.history_requests(requests)
    ids = set(server.candidates(np.array([7]), built).column("item_ids")[0].as_py())
    assert not ids & {102, 103, 104}  # the window (max_history 3) is excluded
    assert ids == set(range(100, 100 + N)) - {101, 102, 103, 104}  # item 101 is outside the window


def test_the_scorer_weights_tuned_in_training_are_served_unless_switched_off(version, tmp_path):
    sid_version, retriever = version
    # The fixture's checkpoint records no tuned weights: the generation config's own are used.
    assert load_server(sid_version, retriever, GenerationConfig(), device="cpu").generator.config.weights == GenerationConfig().weights
    tuned = ScorerWeights(temperature=0.2, dense_weight=0.5, content_weight=2.0, dense_candidates=20)
    checkpoint = load_published_retriever(retriever)
    with_scorer = _publish_retriever(tmp_path, checkpoint.model, sid_version.version, {**checkpoint.meta, "scorer": dataclasses.asdict(tuned)})
    served = load_server(sid_version, with_scorer, GenerationConfig(beam_width=4, k=5), device="cpu").generator.config
    assert served.weights == tuned and (served.beam_width, served.k) == (4, 5)
    untuned = load_server(sid_version, with_scorer, GenerationConfig(tuned_scorer=False), device="cpu").generator.config
    assert untuned.weights == GenerationConfig().weights


def test_requests_with_a_null_id_or_history_are_refused_naming_the_rows(version):
    sid_version, retriever = version
    server = load_server(sid_version, retriever, GenerationConfig(), device="cpu")
    bad = pa.table({"request_id": pa.array([1, None, 3], pa.int64()), "history": pa.array([[100], [101], None], pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match=r"1 rows have a null 'request_id' \(rule: not null\), e.g. rows \[1\]"):
        server.history_requests(bad)
    with pytest.raises(ValueError, match="missing required column 'history'"):
        server.history_requests(pa.table({"request_id": [1]}))
    with pytest.raises(ValueError, match=r"column 'history' has type string but this SID version's item_id has type int64: both must be integer"):
        server.history_requests(pa.table({"request_id": [1], "history": pa.array([["100"]], pa.list_(pa.string()))}))
    with pytest.raises(ValueError, match="trained on histories only"):
        server.query_requests(pa.table({"request_id": [1], "query": ["red lipstick"]}), lambda texts: np.zeros((len(texts), 4)))


def test_a_server_over_catalog_shards_gives_the_candidates_of_one_holding_every_vector(version, tmp_path):
    """The generate job's layout at scale: the server holds the trie and item tokens, each shard a row
    range of the vectors (read one embeddings file at a time); the candidates of a retriever that
    reads item content and has a dense head are the same."""
    sids, trained = version
    model_config = dataclasses.replace(load_published_retriever(trained).model.config, dense_head=True, item_content_dim=8)
    torch.manual_seed(0)
    retriever = _publish_retriever(tmp_path, GenerativeRetriever(model_config), sids.version,
                                   {"train_config": {"user_buckets": 10, "max_history": 3}})  # fmt: skip
    config = GenerationConfig(beam_width=4, k=8, max_batch_scores=64)
    held = load_server(sids, retriever, config, device="cpu")
    bounds = [0, 25, 60]
    shards = [load_catalog_shard(sids, retriever, a, b, config.max_batch_scores, device="cpu") for a, b in itertools.pairwise(bounds)]
    np.testing.assert_array_equal(torch.cat([s.embeddings for s in shards]).numpy(), held.generator.items.content.numpy())
    sharded = load_server(sids, retriever, config, device="cpu", vectors=CatalogVectors(shards, bounds, 8, "cpu"))
    assert sharded.generator.items.content is None  # the server itself holds no embedding
    requests = pa.table({"request_id": pa.array([1, 2, 3], pa.int64()),
                         "history": pa.array([[100, 101, 102], [140], [150, 120]], pa.list_(pa.int64()))})  # fmt: skip
    a, b = (s.candidates(requests.column("request_id").to_numpy(), s.history_requests(requests)[0]) for s in (held, sharded))
    assert a.column("item_ids").to_pylist() == b.column("item_ids").to_pylist()
    np.testing.assert_allclose(np.concatenate(a.column("scores").to_pylist()), np.concatenate(b.column("scores").to_pylist()), rtol=1e-5)
