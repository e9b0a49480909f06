"""``sa2crq bench generate`` on a tiny setting: every configuration measured in its own process,
fast and reference side by side (the speed targets are read from its printed numbers, never here)."""

from __future__ import annotations

import numpy as np

from sa2crq.bench.generation_speed import CATALOG_ITEMS, format_generation_table, run_generation_benchmark, synthetic_catalog
from sa2crq.ids.trie import EOS, PAD, SIDTrie


def test_synthetic_catalog_has_distinct_tiger_style_ids():
    tokens, vocab = synthetic_catalog(seed=0)
    assert tokens.shape == (CATALOG_ITEMS, 5) and np.all(tokens[:, 4] == EOS) and np.all(tokens[:, :4] > EOS)
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), vocab)
    assert trie.n_sids == CATALOG_ITEMS  # the collision digit makes every ID unique
    assert np.array_equal(tokens, synthetic_catalog(seed=0)[0]) and not np.array_equal(tokens, synthetic_catalog(seed=1)[0])


def test_benchmark_measures_every_configuration_and_prints_the_speed_up():
    result = run_generation_benchmark(shapes=["cpu"], beams=[3], batches=[1, 4], requests=4, max_seconds=2.0)
    rows = result["rows"]
    assert [(r["batch_size"], r["implementation"]) for r in rows] == [(1, "fast"), (1, "reference"), (4, "fast"), (4, "reference")]
    for row in rows:
        assert row["requests_timed"] >= 1 and row["requests_per_second"] > 0 and row["ms_per_request"] > 0
        assert 0 < row["constraint_us_per_request"] < row["search_loop_us_per_request"]
        assert row["peak_memory_mb"] >= 0
    assert set(result["allocator"]) == {"MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"}
    table = format_generation_table(result).splitlines()
    assert len(table) == 2 + 2  # header, rule, one line per shape x beam x batch
    assert table[2].startswith("| cpu (0.5M) | 3 | 1 |") and "x |" in table[2]
