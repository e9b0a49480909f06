"""SARQ lengths + SID assignment on synthetic full-depth codes, single process.

Codes are drawn so the first levels are skewed (Zipf-like, as real traffic-heavy regions are) and
popularity is Pareto with a cold share, so prefixes, truncation, buckets and digits all occur.
"""

from __future__ import annotations

import time

import numpy as np

from sa2crq.bench import hardware
from sa2crq.config import SIDConfig
from sa2crq.data.segments import TAIL
from sa2crq.ids.sid_table import assign_sids


def run_sarq_benchmark(n_items: int, levels: int, codebook_size: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, codebook_size + 1)
    zipf = (1.0 / ranks) / (1.0 / ranks).sum()
    codes = np.stack([rng.choice(codebook_size, n_items, p=zipf) for _ in range(levels)], axis=1)
    popularity = (rng.pareto(1.2, n_items) * 2).astype(np.int64) * (rng.random(n_items) > 0.1)
    item_ids = rng.permutation(n_items * 4)[:n_items].astype(np.int64)
    start = time.perf_counter()
    table = assign_sids(
        item_ids, codes, popularity, np.full(n_items, TAIL, dtype=np.int8), (codebook_size,) * levels, SIDConfig()
    )
    seconds = time.perf_counter() - start
    return {
        "items": n_items,
        "seconds": round(seconds, 2),
        "items_per_second": int(n_items / seconds),
        "mean_sid_len": round(float(table.sid_len.mean()), 3),
        "max_truncated_bucket": int(table.bucket_size[table.code_depth < levels].max(initial=0)),
        "digit_overflow_items": table.digit_overflow_items,
        "distinct_sids": int(table.sid_index.max()) + 1,
        "hardware": hardware(),
        "seed": seed,
    }
