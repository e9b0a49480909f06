"""Serving a published retriever over a published SID version: what ``generate`` and ``evaluate`` load.

A SID version directory holds (see :mod:`sa2crq.storage.layout`) the SID table, the item
embeddings and the trie. Items are addressed by their row in the SID table sorted by item id, so
the trie's row order, the token matrix and the embeddings agree however the parquet was sharded.

A retriever records the SID version it was trained on; :func:`load_server` refuses any other
(DESIGN §3.3a): the same tokens name other items there. Both versions are read through
:class:`~sa2crq.storage.published.PublishedVersion`: only their listed files, each checked against
its manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from sa2crq.data.columns import list_matrix
from sa2crq.data.segments import segment_codes
from sa2crq.data.validation import InputError, check_item_id_types, invalid_utf8_rows
from sa2crq.ids.sid_table import SIDVocabulary
from sa2crq.ids.trie import META_FILE as TRIE_META_FILE
from sa2crq.ids.trie import NODES_DIR, ROWS_DIR, SIDTrie
from sa2crq.retrieval.candidates import CandidateGenerator, GenerationConfig
from sa2crq.retrieval.catalog_vectors import CatalogShard, CatalogVectors
from sa2crq.retrieval.checkpoint import load_published_retriever
from sa2crq.retrieval.data import ItemIndex, Requests, path_token_matrix, sid_token_matrix
from sa2crq.retrieval.model import ItemFeatures
from sa2crq.retrieval.scorer import ItemSIDs, ScorerWeights
from sa2crq.storage import layout
from sa2crq.storage.published import PublishedVersion


class VersionMismatchError(ValueError):
    """The retriever was trained on another SID version than the one it would serve."""


@dataclass(frozen=True, eq=False)
class CatalogItems:
    """The items of one SID version in serving order (sorted by item id): what every process that
    addresses items by row reads (the trie-sized part of the catalog; the embeddings are apart)."""

    index: ItemIndex
    sid_tokens: np.ndarray  # (N, T)
    path_tokens: np.ndarray  # (N, L + 2) every item's full code path
    segments: np.ndarray  # (N,) int8 segment codes
    item_id_type: pa.DataType  # the SID table's: a request history names items by this type family


@dataclass(frozen=True, eq=False)
class CatalogView:
    """A SID version's items and trie: what a generator holds itself."""

    items: CatalogItems
    trie: SIDTrie

    @property
    def index(self) -> ItemIndex:
        return self.items.index


def load_catalog_items(sids: PublishedVersion) -> CatalogItems:
    """A published SID version's items in serving order, every file checked against its manifest."""
    # Rows sorted by item id: the one row order every serving artifact uses.
    table = sids.read_parquet(layout.SID_TABLE, columns=["item_id", "sid", "codes", "digit", "segment"]).sort_by("item_id")
    return CatalogItems(
        ItemIndex(table.column("item_id").to_numpy(zero_copy_only=False)), sid_token_matrix(table.column("sid")),
        path_token_matrix(table, SIDVocabulary.from_dict(sids.meta["vocab"])), segment_codes(table.column("segment")),
        table.schema.field("item_id").type,
    )  # fmt: skip


def load_catalog_view(sids: PublishedVersion) -> CatalogView:
    """A published SID version's items and trie, every file checked against its manifest."""
    trie = SIDTrie.from_stored(
        sids.read_json(f"{layout.TRIE}/{TRIE_META_FILE}"), sids.read_parquet(f"{layout.TRIE}/{NODES_DIR}"),
        sids.read_parquet(f"{layout.TRIE}/{ROWS_DIR}"), where=sids.file_url(layout.TRIE),
    )  # fmt: skip
    return CatalogView(load_catalog_items(sids), trie)


def read_embeddings(sids: PublishedVersion, index: ItemIndex, start: int, stop: int) -> np.ndarray:
    """(stop - start, D) float32: the embeddings of serving rows ``[start, stop)``, read one listed
    file at a time, so the version's embeddings are never in memory whole."""
    out, filled = None, 0
    for part in sids.iter_parquet(layout.EMBEDDINGS, columns=["item_id", "embedding"]):
        rows = index.lookup(part.column("item_id").to_numpy(zero_copy_only=False))
        keep = (rows >= start) & (rows < stop)
        vectors = list_matrix(part.column("embedding").filter(pa.array(keep)))
        if out is None:
            out = np.empty((stop - start, vectors.shape[1]), dtype=np.float32)
        out[rows[keep] - start] = vectors
        filled += int(keep.sum())
    if out is None or filled != stop - start:
        raise ValueError(f"SID version {sids.version}: {filled} embeddings for its {stop - start} items in rows [{start}, {stop})")
    return out


