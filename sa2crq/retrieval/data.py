"""Requests for the generative retriever: user histories as SID token sequences, or text queries, and their targets.

Items are addressed by their dense index: the row of the item in the SID table. A request holds
the indices of the user's most recent ``max_history`` items (oldest first, -1 padded on the left),
which the encoder reads (token by token, see :mod:`sa2crq.retrieval.model`), the target
item (in training, every history item's successor is a target too: :func:`training_requests`),
and the user's *whole* history as a CSR, which every variant excludes from its top-K
(DESIGN §5: all of it, not only the encoder's window).

A query request (DESIGN §3.4) carries a text embedding instead of a history; the model projects it
to a few input tokens. No real query log exists here: :func:`synthetic_queries` derives a SYNTHETIC
query set from item text for tests only, and no retrieval quality is claimed for it.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from sa2crq.data.columns import index_ranges, list_matrix
from sa2crq.ids.sid_table import SIDVocabulary, code_path_tokens
from sa2crq.ids.trie import EOS, PAD


@dataclass(frozen=True, eq=False)
class ItemIndex:
    """Maps item ids to dense indices (their row in the SID table)."""

    item_ids: np.ndarray

    def __post_init__(self) -> None:
        order = np.argsort(self.item_ids, kind="stable")
        object.__setattr__(self, "_order", order)
        object.__setattr__(self, "_sorted", self.item_ids[order])

    def __len__(self) -> int:
        return len(self.item_ids)

    def locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dense index, known) of each id; the index of an unknown id is meaningless."""
        ids = np.asarray(ids)
        if len(self._sorted) == 0:
            return np.zeros(ids.shape, dtype=np.int64), np.zeros(ids.shape, dtype=bool)
        pos = np.clip(np.searchsorted(self._sorted, ids), 0, len(self._sorted) - 1)
        return self._order[pos], self._sorted[pos] == ids

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Dense index of each id; an unknown id is an error naming it."""
        rows, known = self.locate(ids)
        if not known.all():
            missing = np.asarray(ids)[~known]
            raise ValueError(f"{len(missing)} interactions name items missing from the SID table, e.g. {missing[:5].tolist()}")
        return rows


def embeddings_in_index_order(embedded: pa.Table, index: ItemIndex) -> np.ndarray:
    """(N, D) float32: the ``embedding`` of every item of ``index`` from a table of ``item_id``,
    ``embedding`` rows in any order (one per item), row i for dense index i."""
    if embedded.num_rows != len(index):
        raise ValueError(f"{embedded.num_rows} item embeddings for {len(index)} items")
    vectors = list_matrix(embedded.column("embedding"))
    out = np.empty(vectors.shape, dtype=np.float32)
    out[index.lookup(embedded.column("item_id").to_numpy(zero_copy_only=False))] = vectors
    return out


@dataclass(frozen=True, eq=False)
class Sequences:
    """Per-user chronological item sequences in CSR form (``items[indptr[u]:indptr[u+1]]``)."""

    user_ids: np.ndarray
    indptr: np.ndarray
    items: np.ndarray

    @classmethod
    def from_interactions(cls, interactions: pa.Table, index: ItemIndex) -> "Sequences":
        """``interactions`` sorted by (user, timestamp), as the splits return them."""
        users = interactions.column("user_id").to_numpy(zero_copy_only=False)
        items = index.lookup(interactions.column("item_id").to_numpy(zero_copy_only=False))
        starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, dtype=np.int64)
        if len(starts) > 1 and not (users[starts[1:]] > users[starts[:-1]]).all():
            raise ValueError("interactions must be sorted by (user, timestamp), as the splits return them")
        return cls(users[starts], np.r_[starts, len(users)].astype(np.int64), items.astype(np.int64))

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)


@dataclass(frozen=True, eq=False)
class Requests:
    user_ids: np.ndarray  # (R,) user ids, or request ids for query requests
    history: np.ndarray  # (R, H) dense item indices, oldest first, -1 padded on the left; (R, 0) for queries
    target: np.ndarray  # (R,) dense item index; -1 when unknown (pure inference)
    # (R, D) float32 query text embeddings: set, these are query requests, encoded from the query alone.
    query: np.ndarray | None = None
    # CSR (indptr (R + 1,), items) of every item of each request's history, for exclusion from the
    # top-K; None: the ``history`` window is the whole history.
    excluded: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.excluded is not None and len(self.excluded[0]) != len(self.user_ids) + 1:
            raise ValueError(f"excluded must be a CSR over R={len(self.user_ids)} requests, got indptr of {len(self.excluded[0])}")
        if self.query is not None:
            if self.query.ndim != 2 or len(self.query) != len(self.user_ids):
                raise ValueError(f"query must be (R={len(self.user_ids)}, D), got {self.query.shape}")
            # A history beside a query would be silently ignored by the encoder; refuse it instead.
            if self.history.shape != (len(self.user_ids), 0):
                raise ValueError(f"query requests take an (R, 0) history, got {self.history.shape}")

    def __len__(self) -> int:
        return len(self.user_ids)

    def subset(self, rows: np.ndarray) -> "Requests":
        rows = np.asarray(rows, dtype=np.int64)
        query = None if self.query is None else self.query[rows]
        excluded = None
        if self.excluded is not None:
            indptr, items = self.excluded
            lengths = np.diff(indptr)[rows]
            excluded = (_indptr(lengths), items[index_ranges(indptr[rows], lengths)])
        return Requests(self.user_ids[rows], self.history[rows], self.target[rows], query, excluded)

    def history_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, indices) of every history item of each request, for exclusion from its top-K."""
        if self.excluded is not None:
            return self.excluded
        valid = self.history >= 0
        return np.r_[0, np.cumsum(valid.sum(1))].astype(np.int64), self.history[valid]

    def excluded_matrix(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), E) the history items of some requests, -1 padded: the scorer's exclusion input."""
        indptr, items = self.history_csr()
        rows = np.asarray(rows, dtype=np.int64)
        lengths = np.diff(indptr)[rows]
        out = np.full((len(rows), max(int(lengths.max(initial=0)), 1)), -1, dtype=np.int64)
        out[np.repeat(np.arange(len(rows)), lengths), index_ranges(np.zeros(len(rows), dtype=np.int64), lengths)] = items[index_ranges(indptr[rows], lengths)]
        return out


