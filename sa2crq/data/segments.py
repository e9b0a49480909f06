"""Head / torso / tail / cold segments by training popularity (DESIGN §3).

Items are ranked by popularity, descending, ties broken by item id ascending. The first
``floor(head_fraction * N)`` ranks are head, the next ``floor(torso_fraction * N)`` torso, the
rest tail; any item with popularity 0 is cold, whatever its rank. Callers pass training
interactions only (evaluation code passes the training split), so segments never see the future.
"""

from __future__ import annotations

import numpy as np

from sa2crq.config import SegmentConfig

HEAD, TORSO, TAIL, COLD = 0, 1, 2, 3
SEGMENT_NAMES = ("head", "torso", "tail", "cold")


def popularity_rank(item_ids: np.ndarray, popularity: np.ndarray) -> np.ndarray:
    """0-based rank of every item: most popular first, ties by item id."""
    order = np.lexsort((item_ids, -popularity.astype(np.int64)))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def assign_segments(item_ids: np.ndarray, popularity: np.ndarray, config: SegmentConfig) -> np.ndarray:
    """Segment code (HEAD, TORSO, TAIL or COLD) per item, int8."""
    n = len(item_ids)
    if len(popularity) != n:
        raise ValueError(f"popularity has {len(popularity)} entries for {n} items")
    if n and popularity.min() < 0:
        raise ValueError("popularity must be non-negative")
    rank = popularity_rank(np.asarray(item_ids), np.asarray(popularity))
    n_head = int(np.floor(config.head_fraction * n))
    n_torso = int(np.floor(config.torso_fraction * n))
    segments = np.full(n, TAIL, dtype=np.int8)
    segments[rank < n_head + n_torso] = TORSO
    segments[rank < n_head] = HEAD
    segments[np.asarray(popularity) == 0] = COLD
    return segments


def segment_codes(names) -> np.ndarray:
    """Segment codes (int8) of a column of segment names, as stored in parquet; an unknown name is an error."""
    import pyarrow as pa
    import pyarrow.compute as pc

    codes = pc.index_in(names, pa.array(SEGMENT_NAMES))
    if codes.null_count:
        raise ValueError(f"{codes.null_count} segment names are not among {', '.join(SEGMENT_NAMES)}")
    return codes.to_numpy(zero_copy_only=False).astype(np.int8)
