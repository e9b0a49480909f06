"""The Spark trie equals the library's SIDTrie.build over the same SID table in item-id order, array for
array, and refuses a broken SID naming its item."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from jobs.config import SparkConfig
from jobs.engines import SparkStaging
from jobs.spark_trie import positions, write_trie_spark
from sa2crq.config import SIDConfig
from sa2crq.data.segments import TAIL
from sa2crq.ids.sid_table import SIDVocabulary, assign_sids
from sa2crq.retrieval.data import sid_token_matrix
from sa2crq.ids.trie import EOS, SIDTrie

K, LEVELS = 4, 3


def _sid_table(n: int, config: SIDConfig, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) * 10**10  # past int32, rows not in id order
    codes = rng.integers(0, K, size=(n, LEVELS))
    pop = (rng.pareto(1.1, n) * 3).astype(np.int64)
    pop[:5] = 1000
    return assign_sids(ids, codes, pop, np.full(n, TAIL), (K,) * LEVELS, config).to_arrow()


@pytest.fixture
def staging(tmp_path):
    staging = SparkStaging(SparkConfig(staging_dir=str(tmp_path / "staging")))
    yield staging
    staging.cleanup()


@pytest.mark.parametrize(
    "n, config",
    [
        (1, SIDConfig()),
        (300, SIDConfig(max_bucket=4)),  # SARQ: lengths 1..4 codes, shared SIDs (buckets)
        (300, SIDConfig(one_item_per_id=True, digit_vocab=400)),  # every SID distinct, digits
    ],
)
def test_spark_trie_equals_the_library(spark, staging, tmp_path, n, config):
    table = _sid_table(n, config, seed=n)
    vocab = SIDVocabulary((K,) * LEVELS, config.digit_vocab)
    sid = table.sort_by("item_id").column("sid")  # serving order
    expected = SIDTrie.build(sid_token_matrix(sid), pc.list_value_length(sid).to_numpy(), vocab.size)
    counts = write_trie_spark(spark.createDataFrame(table.select(["item_id", "sid"]).to_pandas()), vocab.size, str(tmp_path / "trie"), staging)
    written = SIDTrie.load(tmp_path / "trie")
    assert written == expected
    assert (counts.n_nodes, counts.n_sids, counts.n_rows, counts.max_length) == (expected.n_nodes, expected.n_sids, n, expected.max_length)
    if n > 1:  # the case has what it is for: several lengths, shared SIDs or one item per SID
        assert len(set(expected.node_depth[expected.terminal_sid >= 0].tolist())) > 1
        assert (expected.n_sids < n) == (not config.one_item_per_id)


def test_positions_number_rows_in_key_order_across_partitions(spark):
    rng = np.random.default_rng(0)
    keys = rng.permutation(5000).astype(np.int64) * 7
    frame = spark.createDataFrame([(int(k),) for k in keys], "key long").repartition(5)
    held = []
    ranked, count = positions(frame, ["key"], "position", held)
    got = ranked.toPandas().sort_values("key")
    assert count == 5000 and ranked.rdd.getNumPartitions() > 1
    assert got["position"].tolist() == list(range(5000))
    for frame_held in held:
        frame_held.unpersist()


@pytest.mark.parametrize(
    "sid, rule",
    [([5, 9], "EOS .* missing at the end"), ([5, EOS, 9, EOS], "EOS .* in the middle"), ([5, 0, EOS], "PAD .* inside"),
     ([5, 99, EOS], r"token out of range \[0, 20\)"), ([], "empty SID")],  # fmt: skip
)
def test_spark_trie_names_the_first_broken_item(spark, staging, tmp_path, sid, rule):
    rows = [(1, [5, EOS]), (3, sid), (4, [6, 7]), (2, [6, EOS])]
    frame = spark.createDataFrame(rows, "item_id long, sid array<int>")
    with pytest.raises(ValueError, match=rf"item 3: {rule}"):
        write_trie_spark(frame, 20, str(tmp_path / "trie"), staging)
    assert not (tmp_path / "trie" / "trie.json").exists()
