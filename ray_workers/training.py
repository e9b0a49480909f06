"""Ray Train drivers for the library's data-parallel training: the tokenizer and the generative retriever.

Ray Train v2 (the default in Ray 2.60) runs ``run.workers`` TorchTrainer workers in one gloo process
group; the library's collectives (:mod:`sa2crq.distributed`) keep their replicas identical. A run
reports its model once, at the end (a report is a barrier across workers, and slow): rank 0 with the
checkpoint, the others with metrics only. Ray keeps rank 0's metrics alone, so the ranks gather
their replica fingerprints in the group first and the driver checks that they agree. The checkpoint lands at
``{run.storage_path}/{run.name}/{TOKENIZER_CHECKPOINT or RETRIEVER_CHECKPOINT}`` and the driver
loads the model back from there.

A failed worker (killed, out of memory, lost node) restarts the whole group, up to
``run.max_failures`` times. The retriever's run reports its training state at every evaluation
(``{RETRIEVER_STATE_CHECKPOINT}-{step}``, only the latest kept) and restarted workers resume from it;
the tokenizer's run starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch
from ray.train.torch import TorchConfig, TorchTrainer, get_device

from sa2crq import distributed
from sa2crq.config import TokenizerConfig
from sa2crq.data.columns import list_matrix
from sa2crq.data.segments import segment_codes
from sa2crq.quantize.sample import in_sample, sample_fractions, sample_report
from sa2crq.quantize.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from sa2crq.retrieval.checkpoint import load_retriever, load_training_state, save_retriever, save_training_state
from sa2crq.data.embed import TextEmbedder
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.ids.trie import PAD, SIDTrie
from sa2crq.retrieval.candidates import CandidateGenerator, GenerationConfig, validation_recall, validation_samples
from sa2crq.retrieval.data import ItemIndex, embeddings_in_index_order, history_training_data, query_training_data
from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.retrieval.scorer import ItemSIDs
from sa2crq.storage import layout
from sa2crq.retrieval.training import RetrieverTrainConfig, TrainingState, train_retriever
from sa2crq.storage.filesystem import read_parquet, resolve_filesystem
from sa2crq.storage.published import PublishedVersion

log = logging.getLogger(__name__)

CATALOG = "catalog"
TOKENIZER_CHECKPOINT = "tokenizer"
RETRIEVER_CHECKPOINT = "retriever"
RETRIEVER_STATE_CHECKPOINT = "retriever-state"
FIT_REPORT_FILE = "fit_report.json"
REPLICA_FINGERPRINTS = "replica_fingerprints"


@dataclass(frozen=True)
class TrainRun:
    """Where and how a Ray Train run executes."""

    # Unique per job run: Ray Train v2 restores the state of a run directory that already exists.
    name: str
    # Local directory or URL (s3://... on a cluster): Ray Train's run state and checkpoints live under it.
    storage_path: str
    workers: int = 2
    use_gpu: bool = False
    # Fractional on small machines: the catalog's read tasks need CPUs beside the workers.
    cpus_per_worker: float = 1.0
    # Restarts of the worker group after a worker fails. Finite: an error in the code or the data
    # fails every attempt.
    max_failures: int = 2

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus_per_worker < 0 or self.max_failures < 0:
            raise ValueError(
                f"TrainRun needs workers >= 1, cpus_per_worker >= 0 and max_failures >= 0, got {self.workers}, "
                f"{self.cpus_per_worker}, {self.max_failures}"
            )


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------


def fit_tokenizer(catalog_url: str, config: TokenizerConfig, run: TrainRun, *, segment_counts: np.ndarray) -> Tokenizer:
    """Fit the tokenizer on the catalog (``item_id``, ``segment``, ``embedding``), data-parallel.

    Every worker trains on its shard of the catalog's stratified sample: about
    ``config.sample_per_segment`` items per segment (:mod:`sa2crq.quantize.sample`), drawn with the
    catalog's ``segment_counts`` (indexed by segment code). The checkpoint holds the tokenizer and
    its fit report (``fit_report.json`` beside the safetensors), which the returned tokenizer
    carries with the sample added. RQ-KMeans (one faiss k-means per level) is not data-parallel: it runs on one worker.
    """
    if config.quantizer == "rqkmeans" and run.workers != 1:
        log.info("%s: RQ-KMeans is not data-parallel, fitting on one worker instead of %d", run.name, run.workers)
        run = replace(run, workers=1)
    fs, path = resolve_filesystem(catalog_url)
    catalog = ray.data.read_parquet(path, filesystem=fs, columns=["item_id", "segment", "embedding"])
    embedding_type = catalog.schema().base_schema.field("embedding").type
    if not pa.types.is_fixed_size_list(embedding_type):
        raise ValueError(f"{catalog_url}: embedding must be a fixed-size list of floats, got {embedding_type}")
    # The stratified sample, drawn by each read task from the catalog's items per segment.
    fractions = sample_fractions(segment_counts, config.sample_per_segment)
    sample = catalog.map_batches(_keep_sample, fn_kwargs={"fractions": fractions, "seed": config.rqvae.seed}, batch_format="pyarrow")
    args = {"config": config, "dim": embedding_type.list_size}
    result = _trainer(_fit_tokenizer_per_worker, args, run, {CATALOG: sample.select_columns(["segment", "embedding"])}).fit()
    _check_replicas(result.metrics[REPLICA_FINGERPRINTS], run.name)
    with result.checkpoint.as_directory() as directory:
        tokenizer = load_tokenizer(directory)
        with open(os.path.join(directory, FIT_REPORT_FILE)) as f:
            tokenizer.fit_report = json.load(f)
    tokenizer.fit_report["sample"] = sample_report(segment_counts, fractions, config.sample_per_segment)
    return tokenizer


def _keep_sample(batch: pa.Table, fractions: np.ndarray, seed: int) -> pa.Table:
    ids = batch.column("item_id").to_numpy(zero_copy_only=False)
    return batch.filter(pa.array(in_sample(ids, segment_codes(batch.column("segment")), fractions, seed)))


def _fit_tokenizer_per_worker(args: dict[str, Any]) -> None:
    embeddings, segments = _collect_catalog_shard(ray.train.get_dataset_shard(CATALOG), args["dim"])
    tokenizer = build_tokenizer(args["config"], args["dim"])
    report = tokenizer.fit(embeddings, segments)
    metrics = {**_scalars(report), REPLICA_FINGERPRINTS: _replica_fingerprints(tokenizer._tensors())}
    _report(metrics, TOKENIZER_CHECKPOINT, lambda directory: _save_tokenizer(tokenizer, directory))


def _collect_catalog_shard(shard: ray.data.DataIterator, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """This worker's (N, dim) float32 embeddings and int8 segment codes."""
    batches = list(shard.iter_batches(batch_format="pyarrow", batch_size=None))
    if not batches:
        return np.zeros((0, dim), dtype=np.float32), np.zeros(0, dtype=np.int8)
    table = pa.concat_tables(batches)
    embeddings = list_matrix(table.column("embedding")).astype(np.float32, copy=False)
    return embeddings, segment_codes(table.column("segment"))


