"""`sa2crq bench quality`: every tokenizer variant + the same retriever, under DESIGN §5's protocol.

Run 1: plain leave-one-out (last item test, second-last validation), full-catalog ranking, hits at
item level, comparable with published numbers. Run 2: a seeded 10% of items held out of training
(cold start), evaluated on users whose test target is held out, its item scorer tuned on the
validation users whose target is held out; its numbers are reported only as cold R@10.
Popularity, segments and SIDs see each run's training interactions only. Every variant gets the
same retriever shape, training budget (epochs and optimiser steps), beam width and item
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
from sa2crq.data.datasets import read_interactions, read_items
from sa2crq.data.segments import COLD, TAIL, assign_segments
from sa2crq.data.splits import Split, cold_start_split, leave_one_out, popularity
from sa2crq.ids.trie import SIDTrie
from sa2crq.metrics.bootstrap import paired_bootstrap
from sa2crq.metrics.retrieval import RetrievalAccumulator
from sa2crq.retrieval.candidates import Candidates, CandidateGenerator, GenerationConfig, validation_recall, validation_samples
from sa2crq.retrieval.data import ItemIndex, Requests, Sequences, embeddings_in_index_order, evaluation_requests, training_requests
from sa2crq.retrieval.knn import knn_topk
from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.retrieval.scorer import ItemSIDs, ScorerWeights, request_embeddings
from sa2crq.retrieval.training import RetrieverTrainConfig, train_retriever
from sa2crq.storage.reports import dumps_report
from sa2crq.quantize.tokenizer import Tokenizer
from sa2crq.tokenize_catalog import TokenizeResult, item_embeddings, tokenize_catalog

log = logging.getLogger(__name__)

VARIANTS = ("sa2crq", "tiger", "rqkmeans", "sa2crq-no-sarq", "sa2crq-no-acrq")
REFERENCE = "tiger"
KNN_ROW = "dense-knn"
# The scorer with its dense path switched off: what generation alone ranks.
GENERATION_ONLY = ScorerWeights(dense_weight=0.0, content_weight=0.0, dense_candidates=0)


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
    # The retriever reads items' content embeddings beside their SID tokens.
    item_content: bool = True
    variants: tuple[str, ...] = VARIANTS
    bootstrap_resamples: int = 1000


CPU_RETRIEVER = {"d_model": 64, "num_heads": 4, "head_dim": 16, "d_ff": 256, "encoder_layers": 2, "decoder_layers": 2,
                 "dropout": 0.0, "dense_head": True}  # fmt: skip
CPU_TRAIN = RetrieverTrainConfig(epochs=10, batch_size=64, learning_rate=2e-3, warmup_steps=200, schedule="stable-decay", max_history=8,
                                 eval_every_steps=325, patience=2, max_steps=1300, select_users=1000, tune_users=2000)  # fmt: skip

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        tokenizer={"rqvae.codebook_size": 16, "rqvae.latent_dim": 8, "rqvae.hidden_dims": [32], "rqvae.epochs": 4,
                   "acrq.epochs_per_stage": 2},
        retriever={"d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "encoder_layers": 1, "decoder_layers": 1,
                   "dense_head": True},
        train=RetrieverTrainConfig(epochs=2, batch_size=128, warmup_steps=5, max_history=5, user_buckets=50, select_users=50, tune_users=100),
        generation=GenerationConfig(beam_width=5, k=10),
        seeds=(0, 1),
        cold_seeds=(0,),
        hallucination_requests=50,
        max_eval_users=200,
        bootstrap_resamples=200,
    ),
    # Sized for under an hour on 2 cores for the three main variants, both runs and the k-NN row:
    # 1,300 steps of 64 history windows (~290 next-item targets each, ~2.9 epochs of Beauty's
    # 131k training targets), the learning rate decayed over the last quarter, checkpoints scored
    # every 325 steps on 1,000 validation users, the scorer tuned on 2,000, run 1 scored on a
    # seeded 10,000 of 22,363 users.
    "cpu": Profile(
        name="cpu",
        tokenizer={"rqvae.epochs": 25, "acrq.epochs_per_stage": 6},
        retriever=CPU_RETRIEVER,
        train=CPU_TRAIN,
        generation=GenerationConfig(beam_width=20, k=10, batch_size=256),
        seeds=(0, 1),
        cold_seeds=(0,),
        hallucination_requests=500,
        max_eval_users=10000,
        variants=("sa2crq", "tiger", "rqkmeans"),
    ),
    # One H100/H200: the TIGER shape with 20-item histories, trained for longer; needs only torch,
    # numpy and pyarrow. Sized from the CPU curves (still rising after 3.3 epochs): up to 16 epochs
    # of 256 windows (~1,400 targets) a step, checkpoints scored every epoch. Run 1 of
    # sa2crq and tiger at seed 0 takes 334 s on one H200 (README); the whole profile has not run.
    "gpu": Profile(
        name="gpu",
        tokenizer={},
        retriever={"dense_head": True},
        train=RetrieverTrainConfig(epochs=16, batch_size=256, learning_rate=2e-3, warmup_steps=300, max_history=20,
                                   patience=3, select_users=2000, tune_users=4000),
        generation=GenerationConfig(beam_width=20, k=10, batch_size=1024),
        seeds=(0, 1),
        cold_seeds=(0,),
        variants=("sa2crq", "tiger", "sa2crq-no-sarq", "sa2crq-no-acrq", "rqkmeans"),
    ),
}

# The two ablations under the same budget, a run of its own.
PROFILES["cpu-ablations"] = replace(PROFILES["cpu"], name="cpu-ablations", variants=("sa2crq-no-sarq", "sa2crq-no-acrq"))


@dataclass
class RunData:
    """One protocol run (1: leave-one-out, 2: cold start) and its shared inputs."""

    name: str
    split: Split
    items: pa.Table
    test: pa.Table  # the evaluated test rows (run 2: cold targets only)
    cold_only: bool  # run 2: only requests whose target is cold are evaluated
    quantizers: dict[str, Tokenizer] = field(default_factory=dict)


def run_quality_benchmark(data_dir: Path, profile: Profile, out_path: Path, device: str | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    items = read_items(data_dir / "items.parquet")
    interactions = read_interactions(data_dir / "interactions.parquet")
    items, _ = embedded_items(items)
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
    runs = [_run_data("run1", leave_one_out(interactions), items, cold_only=False, limit=profile.max_eval_users, seed=profile.split_seed)]
    if profile.cold_seeds:  # none: run 2 is left out (a device-sized run)
        runs.append(_run_data(
            "run2",
            cold_start_split(items.column("item_id").to_numpy(), interactions, fraction=profile.cold_fraction, seed=profile.split_seed),
            items, cold_only=True, limit=profile.max_eval_users, seed=profile.split_seed,
        ))
    # The k-NN row first (seconds), then each variant; every row is compared with TIGER and k-NN as
    # soon as both exist, so a run stopped early still holds complete, paired rows.
    per_request: dict[str, dict[str, list[np.ndarray]]] = {}
    result["rows"][KNN_ROW], per_request[KNN_ROW] = _evaluate_knn(runs, profile, device)
    for variant in profile.variants:
        if variant == "rqkmeans" and not _has_faiss():
            result["rows"][variant] = {"skipped": "faiss is not installed on this machine"}
            _write(out_path, result)
            continue
        result["rows"][variant], per_request[variant] = _evaluate_variant(variant, runs, profile, device)
        for reference, key in ((REFERENCE, "vs_tiger"), (KNN_ROW, "vs_knn")):
            if reference not in per_request:
                continue
            for name, arrays in per_request.items():
                if name != reference and key not in result["rows"][name]:
                    result["rows"][name][key] = _bootstrap(arrays, per_request[reference], profile)
        result["seconds"] = round(time.perf_counter() - started, 1)
        _write(out_path, result)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["plot"] = plot_learning_curves(result, out_path.with_suffix(".png"))
    result["page"] = write_quality_page(result, out_path.with_suffix(".html"), result["plot"])
    _write(out_path, result)
    return result


def plot_learning_curves(result: dict[str, Any], path: Path) -> str | None:
    """Validation Recall@10 (the selection metric) against training examples, one line per variant
    and seed of run 1, the selected checkpoint marked; a PNG beside the JSON. None where matplotlib
    is not installed (the GPU machine): the curves stay in the JSON."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(8, 5))
    for name, row in result["rows"].items():
        for seed in row.get("run1", {}).get("per_seed", []):
            curve = seed.get("curve") or []
            if not curve:
                continue
            examples = [point["examples"] for point in curve]
            line = axes.plot(examples, [point["metric"] for point in curve], marker=".", label=f"{name} seed {seed['seed']}")
            best = seed["train"]["best_step"]
            chosen = [point for point in curve if point["step"] == best]
            axes.plot([p["examples"] for p in chosen], [p["metric"] for p in chosen], "o", markersize=10, fillstyle="none", color=line[0].get_color())
    axes.set_xlabel("training examples")
    axes.set_ylabel("validation Recall@10 (selection sample)")
    axes.set_title(f"Learning curves, profile {result['profile']} (circle: selected checkpoint)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


def _run_data(name: str, split: Split, items: pa.Table, *, cold_only: bool, limit: int | None, seed: int) -> RunData:
    test = split.cold_test if cold_only else split.test
    if limit is not None and test.num_rows > limit:
        # A seeded uniform sample of test users: unbiased, only noisier (the intervals say how much).
        rows = np.sort(np.random.default_rng(seed).choice(test.num_rows, limit, replace=False))
        test = test.take(pa.array(rows))
    return RunData(name, split, items, test, cold_only)


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
    # Seeded validation samples: one scores checkpoints, a larger one tunes the scorer. Run 2
    # measures requests whose target is cold, so its scorer is tuned on validation requests of
    # that population: tuned on all of them (~90% warm targets) it trades cold recall for warm.
    select_requests, tune_requests = validation_samples(valid_requests, train_cfg, seed=profile.split_seed)
    cold_valid = valid_requests.subset(np.flatnonzero(table.segments[valid_requests.target] == COLD))
    if run.cold_only and len(cold_valid):
        _, tune_requests = validation_samples(cold_valid, train_cfg, seed=profile.split_seed)

    embeddings = embeddings_in_index_order(run.items, index)
    torch.manual_seed(seed)
    model_config = RetrieverConfig(
        vocab_size=vocab.size, encoder_vocab_size=vocab.size + train_cfg.user_buckets,
        item_content_dim=embeddings.shape[1] if profile.item_content else 0, **profile.retriever,
    )  # fmt: skip
    model = GenerativeRetriever(model_config).to(device)
    trie = SIDTrie.build(table.tokens, table.sid_len + 1, vocab.size)
    is_cold = table.segments == COLD
    # The scorer is keyed by the trie's SID index, the one beam search returns.
    sids = (
        ItemSIDs.build(trie.row_sid, codes=table.codes, prefix_levels=table.codes.shape[1], item_is_cold=is_cold, cold_cap=profile.tiger_cold_cap)
        if tiger_rule
        else ItemSIDs.build(trie.row_sid)
    )
    generator = CandidateGenerator(
        model, table.tokens, trie, sids, embeddings, profile.generation,
        user_offset=vocab.size, user_buckets=train_cfg.user_buckets, device=device, path_tokens=table.path_tokens,
    )  # fmt: skip

    history = train_retriever(
        model, train_requests, select_requests, generator.items, train_cfg,
        user_offset=vocab.size, select=lambda _: validation_recall(generator, select_requests),
    )  # fmt: skip
    started = time.perf_counter()
    weights, tuning = generator.tune(tune_requests)
    tune_seconds = time.perf_counter() - started

    started = time.perf_counter()
    batches = list(generator.features(test_requests, [weights, GENERATION_ONLY]))
    generate_seconds = time.perf_counter() - started
    invalid = sum(batch.invalid_beams for batch in batches)
    produced = sum(int(torch.isfinite(batch.features.sid_log_probs).sum()) for batch in batches)
    scored = {
        name: Candidates.concat([batch.score(w, profile.generation.k) for batch in batches], invalid, produced, profile.generation.k)
        for name, w in (("hybrid", weights), ("generation_only", GENERATION_ONLY))
    }
    candidates = scored["hybrid"]
    metrics = _metrics(candidates.items, test_requests, table.segments, candidates.from_bucket, candidates.from_dense)
    metrics["generation_only"] = _metrics(scored["generation_only"].items, test_requests, table.segments)["recall@10"]
    metrics["hallucination"] = generator.hallucination_rate(test_requests.subset(np.arange(min(len(test_requests), profile.hallucination_requests))))
    metrics["constrained_invalid"] = candidates.invalid_beams / max(candidates.beams, 1)
    metrics["train"] = {key: value for key, value in history.items() if key != "curve"}
    metrics["curve"] = history["curve"]
    metrics["scorer"] = asdict(weights)
    metrics["tuning"] = {
        "requests": len(tune_requests), "cold_targets_only": run.cold_only and len(cold_valid) > 0, "points": len(tuning),
        "seconds": round(tune_seconds, 1), "valid_recall@10": max(t["recall"] for t in tuning),
    }  # fmt: skip
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


def _metrics(
    topk: np.ndarray, requests: Requests, segments: np.ndarray, from_bucket: np.ndarray | None = None, from_dense: np.ndarray | None = None
) -> dict[str, Any]:
    acc = RetrievalAccumulator(item_index=np.arange(len(segments)), item_segments=segments, ks=(5, 10))
    acc.update(topk, requests.target, from_bucket=from_bucket, from_dense=from_dense)
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
        emb = torch.as_tensor(embeddings_in_index_order(run.items, index))
        queries = request_embeddings(torch.as_tensor(requests.history), emb, profile.generation.request_last_n)
        top, _ = knn_topk(queries, emb, profile.generation.k, exclude=requests.history_csr(), device=device)
        metrics = _metrics(top, requests, segments)
        seeds = profile.seeds if run.name == "run1" else profile.cold_seeds
        # Deterministic: the same numbers for every seed; repeated so the pairing with TIGER holds.
        row[run.name] = _pool([metrics] * len(seeds), seeds)
        for key in ("recall@10", "ndcg@10", "tail_recall@10"):
            arrays[f"{run.name}/{key}"] = [metrics["per_request"][key]] * len(seeds)
    return row, arrays


def _pool(metrics: list[dict[str, Any]], seeds: tuple[int, ...]) -> dict[str, Any]:
    """Means over seeds of the scalar metrics, plus each seed's own numbers."""
    scalars = [
        "recall@5", "ndcg@5", "recall@10", "ndcg@10", "tail_coverage", "bucket_share_at_k", "dense_share_at_k",
        "generation_only", "hallucination", "constrained_invalid",
    ]  # fmt: skip
    pooled: dict[str, Any] = {"requests": metrics[0]["requests"]}
    for key in scalars:
        values = [m[key] for m in metrics if m.get(key) is not None]
        pooled[key] = float(np.mean(values)) if values else None
    tail = [m["segments"]["tail"]["recall@10"] for m in metrics if m["segments"]["tail"]["recall@10"] is not None]
    pooled["tail_recall@10"] = float(np.mean(tail)) if tail else None
    pooled["segments"] = {name: {"requests": seg["requests"], "recall@10": seg["recall@10"]} for name, seg in metrics[0]["segments"].items()}
    pooled["per_seed"] = [
        {"seed": seed, **{k: m.get(k) for k in ("recall@10", "ndcg@10", "generation_only", "hallucination", "train", "curve", "scorer",
                                                 "tuning", "generate_seconds", "parameters")}}
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


def embedded_items(items: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """The items with every item's unit-norm content embedding in their ``embedding`` column (their
    own where all have one, else MiniLM's of their text, imported lazily), and those (N, D)
    embeddings: what every tokenizer and retriever of a benchmark reads, computed once."""
    embeddings = item_embeddings(items, _text_embedder(items))
    column = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])
    if "embedding" in items.column_names:
        return items.set_column(items.schema.get_field_index("embedding"), "embedding", column), embeddings
    return items.append_column("embedding", column), embeddings


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


QUALITY_COLUMNS = (
    "variant", "R@5", "N@5", "R@10", "N@10", "gen-only R@10", "tail R@10", "cold R@10 (run 2)", "halluc.", "tail cov.",
    "top-10 from buckets / dense", "ID len head/tail", "train ex/s", "best step / steps", "wall s",
    "R@10 vs TIGER (95% CI)", "R@10 vs k-NN (95% CI)",
)  # fmt: skip


def format_quality_table(result: dict[str, Any]) -> str:
    """The side-by-side table as markdown (:func:`quality_table_rows`)."""
    lines = ["| " + " | ".join(QUALITY_COLUMNS) + " |", "|" + "---|" * len(QUALITY_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in quality_table_rows(result)])


def write_quality_page(result: dict[str, Any], path: Path, curves: str | None) -> str:
    """The benchmark's HTML page beside its JSON: the table, hardware and wall time, the learning curves."""
    from sa2crq.metrics.html_report import quality_page

    notes = [f"Profile {result['profile']} on {result['hardware']}; seeds {result['seeds']} (run 1), {result['cold_seeds']} (run 2); "
             f"wall time {result.get('seconds', 0) / 60:.1f} minutes; data {result['data']}.",
             "gen-only: the same checkpoints ranked with the scorer's dense path off. Intervals: paired bootstrap 95% over users."]  # fmt: skip
    png = Path(curves).read_bytes() if curves else None
    path.write_text(quality_page(f"Retrieval quality, profile {result['profile']}", QUALITY_COLUMNS, quality_table_rows(result), notes, png))
    return str(path)


def quality_table_rows(result: dict[str, Any]) -> list[list[str]]:
    """The side-by-side table, one row per variant under :data:`QUALITY_COLUMNS`: run 1
    (leave-one-out) metrics, cold R@10 of run 2, where the top-10 came from, training (examples/s,
    selected step of steps run, converged), and the paired-bootstrap differences of R@10 to TIGER
    and to the k-NN row."""
    rows = []
    for name, row in result["rows"].items():
        if "skipped" in row:
            rows.append([name, f"skipped: {row['skipped']}", *[""] * (len(QUALITY_COLUMNS) - 2)])
            continue
        r1, r2 = row.get("run1", {}), row.get("run2", {})
        tok = row.get("tokenizer", {})
        seeds = r1.get("per_seed", [])
        trains = [seed["train"] for seed in seeds if seed.get("train")]
        speed = f"{np.mean([t['examples_per_second'] for t in trains]):.0f}" if trains else "-"
        steps = ", ".join(f"{t['best_step']}/{t['steps']}" + ("" if t["converged"] else " (not converged)") for t in trains) or "-"
        rows.append([
            name, _f(r1.get("recall@5")), _f(r1.get("ndcg@5")), _f(r1.get("recall@10")), _f(r1.get("ndcg@10")),
            _f(r1.get("generation_only")), _f(r1.get("tail_recall@10")), _f(r2.get("recall@10")), _f(r1.get("hallucination")),
            str(r1.get("tail_coverage", "-")), f"{_f(r1.get('bucket_share_at_k'), 2)} / {_f(r1.get('dense_share_at_k'), 2)}",
            f"{_f(tok.get('mean_sid_len_head'), 2)}/{_f(tok.get('mean_sid_len_tail'), 2)}", speed, steps,
            str(row.get("seconds", "-")), _interval(row, "vs_tiger"), _interval(row, "vs_knn"),
        ])  # fmt: skip
    return rows


def _interval(row: dict[str, Any], key: str) -> str:
    ci = row.get(key, {}).get("run1/recall@10")
    return f"{ci['mean_diff']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]" if ci else "-"


def _f(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
