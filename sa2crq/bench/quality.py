"""`sa2crq bench quality`: every tokenizer variant + the same retriever, under DESIGN §5's protocol.

Run 1: plain leave-one-out (last item test, second-last validation), full-catalog ranking, hits at
item level, comparable with published numbers. Run 2: a seeded 10% of items held out of training
(cold start), evaluated on users whose test target is held out; its numbers are reported only as
cold R@10. Popularity, segments and SIDs see each run's training interactions only. Every variant
gets the same retriever shape, training budget (epochs and optimiser steps), beam width and item
scorer; items in the request's history (training items, plus the validation item for test
requests) are excluded from every top-K. The dense k-NN row ranks items by the cosine similarity
of the request embedding (the last history item's text embedding, as the scorer uses).

Differences to TIGER are paired bootstrap 95% intervals over users, pooled over the seeds
(resampled within each seed). Rows are appended to the JSON file as soon as each is done.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from sa2crq.bench import hardware
from sa2crq.config import SegmentConfig, TokenizerConfig
from sa2crq.data.columns import list_matrix
from sa2crq.data.datasets import read_interactions, read_items
from sa2crq.data.segments import COLD, TAIL, assign_segments
from sa2crq.data.splits import Split, cold_start_split, leave_one_out, popularity
from sa2crq.ids.trie import SIDTrie
from sa2crq.metrics.bootstrap import paired_bootstrap
from sa2crq.metrics.retrieval import RetrievalAccumulator
from sa2crq.retrieval.candidates import CandidateGenerator, GenerationConfig
from sa2crq.retrieval.data import ItemIndex, Requests, Sequences, evaluation_requests, training_requests
from sa2crq.retrieval.knn import knn_topk
from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.retrieval.scorer import BucketIndex, cold_prefix_extension, request_embeddings
from sa2crq.retrieval.training import RetrieverTrainConfig, train_retriever
from sa2crq.storage.reports import dumps_report
from sa2crq.quantize.tokenizer import Tokenizer
from sa2crq.tokenize_catalog import TokenizeResult, item_embeddings, tokenize_catalog

log = logging.getLogger(__name__)

VARIANTS = ("sa2crq", "tiger", "rqkmeans", "sa2crq-no-sarq", "sa2crq-no-acrq")
REFERENCE = "tiger"
KNN_ROW = "dense-knn"


@dataclass(frozen=True)
class Profile:
    name: str
    tokenizer: dict[str, Any]
    retriever: dict[str, Any]
    train: RetrieverTrainConfig
    generation: GenerationConfig
    seeds: tuple[int, ...]
    cold_seeds: tuple[int, ...]
    cold_fraction: float = 0.1
    split_seed: int = 0
    # TIGER's cold-start rule: at most this share of a top-K may be cold items.
    tiger_cold_cap: float = 0.2
    hallucination_requests: int = 2000
    # Evaluate on a seeded sample of at most this many test users per run (None: all of them).
    max_eval_users: int | None = None
    variants: tuple[str, ...] = VARIANTS
    bootstrap_resamples: int = 1000


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        tokenizer={"rqvae.codebook_size": 16, "rqvae.latent_dim": 8, "rqvae.hidden_dims": [32], "rqvae.epochs": 4,
                   "acrq.epochs_per_stage": 2},
        retriever={"d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "encoder_layers": 1, "decoder_layers": 1},
        train=RetrieverTrainConfig(epochs=1, batch_size=128, warmup_steps=5, max_history=5, user_buckets=50),
        generation=GenerationConfig(beam_width=5, k=10),
        seeds=(0, 1),
        cold_seeds=(0,),
        hallucination_requests=50,
        max_eval_users=200,
        bootstrap_resamples=200,
    ),
    # Budget-matched, not converged: sized so all variants and both runs finish within ~60 min on 2
    # cores. Run 1 is scored on a seeded sample of 6,000 of Beauty's 22,363 test users.
    "cpu": Profile(
        name="cpu",
        tokenizer={"rqvae.epochs": 25, "acrq.epochs_per_stage": 6},
        retriever={"d_model": 64, "num_heads": 4, "head_dim": 16, "d_ff": 256, "encoder_layers": 2, "decoder_layers": 2,
                   "dropout": 0.0},
        train=RetrieverTrainConfig(epochs=3, batch_size=512, learning_rate=2e-3, warmup_steps=50, max_history=8,
                                   patience=2, max_steps=300),
        generation=GenerationConfig(beam_width=20, k=10, batch_size=512),
        seeds=(0, 1),
        cold_seeds=(0,),
        hallucination_requests=500,
        max_eval_users=6000,
    ),
    # One H100: TIGER-sized retriever trained for longer; needs only torch, numpy and pyarrow.
    "gpu": Profile(
        name="gpu",
        tokenizer={},
        retriever={},
        train=RetrieverTrainConfig(epochs=30, batch_size=1024, learning_rate=2e-3, warmup_steps=300, max_history=20,
                                   patience=3, max_steps=3000),
        generation=GenerationConfig(beam_width=30, k=10, batch_size=1024),
        seeds=(0, 1),
        cold_seeds=(0,),
        variants=("sa2crq", "tiger", "sa2crq-no-sarq", "sa2crq-no-acrq", "rqkmeans"),
    ),
}


@dataclass
class RunData:
    """One protocol run (1: leave-one-out, 2: cold start) and its shared inputs."""

    name: str
    split: Split
    items: pa.Table
    test: pa.Table  # the evaluated test rows (run 2: cold targets only)
    quantizers: dict[str, Tokenizer] = field(default_factory=dict)


def run_quality_benchmark(data_dir: Path, profile: Profile, out_path: Path, device: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    items = read_items(data_dir / "items.parquet")
    interactions = read_interactions(data_dir / "interactions.parquet")
    embeddings = item_embeddings(items, _text_embedder(items))
    items = _with_embeddings(items, embeddings)
    result: dict[str, Any] = {
        "profile": profile.name,
        "data": str(data_dir),
        "hardware": _hardware(device),
        "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
        "seeds": list(profile.seeds),
        "cold_seeds": list(profile.cold_seeds),
        "split_seed": profile.split_seed,
        "profile_config": _profile_dict(profile),
        "rows": {},
    }
    runs = [
        _run_data("run1", leave_one_out(interactions), items, cold_only=False, limit=profile.max_eval_users, seed=profile.split_seed),
        _run_data(
            "run2",
            cold_start_split(items.column("item_id").to_numpy(), interactions, fraction=profile.cold_fraction, seed=profile.split_seed),
            items, cold_only=True, limit=profile.max_eval_users, seed=profile.split_seed,
        ),
    ]
    per_request: dict[str, dict[str, list[np.ndarray]]] = {}
    for variant in profile.variants:
        if variant == "rqkmeans" and not _has_faiss():
            result["rows"][variant] = {"skipped": "faiss is not installed on this machine"}
            _write(out_path, result)
            continue
        row, arrays = _evaluate_variant(variant, runs, profile, device)
        result["rows"][variant] = row
        per_request[variant] = arrays
        _write(out_path, result)
    knn_row, knn_arrays = _evaluate_knn(runs, profile, device)
    result["rows"][KNN_ROW] = knn_row
    per_request[KNN_ROW] = knn_arrays
    if REFERENCE in per_request:
        for variant, arrays in per_request.items():
            if variant != REFERENCE:
                result["rows"][variant]["vs_tiger"] = _bootstrap(arrays, per_request[REFERENCE], profile)
    result["seconds"] = round(time.perf_counter() - started, 1)
    _write(out_path, result)
    return result


def _run_data(name: str, split: Split, items: pa.Table, *, cold_only: bool, limit: int | None, seed: int) -> RunData:
    test = split.cold_test if cold_only else split.test
    if limit is not None and test.num_rows > limit:
        # A seeded uniform sample of test users: unbiased, only noisier (the intervals say how much).
        rows = np.sort(np.random.default_rng(seed).choice(test.num_rows, limit, replace=False))
        test = test.take(pa.array(rows))
    return RunData(name, split, items, test)


def _quantizer_key(config: TokenizerConfig) -> str:
    """Variants whose configs differ only in SID rules share one trained quantizer."""
    data = config.to_dict()
    data.pop("method")
    data.pop("sid")
    return json.dumps(data, sort_keys=True)


def _evaluate_variant(variant: str, runs: list[RunData], profile: Profile, device: str) -> tuple[dict, dict]:
    config = TokenizerConfig.for_method(variant).with_overrides(profile.tokenizer)
    row: dict[str, Any] = {"method": variant}
    arrays: dict[str, list[np.ndarray]] = {}
    started = time.perf_counter()
    for run in runs:
        log.info("%s %s: tokenizer", variant, run.name)
        key = _quantizer_key(config)
        tokenized = tokenize_catalog(run.items, run.split.train, config, embedder=None, fitted=run.quantizers.get(key))
        run.quantizers[key] = tokenized.tokenizer
        seeds = profile.seeds if run.name == "run1" else profile.cold_seeds
        metrics = []
        for seed in seeds:
            log.info("%s %s seed %d: retriever", variant, run.name, seed)
            metrics.append(_train_and_evaluate(tokenized, run, profile, seed, device, tiger_rule=(variant == "tiger")))
        row[run.name] = _pool(metrics, seeds)
        for key in ("recall@10", "ndcg@10", "tail_recall@10"):
            arrays.setdefault(f"{run.name}/{key}", [m["per_request"][key] for m in metrics])
        if run.name == "run1":
            report = tokenized.report
            row["tokenizer"] = {
                "mean_sid_len_head": report["segments"]["head"]["mean_sid_len"],
                "mean_sid_len_tail": report["segments"]["tail"]["mean_sid_len"],
                "collision_rate": report["collision_rate"],
                "distinct_sids": report["distinct_sids"],
            }
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row, arrays


def _train_and_evaluate(
    tokenized: TokenizeResult, run: RunData, profile: Profile, seed: int, device: str, *, tiger_rule: bool
) -> dict[str, Any]:
    table = tokenized.table
    vocab = table.vocab
    index = ItemIndex(table.item_ids)
    train_seq = Sequences.from_interactions(run.split.train, index)
    train_cfg = replace(profile.train, seed=seed)
    train_requests = training_requests(train_seq, train_cfg.max_history)
    valid_requests = evaluation_requests(train_seq, run.split.valid, index, train_cfg.max_history)
    test_requests = _test_requests(run, index, train_cfg.max_history)

    torch.manual_seed(seed)
    model_config = RetrieverConfig(vocab_size=vocab.size, encoder_vocab_size=vocab.size + train_cfg.user_buckets, **profile.retriever)
    model = GenerativeRetriever(model_config).to(device)
    sid_tokens = torch.as_tensor(table.tokens, device=device)
    history = train_retriever(model, train_requests, valid_requests, sid_tokens, train_cfg, user_offset=vocab.size)

    is_cold = table.segments == COLD
    trie = SIDTrie.build(table.tokens, table.sid_len + 1, vocab.size)
    # Buckets are keyed by the trie's SID index, the one beam search returns.
    extra = cold_prefix_extension(table.codes, trie.row_sid, is_cold, table.codes.shape[1]) if tiger_rule else None
    generator = CandidateGenerator(
        model, table.tokens, trie, BucketIndex.build(trie.row_sid, extra),
        _embeddings_of(run.items, index), profile.generation,
        user_offset=vocab.size, user_buckets=train_cfg.user_buckets, device=device,
        item_is_cold=is_cold if tiger_rule else None, cold_cap=profile.tiger_cold_cap if tiger_rule else None,
    )
    started = time.perf_counter()
    candidates = generator.generate(test_requests)
    generate_seconds = time.perf_counter() - started
    metrics = _metrics(candidates.items, candidates.from_bucket, test_requests, table.segments, profile)
    metrics["hallucination"] = generator.hallucination_rate(test_requests.subset(np.arange(min(len(test_requests), profile.hallucination_requests))))
    metrics["constrained_invalid"] = candidates.invalid_beams / max(candidates.beams, 1)
    metrics["train"] = {k: history[k] for k in ("best_epoch", "best_valid_loss", "steps", "seconds")} | {"epochs_run": len(history["valid_loss"])}
    metrics["generate_seconds"] = round(generate_seconds, 1)
    metrics["parameters"] = model.num_parameters()
    return metrics


def _test_requests(run: RunData, index: ItemIndex, max_history: int) -> Requests:
    """Test requests: each user's training items then the validation item, as history."""
    history = Sequences.from_interactions(
        pa.concat_tables([run.split.train, run.split.valid]).sort_by([("user_id", "ascending"), ("timestamp", "ascending")]),
        index,
    )
    return evaluation_requests(history, run.test, index, max_history)


