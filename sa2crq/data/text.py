"""The text an item is embedded from: ``"title | categories | description"``.

Each part is HTML-unescaped (about 10% of Amazon titles carry ``&amp;``, ``&quot;``, ``&#9733;``), its
whitespace collapsed and trimmed; a part that is missing or blank is left out together with its separator,
so an item with only a title embeds as just the title. ``description`` is used only where the column
exists. Categories are taken as given (e.g. ``Beauty > Makeup > Nails``).
"""

from __future__ import annotations

import html

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ITEM_TEXT_PARTS", "ITEM_TEXT_SEPARATOR", "item_text"]

ITEM_TEXT_PARTS: tuple[str, ...] = ("title", "categories", "description")
ITEM_TEXT_SEPARATOR = " | "


def item_text(items: pa.Table) -> list[str]:
    """One embedding text per row of ``items``, in row order; ``""`` for a row with no text at all."""
    parts = [
        _clean(items[column])
        for column in ITEM_TEXT_PARTS
        if column in items.column_names and not pa.types.is_null(items.schema.field(column).type)
    ]
    if not parts:
        return [""] * items.num_rows
    # Fold the parts pairwise: "a | b" where both exist, else whichever exists. (The one-call
    # binary_join_element_wise(..., null_handling="skip") would do this, but pyarrow 26 drops the rows
    # where every part is null, returning a shorter array.)
    separator = pa.scalar(ITEM_TEXT_SEPARATOR, type=pa.large_string())
    joined = parts[0]
    for part in parts[1:]:
        joined = pc.coalesce(pc.binary_join_element_wise(joined, part, separator), joined, part)
    return joined.fill_null("").to_pylist()


def _clean(values: pa.ChunkedArray) -> pa.Array:
    """Unescape HTML entities, collapse whitespace, and turn blank strings into nulls."""
    # One string type for all parts: the join kernel will not mix string and large_string.
    values = _unescape_html(values.combine_chunks().cast(pa.large_string()))
    values = pc.utf8_trim_whitespace(pc.replace_substring_regex(values, r"\s+", " "))
    return pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values)


def _unescape_html(values: pa.Array) -> pa.Array:
    # Arrow has no HTML-entity decoder, so html.unescape runs in Python, but only on the values that
    # contain "&" and could hold an entity at all (about a tenth of Beauty titles).
    mask = pc.match_substring(values, "&").fill_null(False)
    positions = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
    if positions.size == 0:
        return values
    unescaped = [html.unescape(text) for text in values.take(pa.array(positions)).to_pylist()]
    return pc.replace_with_mask(values, mask, pa.array(unescaped, type=values.type))