def _save_tokenizer(tokenizer: Tokenizer, directory: str) -> None:
    tokenizer.save(directory)
    with open(os.path.join(directory, FIT_REPORT_FILE), "w") as f:
        json.dump(tokenizer.fit_report, f)


# --------------------------------------------------------------------------------------------------------
# Retriever
# --------------------------------------------------------------------------------------------------------


def fit_retriever(
    sids: PublishedVersion,
    train_interactions_url: str,
    valid_interactions_url: str,
    model_config: RetrieverConfig,
    train_config: RetrieverTrainConfig,
    run: TrainRun,
    *,
    query_cache_dir: str | None = None,
) -> tuple[GenerativeRetriever, dict, dict]:
    """Train the retriever, data-parallel; returns the best model, the training history and the
    item scorer's weights tuned on validation.

    A model with ``query_dim`` 0 trains on user histories (the inputs are interactions); one with a
    query input trains on query logs (``query_id``, ``query``, ``item_id``), each worker embedding
    the query text with MiniLM (cached under ``query_cache_dir``). Every worker reads the published
    SID version's SID table and item embeddings whole (its listed files, checked against the manifest) (they map items to tokens and content) and both
    inputs, builds the requests as the benchmark does, and trains on every ``world``-th training
    request. Checkpoints are selected by validation Recall@10 of constrained beam search and the
    item scorer, pooled over the ranks' validation shards; rank 0 then tunes the scorer's weights
    on its validation shard. The checkpoint records the SID version, the train config, the history
    and the tuned weights. Workers restarted after a failure resume from the last evaluation's
    training state; the history's ``resumed_at`` lists the steps they resumed at.
    """
    user_tokens_end = model_config.vocab_size + train_config.user_buckets
    if model_config.encoder_vocab_size < user_tokens_end:
        raise ValueError(
            f"retriever encoder_vocab_size {model_config.encoder_vocab_size} leaves no room for "
            f"{train_config.user_buckets} user tokens after the {model_config.vocab_size} SID tokens: "
            f"set it to vocab_size + user_buckets = {user_tokens_end}"
        )
    args = {"sids": sids, "urls": {"train": train_interactions_url, "valid": valid_interactions_url},
            "model_config": model_config, "train_config": train_config, "query_cache_dir": query_cache_dir}  # fmt: skip
    result = _trainer(_fit_retriever_per_worker, args, run, {}).fit()
    _check_replicas(result.metrics[REPLICA_FINGERPRINTS], run.name)
    with result.checkpoint.as_directory() as directory:
        checkpoint = load_retriever(directory)
    return checkpoint.model, checkpoint.meta["history"], checkpoint.meta["scorer"]