def load_catalog_shard(sids: PublishedVersion, retriever: PublishedVersion, start: int, stop: int, max_batch_scores: int,
                       *, device: str | None = None) -> CatalogShard:  # fmt: skip
    """Serving rows ``[start, stop)`` of ``sids`` as a :class:`CatalogShard` of ``retriever``'s vectors."""
    model = _checked_retriever(sids, retriever).model
    items = load_catalog_items(sids)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    features = ItemFeatures(torch.as_tensor(items.sid_tokens[start:stop]), torch.as_tensor(read_embeddings(sids, items.index, start, stop)),
                            torch.as_tensor(items.path_tokens[start:stop])).to(device)  # fmt: skip
    return CatalogShard.for_model(model.to(device).eval(), start, features, max_batch_scores)


@dataclass(frozen=True, eq=False)
class Server:
    """A retriever ready to generate over its SID version."""

    catalog: CatalogView
    generator: CandidateGenerator
    max_history: int
    sid_version: str

    def history_requests(self, table: pa.Table) -> tuple[Requests, np.ndarray]:
        """Requests from rows of ``request_id``, ``history`` (item ids, oldest first) and optional ``user_id``.

        The last ``max_history`` known items feed the encoder; every known item is excluded from
        the top-K. History items the SID version does not know are left out; how many, per
        request, is returned so the job reports it.
        """
        check_requests_schema(table.schema, "history", self.catalog.items.item_id_type)
        _require_values(table, ["request_id", "history"])
        history = table.column("history").combine_chunks()
        lengths = pc.list_value_length(history).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        ids = pc.list_flatten(history).to_numpy(zero_copy_only=False)
        rows, known = self.catalog.index.locate(ids)
        every_owner = np.repeat(np.arange(len(lengths)), lengths)
        unknown = np.bincount(every_owner[~known], minlength=len(lengths))
        owner = every_owner[known]
        rows = rows[known]
        # Keep each request's last max_history known items, oldest first, -1 padded on the left.
        kept = np.bincount(owner, minlength=len(lengths))
        from_end = np.arange(len(owner)) - np.r_[0, np.cumsum(kept)][owner] - kept[owner]
        window = np.full((len(lengths), self.max_history), -1, dtype=np.int64)
        inside = from_end >= -self.max_history
        window[owner[inside], self.max_history + from_end[inside]] = rows[inside]
        users = table.column("user_id" if "user_id" in table.column_names else "request_id").to_numpy(zero_copy_only=False)
        excluded = (np.r_[0, np.cumsum(kept)].astype(np.int64), rows)
        return Requests(np.asarray(users), window, np.full(len(lengths), -1, dtype=np.int64), excluded=excluded), unknown

    def query_requests(self, table: pa.Table, embed) -> Requests:
        """Requests from rows of ``request_id`` and ``query`` (text), embedded by ``embed(texts)``."""
        check_requests_schema(table.schema, "query", self.catalog.items.item_id_type)
        _require_values(table, ["request_id", "query"])
        if self.generator.model.config.query_dim == 0:
            raise ValueError("this retriever was trained on histories only: it has no query input")
        request_ids = table.column("request_id").to_numpy(zero_copy_only=False)
        n = len(request_ids)
        queries = np.asarray(embed(table.column("query").to_pylist()), dtype=np.float32)
        item_dim = self.generator.embedding_dim
        if queries.shape[1] != item_dim:
            # The item scorer compares the query with item embeddings: they must share one space.
            raise ValueError(
                f"query embeddings have {queries.shape[1]} dimensions but this SID version's item embeddings "
                f"{item_dim}: query requests need items embedded from text by the same model"
            )
        return Requests(np.asarray(request_ids), np.zeros((n, 0), dtype=np.int64), np.full(n, -1, dtype=np.int64), queries)

    def candidates(self, request_ids: np.ndarray, requests: Requests) -> pa.Table:
        """``request_id``, ``item_ids``, ``scores`` (best first; empty slots left out)."""
        result = self.generator.generate(requests)
        filled = result.items >= 0
        lengths = filled.sum(axis=1)
        offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
        item_ids = self.catalog.index.item_ids[result.items[filled]]
        return pa.table(
            {
                "request_id": pa.array(request_ids),
                "item_ids": pa.ListArray.from_arrays(offsets, pa.array(item_ids)),
                "scores": pa.ListArray.from_arrays(offsets, pa.array(result.scores[filled].astype(np.float32))),
            }
        )



