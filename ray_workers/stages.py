"""Per-shard transforms for :func:`ray_workers.shards.map_shards`: item embedding, full-depth encoding, generation.

Each stage is a factory, called once in each actor, that loads what the stage needs and returns the
per-table transform. The factories are module-level functions so that Ray pickles them by reference.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch

from ray_workers.catalog_shards import CatalogShards, RayCatalogVectors
from sa2crq.data.embed import TextEmbedder
from sa2crq.data.columns import list_matrix
from sa2crq.data.validation import DEFAULT_TEXT_COLUMNS
from sa2crq.quantize.tokenizer import load_tokenizer
from sa2crq.retrieval.candidates import GenerationConfig
from sa2crq.retrieval.serving import load_server
from sa2crq.storage.published import PublishedVersion
from sa2crq.tokenize_catalog import item_embeddings

__all__ = ["CODES_COLUMN", "EMBEDDING_COLUMN", "embed_stage", "encode_stage", "generate_stage"]

EMBEDDING_COLUMN = "embedding"
CODES_COLUMN = "codes"


def embed_stage(cache_dir: str | None, batch_size: int = 128) -> Callable[[pa.Table], pa.Table]:
    """Items -> items without their text columns, plus ``embedding`` (fixed_size_list<float32, D>, unit norm).

    An item keeps its own ``embedding`` where it has one (normalised); the rest are embedded from text.
    MiniLM loads on the first item that needs it, so a shard whose items all carry embeddings never
    loads it. ``cache_dir`` is the text-embedding cache on the actor's local disk (None: no cache).
    """
    embedder = TextEmbedder(cache_dir, batch_size)

    def embed(items: pa.Table) -> pa.Table:
        vectors = item_embeddings(items, embedder)
        kept = [c for c in items.column_names if c not in DEFAULT_TEXT_COLUMNS and c != EMBEDDING_COLUMN]
        return items.select(kept).append_column(EMBEDDING_COLUMN, _fixed_size_list(vectors.astype(np.float32)))

    return embed


def encode_stage(tokenizer_url: str) -> Callable[[pa.Table], pa.Table]:
    """Items with ``embedding`` -> the same columns without it, plus full-depth ``codes``
    (fixed_size_list<int32, L>). ``tokenizer_url``: a local directory or any URL of a saved tokenizer."""
    tokenizer = load_tokenizer(tokenizer_url)

    def encode(items: pa.Table) -> pa.Table:
        embeddings = items.column(EMBEDDING_COLUMN).combine_chunks()
        if embeddings.null_count:
            raise ValueError(f"{embeddings.null_count} items have no embedding: run the embedding stage first")
        vectors = list_matrix(embeddings)
        codes = tokenizer.encode(vectors).astype(np.int32)  # K is far below 2**31
        return items.drop_columns([EMBEDDING_COLUMN]).append_column(CODES_COLUMN, _fixed_size_list(codes))

    return encode


def _fixed_size_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def generate_stage(
    sids: PublishedVersion,
    retriever: PublishedVersion,
    generation: dict,
    request_kind: str,
    cache_dir: str | None,
    catalog_shards: CatalogShards | None = None,
) -> Callable[[pa.Table], pa.Table]:
    """Requests -> candidates: ``request_id``, ``item_ids``, ``scores`` (best first), the versions used,
    and for history requests how many history items the SID version did not know. Each actor reads
    both published versions itself, checking their files against the manifests; with
    ``catalog_shards`` it reads no embedding and reaches the catalog's vectors there."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    vectors = None if catalog_shards is None else RayCatalogVectors(catalog_shards, device)
    server = load_server(sids, retriever, GenerationConfig(**generation), device=device, vectors=vectors)
    sid_version, retriever_version = sids.version, retriever.version
    embedder = TextEmbedder(cache_dir) if request_kind == "query" else None

    def generate(requests: pa.Table) -> pa.Table:
        request_ids = requests.column("request_id").to_numpy(zero_copy_only=False)
        if embedder is None:
            built, unknown = server.history_requests(requests)
        else:
            built = server.query_requests(requests, embedder.embed)
            unknown = np.zeros(len(request_ids), dtype=np.int64)
        out = server.candidates(request_ids, built)
        n = out.num_rows
        return (
            out.append_column("sid_version", pa.array([sid_version] * n, pa.string()))
            .append_column("retriever_version", pa.array([retriever_version] * n, pa.string()))
            .append_column("unknown_history_items", pa.array(unknown.astype(np.int32)))
        )

    return generate
