"""The tokenizer run, end to end on one machine: validate -> embed -> segment -> fit -> encode -> SIDs -> write.

This is the library's single-process path (tests, the demo, benchmarks). The distributed jobs
run the same steps through Spark and Ray with the same functions underneath.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sa2crq.config import TokenizerConfig
from sa2crq.data.embed import TextEmbedder, embed_items
from sa2crq.data.segments import SEGMENT_NAMES, assign_segments
from sa2crq.data.splits import popularity
from sa2crq.data.validation import (
    Validated,
    ValidatedCatalog,
    check_embedding_mix,
    validate_catalog,
    write_catalog_rejects,
)
from sa2crq.ids.sid_table import SIDTable, assign_sids
from sa2crq.ids.trie import SIDTrie
from sa2crq.metrics.html_report import sid_version_page
from sa2crq.metrics.tokenizer_report import tokenizer_report
from sa2crq.storage.reports import dumps_report
from sa2crq.quantize.sample import in_sample, sample_fractions, sample_report
from sa2crq.quantize.tokenizer import Tokenizer, build_tokenizer

log = logging.getLogger(__name__)

SID_TABLE_FILE = "sid_table.parquet"
REPORT_FILE = "report.json"
REPORT_PAGE_FILE = "report.html"
TOKENIZER_DIR = "tokenizer"
TRIE_DIR = "trie"


@dataclass(frozen=True)
class TokenizeResult:
    table: SIDTable
    tokenizer: Tokenizer
    report: dict[str, Any]
    items: Validated
    interactions: Validated


def item_embeddings(items: pa.Table, embedder: TextEmbedder | None) -> np.ndarray:
    """L2-normalised (N, D) embeddings of validated items: each item's own ``embedding`` where it
    has one, the text embedding of the rest."""
    column = items.column("embedding").combine_chunks() if "embedding" in items.column_names else None
    has_own = np.zeros(items.num_rows, dtype=bool) if column is None else column.is_valid().to_numpy(zero_copy_only=False)
    if has_own.all():
        flat = column.flatten().to_numpy(zero_copy_only=False)
        vectors = flat.reshape(items.num_rows, -1).astype(np.float32)
    else:
        if embedder is None:
            raise ValueError(f"{int((~has_own).sum())} items have no embedding and no text embedder was given")
        check_embedding_mix(items, embedder.embedding_dim)  # before the text model spends any time
        from_text = embed_items(items.filter(pa.array(~has_own)), embedder)
        vectors = np.empty((items.num_rows, from_text.shape[1]), dtype=np.float32)
        vectors[~has_own] = from_text
        if has_own.any():
            own = column.filter(pa.array(has_own)).flatten().to_numpy(zero_copy_only=False)
            vectors[has_own] = own.reshape(-1, from_text.shape[1])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def tokenize_catalog(
    items: pa.Table,
    interactions: pa.Table,
    config: TokenizerConfig,
    *,
    embedder: TextEmbedder | None,
    max_reject_fraction: float = 0.05,
    fitted: Tokenizer | None = None,
) -> TokenizeResult:
    """Everything in memory; ``interactions`` are treated as training interactions.

    ``fitted``: a tokenizer already trained on the same items and interactions (e.g. shared by two
    variants that differ only in their SID rules); it is used as is instead of training a new one.
    """
    validated = validate_catalog(items, interactions, max_reject_fraction=max_reject_fraction)
    valid_items, valid_interactions = validated.items, validated.interactions
    catalog = valid_items.valid
    item_ids = catalog.column("item_id").to_numpy(zero_copy_only=False)
    embeddings = item_embeddings(catalog, embedder)
    pop = popularity(item_ids, valid_interactions.valid)
    segments = assign_segments(item_ids, pop, config.segments)

    tokenizer = fitted
    if tokenizer is None:
        tokenizer = build_tokenizer(config, embeddings.shape[1])
        counts = np.bincount(segments, minlength=len(SEGMENT_NAMES))
        fractions = sample_fractions(counts, config.sample_per_segment)
        sample = in_sample(item_ids, segments, fractions, config.rqvae.seed)
        log.info("fitting %s tokenizer on %d of %d items", config.method, int(sample.sum()), len(item_ids))
        tokenizer.fit(embeddings[sample], segments[sample])
        tokenizer.fit_report["sample"] = sample_report(counts, fractions, config.sample_per_segment)
    codes = tokenizer.encode(embeddings)
    table = assign_sids(item_ids, codes, pop, segments, tokenizer.codebook_sizes(), config.sid)
    report = tokenizer_report(table, tokenizer.fit_report, method=config.method, max_bucket=config.sid.max_bucket)
    report["input"] = validated.counts
    return TokenizeResult(table, tokenizer, report, valid_items, valid_interactions)


def write_result(result: TokenizeResult, out_dir: str | Path) -> dict[str, str]:
    """SID table, tokenizer checkpoint, trie, rejects and report under ``out_dir``; report last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sid_table": out / SID_TABLE_FILE, "tokenizer": out / TOKENIZER_DIR, "trie": out / TRIE_DIR}
    pq.write_table(result.table.to_arrow(), paths["sid_table"])
    result.tokenizer.save(str(paths["tokenizer"]))
    table = result.table
    SIDTrie.build(table.tokens, table.sid_len + 1, table.vocab.size).save(paths["trie"])
    written = {name: str(path) for name, path in paths.items()}
    written |= write_catalog_rejects(ValidatedCatalog(result.items, result.interactions), out)
    page = out / REPORT_PAGE_FILE
    page.write_text(sid_version_page(result.report, f"SID table: {result.report['method']}, {result.report['items']:,} items"))
    report = out / REPORT_FILE
    report.write_text(dumps_report(result.report))
    return written | {"report page": str(page), "report": str(report)}
