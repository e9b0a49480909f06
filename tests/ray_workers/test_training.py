"""Ray Train drives the library's data-parallel training: 2 CPU workers in a gloo group, checkpoints on storage."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from jobs.object_store import ensure_bucket
from ray_workers.training import (
    REPLICA_FINGERPRINTS,
    RETRIEVER_STATE_CHECKPOINT,
    TrainRun,
    _replica_fingerprints,
    fit_retriever,
    fit_tokenizer,
)
from sa2crq.config import SegmentConfig, SIDConfig
from sa2crq.data.columns import list_column
from sa2crq.data.segments import SEGMENT_NAMES, assign_segments
from sa2crq.ids.sid_table import FIRST_CODE_TOKEN, SIDVocabulary, assign_sids
from sa2crq.ids.trie import PAD, SIDTrie
from sa2crq.retrieval.candidates import CandidateGenerator, GenerationConfig, validation_recall
from sa2crq.retrieval.checkpoint import load_retriever
from sa2crq.retrieval.data import history_training_data, sid_token_matrix
from sa2crq.retrieval.model import ItemFeatures, RetrieverConfig
from sa2crq.retrieval.scorer import ItemSIDs, ScorerWeights
from sa2crq.retrieval.training import RetrieverTrainConfig, validation_loss
from sa2crq.storage import layout
from sa2crq.storage.filesystem import read_parquet, resolve_filesystem, write_parquet
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion
from tests.conftest import small_config

ITEMS = 1500
# Fractional CPUs: on a 2-CPU Ray the catalog's read tasks need a CPU beside the two workers.
WORKER_CPUS = 0.5


@pytest.fixture(scope="module")
def bucket(s3_endpoint) -> str:
    name = f"train-{uuid.uuid4().hex[:8]}"
    ensure_bucket(f"s3://{name}")
    return name


@pytest.mark.timeout(150)
def test_fit_tokenizer_checkpoints_on_s3_and_replicas_agree(s3_endpoint, ray_local, bucket, catalog):
    import fsspec
    from ray.train import Result

    ids, x, pop = catalog.item_ids[:ITEMS], catalog.embeddings[:ITEMS], catalog.popularity[:ITEMS]
    segments = assign_segments(ids, pop, SegmentConfig())
    table = pa.table({
        "item_id": ids,
        "segment": pa.array(np.asarray(SEGMENT_NAMES)[segments]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1]),
    })
    for part, rows in enumerate(np.array_split(np.arange(ITEMS), 2)):  # two files: a block for each worker
        write_parquet(table.take(rows), f"s3://{bucket}/catalog/part-{part}.parquet")
    run = TrainRun(name=f"tokenizer-{uuid.uuid4().hex[:8]}", storage_path=f"s3://{bucket}/runs", cpus_per_worker=WORKER_CPUS)
    # A cap the torso and cold segments exceed: the workers fit on the stratified sample.
    config = small_config(**{"rqvae.epochs": 6, "acrq.epochs_per_stage": 2, "sample_per_segment": 300})
    counts = np.bincount(segments, minlength=len(SEGMENT_NAMES))
    assert counts[0] <= 300 < min(counts[1], counts[3])

    tokenizer = fit_tokenizer(f"s3://{bucket}/catalog", config, run, segment_counts=counts)

    stored = {p.rsplit("/", 1)[-1] for p in fsspec.filesystem("s3").ls(f"{bucket}/runs/{run.name}/tokenizer")}
    assert {"model.safetensors", "checkpoint.json", "fit_report.json"} <= stored
    codes = tokenizer.encode(x)
    assert codes.shape == (ITEMS, config.rqvae.levels)
    assert ((codes >= 0) & (codes < np.asarray(tokenizer.codebook_sizes()))).all()
    acrq = tokenizer.fit_report["acrq"]
    assert acrq["head_items"] == int((segments == 0).sum())  # counted over both shards, the head kept whole
    sample = tokenizer.fit_report["sample"]
    assert sample["per_segment"] == 300
    assert [sample["segments"][name]["items"] for name in SEGMENT_NAMES] == counts.tolist()
    assert sample["segments"]["cold"]["fraction"] == round(300 / counts[3], 6) and sample["segments"]["head"]["fraction"] == 1.0
    assert 0.0 <= acrq["head_code_stability"] <= 1.0 and len(acrq["phase2_loss"]) > 0
    # Ray keeps rank 0's metrics only; they carry both ranks' fingerprints, gathered in the group.
    fs, path = resolve_filesystem(f"s3://{bucket}/runs/{run.name}")
    fingerprints = Result.from_path(path, storage_filesystem=fs).metrics[REPLICA_FINGERPRINTS]
    assert len(fingerprints) == 2 and fingerprints[1] == fingerprints[0]
    assert _replica_fingerprints(tokenizer._tensors()) == [fingerprints[0]]


def _sid_table_and_interactions(tmp_path):
    """A published SID version (SID table and item embeddings) of 64 items with 2-level SIDs; 60 users
    who walk the catalog in steps of one (a learnable pattern). Returns the vocabulary size, the
    paths, and the item embeddings in SID table row order."""
    rng = np.random.default_rng(0)
    n_items, n_users, length = 64, 60, 8
    item_ids = np.arange(n_items, dtype=np.int64) * 5 + 1
    codes = np.stack([np.arange(n_items) // 8, np.arange(n_items) % 8], 1)
    pop = rng.integers(1, 20, n_items)
    table = assign_sids(item_ids, codes, pop, assign_segments(item_ids, pop, SegmentConfig()), (8, 8),
                        SIDConfig(adaptive_length=False))
    start = rng.integers(0, n_items, n_users)
    walk = item_ids[(start[:, None] + np.arange(length)[None, :]) % n_items]
    users = np.repeat(np.arange(n_users, dtype=np.int64), length)
    interactions = pa.table({"user_id": users, "item_id": walk.reshape(-1), "timestamp": np.tile(np.arange(length), n_users)})
    last = np.tile(np.arange(length) == length - 1, n_users)
    embeddings = rng.normal(size=(n_items, 8)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    embedded = pa.table({"item_id": item_ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), 8)})
    sids = Publisher(str(tmp_path / "sids"))
    version = sids.new_version()
    write_parquet(table.to_arrow(), f"{sids.version_url(version)}/{layout.SID_TABLE}/part-0.parquet")
    # Shuffled: the workers must put the embeddings in the SID table's row order themselves.
    write_parquet(embedded.take(rng.permutation(n_items)), f"{sids.version_url(version)}/{layout.EMBEDDINGS}/part-0.parquet")
    sids.publish(version, parent=None, meta={"vocab": table.vocab.to_dict()})
    paths = {"train": str(tmp_path / "train.parquet"), "valid": str(tmp_path / "valid.parquet")}
    write_parquet(interactions.filter(pa.array(~last)), paths["train"])
    write_parquet(interactions.filter(pa.array(last)), paths["valid"])
    return table.vocab.size, {"sid_version": PublishedVersion.open(sids, version), **paths}, embeddings


TRAIN_CONFIG = RetrieverTrainConfig(epochs=4, batch_size=32, learning_rate=3e-3, warmup_steps=2, max_history=4,
                                    user_buckets=8, patience=4, seed=0)


def _retriever_config(vocab: int) -> RetrieverConfig:
    return RetrieverConfig(vocab_size=vocab, encoder_vocab_size=vocab + TRAIN_CONFIG.user_buckets, d_model=32,
                           num_heads=2, head_dim=16, d_ff=64, encoder_layers=1, decoder_layers=1, dropout=0.0)


@pytest.mark.timeout(180)
def test_fit_retriever_learns_and_checkpoints_the_best_model(ray_local, tmp_path):
    vocab, paths, embeddings = _sid_table_and_interactions(tmp_path)
    train_config, model_config = TRAIN_CONFIG, _retriever_config(vocab)
    run = TrainRun(name=f"retriever-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path / "runs"), cpus_per_worker=WORKER_CPUS)

    model, history, scorer = fit_retriever(paths["sid_version"], paths["train"], paths["valid"], model_config, train_config, run)

    curve = history["curve"]
    assert len(curve) == 4 and curve[-1]["valid_loss"] < curve[0]["valid_loss"]  # one evaluation per epoch; it learns
    assert history["selected_by"] == "select" and history["best_metric"] == max(p["metric"] for p in curve)
    assert history["resumed_at"] == []
    # Ray keeps the latest checkpoint only: the model; each evaluation's training state is gone.
    assert not list((tmp_path / "runs" / run.name).glob(f"{RETRIEVER_STATE_CHECKPOINT}-*"))
    checkpoint = load_retriever(tmp_path / "runs" / run.name / "retriever")
    assert checkpoint.sid_version == paths["sid_version"].version
    assert checkpoint.meta["train_config"] == train_config.to_dict() and checkpoint.meta["world_size"] == 2
    # Rank 0 tuned the item scorer on validation; the weights are returned and recorded.
    assert checkpoint.meta["scorer"] == scorer and isinstance(ScorerWeights(**scorer), ScorerWeights)
    # The returned model is the best evaluation's: its loss over the whole validation set is the
    # loss the two ranks pooled over their halves at that evaluation...
    sid_version = paths["sid_version"]
    data = history_training_data(sid_version.read_parquet(layout.SID_TABLE), SIDVocabulary.from_dict(sid_version.meta["vocab"]),
                                 read_parquet(paths["train"]), read_parquet(paths["valid"]), train_config.max_history)  # fmt: skip
    full = validation_loss(model, data.valid, ItemFeatures(torch.as_tensor(data.sid_tokens)), train_config, user_offset=vocab)
    assert full == pytest.approx(history["best_valid_loss"], rel=1e-5)
    # ...and its Recall@10 over the whole validation set (each rank selected on its whole half) is the
    # pooled selection metric, up to one request (float32 beams, batched differently, may flip a tie).
    trie = SIDTrie.build(data.sid_tokens, (data.sid_tokens != PAD).sum(1), vocab)
    generator = CandidateGenerator(model, data.sid_tokens, trie, ItemSIDs.build(trie.row_sid), embeddings, GenerationConfig(),
                                   user_offset=vocab, user_buckets=train_config.user_buckets)
    assert validation_recall(generator, data.valid) == pytest.approx(history["best_metric"], abs=1 / len(data.valid) + 1e-9)


@pytest.mark.timeout(90)
def test_fit_retriever_refuses_a_vocabulary_that_does_not_fit_the_sids(ray_local, tmp_path):
    from ray.train import TrainingFailedError

    vocab, paths, _ = _sid_table_and_interactions(tmp_path)
    # No restarts: the error is in the inputs, every attempt would fail the same way.
    run = TrainRun(name=f"retriever-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path / "runs"), cpus_per_worker=WORKER_CPUS,
                   max_failures=0)  # fmt: skip
    # Checked on the driver, before any worker starts.
    with pytest.raises(ValueError, match="user tokens"):
        fit_retriever(paths["sid_version"], paths["train"], paths["valid"], replace(_retriever_config(vocab), encoder_vocab_size=vocab),
                      TRAIN_CONFIG, run)
    # Checked on the workers, which read the SID table: a vocabulary of level-1 codes only.
    with pytest.raises(TrainingFailedError, match="beyond the retriever's vocab_size"):
        fit_retriever(paths["sid_version"], paths["train"], paths["valid"], _retriever_config(FIRST_CODE_TOKEN + 8), TRAIN_CONFIG,
                      run)


def test_a_train_run_restarts_its_workers_a_finite_number_of_times():
    assert TrainRun(name="run", storage_path="runs").max_failures == 2
    with pytest.raises(ValueError, match="max_failures >= 0"):
        TrainRun(name="run", storage_path="runs", max_failures=-1)  # Ray's "forever"


@pytest.mark.fault_scenario(6)
@pytest.mark.slow_fault  # 75 s: `make faults` runs it (CI too)
@pytest.mark.timeout(240)
def test_fit_retriever_resumes_from_the_last_evaluation_when_a_worker_dies(ray_local, tmp_path):
    from ray._private.state import actors  # the GCS's actor table: works without the dashboard

    vocab, paths, _ = _sid_table_and_interactions(tmp_path)
    epochs = 12  # an evaluation (and a training state) an epoch: the run outlasts the kill after the third
    train_config = replace(TRAIN_CONFIG, epochs=epochs, patience=epochs)
    run = TrainRun(name=f"retriever-{uuid.uuid4().hex[:8]}", storage_path=str(tmp_path / "runs"), cpus_per_worker=WORKER_CPUS,
                   max_failures=1)  # fmt: skip
    run_dir = tmp_path / "runs" / run.name
    first_state: list[int] = []  # the step of the first training state seen on storage
    killed: list[int] = []  # the pid of the worker killed

    def kill_a_worker_once_a_state_is_registered() -> None:
        seen: set[str] = set()
        deadline = time.monotonic() + 180
        # Ray takes a report from a worker only after it took the one before: once the third state
        # is uploaded, the first is registered, and a restart resumes from it or a later one.
        while len(seen) < 3 and time.monotonic() < deadline:
            seen |= {path.name for path in run_dir.glob(f"{RETRIEVER_STATE_CHECKPOINT}-*")}
            time.sleep(0.05)
        if len(seen) < 3:
            return
        first_state.append(min(int(name.rsplit("-", 1)[1]) for name in seen))
        workers = [a["Pid"] for a in actors(actor_state_name="ALIVE").values() if a["ActorClassName"].endswith("RayTrainWorker")]
        os.kill(workers[0], signal.SIGKILL)
        killed.append(workers[0])

    killer = threading.Thread(target=kill_a_worker_once_a_state_is_registered, daemon=True)
    killer.start()
    _, history, _ = fit_retriever(paths["sid_version"], paths["train"], paths["valid"], _retriever_config(vocab), train_config, run)
    killer.join()

    assert first_state and killed, "no worker was killed while the run trained"
    # The restarted workers took up the state of an evaluation at or after the first seen...
    assert len(history["resumed_at"]) == 1 and history["resumed_at"][0] >= first_state[0]
    # ...and its curve holds every evaluation once: those before the resume restored, not redone.
    steps = [point["step"] for point in history["curve"]]
    assert len(steps) == epochs and steps == sorted(set(steps)) and steps[-1] == history["steps"]
    checkpoint = load_retriever(run_dir / "retriever")
    assert checkpoint.meta["history"]["resumed_at"] == history["resumed_at"] and checkpoint.meta["world_size"] == 2


@pytest.mark.timeout(20)
def test_sid_token_matrix_reproduces_the_sid_tables_tokens():
    rng = np.random.default_rng(1)
    item_ids = np.arange(300, dtype=np.int64)
    pop = rng.integers(0, 50, 300)
    table = assign_sids(item_ids, rng.integers(0, 8, (300, 3)), pop, assign_segments(item_ids, pop, SegmentConfig()),
                        (8, 8, 8), SIDConfig(tau=5.0))  # adaptive lengths and digits: IDs of every length
    tokens = sid_token_matrix(table.to_arrow().column("sid"))
    width = int(table.sid_len.max()) + 1
    assert len(np.unique(table.sid_len)) > 1
    np.testing.assert_array_equal(tokens, table.tokens[:, :width])
    # A column in several chunks (how a SID column past 2^31 tokens is built) reads the same.
    lengths = table.sid_len + 1
    chunked = list_column(lengths, np.concatenate([row[:n] for row, n in zip(table.tokens, lengths)]).astype(np.int32), max_values=100)
    assert chunked.num_chunks > 1
    np.testing.assert_array_equal(sid_token_matrix(chunked), tokens)
