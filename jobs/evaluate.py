"""``sa2crq evaluate``: the retrieval metrics (DESIGN §5) of a published retriever on held-out targets.

The histories (training + validation interactions) and one target per user become requests; the
retriever generates with the same constrained beam search and item scorer as ``generate``, items of
the user's history excluded; Recall@K and NDCG@K overall and per segment, tail coverage, the share of
top-K from buckets, and hallucination (unconstrained decoding) are written as JSON and printed.

Both inputs are validated first (:func:`validate_inputs`) against the SID version's items, as
train-retriever validates its interactions: rejected rows (an item the version does not know among
them) are written with their reasons beside the report, under ``<report>-rejects/<input>/``, and
counted in it; only the rows that passed are scored.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa

from jobs.config import EvaluateConfig
from jobs.object_store import object_store
from jobs.publishing import resolve_version, write_json, write_text
from jobs.summary import JobSummary
from sa2crq.data.validation import InputError, Validated, validate_interactions, write_rejects
from sa2crq.metrics.html_report import evaluation_page
from sa2crq.metrics.retrieval import RetrievalAccumulator
from sa2crq.retrieval.data import BY_USER_TIME, Sequences, evaluation_requests
from sa2crq.retrieval.serving import load_server
from sa2crq.storage.filesystem import read_parquet
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion

log = logging.getLogger(__name__)


def run_evaluate(config: EvaluateConfig) -> JobSummary:
    storage = config.storage
    with object_store(storage):
        retrievers, sids = Publisher(storage.retrievers), Publisher(storage.sids)
        retriever_version = resolve_version(retrievers, config.retriever_version, "retriever", hint="run `sa2crq train-retriever` first")
        sid_version = config.sid_version or retrievers.manifest(retriever_version).meta["sid_version"]
        server = load_server(PublishedVersion.open(sids, sid_version), PublishedVersion.open(retrievers, retriever_version), config.generation)
        index = server.catalog.index
        out = config.out or f"{storage.root.rstrip('/')}/evaluations/{retriever_version}.json"
        inputs = validate_inputs(config, pa.array(index.item_ids), out)
        history, targets = inputs["history"].valid, inputs["targets"].valid
        requests = evaluation_requests(Sequences.from_interactions(history.sort_by(BY_USER_TIME), index), targets, index, server.max_history)
        started = time.perf_counter()
        candidates = server.generator.generate(requests)
        seconds = time.perf_counter() - started
        accumulator = RetrievalAccumulator(item_index=np.arange(len(index)), item_segments=server.catalog.items.segments, ks=(5, 10))
        accumulator.update(candidates.items, requests.target, from_bucket=candidates.from_bucket, from_dense=candidates.from_dense)
        metrics = accumulator.result()
        sample = np.arange(min(len(requests), config.hallucination_requests))
        metrics["hallucination"] = server.generator.hallucination_rate(requests.subset(sample))
        metrics["constrained_invalid"] = candidates.invalid_beams / max(candidates.beams, 1)
        metrics["generate_seconds"] = round(seconds, 2)
        report = {"retriever_version": retriever_version, "sid_version": sid_version, "history_excluded": True,
                  "generation": server.generator.config.to_dict(), "metrics": metrics,
                  "input": {name: validated.counts for name, validated in inputs.items()}}  # fmt: skip
        page = f"{out.removesuffix('.json')}.html"
        write_text(page, evaluation_page(report, f"Evaluation of retriever {retriever_version} on SID version {sid_version}"))
        write_json(out, report)
        summary = JobSummary("evaluate", publishes=False, report=report)
        summary.add("evaluation report", out)
        summary.add("evaluation report page", page)
        for name, validated in inputs.items():
            summary.add(f"rejected {name} rows", rejects_url(out, name), validated.counts["rejected"])
        unknown = inputs["targets"].counts["by_reason"].get("unknown_item_id", 0)
        if unknown:
            summary.notes.append(f"{unknown} targets name items outside SID version {sid_version} and are not scored")
        summary.notes.append("\n" + format_metrics(metrics))
        return summary


def validate_inputs(config: EvaluateConfig, known_item_ids: pa.Array, out: str) -> dict[str, Validated]:
    """``history`` and ``targets`` validated as interactions against ``known_item_ids`` (the SID
    version's items), each one's rejected rows written under :func:`rejects_url`; a table-level
    problem raises an ``InputError`` naming the input."""
    validated = {}
    for name in ("history", "targets"):
        source = getattr(config, name)
        try:
            validated[name] = validate_interactions(read_parquet(source), known_item_ids=known_item_ids,
                                                    max_reject_fraction=config.max_reject_fraction)  # fmt: skip
        except InputError as refusal:
            raise InputError(f"{name} ({source}): {refusal}") from refusal
    for name, result in validated.items():  # a refused run writes nothing
        write_rejects(result, f"{rejects_url(out, name)}/part-00000.parquet")
    return validated


def rejects_url(out: str, name: str) -> str:
    """Where an input's rejected rows go: beside the report ``out``."""
    return f"{out.removesuffix('.json')}-rejects/{name}"


def format_metrics(metrics: dict) -> str:
    """A markdown table: overall and per-segment R@5, N@5, R@10, N@10, then the other numbers."""

    def cell(value) -> str:
        return "-" if value is None else f"{value:.4f}"

    names = ("recall@5", "ndcg@5", "recall@10", "ndcg@10")
    lines = ["| slice | requests | R@5 | N@5 | R@10 | N@10 |", "|---|---|---|---|---|---|"]
    lines.append(f"| all | {metrics['requests']} | " + " | ".join(cell(metrics[n]) for n in names) + " |")
    for name, values in metrics["segments"].items():
        lines.append(f"| {name} | {values['requests']} | " + " | ".join(cell(values[n]) for n in names) + " |")
    lines.append(
        f"tail coverage {metrics['tail_coverage']}, top-{metrics['k']} from buckets {cell(metrics['bucket_share_at_k'])}, "
        f"from the dense path only {cell(metrics['dense_share_at_k'])}, "
        f"hallucination (unconstrained) {cell(metrics['hallucination'])}, constrained invalid {cell(metrics['constrained_invalid'])}"
    )
    return "\n".join(lines)