def _metrics(topk: np.ndarray, from_bucket: np.ndarray | None, requests: Requests, segments: np.ndarray, profile: Profile) -> dict[str, Any]:
    acc = RetrievalAccumulator(item_index=np.arange(len(segments)), item_segments=segments, ks=(5, 10))
    acc.update(topk, requests.target, from_bucket=from_bucket)
    out = acc.result()
    tail = acc.request_segments() == TAIL
    out["per_request"] = {
        "recall@10": acc.per_request("recall@10"),
        "ndcg@10": acc.per_request("ndcg@10"),
        "tail_recall@10": acc.per_request("recall@10")[tail],
    }
    return out


def _evaluate_knn(runs: list[RunData], profile: Profile, device: str) -> tuple[dict, dict]:
    row: dict[str, Any] = {"method": KNN_ROW}
    arrays: dict[str, list[np.ndarray]] = {}
    item_ids = runs[0].items.column("item_id").to_numpy()
    index = ItemIndex(item_ids)
    for run in runs:
        segments = assign_segments(item_ids, popularity(item_ids, run.split.train), SegmentConfig())
        requests = _test_requests(run, index, profile.train.max_history)
        emb = torch.as_tensor(_embeddings_of(run.items, index))
        queries = request_embeddings(torch.as_tensor(requests.history), emb, profile.generation.request_last_n)
        top, _ = knn_topk(queries, emb, profile.generation.k, exclude=requests.history_csr(), device=device)
        metrics = _metrics(top, None, requests, segments, profile)
        seeds = profile.seeds if run.name == "run1" else profile.cold_seeds
        # Deterministic: the same numbers for every seed; repeated so the pairing with TIGER holds.
        row[run.name] = _pool([metrics] * len(seeds), seeds)
        for key in ("recall@10", "ndcg@10", "tail_recall@10"):
            arrays[f"{run.name}/{key}"] = [metrics["per_request"][key]] * len(seeds)
    return row, arrays


