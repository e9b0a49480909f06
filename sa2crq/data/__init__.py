"""Data: loaders, validation, item text and embeddings, splits.

One item's way in: a loader (:mod:`.datasets`) reads the parquet row; :func:`validate_items` keeps or
quarantines it (:mod:`.validation`); :func:`item_text` builds its text and :class:`TextEmbedder` its
vector (:mod:`.text`, :mod:`.embed`); :mod:`.splits` decides which interactions count as training, and
:func:`popularity` turns those into the traffic counts everything downstream segments by.
"""

from sa2crq.data.datasets import (
    BEAUTY_DEFAULT_ROOT,
    beauty_available,
    fetch_movielens_wheel,
    load_amazon_beauty,
    load_movielens_100k,
    movielens_wheel_path,
    read_interactions,
    read_items,
)
from sa2crq.data.embed import EMBEDDING_DIM, MODEL_ID, TextEmbedder, embed_items, text_key
from sa2crq.data.splits import Split, cold_start_split, leave_one_out, popularity
from sa2crq.data.text import item_text
from sa2crq.data.validation import (
    DEFAULT_TEXT_COLUMNS,
    InputError,
    Validated,
    ValidatedCatalog,
    validate_catalog,
    validate_interactions,
    validate_items,
    validate_queries,
    write_rejects,
)

__all__ = [
    "BEAUTY_DEFAULT_ROOT",
    "DEFAULT_TEXT_COLUMNS",
    "EMBEDDING_DIM",
    "MODEL_ID",
    "InputError",
    "Split",
    "TextEmbedder",
    "Validated",
    "ValidatedCatalog",
    "beauty_available",
    "cold_start_split",
    "embed_items",
    "fetch_movielens_wheel",
    "item_text",
    "leave_one_out",
    "load_amazon_beauty",
    "load_movielens_100k",
    "movielens_wheel_path",
    "popularity",
    "read_interactions",
    "read_items",
    "text_key",
    "validate_catalog",
    "validate_interactions",
    "validate_items",
    "validate_queries",
    "write_rejects",
]
