"""SID tokens and full code paths of a SID table."""

from __future__ import annotations

import numpy as np

from sa2crq.config import SegmentConfig, SIDConfig
from sa2crq.data.segments import assign_segments
from sa2crq.ids.sid_table import assign_sids, code_path_tokens
from sa2crq.ids.trie import EOS, PAD


def test_code_path_tokens_spell_every_level_while_sids_may_stop_early():
    rng = np.random.default_rng(0)
    n, levels, k = 200, 3, 4
    item_ids = np.arange(n, dtype=np.int64)
    popularity = rng.integers(0, 50, n)
    codes = rng.integers(0, k, (n, levels))
    table = assign_sids(item_ids, codes, popularity, assign_segments(item_ids, popularity, SegmentConfig()), (k,) * levels, SIDConfig(max_bucket=4))
    paths = table.path_tokens
    assert paths.shape == (n, levels + 2)
    np.testing.assert_array_equal(paths[:, :levels], table.vocab.level_offsets[None, :] + codes)  # every level
    has_digit = table.digit >= 0
    np.testing.assert_array_equal(paths[has_digit, levels], table.vocab.digit_offset + table.digit[has_digit])
    np.testing.assert_array_equal(paths[np.arange(n), levels + has_digit], np.full(n, EOS))
    assert (paths[~has_digit, levels + 1] == PAD).all()
    short = table.code_depth < levels
    assert short.any() and (~short).any()
    # A full-depth SID is its path; a short one is the path's prefix.
    np.testing.assert_array_equal(table.tokens[~short], paths[~short])
    for row in np.flatnonzero(short)[:20]:
        depth = table.code_depth[row]
        np.testing.assert_array_equal(table.tokens[row, :depth], paths[row, :depth])
        assert table.tokens[row, depth] == EOS
    np.testing.assert_array_equal(code_path_tokens(table.codes, table.digit, table.vocab), paths)


def test_the_published_table_gives_the_same_code_paths():
    """What training and serving read back from the SID table's ``codes`` and ``digit`` columns."""
    from sa2crq.retrieval.data import path_token_matrix

    rng = np.random.default_rng(1)
    item_ids = np.arange(50, dtype=np.int64)
    popularity = rng.integers(0, 9, 50)
    table = assign_sids(item_ids, rng.integers(0, 3, (50, 2)), popularity, assign_segments(item_ids, popularity, SegmentConfig()), (3, 3), SIDConfig())
    np.testing.assert_array_equal(path_token_matrix(table.to_arrow(), table.vocab), table.path_tokens)