def _fit_retriever_per_worker(args: dict[str, Any]) -> None:
    model_config: RetrieverConfig = args["model_config"]
    train_config: RetrieverTrainConfig = args["train_config"]
    sids: PublishedVersion = args["sids"]
    tables = {name: read_parquet(url) for name, url in args["urls"].items()}
    tables |= {"sid_table": sids.read_parquet(layout.SID_TABLE), "embeddings": sids.read_parquet(layout.EMBEDDINGS)}
    vocab = SIDVocabulary.from_dict(sids.meta["vocab"])
    if model_config.query_dim:
        embed = TextEmbedder(args["query_cache_dir"]).embed
        data = query_training_data(tables["sid_table"], vocab, tables["train"], tables["valid"], embed)
    else:
        data = history_training_data(tables["sid_table"], vocab, tables["train"], tables["valid"], train_config.max_history)
    sid_vocab = int(data.sid_tokens.max()) + 1
    if sid_vocab > model_config.vocab_size:
        raise ValueError(
            f"the SID table uses tokens up to {sid_vocab - 1}, beyond the retriever's vocab_size "
            f"{model_config.vocab_size}: size the retriever to this SID version's vocabulary"
        )
    rank, world = distributed.rank(), distributed.world_size()
    device = get_device()
    torch.manual_seed(train_config.seed)  # identical initial replicas on every rank
    model = GenerativeRetriever(model_config).to(device)
    # The trie and the scorer's item map in the SID table's row order, the dense index the requests use.
    trie = SIDTrie.build(data.sid_tokens, (data.sid_tokens != PAD).sum(1), model_config.vocab_size)
    embeddings = embeddings_in_index_order(tables["embeddings"], ItemIndex(tables["sid_table"].column("item_id").to_numpy(zero_copy_only=False)))
    generator = CandidateGenerator(
        model, data.sid_tokens, trie, ItemSIDs.build(trie.row_sid), embeddings, GenerationConfig(),
        user_offset=model_config.vocab_size, user_buckets=train_config.user_buckets, device=device, path_tokens=data.path_tokens,
    )  # fmt: skip
    valid = data.valid.subset(np.arange(rank, len(data.valid), world))
    select_requests, tune_requests = validation_samples(valid, replace(train_config, select_users=-(-train_config.select_users // world)), seed=train_config.seed)
    history = train_retriever(
        model,
        data.train.subset(np.arange(rank, len(data.train), world)),
        valid,
        generator.items,
        train_config,
        user_offset=model_config.vocab_size,
        select=lambda _: validation_recall(generator, select_requests),
        on_evaluation=_report_training_state,
        resume=_training_state_to_resume(),
    )
    scorer, _ = generator.tune(tune_requests) if rank == 0 else (None, None)
    scalars = {key: history[key] for key in ("best_step", "best_metric", "steps", "seconds")}
    metrics = {**scalars, REPLICA_FINGERPRINTS: _replica_fingerprints(model.state_dict())}
    meta = {"train_config": train_config.to_dict(), "history": history | {"off_catalog": data.off_catalog}, "world_size": world,
            "scorer": None if scorer is None else asdict(scorer)}  # fmt: skip
    _report(
        metrics, RETRIEVER_CHECKPOINT,
        lambda directory: save_retriever(directory, model.cpu(), sid_version=sids.version, meta=meta),
    )


def _report_training_state(state: TrainingState) -> None:
    metrics = {"step": state.steps, "selection_metric": state.curve[-1]["metric"]}
    # Named by step: Ray wants a checkpoint directory name unique within the run.
    _report(metrics, f"{RETRIEVER_STATE_CHECKPOINT}-{state.steps:08d}", lambda directory: save_training_state(directory, state))


def _training_state_to_resume() -> TrainingState | None:
    """The latest reported training state when Ray restarted the workers after a failure, else None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_training_state(directory)
    log.info("resuming the retriever's training at step %d", state.steps)
    return state


# --------------------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------------------


def _trainer(train_fn, args: dict[str, Any], run: TrainRun, datasets: dict[str, ray.data.Dataset]) -> TorchTrainer:
    fs, path = resolve_filesystem(run.storage_path)
    return TorchTrainer(
        train_fn,
        train_loop_config=args,
        # gloo even on GPUs: the library's bookkeeping collectives (step counts, pooled losses) use CPU tensors.
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.workers, use_gpu=run.use_gpu, resources_per_worker={"CPU": run.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=run.name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            # The latest checkpoint is what a restart resumes from and, at the end, the model.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
        ),  # fmt: skip
        datasets=datasets,
    )


def _report(metrics: dict[str, Any], checkpoint_name: str, save) -> None:
    """A report, on every rank: rank 0 saves (``save(directory)``) and hands Ray the checkpoint."""
    if distributed.rank() != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as directory:
        save(directory)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=checkpoint_name)


def _replica_fingerprints(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Every rank's sha256 of its replica's tensors, gathered on all ranks (Ray keeps rank 0's metrics only)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    mine = torch.tensor(list(digest.digest()), dtype=torch.uint8).reshape(1, -1)
    return [bytes(row).hex() for row in distributed.gather_rows(mine, 1).tolist()]


def _check_replicas(fingerprints: list[str], name: str) -> None:
    """Data-parallel training must end with bit-identical replicas: every rank applies the same
    averaged gradients, and the quantizer's codebooks come from rank 0. A divergent one means a
    broken collective."""
    for rank, fingerprint in enumerate(fingerprints[1:], start=1):
        if fingerprint != fingerprints[0]:
            raise RuntimeError(f"{name}: rank {rank}'s replica differs from rank 0's after training")


def _scalars(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a (nested) fit report, as flat metrics (``acrq/head_code_stability``)."""
    out: dict[str, float] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = float(value)
    return out
