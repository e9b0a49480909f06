"""The bad-input policy of sa2crq.data.validation: one test per rule, and the books always balance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sa2crq.data.validation import (
    ITEM_REJECT_REASONS,
    InputError,
    Validated,
    validate_interactions,
    validate_items,
    write_rejects,
)

DIM = 4
# Each breaks UTF-8 differently: a stray byte, an overlong '/', a UTF-16 surrogate, a cut 3-byte
# sequence, a code point beyond U+10FFFF.
INVALID_UTF8 = [b"bad\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]


def unchecked_strings(values: list[bytes | None]) -> pa.Array:
    """A string array holding the bytes as given, unchecked. pyarrow writes it to parquet as a string column:
    how a file declared string comes to hold bytes that are not UTF-8."""
    return pa.array(values, pa.binary()).view(pa.string())


def items_table(embeddings: list[list[float] | None] | None = None, **columns: list) -> pa.Table:
    data: dict[str, pa.Array] = {name: pa.array(values) for name, values in columns.items()}
    if embeddings is not None:
        data["embedding"] = pa.array(embeddings, type=pa.list_(pa.float32()))
    return pa.table(data)


def balanced(result: Validated) -> dict:
    counts = result.counts
    assert counts["rows_in"] == counts["rows_out"] + counts["rejected"]
    assert counts["rejected"] == sum(counts["by_reason"].values())
    return counts


def reasons_by_id(result: Validated) -> dict:
    return dict(zip(result.rejects["item_id"].to_pylist(), result.rejects["reject_reason"].to_pylist(), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Items: row-level rules
# ---------------------------------------------------------------------------------------------------------


def test_clean_items_pass_unchanged() -> None:
    table = items_table(item_id=[1, 2], title=["a", "b"], categories=["x", None])
    result = validate_items(table)
    assert result.valid.equals(table)
    assert result.rejects.num_rows == 0
    assert result.rejects.schema.names == [*table.schema.names, "reject_reason"]
    assert balanced(result) == {"rows_in": 2, "rows_out": 2, "rejected": 0, "by_reason": {}}


def test_null_item_id() -> None:
    result = validate_items(items_table(item_id=[1, None, 3], title=["a", "b", "c"]))
    assert result.valid["item_id"].to_pylist() == [1, 3]
    assert result.rejects["reject_reason"].to_pylist() == ["null_item_id"]
    assert balanced(result)["by_reason"] == {"null_item_id": 1}


def test_duplicate_ids_reject_every_copy() -> None:
    result = validate_items(items_table(item_id=["a", "b", "a", "c", "a"], title=["1", "2", "3", "4", "5"]))
    assert result.valid["item_id"].to_pylist() == ["b", "c"]
    assert result.rejects["title"].to_pylist() == ["1", "3", "5"]  # original columns kept, all copies out
    assert balanced(result)["by_reason"] == {"duplicate_item_id": 3}


@pytest.mark.parametrize(
    ("title", "categories", "rejected"),
    [
        (None, None, True),
        ("", None, True),
        ("  \t ", "\n", True),
        ("t", None, False),
        (None, "Beauty > Nails", False),
        ("  ", "Beauty", False),
    ],
)
def test_text_presence(title: str | None, categories: str | None, rejected: bool) -> None:
    table = pa.table(
        {
            "item_id": [1, 2],
            "title": pa.array([title, "ok"], pa.string()),
            "categories": pa.array([categories, None], pa.string()),
        }
    )
    result = validate_items(table)
    assert reasons_by_id(result) == ({1: "no_text_or_embedding"} if rejected else {})
    balanced(result)


def test_description_counts_as_text_and_explicit_text_columns_are_honoured() -> None:
    table = items_table(item_id=[1, 2], title=[None, "t"], description=["d", None])
    assert validate_items(table).rejects.num_rows == 0
    only_title = validate_items(table, text_columns=["title"])
    assert reasons_by_id(only_title) == {1: "no_text_or_embedding"}


def test_valid_embedding_needs_no_text() -> None:
    table = items_table([[1, 0, 0, 0], None], item_id=[1, 2], title=pa.array([None, None], pa.string()))
    result = validate_items(table)
    assert result.valid["item_id"].to_pylist() == [1]
    assert reasons_by_id(result) == {2: "no_text_or_embedding"}


@pytest.mark.parametrize(
    ("vector", "reason"),
    [
        ([1.0, math.nan, 0.0, 0.0], "embedding_non_finite"),
        ([1.0, math.inf, 0.0, 0.0], "embedding_non_finite"),
        ([-math.inf, 0.0, 0.0, 0.0], "embedding_non_finite"),
        ([1.0, None, 0.0, 0.0], "embedding_non_finite"),
        ([1e39, 0.0, 0.0, 0.0], "embedding_non_finite"),  # finite in float64, inf as float32
        ([0.0, 0.0, 0.0, 0.0], "embedding_zero_norm"),
        ([1e-20, 0.0, 0.0, 0.0], "embedding_zero_norm"),
        ([1.0, 2.0, 3.0], "embedding_wrong_dimension"),
        ([1.0, 2.0, 3.0, 4.0, 5.0], "embedding_wrong_dimension"),
        ([], "embedding_wrong_dimension"),
    ],
)
def test_bad_embedding_rejected_even_with_text(vector: list, reason: str) -> None:
    good = [[0.5, 0.5, 0.5, 0.5]] * 3
    table = items_table([*good, vector], item_id=[1, 2, 3, 4], title=["a", "b", "c", "d"])
    result = validate_items(table)  # dimension inferred: 4 is the majority
    assert reasons_by_id(result) == {4: reason}
    assert balanced(result)["rows_out"] == 3


def test_embedding_dimension_explicit_and_fixed_size_list() -> None:
    values = pa.array(np.arange(1, 13, dtype=np.float32))
    fixed = pa.FixedSizeListArray.from_arrays(values, 4)
    table = pa.table({"item_id": [1, 2, 3], "embedding": fixed})
    assert validate_items(table).rejects.num_rows == 0
    wrong = validate_items(table, embedding_dim=8)
    assert set(wrong.rejects["reject_reason"].to_pylist()) == {"embedding_wrong_dimension"}
    balanced(wrong)


def test_embedding_checks_respect_chunks_and_slices() -> None:
    # Flattened values must line up with rows even when the column is chunked and sliced.
    good = pa.array([[1.0, 0.0], [0.0, 1.0], [math.nan, 1.0]], type=pa.list_(pa.float64()))
    chunked = pa.chunked_array([good.slice(1, 2), pa.array([None, [0.0, 0.0]], type=good.type)])
    table = pa.table({"item_id": [1, 2, 3, 4], "title": ["a", "b", "c", "d"], "embedding": chunked})
    assert reasons_by_id(validate_items(table)) == {2: "embedding_non_finite", 4: "embedding_zero_norm"}


def test_first_rule_wins() -> None:
    # Duplicate id and broken embedding: reported once, under the earlier rule.
    table = items_table([[math.nan] * DIM, [1.0] * DIM], item_id=[7, 7], title=["a", "b"])
    assert validate_items(table).rejects["reject_reason"].to_pylist() == ["duplicate_item_id"] * 2


def test_every_item_rule_is_exercised_together() -> None:
    table = items_table(
        [[1] * 4, [1] * 4, None, [1] * 4, [1] * 2, [math.nan, 1, 1, 1], [0] * 4, None, [1] * 4, [1] * 4],
        item_id=[1, None, 3, 3, 5, 6, 7, 8, 9, 10],
    ).append_column("title", unchecked_strings([b"t", b"t", b"t", b"t", b"t", b"t", b"t", None, None, b"\xff"]))
    counts = balanced(validate_items(table, embedding_dim=DIM))
    expected = {reason: (2 if reason == "duplicate_item_id" else 1) for reason in ITEM_REJECT_REASONS}
    assert counts["by_reason"] == expected
    assert counts["rows_out"] == 2


def test_invalid_utf8_in_any_string_column_quarantines_the_row(tmp_path: Path) -> None:
    # Read back from parquet, as a run reads its input: the file is declared string, its bytes are not UTF-8.
    values = [b"ok", b"caf\xc3\xa9 \xf0\x9f\x98\x80", None, *INVALID_UTF8]
    n = len(values)
    table = pa.table({"item_id": pa.array(range(n), pa.int64()), "title": unchecked_strings(values),
                      "brand": unchecked_strings([b"\xff", *[b"b"] * (n - 1)])})  # fmt: skip
    pq.write_table(table, tmp_path / "items.parquet")
    result = validate_items(pq.read_table(tmp_path / "items.parquet"))
    assert reasons_by_id(result) == {0: "invalid_utf8", 2: "no_text_or_embedding"} | {3 + i: "invalid_utf8" for i in range(5)}
    assert result.valid["title"].to_pylist() == ["caf\u00e9 \U0001f600"]
    balanced(result)


def test_invalid_utf8_ids_and_refusal_examples_show_the_bytes() -> None:
    table = pa.table({"user_id": unchecked_strings([b"u\xff", b"u"]), "item_id": unchecked_strings([b"a", b"a\xfe"]),
                      "timestamp": [1, 2]})  # fmt: skip
    result = validate_interactions(table, known_item_ids=pa.array(["a"]))
    assert result.rejects["reject_reason"].to_pylist() == ["invalid_utf8", "invalid_utf8"]
    with pytest.raises(InputError, match=r"user_id=b'u\\xff', item_id='a': invalid_utf8"):
        validate_interactions(table, known_item_ids=pa.array(["a"]), max_reject_fraction=0.5)


# ---------------------------------------------------------------------------------------------------------
# Items: table-level errors
# ---------------------------------------------------------------------------------------------------------


def test_empty_input() -> None:
    with pytest.raises(InputError, match="empty"):
        validate_items(pa.table({"item_id": pa.array([], pa.int64()), "title": pa.array([], pa.string())}))


def test_missing_item_id() -> None:
    with pytest.raises(InputError, match="missing required column 'item_id'"):
        validate_items(pa.table({"title": ["a"]}))


def test_missing_named_text_column() -> None:
    with pytest.raises(InputError, match="'description'"):
        validate_items(items_table(item_id=[1], title=["a"]), text_columns=["title", "description"])


def test_no_text_and_no_embedding_column() -> None:
    with pytest.raises(InputError, match="no text column"):
        validate_items(pa.table({"item_id": [1], "price": [3.0]}))


@pytest.mark.parametrize(
    ("column", "values", "rule"),
    [
        ("item_id", pa.array([1, 2], pa.int32()), "int64 or string"),
        ("item_id", pa.array([1.0, 2.0]), "int64 or string"),
        ("title", pa.array([1, 2]), "string"),
        ("embedding", pa.array([[1, 2], [3, 4]], pa.list_(pa.int64())), "list or fixed_size_list of float"),
        ("embedding", pa.array([1.0, 2.0]), "list or fixed_size_list of float"),
    ],
)
def test_wrong_item_column_type(column: str, values: pa.Array, rule: str) -> None:
    data = {"item_id": pa.array([1, 2]), "title": pa.array(["a", "b"])}
    data[column] = values
    with pytest.raises(InputError, match=f"column '{column}'.*{rule}"):
        validate_items(pa.table(data))


def test_string_ids_and_large_strings_accepted() -> None:
    table = pa.table({name: pa.array(["x", "y"], pa.large_string()) for name in ("item_id", "title")})
    assert validate_items(table).valid.num_rows == 2


def test_max_reject_fraction_names_count_fraction_and_ids() -> None:
    ids = list(range(100, 120))
    titles = ["t"] * 8 + [None] * 12
    table = items_table(item_id=ids, title=titles)
    with pytest.raises(InputError) as raised:
        validate_items(table, max_reject_fraction=0.5)
    message = str(raised.value)
    assert "12 of 20" in message and "60.00%" in message
    assert "item_id=108: no_text_or_embedding" in message
    # Ten examples at most.
    assert "item_id=117" in message and "item_id=118" not in message
    # At the ceiling exactly, it passes.
    assert validate_items(table, max_reject_fraction=0.6).counts["rejected"] == 12


# ---------------------------------------------------------------------------------------------------------
# Interactions
# ---------------------------------------------------------------------------------------------------------

KNOWN = pa.array([10, 20, 30])


def test_interaction_rules() -> None:
    table = pa.table(
        {
            "user_id": [1, None, 1, 2, 2, 3],
            "item_id": pa.array([10, 20, None, 99, 30, 20]),
            "timestamp": [1, 2, 3, None, 5, 6],
        }
    )
    result = validate_interactions(table, known_item_ids=KNOWN)
    assert result.rejects["reject_reason"].to_pylist() == ["null_user_id", "null_item_id", "null_timestamp"]
    assert result.valid["item_id"].to_pylist() == [10, 30, 20]
    counts = balanced(result)
    assert counts == {
        "rows_in": 6,
        "rows_out": 3,
        "rejected": 3,
        "by_reason": {"null_item_id": 1, "null_timestamp": 1, "null_user_id": 1},
    }


def test_unknown_item_id() -> None:
    table = pa.table({"user_id": ["u", "u", "v"], "item_id": [10, 11, 30], "timestamp": [1, 2, 3]})
    result = validate_interactions(table, known_item_ids=pa.chunked_array([[10], [30, None]]))
    assert result.rejects.to_pylist() == [
        {"user_id": "u", "item_id": 11, "timestamp": 2, "reject_reason": "unknown_item_id"}
    ]
    balanced(result)


def test_string_item_ids_match_across_string_widths() -> None:
    table = pa.table({"user_id": [1, 2], "item_id": pa.array(["a", "z"], pa.large_string()), "timestamp": [1, 2]})
    result = validate_interactions(table, known_item_ids=pa.array(["a", "b"], pa.string()))
    assert reasons_by_id(result) == {"z": "unknown_item_id"}


def test_timestamp_type_may_be_a_timestamp() -> None:
    table = pa.table({"user_id": [1], "item_id": [10], "timestamp": pa.array([0], pa.timestamp("s"))})
    assert validate_interactions(table, known_item_ids=KNOWN).valid.num_rows == 1


@pytest.mark.parametrize(
    ("column", "values"),
    [
        ("user_id", pa.array([1.5])),
        ("item_id", pa.array(["10"])),  # string ids against integer catalog ids
        ("item_id", pa.array([10], pa.int32())),
        ("timestamp", pa.array(["2014-01-01"])),
        ("timestamp", pa.array([1.5])),
    ],
)
def test_wrong_interaction_column_type(column: str, values: pa.Array) -> None:
    data = {"user_id": pa.array([1]), "item_id": pa.array([10]), "timestamp": pa.array([1])}
    data[column] = values
    with pytest.raises(InputError, match=f"'{column}'"):
        validate_interactions(pa.table(data), known_item_ids=KNOWN)


def test_interactions_missing_column_and_empty() -> None:
    with pytest.raises(InputError, match="missing required column 'timestamp'"):
        validate_interactions(pa.table({"user_id": [1], "item_id": [10]}), known_item_ids=KNOWN)
    empty = pa.table({name: pa.array([], pa.int64()) for name in ("user_id", "item_id", "timestamp")})
    with pytest.raises(InputError, match="empty"):
        validate_interactions(empty, known_item_ids=KNOWN)


def test_interactions_ceiling_names_examples() -> None:
    table = pa.table({"user_id": [1, 2, 3], "item_id": [10, 77, 88], "timestamp": [1, 2, 3]})
    with pytest.raises(InputError, match=r"2 of 3 .*item_id=77: unknown_item_id; .*item_id=88"):
        validate_interactions(table, known_item_ids=KNOWN, max_reject_fraction=0.1)


# ---------------------------------------------------------------------------------------------------------
# Rejects on disk
# ---------------------------------------------------------------------------------------------------------


def test_write_rejects_always_writes(tmp_path: Path) -> None:
    clean = validate_items(items_table(item_id=[1], title=["a"]))
    path = write_rejects(clean, tmp_path / "nested" / "rejects.parquet")
    written = pq.read_table(path)
    assert written.num_rows == 0 and "reject_reason" in written.column_names

    dirty = validate_items(items_table(item_id=[1, 1], title=["a", "b"]))
    write_rejects(dirty, tmp_path / "dirty.parquet")
    assert pq.read_table(tmp_path / "dirty.parquet").equals(dirty.rejects)


def test_write_rejects_to_fsspec_url() -> None:
    import fsspec

    dirty = validate_items(items_table(item_id=[1, 1], title=["a", "b"]))
    write_rejects(dirty, "memory://sa2crq-test/rejects.parquet")
    with fsspec.open("memory://sa2crq-test/rejects.parquet", "rb") as handle:
        assert pq.read_table(handle).num_rows == 2
