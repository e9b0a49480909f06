"""The tokenizer's training sample: about ``per_segment`` items of every segment.

A quantizer learns its codebooks from a sample as well as from the whole catalog once the sample
covers every region of the embedding space, and training memory and time then stop growing with
the catalog. The sample is stratified so that ACRQ's phases each see their segment (the head is
small and usually kept whole; the tail and cold items are most of a large catalog). Membership is
a Bernoulli draw decided by a seeded hash of the item id, so it needs no shuffle, no coordination
between the shards that apply it, and picks the same items on every run and on every worker.
"""

from __future__ import annotations

import numpy as np

from sa2crq.data.segments import SEGMENT_NAMES


def sample_fractions(segment_counts: np.ndarray, per_segment: int) -> np.ndarray:
    """(n_segments,) float64: the share of each segment's items to keep, from the items per segment
    (indexed by segment code); 1 where a segment has at most ``per_segment`` items, or everywhere
    when ``per_segment`` is 0 (no sampling)."""
    counts = np.asarray(segment_counts, dtype=np.float64)
    if not per_segment:
        return np.ones_like(counts)
    return np.minimum(1.0, per_segment / np.maximum(counts, 1.0))


def in_sample(item_ids: np.ndarray, segments: np.ndarray, fractions: np.ndarray, seed: int) -> np.ndarray:
    """bool per item: whether it belongs to the sample (int64 or string ids)."""
    import pandas as pd

    # hash_array: vectorised, and a fixed function of the value (and, for strings, the key) on every
    # machine. Numbers ignore the key, so the seed is mixed in by a second hash.
    hashed = pd.util.hash_array(np.asarray(item_ids), hash_key=f"{seed:016d}"[-16:])
    hashed = pd.util.hash_array(hashed ^ np.uint64((seed * 0x9E3779B97F4A7C15) % (1 << 64)))
    uniform = (hashed >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # 53 bits: exact in float64
    return uniform < fractions[np.asarray(segments, dtype=np.int64)]


def sample_report(segment_counts: np.ndarray, fractions: np.ndarray, per_segment: int) -> dict:
    """What a fit report records of its sample: the cap, and per segment the catalog's items and the
    share drawn."""
    return {
        "per_segment": per_segment,
        "segments": {name: {"items": int(n), "fraction": round(float(f), 6)} for name, n, f in zip(SEGMENT_NAMES, segment_counts, fractions)},
    }
