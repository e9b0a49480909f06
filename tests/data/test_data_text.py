"""item_text: the exact string each item is embedded from."""

from __future__ import annotations

import pyarrow as pa

from sa2crq.data.text import item_text


def test_title_and_categories_joined_and_unescaped() -> None:
    items = pa.table(
        {
            "item_id": [1, 2, 3],
            "title": pa.array(
                ["Rose &amp; Oud &quot;Intense&quot;", "Star &#9733; Serum", "Plain"], pa.large_string()
            ),
            "categories": ["Beauty > Fragrance", "Beauty > Skin Care", "Beauty > Makeup > Nails"],
        }
    )
    assert item_text(items) == [
        'Rose & Oud "Intense" | Beauty > Fragrance',
        "Star \u2605 Serum | Beauty > Skin Care",
        "Plain | Beauty > Makeup > Nails",
    ]


def test_missing_parts_are_omitted_cleanly() -> None:
    items = pa.table(
        {
            "title": pa.array(["  Only  title ", None, "   ", None], pa.string()),
            "categories": pa.array([None, "Only > Cats", None, None], pa.string()),
        }
    )
    assert item_text(items) == ["Only title", "Only > Cats", "", ""]


def test_description_appended_only_when_present() -> None:
    items = pa.table({"title": ["T", "T", None], "categories": ["C", None, None], "description": ["D", "D", "D"]})
    assert item_text(items) == ["T | C | D", "T | D", "D"]


def test_no_text_columns_and_chunked_input() -> None:
    assert item_text(pa.table({"item_id": [1, 2]})) == ["", ""]
    chunked = pa.table({"title": pa.chunked_array([["a"], ["b &lt; c"]])})
    assert item_text(chunked) == ["a", "b < c"]
