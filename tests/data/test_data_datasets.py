"""Loaders: parquet through any filesystem, Amazon Beauty, MovieLens-100K."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sa2crq.data.datasets import (
    beauty_available,
    load_amazon_beauty,
    load_movielens_100k,
    movielens_wheel_path,
    read_interactions,
    read_items,
)
from sa2crq.data.splits import leave_one_out
from sa2crq.data.text import item_text
from sa2crq.data.validation import validate_interactions, validate_items

# The git-ignored cache where the MovieLens wheel is kept (fetched by hand or by a job, never by the tests).
CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache"


def test_read_parquet_local_directory_and_fsspec_url(tmp_path: Path) -> None:
    import fsspec

    table = pa.table({"item_id": [1, 2, 3], "title": ["a", "b", "c"]})
    # Written from pandas, so the file carries pandas schema metadata that the reader should drop.
    pq.write_table(pa.Table.from_pandas(table.to_pandas()), tmp_path / "items.parquet")
    read = read_items(tmp_path / "items.parquet")
    assert read.equals(table) and read.schema.metadata is None  # pandas metadata dropped

    (tmp_path / "parts").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "parts" / "a.parquet")
    pq.write_table(table.slice(2), tmp_path / "parts" / "b.parquet")
    assert read_items(tmp_path / "parts").sort_by("item_id").equals(table)

    with fsspec.open("memory://sa2crq-datasets/inter.parquet", "wb") as handle:
        pq.write_table(pa.table({"user_id": [1], "item_id": [2], "timestamp": [3]}), handle)
    assert read_interactions("memory://sa2crq-datasets/inter.parquet").num_rows == 1


@pytest.mark.beauty
@pytest.mark.skipif(not beauty_available(), reason="Amazon Beauty data not present in ../shared/data")
def test_amazon_beauty() -> None:
    items, interactions = load_amazon_beauty()
    assert items.num_rows == 12_101
    assert interactions.num_rows == 198_502
    assert pc.count_distinct(interactions["user_id"]).as_py() == 22_363

    valid_items = validate_items(items, max_reject_fraction=0.0)
    valid_interactions = validate_interactions(
        interactions, known_item_ids=valid_items.valid["item_id"], max_reject_fraction=0.0
    )
    assert valid_interactions.counts["rows_out"] == 198_502

    split = leave_one_out(interactions)
    assert split.train.num_rows == 198_502 - 2 * 22_363
    assert split.valid.num_rows == split.test.num_rows == 22_363

    texts = item_text(items)
    assert texts[0] == "OPI Nail Lacquer, Simmer and Shimmer, 0.5-Fluid Ounce | Beauty > Makeup > Nails > Nail Polish"
    assert not any("&amp;" in text or "&quot;" in text for text in texts)


@pytest.mark.skipif(
    not movielens_wheel_path(CACHE_DIR).is_file(),
    reason=f"recbole wheel not cached under {CACHE_DIR}/wheels (fetching it is too slow for tests)",
)
def test_movielens_100k() -> None:
    items, interactions = load_movielens_100k(CACHE_DIR)
    assert items.num_rows == 1_682
    assert interactions.num_rows == 100_000
    assert pc.count_distinct(interactions["user_id"]).as_py() == 943
    assert pc.count_distinct(interactions["item_id"]).as_py() == 1_682
    assert interactions.schema == pa.schema([(name, pa.int64()) for name in ("user_id", "item_id", "timestamp")])
    assert np.array_equal(items["item_id"].to_numpy(), np.arange(1, 1_683))

    first = items.slice(0, 1).to_pylist()[0]
    assert first == {"item_id": 1, "title": "Toy Story (1995)", "categories": "Animation, Children's, Comedy"}
    # The data's own placeholders: item 267 is "unkonwn" throughout, item 1412's "year" is "V", and item
    # 1373's only genre is "unknown".
    by_id = {row["item_id"]: row for row in items.to_pylist()}
    assert by_id[267]["title"] is None and by_id[267]["categories"] is None
    assert by_id[1412]["title"] == "Land Before Time III: The Time of the Great Giving (1995)"
    assert by_id[1373] == {"item_id": 1373, "title": "Good Morning (1971)", "categories": None}
    assert validate_items(items).counts["by_reason"] == {"no_text_or_embedding": 1}
