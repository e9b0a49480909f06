"""Input validation: what is accepted, what is quarantined, what is refused.

Policy
------
**Table-level problems refuse the whole input** with :class:`InputError` (a ``ValueError``) whose message
names the table, the column and the rule. These are bugs in whatever produced the table, and no row of it
can be trusted:

* the input has no rows;
* a required column is missing (items: ``item_id``; interactions: ``user_id``, ``item_id``, ``timestamp``);
* a column has the wrong type: ``item_id`` int64 or string; ``user_id`` any integer or string;
  ``timestamp`` an integer or timestamp; text columns string; ``embedding`` a list or fixed-size list of
  floats. Nothing is coerced: a silently cast id is how two catalogs stop joining;
* an items table has neither a text column nor an ``embedding`` column, so no row could ever be valid;
* a caller names a text column that does not exist.

**Row-level problems quarantine the row.** At catalog scale some rows are always broken, and one bad row
must not stop the nightly job. A quarantined row goes to the ``rejects`` table with all its original
columns plus ``reject_reason``: the name of the first rule below that it breaks (one reason per row).

Items, in this order:

``null_item_id``
    ``item_id`` is null.
``duplicate_item_id``
    the id occurs more than once. *Every* row with that id is rejected: there is no way to know which
    copy is right, and keeping the first would make the result depend on file order.
``invalid_utf8``
    a string column (an id, a text column or any other) holds bytes that are not valid UTF-8. Parquet
    does not check what a writer declared as string, and every reader that decodes the value would
    fail on it, far from the row.
``embedding_wrong_dimension``
    a non-null ``embedding`` whose length differs from ``embedding_dim`` (default: the most common
    length among the non-null embeddings, the smaller on a tie).
``embedding_non_finite``
    the embedding holds NaN, ±inf, a null element, or a finite value beyond float32's range
    (``MAX_EMBEDDING_VALUE``): embeddings are stored and used as float32, where it would be inf.
``embedding_zero_norm``
    the embedding's L2 norm is at most 1e-12 (``MIN_EMBEDDING_NORM``), too small to normalise: torch's
    ``F.normalize`` clamps norms at that value, so such a vector would not come out unit length.
``no_text_or_embedding``
    the embedding is null or absent and no text column holds a non-blank value (after stripping).
    An item with a valid embedding needs no text.

A broken embedding rejects the row even when the row also has text: a broken vector means its producer
is broken, and quietly re-embedding from text would hide that.

Interactions, in this order: ``null_user_id``, ``null_item_id``, ``null_timestamp``, ``invalid_utf8`` (as for
items), ``unknown_item_id``
(the item is not among ``known_item_ids``, typically the ids that survived :func:`validate_items`),
``duplicate_interaction`` (the same ``user_id``, ``item_id`` and ``timestamp`` as an earlier row: a
re-sent partition would otherwise count its events twice in popularity; the first copy is kept).

Query logs (``query_id``, ``query``, ``item_id``: what a query retriever trains on), in this order:
``null_query_id``, ``null_item_id``, ``invalid_utf8`` (as for items), ``blank_query`` (the query text is null or
blank after stripping, as an item's text), ``unknown_item_id`` (as for interactions).

**Quarantine has a ceiling.** If the rejected share exceeds ``max_reject_fraction``, the input is refused
with an :class:`InputError` naming the count, the share and up to ten example rows with their reasons: a
mostly broken input is a pipeline bug, not dirty data. The default ceiling of 1.0 never refuses.

**Both tables together** (:func:`validate_catalog`, what a run does): items first, then interactions
against the item ids that survived, so an interaction naming a quarantined or absent item is
``unknown_item_id``, and the two tables must name items by the same id type (integer or string). A run
stops at the first refusal; a dry run (``sa2crq validate``) collects every table's result and refusal.

Valid rows are returned unchanged (same columns, types and order). For every result,
``rows_in == rows_out + rejected``.

All checks are vectorised (pyarrow.compute over columns, numpy over flattened embedding values); only a
string column that fails Arrow's UTF-8 validation is decoded value by value, to find its broken rows.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sa2crq.storage.filesystem import PathLike, resolve_filesystem

__all__ = [
    "DEFAULT_TEXT_COLUMNS",
    "EMBEDDING_COLUMN",
    "INTERACTION_REJECT_REASONS",
    "ITEM_REJECT_REASONS",
    "InputError",
    "MAX_EMBEDDING_VALUE",
    "MIN_EMBEDDING_NORM",
    "QUERY_REJECT_REASONS",
    "REJECTED_INTERACTIONS_FILE",
    "REJECTED_ITEMS_FILE",
    "REJECT_KEY_COLUMNS",
    "REJECT_REASON_COLUMN",
    "Validated",
    "ValidatedCatalog",
    "check_interactions_schema",
    "check_queries_schema",
    "check_embedding_mix",
    "check_item_id_types",
    "check_items_schema",
    "check_reject_ceiling",
    "invalid_utf8_rows",
    "readable_rows",
    "validate_catalog",
    "validate_interactions",
    "validate_items",
    "validate_queries",
    "write_catalog_rejects",
    "write_rejects",
]

DEFAULT_TEXT_COLUMNS: tuple[str, ...] = ("title", "categories", "description")
EMBEDDING_COLUMN = "embedding"
REJECT_REASON_COLUMN = "reject_reason"
MIN_EMBEDDING_NORM = 1e-12
MAX_EMBEDDING_VALUE = float(np.finfo(np.float32).max)

# Rule names in priority order: a row breaking several rules is reported under the first.
ITEM_REJECT_REASONS: tuple[str, ...] = (
    "null_item_id",
    "duplicate_item_id",
    "invalid_utf8",
    "embedding_wrong_dimension",
    "embedding_non_finite",
    "embedding_zero_norm",
    "no_text_or_embedding",
)
INTERACTION_REJECT_REASONS: tuple[str, ...] = (
    "null_user_id",
    "null_item_id",
    "null_timestamp",
    "invalid_utf8",
    "unknown_item_id",
    "duplicate_interaction",
)
QUERY_REJECT_REASONS: tuple[str, ...] = (
    "null_query_id",
    "null_item_id",
    "invalid_utf8",
    "blank_query",
    "unknown_item_id",
)

# The columns that identify a row of each table, in refusal messages and examples.
REJECT_KEY_COLUMNS: dict[str, tuple[str, ...]] = {
    "items": ("item_id",), "interactions": ("user_id", "item_id"), "queries": ("query_id", "item_id"),
}
# File names of a single-machine run's rejects (the jobs write the same tables under their version's prefix).
REJECTED_ITEMS_FILE = "rejected_items.parquet"
REJECTED_INTERACTIONS_FILE = "rejected_interactions.parquet"

_MAX_EXAMPLES = 10


class InputError(ValueError):
    """The input as a whole breaks the data contract; the message names the column and the rule."""


@dataclass(frozen=True)
class Validated:
    """Rows that passed (``valid``) and rows quarantined with a ``reject_reason`` (``rejects``)."""

    valid: pa.Table
    rejects: pa.Table

    @property
    def counts(self) -> dict[str, Any]:
        """``rows_in``, ``rows_out``, ``rejected`` and ``by_reason`` (reason -> rows), for reports and logs."""
        by_reason: dict[str, int] = {}
        if self.rejects.num_rows:
            tallies = pc.value_counts(self.rejects[REJECT_REASON_COLUMN])
            by_reason = dict(
                sorted(zip(tallies.field("values").to_pylist(), tallies.field("counts").to_pylist(), strict=True))
            )
        return {
            "rows_in": self.valid.num_rows + self.rejects.num_rows,
            "rows_out": self.valid.num_rows,
            "rejected": self.rejects.num_rows,
            "by_reason": by_reason,
        }


# --------------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------------


def validate_items(
    table: pa.Table,
    *,
    text_columns: Sequence[str] | None = None,
    embedding_dim: int | None = None,
    max_reject_fraction: float = 1.0,
) -> Validated:
    """Validate an items table (see the module docstring for the rules).

    ``text_columns`` defaults to whichever of ``DEFAULT_TEXT_COLUMNS`` exist. ``embedding_dim`` None means
    the most common length among the non-null embeddings.
    """
    name = "items"
    _check_fraction(max_reject_fraction)
    if table.num_rows == 0:
        raise InputError(f"{name}: input is empty (0 rows)")
    text_columns, has_embedding = check_items_schema(table.schema, text_columns)

    ids = table["item_id"]
    n = table.num_rows
    invalid_utf8 = invalid_utf8_rows(table)
    if has_embedding:
        emb = _embedding_checks(table[EMBEDDING_COLUMN], embedding_dim)
    else:
        emb = _EmbeddingChecks.absent(n)

    rules = {
        "null_item_id": _to_bool(pc.is_null(ids)),
        "duplicate_item_id": _duplicated(ids),
        "invalid_utf8": invalid_utf8,
        "embedding_wrong_dimension": emb.wrong_dimension,
        "embedding_non_finite": emb.non_finite,
        "embedding_zero_norm": emb.zero_norm,
        "no_text_or_embedding": ~emb.present & ~_has_text(table, text_columns, invalid_utf8),
    }
    result = _quarantine(table, ITEM_REJECT_REASONS, rules)
    check_reject_ceiling(name, result, max_reject_fraction)
    return result


def validate_interactions(
    table: pa.Table,
    *,
    known_item_ids: pa.Array | pa.ChunkedArray,
    max_reject_fraction: float = 1.0,
) -> Validated:
    """Validate an interactions table (``user_id``, ``item_id``, ``timestamp``) against the known item ids.

    ``item_id`` must be in the same type family (integer or string) as ``known_item_ids``.
    """
    name = "interactions"
    _check_fraction(max_reject_fraction)
    if table.num_rows == 0:
        raise InputError(f"{name}: input is empty (0 rows)")
    check_interactions_schema(table.schema)

    unknown = _unknown_item_ids(name, table, known_item_ids)
    ids = table["item_id"]
    event = ["user_id", "item_id", "timestamp"]
    first_copies = (
        table.select(event).append_column("_row", pa.array(np.arange(table.num_rows)))
        .group_by(event, use_threads=False).aggregate([("_row", "min")]).column("_row_min").to_numpy()
    )  # fmt: skip
    repeated = np.ones(table.num_rows, dtype=bool)
    repeated[first_copies] = False
    rules = {
        "null_user_id": _to_bool(pc.is_null(table["user_id"])),
        "null_item_id": _to_bool(pc.is_null(ids)),
        "null_timestamp": _to_bool(pc.is_null(table["timestamp"])),
        "invalid_utf8": invalid_utf8_rows(table),
        "unknown_item_id": unknown,
        "duplicate_interaction": repeated,
    }
    result = _quarantine(table, INTERACTION_REJECT_REASONS, rules)
    check_reject_ceiling(name, result, max_reject_fraction)
    return result


def validate_queries(
    table: pa.Table,
    *,
    known_item_ids: pa.Array | pa.ChunkedArray,
    max_reject_fraction: float = 1.0,
) -> Validated:
    """Validate a query log (``query_id``, ``query``, ``item_id``) against the known item ids: the item and
    interaction rules that apply to it, under the same names, and ``blank_query`` for its text."""
    name = "queries"
    _check_fraction(max_reject_fraction)
    if table.num_rows == 0:
        raise InputError(f"{name}: input is empty (0 rows)")
    check_queries_schema(table.schema)
    unknown = _unknown_item_ids(name, table, known_item_ids)
    invalid_utf8 = invalid_utf8_rows(table)
    rules = {
        "null_query_id": _to_bool(pc.is_null(table["query_id"])),
        "null_item_id": _to_bool(pc.is_null(table["item_id"])),
        "invalid_utf8": invalid_utf8,
        "blank_query": ~_has_text(table, ["query"], invalid_utf8),
        "unknown_item_id": unknown,
    }
    result = _quarantine(table, QUERY_REJECT_REASONS, rules)
    check_reject_ceiling(name, result, max_reject_fraction)
    return result


@dataclass(frozen=True)
class ValidatedCatalog:
    """Both tables of a run's input, validated together; ``refusals`` in the order a run meets them.

    A table is None when it was refused before any row could be judged (its schema, or for interactions
    the items' schema, since there are no known ids to check against). Only a dry run gets refusals
    back: a run raises the first.
    """

    items: Validated | None
    interactions: Validated | None
    refusals: tuple[InputError, ...] = ()

    @property
    def counts(self) -> dict[str, Any]:
        """``{"items": ..., "interactions": ...}`` as :attr:`Validated.counts`: a report's ``input`` section."""
        tables = {"items": self.items, "interactions": self.interactions}
        return {name: table.counts for name, table in tables.items() if table is not None}


def validate_catalog(
    items: pa.Table,
    interactions: pa.Table,
    *,
    max_reject_fraction: float = 1.0,
    stop_at_refusal: bool = True,
) -> ValidatedCatalog:
    """Items, then interactions against the item ids that survived (the cross-table rules:
    ``unknown_item_id`` and one item-id type family across both tables), each table's ceiling checked
    as soon as it is validated, in the order a run checks them.

    ``stop_at_refusal`` False (a dry run) quarantines every row whatever the ceilings say and returns
    each refusal instead of raising the first, so one look shows every problem a run would stop on.
    """
    _check_fraction(max_reject_fraction)
    refusals: list[InputError] = []

    def attempt(check: Callable[[], Any]) -> Any:
        try:
            return check()
        except InputError as refusal:
            if stop_at_refusal:
                raise
            refusals.append(refusal)
            return None

    # The ceiling is checked apart from the rules so that a dry run still sees every quarantined row.
    valid_items = attempt(lambda: validate_items(items))
    valid_interactions = None
    if valid_items is None:
        attempt(lambda: check_interactions_schema(interactions.schema))
    else:
        attempt(lambda: check_reject_ceiling("items", valid_items, max_reject_fraction))
        valid_interactions = attempt(
            lambda: validate_interactions(interactions, known_item_ids=valid_items.valid.column("item_id"))
        )
        if valid_interactions is not None:
            attempt(lambda: check_reject_ceiling("interactions", valid_interactions, max_reject_fraction))
    return ValidatedCatalog(valid_items, valid_interactions, tuple(refusals))


def check_items_schema(schema: pa.Schema, text_columns: Sequence[str] | None = None) -> tuple[list[str], bool]:
    """The table-level rules of an items schema; returns (text columns, whether embeddings are given).

    ``text_columns`` defaults to whichever of ``DEFAULT_TEXT_COLUMNS`` exist. Shared with the Spark
    implementation, which checks the same schema before any row is read.
    """
    name = "items"
    _check_schema(name, schema, ("item_id",))
    _require_type(name, schema, "item_id", _is_id_type, "int64 or string")
    if text_columns is None:
        text_columns = [c for c in DEFAULT_TEXT_COLUMNS if c in schema.names]
    else:
        _require_columns(name, schema, text_columns)
    for column in text_columns:
        _require_type(name, schema, column, _is_text_type, "string")
    # As with text, an all-null column that parquet typed as null is simply an absent one.
    has_embedding = EMBEDDING_COLUMN in schema.names and not pa.types.is_null(schema.field(EMBEDDING_COLUMN).type)
    if has_embedding:
        _require_type(name, schema, EMBEDDING_COLUMN, _is_embedding_type, "list or fixed_size_list of float")
    if not text_columns and not has_embedding:
        raise InputError(
            f"{name}: no text column ({', '.join(DEFAULT_TEXT_COLUMNS)}) and no '{EMBEDDING_COLUMN}' column: "
            "no item could be embedded"
        )
    return list(text_columns), has_embedding


def check_interactions_schema(schema: pa.Schema) -> None:
    """The table-level rules of an interactions schema (shared with the Spark implementation)."""
    name = "interactions"
    _check_schema(name, schema, ("user_id", "item_id", "timestamp"))
    _require_type(name, schema, "user_id", _is_user_id_type, "integer or string")
    _require_type(name, schema, "item_id", _is_id_type, "int64 or string")
    _require_type(name, schema, "timestamp", _is_timestamp_type, "integer or timestamp")


def check_queries_schema(schema: pa.Schema) -> None:
    """The table-level rules of a query log's schema."""
    name = "queries"
    _check_schema(name, schema, ("query_id", "query", "item_id"))
    _require_type(name, schema, "query_id", _is_user_id_type, "integer or string")
    _require_type(name, schema, "query", _is_text_type, "string")
    _require_type(name, schema, "item_id", _is_id_type, "int64 or string")


def check_item_id_types(
    item_type: pa.DataType, known_type: pa.DataType, *, table: str = "interactions", column: str = "item_id",
    known: str = "the items'",
) -> None:
    """A table (``table``'s ``column``) must name items by the known items' id type family (integer or string):
    nothing is coerced, since a string id cast to a number (or back) joins the wrong item or none. Shared with
    Spark, ingest (a batch against the published items) and generate (request histories)."""
    if not _is_id_type(known_type):
        raise InputError(f"known_item_ids: type {known_type} breaks rule 'int64 or string'")
    if pa.types.is_integer(known_type) != pa.types.is_integer(item_type):
        raise InputError(
            f"{table}: column '{column}' has type {item_type} but {known} item_id has type "
            f"{known_type}: both must be integer or both string"
        )


def readable_rows(table: pa.Table) -> list[dict[str, Any]]:
    """The rows as Python values for messages; a string that is not valid UTF-8 stays ``bytes``, so that a
    message shows the offending bytes instead of failing to decode them."""
    strings = [f.name for f in table.schema if _is_string(f.type)]
    as_bytes = pa.schema([f.with_type(pa.large_binary()) if f.name in strings else f for f in table.schema])
    rows = table.cast(as_bytes).to_pylist()
    for row in rows:
        for column in strings:
            row[column] = _decoded(row[column])
    return rows


def write_rejects(validated: Validated, path: PathLike) -> str:
    """Write the rejects table as one parquet file at ``path`` (local or any fsspec URL).

    Written even when empty, so that "nothing was rejected" is itself on record. Returns the path written.
    """
    fs, inner = resolve_filesystem(path)
    parent = posixpath.dirname(inner)
    if parent:
        fs.create_dir(parent, recursive=True)
    pq.write_table(validated.rejects, inner, filesystem=fs)
    return str(path)


def check_embedding_mix(items: pa.Table, text_embedding_dim: int) -> None:
    """Validated items that carry their own embedding beside items embedded from text must have the
    text model's dimension: both kinds of vector go to one quantizer. Checked when a run embeds."""
    column = items.column(EMBEDDING_COLUMN) if EMBEDDING_COLUMN in items.column_names else None
    if column is None or pa.types.is_null(column.type) or column.null_count in (0, len(column)):
        return
    own_dim = pc.list_value_length(column).drop_null()[0].as_py()  # validated: every one has the same
    if own_dim != text_embedding_dim:
        raise InputError(
            f"items: {len(column) - column.null_count} items carry an embedding of dimension {own_dim} and "
            f"{column.null_count} are embedded from text by a model of dimension {text_embedding_dim}: "
            "give every item an embedding or none"
        )


def write_catalog_rejects(validated: ValidatedCatalog, out_dir: PathLike) -> dict[str, str]:
    """``rejected_items.parquet`` and ``rejected_interactions.parquet`` under ``out_dir``, as a run writes
    them (a table refused before validation has none); returns name -> path written."""
    base = str(out_dir).rstrip("/")
    files = {"rejected_items": (validated.items, REJECTED_ITEMS_FILE),
             "rejected_interactions": (validated.interactions, REJECTED_INTERACTIONS_FILE)}  # fmt: skip
    return {name: write_rejects(table, f"{base}/{file}") for name, (table, file) in files.items() if table is not None}


def check_reject_ceiling(name: str, result: Validated, max_reject_fraction: float) -> None:
    """Refuse ``result`` (of table ``name``: ``items`` or ``interactions``) when its rejected share exceeds
    ``max_reject_fraction``, naming the count, the share and example rows."""
    _check_fraction(max_reject_fraction)
    keys = REJECT_KEY_COLUMNS[name]
    counts = result.counts
    fraction = counts["rejected"] / counts["rows_in"]
    if fraction <= max_reject_fraction:
        return
    examples = readable_rows(result.rejects.select([*keys, REJECT_REASON_COLUMN]).slice(0, _MAX_EXAMPLES))
    shown = "; ".join(
        ", ".join(f"{k}={row[k]!r}" for k in keys) + f": {row[REJECT_REASON_COLUMN]}" for row in examples
    )
    raise InputError(
        f"{name}: {counts['rejected']} of {counts['rows_in']} rows rejected ({fraction:.2%}), "
        f"above max_reject_fraction={max_reject_fraction:.2%}; by reason {counts['by_reason']}; "
        f"examples: {shown}"
    )


# --------------------------------------------------------------------------------------------------------
# Table-level checks
# --------------------------------------------------------------------------------------------------------


def _check_fraction(max_reject_fraction: float) -> None:
    if not 0.0 <= max_reject_fraction <= 1.0:
        raise ValueError(f"max_reject_fraction must be in [0, 1], got {max_reject_fraction}")


def _require_columns(name: str, schema: pa.Schema, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise InputError(
            f"{name}: missing required column {', '.join(repr(c) for c in missing)} "
            f"(columns present: {', '.join(schema.names) or 'none'})"
        )


def _check_schema(name: str, schema: pa.Schema, required: Sequence[str]) -> None:
    """The checks every input shares: required columns, no reserved column."""
    _require_columns(name, schema, required)
    if REJECT_REASON_COLUMN in schema.names:
        raise InputError(f"{name}: column '{REJECT_REASON_COLUMN}' is reserved for the rejects table")


def _require_type(
    name: str, schema: pa.Schema, column: str, accepts: Callable[[pa.DataType], bool], rule: str
) -> None:
    dtype = schema.field(column).type
    if not accepts(dtype):
        raise InputError(f"{name}: column '{column}' has type {dtype}, breaks rule '{rule}'")


def _is_string(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


def _is_id_type(dtype: pa.DataType) -> bool:
    return pa.types.is_int64(dtype) or _is_string(dtype)


def _is_user_id_type(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or _is_string(dtype)


def _is_timestamp_type(dtype: pa.DataType) -> bool:
    return pa.types.is_integer(dtype) or pa.types.is_timestamp(dtype)


def _is_text_type(dtype: pa.DataType) -> bool:
    # An all-null column read from parquet can come back as type null; it simply holds no text.
    return _is_string(dtype) or pa.types.is_null(dtype)


def _is_embedding_type(dtype: pa.DataType) -> bool:
    is_list = pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)
    return is_list and pa.types.is_floating(dtype.value_type)


# --------------------------------------------------------------------------------------------------------
# Row-level checks (each returns a numpy bool mask over rows)
# --------------------------------------------------------------------------------------------------------


def _to_bool(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _duplicated(ids: pa.ChunkedArray) -> np.ndarray:
    """True for every row whose (non-null) id occurs more than once."""
    tallies = pc.value_counts(ids)
    repeated = tallies.field("values").filter(pc.greater(tallies.field("counts"), 1)).drop_null()
    return _to_bool(pc.is_in(ids, value_set=repeated))


def _decoded(value: bytes | None) -> str | bytes | None:
    try:
        return None if value is None else value.decode("utf-8")
    except UnicodeDecodeError:
        return value


def _unknown_item_ids(name: str, table: pa.Table, known_item_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """True where ``item_id`` is not among the known ids (of the same type family, or ``name`` is refused)."""
    known = known_item_ids.combine_chunks() if isinstance(known_item_ids, pa.ChunkedArray) else known_item_ids
    item_type = table.schema.field("item_id").type
    check_item_id_types(item_type, known.type, table=name)
    return ~_to_bool(pc.is_in(table["item_id"], value_set=known.drop_null().cast(item_type)))


def invalid_utf8_rows(table: pa.Table) -> np.ndarray:
    """True where any string column's value is not valid UTF-8 (Arrow's string kernels raise on it)."""
    invalid = np.zeros(table.num_rows, dtype=bool)
    for field in table.schema:
        if not _is_string(field.type):
            continue
        try:
            table[field.name].validate(full=True)  # vectorised; the common case ends here
            continue
        except pa.ArrowInvalid:
            pass
        # Only a column that fails the vectorised check is decoded value by value, to find its rows.
        values = table[field.name].cast(pa.large_binary()).to_pylist()
        invalid |= np.fromiter((isinstance(_decoded(v), bytes) for v in values), dtype=bool, count=len(values))
    return invalid


def _has_text(table: pa.Table, columns: Sequence[str], invalid_utf8: np.ndarray) -> np.ndarray:
    """True where at least one text column is non-null and non-blank after stripping whitespace; rows in
    ``invalid_utf8`` are quarantined for that and read as having no text (the string kernels would raise)."""
    present = np.zeros(table.num_rows, dtype=bool)
    skip = pa.array(invalid_utf8)
    for column in columns:
        values = table[column]
        if pa.types.is_null(values.type):
            continue
        values = pc.if_else(skip, pa.scalar(None, values.type), values)
        nonblank = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
        present |= _to_bool(nonblank.fill_null(False))
    return present


@dataclass(frozen=True, eq=False)  # holds numpy arrays, which have no single truth value to compare by
class _EmbeddingChecks:
    present: np.ndarray
    wrong_dimension: np.ndarray
    non_finite: np.ndarray
    zero_norm: np.ndarray

    @classmethod
    def absent(cls, n: int) -> _EmbeddingChecks:
        none = np.zeros(n, dtype=bool)
        return cls(present=none, wrong_dimension=none, non_finite=none, zero_norm=none)


def _embedding_checks(column: pa.ChunkedArray, embedding_dim: int | None) -> _EmbeddingChecks:
    """Per-row embedding checks on the flattened values, so ragged lists need no per-row Python."""
    lists = column.combine_chunks()
    n = len(lists)
    present = _to_bool(lists.is_valid())
    # flatten() skips the values behind null rows and honours slicing offsets, so the values line up
    # with the per-row lengths (0 for null rows).
    lengths = pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = lists.flatten()
    # Null elements become NaN here, so they are caught as non-finite.
    values = np.asarray(flat.to_numpy(zero_copy_only=False), dtype=np.float64)
    if values.shape[0] != lengths.sum():
        raise AssertionError("embedding values do not line up with list lengths")

    if embedding_dim is None:
        dims, freq = np.unique(lengths[present], return_counts=True)
        # np.unique sorts, so argmax takes the smaller dimension on a tie.
        embedding_dim = int(dims[np.argmax(freq)]) if dims.size else 0
    wrong_dimension = present & (lengths != embedding_dim)

    row = np.repeat(np.arange(n), lengths)
    bad = ~(np.abs(values) <= MAX_EMBEDDING_VALUE)  # NaN compares False: it is bad too
    with np.errstate(over="ignore"):  # a huge but finite value may square to inf; that is not a zero norm
        squares = np.where(bad, 0.0, values * values)
    non_finite = present & ~wrong_dimension & (np.bincount(row, weights=bad, minlength=n) > 0)
    norm = np.sqrt(np.bincount(row, weights=squares, minlength=n))
    zero_norm = present & ~wrong_dimension & ~non_finite & (norm <= MIN_EMBEDDING_NORM)
    return _EmbeddingChecks(
        present=present, wrong_dimension=wrong_dimension, non_finite=non_finite, zero_norm=zero_norm
    )


# --------------------------------------------------------------------------------------------------------
# Quarantine
# --------------------------------------------------------------------------------------------------------


def _quarantine(table: pa.Table, reasons: Sequence[str], rules: dict[str, np.ndarray]) -> Validated:
    """Split ``table`` by the rule masks; a row breaking several rules gets the first in ``reasons``."""
    n = table.num_rows
    first_broken = np.full(n, -1, dtype=np.int64)
    # Assign from the last rule to the first so that earlier rules overwrite later ones.
    for index in range(len(reasons) - 1, -1, -1):
        first_broken[rules[reasons[index]]] = index
    rejected = first_broken >= 0

    names = np.asarray(reasons, dtype=object)[first_broken[rejected]]
    rejects = table.filter(pa.array(rejected)).append_column(
        REJECT_REASON_COLUMN, pa.array(names, type=pa.string())
    )
    valid = table.filter(pa.array(~rejected))
    if valid.num_rows + rejects.num_rows != n:
        raise AssertionError(f"rows_in {n} != rows_out {valid.num_rows} + rejected {rejects.num_rows}")
    return Validated(valid=valid, rejects=rejects)