def _indptr(lengths: np.ndarray) -> np.ndarray:
    return np.r_[0, np.cumsum(lengths)].astype(np.int64)


def _windows(seq: Sequences, ends: np.ndarray, owners: np.ndarray, max_history: int) -> np.ndarray:
    """(R, H): for request r, the items of user owners[r] at positions [ends[r]-H, ends[r]), -1 padded."""
    offsets = np.arange(-max_history, 0)
    pos = ends[:, None] + offsets[None, :]
    inside = pos >= seq.indptr[owners][:, None]
    return np.where(inside, seq.items[np.clip(pos, 0, None)], -1)


def training_requests(train: Sequences, max_history: int) -> Requests:
    """Every training sequence cut into windows of ``max_history`` + 1 items, from its end: one
    request per window, history = all but the window's last item, target = its last item.

    Training decodes every item of a window after its first from the items before it
    (``make_batch(every_position=True)``), so each position t >= 1 of a sequence is a target
    exactly once, with a history of at most ``max_history`` items (shorter for the first items of
    a window that does not start the sequence)."""
    lengths = train.lengths()
    # Window ends: the last position, then every max_history positions earlier, while >= 1.
    per_user = np.maximum(-(-(lengths - 1) // max_history), 0)
    owners = np.repeat(np.arange(len(lengths)), per_user)
    back = index_ranges(np.zeros(len(lengths), dtype=np.int64), per_user) * max_history
    ends = train.indptr[owners + 1] - 1 - back
    return Requests(train.user_ids[owners], _windows(train, ends, owners, max_history), train.items[ends])


def evaluation_requests(history: Sequences, targets: pa.Table, index: ItemIndex, max_history: int) -> Requests:
    """One request per target row: the user's ``history`` sequence before it (its last
    ``max_history`` items for the encoder, all of it for exclusion), then the target.

    Targets of users with no history get an all-padding history (only the user token remains).
    """
    users = targets.column("user_id").to_numpy(zero_copy_only=False)
    target_items = index.lookup(targets.column("item_id").to_numpy(zero_copy_only=False))
    windows = np.full((len(users), max_history), -1, dtype=np.int64)
    lengths = np.zeros(len(users), dtype=np.int64)
    starts = np.zeros(len(users), dtype=np.int64)
    if len(history.user_ids):
        pos = np.minimum(np.searchsorted(history.user_ids, users), len(history.user_ids) - 1)
        known = history.user_ids[pos] == users
        owners = pos[known]
        windows[known] = _windows(history, history.indptr[owners + 1], owners, max_history)
        starts[known] = history.indptr[owners]
        lengths[known] = history.indptr[owners + 1] - history.indptr[owners]
    excluded = (_indptr(lengths), history.items[index_ranges(starts, lengths)])
    return Requests(users, windows, target_items.astype(np.int64), excluded=excluded)


def sid_token_matrix(sid: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, T) int64 SID token rows from the SID table's ``sid`` list column (EOS-terminated), PAD-filled
    on the right to the longest SID: the matrix the requests' dense item indices address."""
    # Chunk by chunk: one combined list array cannot address 2^31 tokens (sa2crq.data.columns).
    if sid.null_count:
        raise ValueError(f"the SID table has {sid.null_count} items without a SID")
    lengths = pc.list_value_length(sid).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(sid).to_numpy(zero_copy_only=False).astype(np.int64)
    ends = np.cumsum(lengths) - 1
    if len(sid) and ((lengths < 1).any() or (flat[ends] != EOS).any()):
        raise ValueError("every SID must end with EOS")
    width = int(lengths.max()) if len(sid) else 1
    tokens = np.full((len(sid), width), PAD, dtype=np.int64)
    tokens[np.arange(width)[None, :] < lengths[:, None]] = flat
    return tokens


def path_token_matrix(sid_table: pa.Table, vocab: SIDVocabulary) -> np.ndarray:
    """(N, L + 2) every item's full code path as tokens (:func:`sa2crq.ids.sid_table.code_path_tokens`)
    from the SID table's ``codes`` and ``digit`` columns, row i = item i of the table."""
    # Full-depth codes, one per level; Spark writes them as a variable-size list, the library as fixed-size.
    flat = pc.list_flatten(sid_table.column("codes")).to_numpy(zero_copy_only=False).astype(np.int64)
    digit = sid_table.column("digit").to_numpy(zero_copy_only=False).astype(np.int64)
    return code_path_tokens(flat.reshape(len(sid_table), len(vocab.codebook_sizes)), digit, vocab)


@dataclass(frozen=True, eq=False)
class TrainingData:
    """What retriever training needs, in the benchmark's layout: history or query requests."""

    sid_tokens: np.ndarray  # (N, T) token rows, row i = item i of the SID table
    path_tokens: np.ndarray  # (N, L + 2) every item's full code path, same rows
    train: Requests  # histories: every position of every training sequence; queries: one per query row
    valid: Requests  # one per validation row (histories: the user's training sequence before it)
    # Rows left out because their item is not in the SID table, per input.
    off_catalog: dict[str, int]


def history_training_data(sid_table: pa.Table, vocab: SIDVocabulary, train: pa.Table, valid: pa.Table, max_history: int) -> TrainingData:
    """From a SID table (``item_id``, ``sid``, ``codes``, ``digit``) of vocabulary ``vocab`` and
    training / validation interactions (``user_id``, ``item_id``, ``timestamp``). Interactions are sorted by (user, timestamp) here: parquet written by
    several writers need not keep the split's order. Interactions with items the SID table lacks
    (rejected by validation, or removed) are left out and counted."""
    index = ItemIndex(sid_table.column("item_id").to_numpy(zero_copy_only=False))
    train, train_off = on_catalog(train, sid_table.column("item_id"))
    valid, valid_off = on_catalog(valid, sid_table.column("item_id"))
    train_seq = Sequences.from_interactions(train.sort_by(BY_USER_TIME), index)
    return TrainingData(
        sid_token_matrix(sid_table.column("sid")),
        path_token_matrix(sid_table, vocab),
        training_requests(train_seq, max_history),
        evaluation_requests(train_seq, valid, index, max_history),
        {"train": train_off, "valid": valid_off},
    )


def query_training_data(sid_table: pa.Table, vocab: SIDVocabulary, train: pa.Table, valid: pa.Table, embed) -> TrainingData:
    """From a SID table and training / validation query logs (``query_id``, ``query``, ``item_id``):
    one request per row, its query text embedded by ``embed(texts) -> (n, D)``. Rows whose item
    the SID table lacks are left out and counted."""
    index = ItemIndex(sid_table.column("item_id").to_numpy(zero_copy_only=False))
    train, train_off = on_catalog(train, sid_table.column("item_id"))
    valid, valid_off = on_catalog(valid, sid_table.column("item_id"))

    def requests(log: pa.Table) -> Requests:
        return query_requests(log, embed(log.column("query").to_pylist()), index)

    return TrainingData(
        sid_token_matrix(sid_table.column("sid")), path_token_matrix(sid_table, vocab), requests(train), requests(valid),
        {"train": train_off, "valid": valid_off},
    )  # fmt: skip


BY_USER_TIME = [("user_id", "ascending"), ("timestamp", "ascending")]


def on_catalog(interactions: pa.Table, item_ids: pa.Array | pa.ChunkedArray) -> tuple[pa.Table, int]:
    """The interactions whose item is in ``item_ids``, and how many rows were not."""
    known = pc.is_in(interactions.column("item_id"), value_set=item_ids)
    kept = interactions.filter(known)
    return kept, interactions.num_rows - kept.num_rows


def query_requests(queries: pa.Table, embeddings: np.ndarray, index: ItemIndex) -> Requests:
    """One query request per row of ``queries`` (``query_id``, ``item_id``): ``embeddings[r]`` is the
    text embedding of row r's query, the target its item."""
    targets = index.lookup(queries.column("item_id").to_numpy(zero_copy_only=False)).astype(np.int64)
    ids = queries.column("query_id").to_numpy(zero_copy_only=False)
    return Requests(ids, np.zeros((len(ids), 0), dtype=np.int64), targets, np.asarray(embeddings, dtype=np.float32))


def synthetic_queries(items: pa.Table, *, seed: int, words: int = 3) -> pa.Table:
    """A SYNTHETIC query set, one query per item: NOT a query log, and no retrieval quality may be claimed from it.

    No real query log exists here, so the query path is exercised on text derived from the item
    itself: the leaf of its categories (the last ``>``- or comma-separated part) followed by up to
    ``words`` title words drawn at random (seeded, kept in title order), HTML-unescaped and
    lower-cased. An item with neither title nor categories gets ``""``. Returns ``query_id``
    (int64, the item's row), ``query`` and ``item_id``, in item order; the same seed gives the same
    table. A per-item Python loop over strings: this is small test/benchmark-only data.
    """
    if words < 1:
        raise ValueError(f"synthetic_queries words must be >= 1, got {words}")
    rng = np.random.default_rng(seed)
    titles = _strings(items, "title")
    categories = _strings(items, "categories")
    queries = []
    for title, category in zip(titles, categories):
        leaf = [part.strip() for part in re.split(r"[>,]", html.unescape(category)) if part.strip()][-1:]
        tokens = re.findall(r"\w+", html.unescape(title))
        # One random key per title word; the smallest ``words`` keys pick the words.
        picked = np.sort(np.argsort(rng.random(len(tokens)), kind="stable")[:words])
        queries.append(" ".join(leaf + [tokens[i] for i in picked]).lower())
    query_ids = np.arange(items.num_rows, dtype=np.int64)
    return pa.table({"query_id": query_ids, "query": pa.array(queries, pa.string()), "item_id": items.column("item_id")})


def _strings(items: pa.Table, column: str) -> list[str]:
    """A text column as Python strings, "" where missing (or where the table lacks the column)."""
    if column not in items.column_names:
        return [""] * items.num_rows
    return [value or "" for value in items.column(column).cast(pa.string()).to_pylist()]


def user_token(user_ids: np.ndarray, buckets: int, offset: int) -> np.ndarray:
    """Hashed user token: a stable hash of the id (int or string), so ids need not be dense."""
    ids = np.asarray(user_ids)
    if ids.dtype.kind == "U":  # pandas hashes strings as Python objects, not fixed-width unicode
        ids = ids.astype(object)
    hashed = pd.util.hash_array(ids, categorize=False)
    return (offset + (hashed % np.uint64(buckets))).astype(np.int64)