def _pool(metrics: list[dict[str, Any]], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Means over seeds of the scalar metrics, plus each seed's own numbers."""
    scalars = ["recall@5", "ndcg@5", "recall@10", "ndcg@10", "tail_coverage", "bucket_share_at_k", "hallucination", "constrained_invalid"]
    pooled: dict[str, Any] = {"requests": metrics[0]["requests"]}
    for key in scalars:
        values = [m[key] for m in metrics if m.get(key) is not None]
        pooled[key] = float(np.mean(values)) if values else None
    tail = [m["segments"]["tail"]["recall@10"] for m in metrics if m["segments"]["tail"]["recall@10"] is not None]
    pooled["tail_recall@10"] = float(np.mean(tail)) if tail else None
    pooled["segments"] = {name: {"requests": seg["requests"], "recall@10": seg["recall@10"]} for name, seg in metrics[0]["segments"].items()}
    pooled["per_seed"] = [
        {"seed": seed, **{k: m.get(k) for k in ("recall@10", "ndcg@10", "hallucination", "train", "generate_seconds", "parameters")}}
        for seed, m in zip(seeds, metrics)
    ]
    return pooled


def _bootstrap(arrays: dict[str, list[np.ndarray]], reference: dict[str, list[np.ndarray]], profile: Profile) -> dict[str, Any]:
    out = {}
    for key, parts in arrays.items():
        ref = reference[key]
        a, b = np.concatenate(parts), np.concatenate(ref[: len(parts)])
        if len(a) == 0 or len(a) != len(b):
            continue
        groups = np.concatenate([np.full(len(p), i) for i, p in enumerate(parts)])
        out[key] = paired_bootstrap(a, b, n_resamples=profile.bootstrap_resamples, seed=0, groups=groups).to_dict()
    return out


def _embeddings_of(items: pa.Table, index: ItemIndex) -> np.ndarray:
    """Embeddings in the SID table's row order (the dense index)."""
    emb = list_matrix(items.column("embedding")).astype(np.float32)
    rows = ItemIndex(items.column("item_id").to_numpy()).lookup(index.item_ids)
    return emb[rows]


def _with_embeddings(items: pa.Table, embeddings: np.ndarray) -> pa.Table:
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])
    if "embedding" in items.column_names:
        return items.set_column(items.schema.get_field_index("embedding"), "embedding", column)
    return items.append_column("embedding", column)


