"""Dataset loaders. Each returns ``(items, interactions)`` as pyarrow tables, unvalidated.

* :func:`read_items` / :func:`read_interactions`: parquet (a file or a directory of files) at a local path
  or any fsspec URL.
* :func:`load_amazon_beauty`: the benchmark of DESIGN §5 (see ``../shared/data/amazon-beauty/README.md``).
* :func:`load_movielens_100k`: MovieLens-100K as shipped inside the ``recbole==1.2.1`` wheel. Its licence
  forbids redistribution, so the wheel is fetched into a caller-given (git-ignored) cache directory and the
  data files are read straight out of the zip; nothing is extracted.

Pass the tables through :mod:`sa2crq.data.validation` before use.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from sa2crq.storage.filesystem import PathLike, read_parquet

__all__ = [
    "BEAUTY_DEFAULT_ROOT",
    "MOVIELENS_WHEEL",
    "beauty_available",
    "fetch_movielens_wheel",
    "load_amazon_beauty",
    "load_movielens_100k",
    "movielens_wheel_path",
    "read_interactions",
    "read_items",
]

# sa2crq/data/datasets.py -> parents[2] is the repository root; the shared data sits beside it. An
# installed package has no such neighbour, hence the environment override.
_REPO_ROOT = Path(__file__).resolve().parents[2]
BEAUTY_DEFAULT_ROOT = Path(
    os.environ.get("SA2CRQ_BEAUTY_ROOT", _REPO_ROOT.parent / "shared" / "data" / "amazon-beauty")
)

MOVIELENS_WHEEL = "recbole-1.2.1-py3-none-any.whl"
# sha256 of the PyPI file: a corrupt or substituted cached wheel is refused rather than parsed.
_MOVIELENS_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
_MOVIELENS_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.{kind}"
# Item 267 is "unkonwn" (sic) in title and year, and two films have the genre "unknown": placeholders,
# not text, so they become null rather than being embedded.
_MOVIELENS_PLACEHOLDERS = ("unknown", "unkonwn")


# --------------------------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------------------------


def read_items(path: PathLike) -> pa.Table:
    """Items parquet at ``path`` (a file or a directory of files; local or any fsspec URL)."""
    return read_parquet(path)


def read_interactions(path: PathLike) -> pa.Table:
    """Interactions parquet at ``path`` (a file or a directory of files; local or any fsspec URL)."""
    return read_parquet(path)


# --------------------------------------------------------------------------------------------------------
# Amazon Beauty
# --------------------------------------------------------------------------------------------------------


def beauty_available(root: PathLike = BEAUTY_DEFAULT_ROOT) -> bool:
    """Whether both Beauty parquet files are present under the local directory ``root``."""
    return all((Path(root) / name).is_file() for name in ("items.parquet", "interactions.parquet"))


def load_amazon_beauty(root: PathLike = BEAUTY_DEFAULT_ROOT) -> tuple[pa.Table, pa.Table]:
    """Amazon Beauty 2014 5-core: items (``item_id``, ``asin``, ``transrec_id``, ``title``, ``categories``)
    and interactions (``user_id``, ``item_id``, ``timestamp``).

    ``timestamp`` is the 0-based position in the user's sequence, not a time (see the data README).
    """
    base = os.fspath(root).rstrip("/")
    return read_items(f"{base}/items.parquet"), read_interactions(f"{base}/interactions.parquet")


# --------------------------------------------------------------------------------------------------------
# MovieLens-100K (from the RecBole wheel)
# --------------------------------------------------------------------------------------------------------


def movielens_wheel_path(cache_dir: PathLike) -> Path:
    """Where :func:`fetch_movielens_wheel` keeps the wheel under ``cache_dir``."""
    return Path(cache_dir) / "wheels" / MOVIELENS_WHEEL


def fetch_movielens_wheel(cache_dir: PathLike) -> Path:
    """The RecBole wheel under ``cache_dir/wheels``, downloaded with pip if it is not there yet."""
    wheel = movielens_wheel_path(cache_dir)
    if not wheel.is_file():
        command = [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"),
            *("recbole==1.2.1", "-d", str(wheel.parent)),
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not wheel.is_file():
            raise RuntimeError(f"could not fetch {MOVIELENS_WHEEL} with {' '.join(command)}:\n{done.stderr}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != _MOVIELENS_WHEEL_SHA256:
        raise RuntimeError(f"{wheel} has sha256 {digest}, expected {_MOVIELENS_WHEEL_SHA256}; delete it and retry")
    return wheel


def load_movielens_100k(cache_dir: PathLike) -> tuple[pa.Table, pa.Table]:
    """MovieLens-100K: 943 users, 1,682 items, 100,000 ratings.

    items: ``item_id`` int64, ``title`` ("Toy Story (1995)"), ``categories`` (genres, "Animation,
    Children's, Comedy"), sorted by ``item_id``. interactions: ``user_id``, ``item_id``, ``timestamp``
    (unix seconds), all int64, in file order (ratings are dropped: every rating counts as an interaction).
    Many ratings share a (user, timestamp); file order is what breaks those ties in the splits.
    """
    with zipfile.ZipFile(fetch_movielens_wheel(cache_dir)) as wheel:
        raw_items = _read_atomic(
            wheel,
            "item",
            {"item_id": pa.int64(), "movie_title": pa.string(), "release_year": pa.string(), "class": pa.string()},
        )
        interactions = _read_atomic(
            wheel, "inter", {"user_id": pa.int64(), "item_id": pa.int64(), "timestamp": pa.int64()}
        )
    items = pa.table(
        {
            "item_id": raw_items["item_id"],
            "title": _movielens_title(raw_items["movie_title"], raw_items["release_year"]),
            "categories": _movielens_genres(raw_items["class"]),
        }
    ).sort_by("item_id")
    return items, interactions


def _read_atomic(wheel: zipfile.ZipFile, kind: str, columns: dict[str, pa.DataType]) -> pa.Table:
    """Read the wanted columns of a RecBole atomic file: tab-separated, header ``name:type``, no quoting."""
    data = wheel.read(_MOVIELENS_MEMBER.format(kind=kind))
    header = data.split(b"\n", 1)[0].decode()
    names = [field.split(":", 1)[0] for field in header.split("\t")]
    return pacsv.read_csv(
        io.BytesIO(data),
        read_options=pacsv.ReadOptions(column_names=names, skip_rows=1),
        # Titles contain quotes and commas verbatim, so quoting must be off.
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=columns, include_columns=list(columns)),
    )


def _movielens_title(title: pa.ChunkedArray, year: pa.ChunkedArray) -> pa.ChunkedArray:
    """``"<title> (<year>)"``; the year is left out where it is not four digits (item 1412 has "V")."""
    title = _null_placeholders(title)
    has_year = pc.match_substring_regex(year, r"^\d{4}$")
    suffix = pc.if_else(has_year, pc.replace_substring_regex(year, r"^(\d{4})$", r" (\1)"), "")
    return pc.binary_join_element_wise(title, suffix, "")


def _movielens_genres(genres: pa.ChunkedArray) -> pa.Array:
    """Space-separated genre tokens to ``"A, B"``, without the "unknown" placeholder.

    RecBole's token_seq separator is a space, so no genre token contains one ("Children's", "Film-Noir").
    """
    tokens = pc.split_pattern(genres.combine_chunks(), " ")
    flat = pc.list_flatten(tokens)
    keep = pc.and_(pc.invert(pc.is_in(flat, pa.array(_MOVIELENS_PLACEHOLDERS))), pc.not_equal(flat, ""))
    # Rebuild the lists from the kept tokens: new offsets from per-row counts of kept tokens.
    per_row = np.bincount(pc.list_parent_indices(tokens).filter(keep).to_numpy(), minlength=len(tokens))
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_row)]), type=pa.int32())
    kept = pa.ListArray.from_arrays(offsets, flat.filter(keep))
    return _null_placeholders(pc.binary_join(kept, ", "))


def _null_placeholders(values: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Null where the value is blank or a MovieLens placeholder for "no data"."""
    blank = pc.equal(pc.utf8_trim_whitespace(values), "")
    empty = pc.or_(blank, pc.is_in(values, pa.array(_MOVIELENS_PLACEHOLDERS)))
    return pc.if_else(empty, pa.scalar(None, values.type), values)