REQUEST_COLUMNS = {"history": ("request_id", "history"), "query": ("request_id", "query")}


def check_requests_schema(schema: pa.Schema, request_kind: str, catalog_item_type: pa.DataType) -> None:
    """The table-level rules of a request file, which ``generate`` checks on the file's schema before any
    request is read: the kind's columns, a ``history`` that lists item ids of the catalog's id type family
    (nothing is coerced: a cast id names another item or none), a string ``query``."""
    columns = REQUEST_COLUMNS[request_kind]
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(f"requests: missing required column {', '.join(map(repr, missing))} "
                         f"(columns present: {', '.join(schema.names) or 'none'})")  # fmt: skip
    if request_kind == "history":
        history = schema.field("history").type
        if not (pa.types.is_list(history) or pa.types.is_large_list(history)):
            raise InputError(f"requests: column 'history' has type {history}, breaks rule 'list of item ids'")
        check_item_id_types(history.value_type, catalog_item_type, table="requests", column="history",
                            known="this SID version's")  # fmt: skip
    elif not (pa.types.is_string(schema.field("query").type) or pa.types.is_large_string(schema.field("query").type)):
        raise InputError(f"requests: column 'query' has type {schema.field('query').type}, breaks rule 'string'")


def _require_values(table: pa.Table, columns: list[str]) -> None:
    """Requests are refused, naming rows, when a column holds nulls, or a string column bytes that are
    not UTF-8: a request without an id or a body cannot be answered or matched back."""
    for column in columns:
        nulls = np.flatnonzero(table.column(column).is_null().to_numpy(zero_copy_only=False))
        if len(nulls):
            raise InputError(f"requests: {len(nulls)} rows have a null {column!r} (rule: not null), e.g. rows {nulls[:10].tolist()}")
    broken = np.flatnonzero(invalid_utf8_rows(table))
    if len(broken):
        raise InputError(f"requests: {len(broken)} rows hold a string that is not valid UTF-8 (rule: invalid_utf8), "
                         f"e.g. rows {broken[:10].tolist()}")  # fmt: skip


def _checked_retriever(sids: PublishedVersion, retriever: PublishedVersion):
    checkpoint = load_published_retriever(retriever)
    if checkpoint.sid_version != sids.version:
        raise VersionMismatchError(
            f"retriever version {retriever.version} was trained on SID version {checkpoint.sid_version}, "
            f"not {sids.version}: retrain it on {sids.version} or serve SID version {checkpoint.sid_version}"
        )
    return checkpoint


def load_server(sids: PublishedVersion, retriever: PublishedVersion, generation: GenerationConfig, *,
                device: str | None = None, vectors: CatalogVectors | None = None) -> Server:  # fmt: skip
    """The published retriever version ``retriever`` serving the published SID version ``sids``.
    ``vectors``: the catalog's vectors for this retriever held elsewhere
    (:func:`load_catalog_shard`); None: this process reads every item's embedding."""
    checkpoint = _checked_retriever(sids, retriever)
    catalog = load_catalog_view(sids)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    train = checkpoint.meta["train_config"]
    vocab_size = checkpoint.model.config.vocab_size
    if generation.tuned_scorer and "scorer" in checkpoint.meta:
        # The weights train-retriever tuned on its validation split (DESIGN §3.4).
        generation = generation.with_weights(ScorerWeights(**checkpoint.meta["scorer"]))
    embeddings = read_embeddings(sids, catalog.index, 0, len(catalog.index)) if vectors is None else vectors
    generator = CandidateGenerator(
        checkpoint.model,
        catalog.items.sid_tokens,
        catalog.trie,
        ItemSIDs.build(catalog.trie.row_sid),
        embeddings,
        generation,
        user_offset=vocab_size,
        user_buckets=int(train["user_buckets"]),
        device=device,
        path_tokens=catalog.items.path_tokens,
    )
    return Server(catalog, generator, int(train["max_history"]), sids.version)