def _text_embedder(items: pa.Table):
    if "embedding" in items.column_names and items.column("embedding").null_count == 0:
        return None
    from sa2crq.data.embed import TextEmbedder

    return TextEmbedder(Path(os.environ.get("SA2CRQ_CACHE", ".cache")) / "embeddings")


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _hardware(device: str) -> str:
    cpu = hardware()
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} ({cpu})"
    return cpu


def _profile_dict(profile: Profile) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(profile), default=str))


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dumps_report(result))
    os.replace(tmp, path)


def format_quality_table(result: dict[str, Any]) -> str:
    """The side-by-side table (markdown)."""
    header = (
        "| variant | R@5 | N@5 | R@10 | N@10 | tail R@10 | cold R@10 (run 2) | halluc. | tail cov. | top-10 from buckets "
        "| ID len head/tail | collision | wall s | R@10 vs TIGER (95% CI) |"
    )
    lines = [header, "|" + "---|" * 14]
    for name, row in result["rows"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} |" + " |" * 12)
            continue
        r1, r2 = row.get("run1", {}), row.get("run2", {})
        tok = row.get("tokenizer", {})
        ci = row.get("vs_tiger", {}).get("run1/recall@10")
        ci_text = f"{ci['mean_diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]" if ci else "-"
        lines.append(
            f"| {name} | {_f(r1.get('recall@5'))} | {_f(r1.get('ndcg@5'))} | {_f(r1.get('recall@10'))} | {_f(r1.get('ndcg@10'))} "
            f"| {_f(r1.get('tail_recall@10'))} | {_f(r2.get('recall@10'))} | {_f(r1.get('hallucination'))} "
            f"| {r1.get('tail_coverage', '-')} | {_f(r1.get('bucket_share_at_k'))} "
            f"| {_f(tok.get('mean_sid_len_head'), 2)}/{_f(tok.get('mean_sid_len_tail'), 2)} | {_f(tok.get('collision_rate'))} "
            f"| {row.get('seconds', '-')} | {ci_text} |"
        )
    return "\n".join(lines)


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
