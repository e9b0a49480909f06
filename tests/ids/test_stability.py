"""SID stability across versions (DESIGN §3.3a): recode with hysteresis, ingest, churn and remap."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sa2crq.config import SIDConfig, TokenizerConfig
from sa2crq.ids.sid_table import SIDTable, assign_sids, sid_groups
from sa2crq.ids.stability import PublishedSIDs, sid_churn, stable_assign_sids
from sa2crq.quantize.sarq import prefix_group_ids, sarq_lengths

K = 4  # codebook size of the hand-made catalogs


def _assign(ids, codes, pop, config) -> SIDTable:
    n, levels = codes.shape
    return assign_sids(ids, codes, pop, np.zeros(n, dtype=np.int8), (int(codes.max()) + 1,) * levels, config)


def _stable(previous: SIDTable, ids, codes, pop, config, **kwargs):
    n, levels = codes.shape
    published = PublishedSIDs.from_arrow(previous.to_arrow())
    sizes = previous.vocab.codebook_sizes
    return stable_assign_sids(published, ids, codes, pop, np.zeros(n, dtype=np.int8), sizes, config, **kwargs)


def _tokens_by_id(table: SIDTable) -> dict:
    return {item: tuple(row) for item, row in zip(table.item_ids.tolist(), table.tokens.tolist())}


def assert_invariants(table: SIDTable, config: SIDConfig) -> None:
    """The promises of assign_sids: one token sequence per SID, distinct SIDs except truncated buckets
    and the overflow digit, capped truncated buckets, unique digits inside a full-depth group."""
    levels = table.codes.shape[1]
    last = config.digit_vocab - 1
    _, by_tokens = np.unique(table.tokens, axis=0, return_inverse=True)
    assert len(np.unique(np.stack([by_tokens.reshape(-1), table.sid_index], 1), axis=0)) == table.sid_index.max() + 1
    assert len(np.unique(by_tokens)) == table.sid_index.max() + 1
    shared = table.bucket_size > 1
    truncated = table.code_depth < levels
    if config.one_item_per_id:
        assert (~shared | (table.digit == last)).all()
    else:
        assert (~shared | truncated | (table.digit == last)).all()
    before_digit = sid_groups(prefix_group_ids(table.codes), table.code_depth)
    group_size = np.bincount(before_digit)[before_digit]
    assert (group_size[truncated] <= config.max_bucket).all()
    regular = (table.digit >= 0) & (table.digit < last)
    pairs = np.stack([before_digit[regular], table.digit[regular]], 1)
    assert len(np.unique(pairs, axis=0)) == len(pairs)
    no_digit_full = (table.digit < 0) & ~truncated
    assert (np.bincount(before_digit[no_digit_full], minlength=len(group_size)) <= 1).all()
    assert table.digit_overflow_items == int(((table.digit == last) & shared).sum())


def hand_catalog():
    """8 hot items under first code 0 (full depth), 48 cold ones under codes 1..3 (depth-1 buckets of 16).

    W = 8 * 1001 + 48 = 8056 and tau = 5 give a keep threshold of 252."""
    hot = np.array([[0, i // K, i % K] for i in range(8)])
    cold = np.array([[a, b, c] for a in (1, 2, 3) for b in range(K) for c in range(K)])
    codes = np.concatenate([hot, cold])
    pop = np.concatenate([np.full(8, 1000), np.zeros(len(cold))]).astype(np.int64)
    return np.arange(len(codes), dtype=np.int64) * 3 + 1, codes, pop


HAND = SIDConfig(tau=5.0)


def random_catalog(seed: int, n: int = 500, levels: int = 3, k: int = 6):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, k, size=(n, levels))
    pop = (rng.pareto(1.1, n) * 3).astype(np.int64) * (rng.random(n) < 0.6)
    pop[:10] = 5000  # a few items carry the traffic, so the cold rest is truncated
    return rng.permutation(20 * n)[:n].astype(np.int64), codes, pop


CONFIGS = [
    SIDConfig(max_bucket=12),  # depths 1, 2 and 3, buckets and digits all occur
    SIDConfig(adaptive_length=False, always_digit=True, digit_vocab=3),  # with digit overflow
    SIDConfig(max_bucket=12, one_item_per_id=True, digit_vocab=256),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["sarq", "fixed-digits", "one-per-id"])
def test_same_codes_and_popularity_reproduce_the_published_table(config):
    ids, codes, pop = random_catalog(0)
    previous = _assign(ids, codes, pop, config)
    assert_invariants(previous, config)
    table, stats = _stable(previous, ids, codes, pop, config)
    assert table.to_arrow().equals(previous.to_arrow())
    # The Spark job writes codes as variable-length lists: the same published SIDs.
    published = previous.to_arrow()
    spark_shaped = published.set_column(
        published.schema.get_field_index("codes"), "codes", published.column("codes").cast(pa.list_(pa.int32()))
    )
    np.testing.assert_array_equal(PublishedSIDs.from_arrow(spark_shaped).codes, previous.codes)
    assert (stats.pinned, stats.placed, stats.new_items, stats.removed_items) == (len(ids), 0, 0, 0)
    churn, remap = sid_churn(previous.to_arrow(), table.to_arrow())
    assert churn["churn"] == 0.0 and remap.num_rows == 0
    # Row order does not matter.
    perm = np.random.default_rng(1).permutation(len(ids))
    shuffled, _ = _stable(previous, ids[perm], codes[perm], pop[perm], config)
    assert _tokens_by_id(shuffled) == _tokens_by_id(previous)


def test_mass_moves_within_the_hysteresis_band_keep_every_sid():
    ids, codes, pop = hand_catalog()
    previous = _assign(ids, codes, pop, HAND)
    assert previous.threshold == 252 and np.bincount(previous.code_depth).tolist() == [0, 48, 0, 8]
    shifted = pop.copy()
    shifted[:8] += np.arange(8) - 4  # hot items drift a little
    warming = (codes[:, 0] == 1) & (codes[:, 1] == 0)
    shifted[warming] = 100  # prefix [1, 0] now reaches the threshold (not twice it): fresh depth 2 for these four
    fresh, _, _ = sarq_lengths(codes, shifted, HAND)
    assert (fresh - previous.code_depth).tolist() == warming.astype(int).tolist()

    table, stats = _stable(previous, ids, codes, shifted, HAND)
    assert (stats.pinned, stats.moved_by_hysteresis) == (len(ids), 0)
    np.testing.assert_array_equal(table.tokens, previous.tokens)
    np.testing.assert_array_equal(table.popularity, shifted)  # the new popularity is published
    assert sid_churn(previous.to_arrow(), table.to_arrow())[0]["churn"] == 0.0

    # Without hysteresis the same shift moves exactly those four items.
    strict = SIDConfig(tau=5.0, hysteresis_bits=0)
    table, stats = _stable(previous, ids, codes, shifted, strict)
    assert (stats.moved_by_hysteresis, stats.placed) == (4, 4)
    assert table.code_depth[warming].tolist() == [2, 2, 2, 2]


def test_a_shift_past_the_hysteresis_band_moves_the_items_under_the_crossing_prefix_and_only_them():
    ids, codes, pop = hand_catalog()
    previous = _assign(ids, codes, pop, HAND)
    star = int(np.flatnonzero((codes == [2, 0, 0]).all(axis=1))[0])
    siblings = np.flatnonzero((codes[:, :2] == [2, 0]).all(axis=1) & (np.arange(len(ids)) != star))
    shifted = pop.copy()
    shifted[star] = 600  # threshold 271; prefix [2, 0] now carries 604, over twice it: star 1 -> 3, siblings 1 -> 2
    table, stats = _stable(previous, ids, codes, shifted, HAND)
    assert table.threshold == 271
    assert stats == type(stats)(pinned=len(ids) - 4, placed=4, moved_by_hysteresis=4, new_items=0, removed_items=0)
    assert (table.code_depth[star], table.digit[star]) == (3, -1)
    assert table.code_depth[siblings].tolist() == [2, 2, 2]
    moved = np.sort(np.append(siblings, star))
    others = np.setdiff1d(np.arange(len(ids)), moved)
    np.testing.assert_array_equal(table.tokens[others], previous.tokens[others])
    churn, remap = sid_churn(previous.to_arrow(), table.to_arrow())
    assert (churn["changed"], churn["unchanged"]) == (4, len(ids) - 4)
    assert remap.column("item_id").to_pylist() == ids[moved].tolist()
    # Two bits of hysteresis (a factor 4) absorb the move.
    _, stats = _stable(previous, ids, codes, shifted, SIDConfig(tau=5.0, hysteresis_bits=2))
    assert stats.moved_by_hysteresis == 0


def test_a_threshold_one_unit_lower_moves_no_sid():
    """The nightly case: a day's cold items lower the keep threshold by one unit (5 -> 4), and items
    whose weight is 4 and that are alone in their deeper prefixes would jump from depth 1 to full
    depth. A tolerance in depth levels moved them all; the mass band keeps them."""
    config = SIDConfig()
    rng = np.random.default_rng(0)
    levels, n = 3, 100
    codes = rng.integers(0, 8, (n, levels))
    pop = np.zeros(n, dtype=np.int64)
    pop[:10] = 3  # weight 4: alone below level 1 ...
    codes[:10, 1], codes[:10, 2] = 8 + np.arange(10), 0  # ... each under its own level-2 code
    pop[10:12] = 175  # the rest of the traffic: W = 100 + 30 + 350 = 480 over 100 items, threshold 5
    previous = _assign(np.arange(n), codes, pop, config)
    assert previous.threshold == 5 and (previous.code_depth[:10] == 1).all()

    new_codes = np.concatenate([codes, rng.integers(0, 8, (30, levels))])
    new_pop = np.concatenate([pop, np.zeros(30, dtype=np.int64)])  # 30 cold items: 510 / 130, threshold 4
    ids = np.arange(n + 30)
    fresh, _, threshold = sarq_lengths(new_codes, new_pop, config)
    assert threshold == 4 and (fresh[:10] == levels).all()  # two levels past any one-level tolerance

    table, stats = _stable(previous, ids, new_codes, new_pop, config)
    assert (stats.pinned, stats.moved_by_hysteresis, stats.new_items) == (n, 0, 30)
    assert sid_churn(previous.to_arrow(), table.to_arrow())[0]["changed"] == 0
    assert_invariants(table, config)
    # Twice the threshold is where the band ends: at weight 12 (threshold 560 / 100 -> 6) the same
    # items move to full depth.
    hot = pop.copy()
    hot[:10] = 11
    table, stats = _stable(previous, np.arange(n), codes, hot, config)
    assert table.threshold == 6 and stats.moved_by_hysteresis == 10 and (table.code_depth[:10] == levels).all()


def test_recode_places_changed_and_new_items_around_the_pinned_ones():
    config = SIDConfig(max_bucket=12, digit_vocab=4)
    ids, codes, pop = random_catalog(2, n=800)
    previous = _assign(ids, codes, pop, config)
    rng = np.random.default_rng(3)
    keep = rng.random(len(ids)) > 0.05  # some items leave the catalog
    new_codes = codes.copy()
    recoded = rng.random(len(ids)) < 0.05
    new_codes[recoded] = rng.integers(0, 6, size=(int(recoded.sum()), 3))
    new_ids = 20 * 800 + np.arange(200)  # published ids are below 20 * n
    cat_ids = np.concatenate([ids[keep], new_ids])
    cat_codes = np.concatenate([new_codes[keep], rng.integers(0, 6, size=(200, 3))])
    cat_pop = np.concatenate([pop[keep], rng.integers(0, 3, 200)])

    table, stats = _stable(previous, cat_ids, cat_codes, cat_pop, config)
    assert_invariants(table, config)
    assert (stats.new_items, stats.removed_items) == (200, int((~keep).sum()))
    assert stats.placed >= 200 + int((recoded & keep).sum()) and stats.pinned + stats.placed == len(cat_ids)
    before, after = _tokens_by_id(previous), _tokens_by_id(table)
    same_codes = {i for i, changed in zip(ids[keep].tolist(), recoded[keep]) if not changed}
    kept_sid = sum(after[i] == before[i] for i in same_codes)
    assert kept_sid >= stats.pinned and stats.pinned > 0.9 * len(same_codes)
    assert (table.code_depth < 3).any()
    assert table.digit_overflow_items > 0  # the digit vocabulary of 4 overflows: the shared last digit is exercised


def test_recode_fills_the_digit_gaps_left_by_removed_items():
    config = SIDConfig(adaptive_length=False, digit_vocab=5)
    codes = np.array([[1, 1], [1, 1], [1, 1], [2, 2], [2, 2]])
    previous = _assign(np.array([1, 2, 3, 4, 5]), codes, np.array([9, 8, 7, 9, 8]), config)
    assert previous.digit.tolist() == [0, 1, 2, 0, 1]
    # Items 2 and 4 leave: group [1, 1] holds digits {0, 2}, group [2, 2] holds {1}.
    ids = np.array([1, 3, 5, 10, 11, 12])
    table, stats = _stable(
        previous, ids, np.array([[1, 1], [1, 1], [2, 2], [1, 1], [1, 1], [2, 2]]), np.array([9, 7, 8, 0, 1, 0]), config
    )
    # In [1, 1], 11 (more popular) takes the gap 1 and 10 the next free digit 3; in [2, 2], 12 takes 0.
    assert table.digit.tolist() == [0, 2, 1, 3, 1, 0]
    assert (stats.pinned, stats.new_items, stats.removed_items) == (3, 3, 2)
    assert_invariants(table, config)


def test_ingest_gives_new_items_free_digits_and_never_touches_published_ones():
    config = SIDConfig(adaptive_length=False, digit_vocab=4)
    codes = np.array([[1, 1], [1, 1], [2, 2]])
    previous = _assign(np.array([10, 11, 12]), codes, np.array([5, 3, 1]), config)
    assert previous.digit.tolist() == [0, 1, -1]
    new_codes = np.array([[1, 1], [2, 2], [3, 3], [1, 1], [1, 1]])
    ids = np.array([10, 11, 12, 20, 21, 22, 23, 24])
    table, stats = _stable(
        previous, ids, np.concatenate([codes, new_codes]), np.array([5, 3, 1, 0, 0, 0, 0, 0]), config,
        pin_all_previous=True,
    )
    np.testing.assert_array_equal(table.tokens[:3], previous.tokens)
    # Item 20 takes the free digit 2 of group [1, 1]; 23 and 24 find none below the last digit and
    # share it (overflow); 21 joins the digitless item 12 with digit 0; 22 is alone and needs none.
    assert table.digit.tolist() == [0, 1, -1, 2, 0, -1, 3, 3]
    assert table.digit_overflow_items == 2
    assert (stats.pinned, stats.placed, stats.new_items) == (3, 5, 5)
    assert_invariants(table, config)
    strict = SIDConfig(adaptive_length=False, digit_vocab=4, one_item_per_id=True)
    with pytest.raises(ValueError, match="item 23 .*digit vocabulary"):
        _stable(previous, ids, np.concatenate([codes, new_codes]), table.popularity, strict, pin_all_previous=True)


def test_ingest_into_a_full_truncated_bucket_goes_one_level_deeper():
    # Cold items 1 and 2 share the depth-1 bucket [0]; the hot ones keep full depth.
    codes = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]])
    pop = np.array([0, 0, 100, 100])
    config = SIDConfig(tau=2.0, max_bucket=3)
    previous = _assign(np.array([1, 2, 3, 4]), codes, pop, config)
    assert previous.code_depth.tolist() == [1, 1, 3, 3] and previous.threshold == 51
    new_codes = np.array([[0, 0, 1], [0, 1, 1], [0, 1, 2]])
    table, stats = _stable(
        previous, np.array([1, 2, 3, 4, 7, 5, 6]), np.concatenate([codes, new_codes]),
        np.concatenate([pop, [0, 3, 0]]), config, pin_all_previous=True,
    )
    np.testing.assert_array_equal(table.tokens[:4], previous.tokens)
    assert table.threshold == previous.threshold  # the published threshold, not one from the new catalog
    # One place is left in bucket [0]: the least popular new item, the lower id at equal popularity (6),
    # takes it; 5 and 7 go one level deeper, to the empty buckets [0, 1] and [0, 0].
    assert table.code_depth.tolist() == [1, 1, 3, 3, 2, 2, 1]
    assert table.bucket_size.tolist() == [3, 3, 1, 1, 1, 1, 3]
    assert stats.placed == 3
    assert_invariants(table, config)


@pytest.mark.parametrize("config", CONFIGS, ids=["sarq", "fixed-digits", "one-per-id"])
def test_ingest_is_idempotent(config):
    ids, codes, pop = random_catalog(4, n=400)
    previous = _assign(ids, codes, pop, config)
    rng = np.random.default_rng(5)
    cat_ids = np.concatenate([ids, np.arange(150) * 3 + 20 * 400])
    cat_codes = np.concatenate([codes, rng.integers(0, 6, size=(150, 3))])
    cat_pop = np.concatenate([pop, np.zeros(150, dtype=np.int64)])
    first, stats = _stable(previous, cat_ids, cat_codes, cat_pop, config, pin_all_previous=True)
    assert (stats.pinned, stats.placed) == (400, 150)
    np.testing.assert_array_equal(first.tokens[:400], previous.tokens)
    assert_invariants(first, config)
    again, stats = _stable(first, cat_ids, cat_codes, cat_pop, config, pin_all_previous=True)
    assert (stats.pinned, stats.placed) == (550, 0)
    np.testing.assert_array_equal(again.tokens, first.tokens)


def test_ingest_refuses_to_change_or_drop_published_items():
    ids, codes, pop = hand_catalog()
    previous = _assign(ids, codes, pop, HAND)
    with pytest.raises(ValueError, match="item 4 is already published"):
        altered = codes.copy()
        altered[1] = [3, 3, 3]
        _stable(previous, ids, altered, pop, HAND, pin_all_previous=True)
    with pytest.raises(ValueError, match="item 4 is already published"):
        _stable(previous, ids, codes, pop + (ids == 4), HAND, pin_all_previous=True)
    with pytest.raises(ValueError, match="item id 4 appears more than once"):
        _stable(previous, np.append(ids, 4), np.vstack([codes, [[3, 3, 3]]]), np.append(pop, 0), HAND,
                pin_all_previous=True)
    with pytest.raises(ValueError, match="published item 1 is missing"):
        _stable(previous, ids[1:], codes[1:], pop[1:], HAND, pin_all_previous=True)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n_prev=st.integers(1, 80),
    n_new=st.integers(0, 40),
    levels=st.integers(1, 3),
    k=st.integers(2, 4),
    max_bucket=st.integers(1, 5),
    digit_vocab=st.integers(2, 6),
    mode=st.sampled_from(["sarq", "fixed", "always-digit", "one-per-id"]),
    ingest=st.booleans(),
)
def test_placement_keeps_the_invariants(seed, n_prev, n_new, levels, k, max_bucket, digit_vocab, mode, ingest):
    config = SIDConfig(
        adaptive_length=mode != "fixed",
        always_digit=mode == "always-digit",
        one_item_per_id=mode == "one-per-id",
        max_bucket=max_bucket,
        digit_vocab=256 if mode == "one-per-id" else digit_vocab,
        hysteresis_bits=seed % 2,
    )
    rng = np.random.default_rng(seed)
    ids = rng.permutation(1000)[:n_prev]
    codes = rng.integers(0, k, size=(n_prev, levels))
    pop = rng.integers(0, 20, n_prev) * (rng.random(n_prev) < 0.5)
    # Codebooks of k codes: the new items may use codes the published ones happen not to.
    previous = assign_sids(ids, codes, pop, np.zeros(n_prev, dtype=np.int8), (k,) * levels, config)
    new_ids = 1000 + np.arange(n_new)
    new_codes = rng.integers(0, k, size=(n_new, levels))
    if ingest:
        cat_ids, cat_pop = np.concatenate([ids, new_ids]), np.concatenate([pop, np.zeros(n_new, dtype=np.int64)])
        cat_codes = np.concatenate([codes, new_codes])
    else:
        keep = rng.random(n_prev) < 0.9
        keep[0] = True
        changed = codes.copy()
        recoded = rng.random(n_prev) < 0.2
        changed[recoded] = rng.integers(0, k, size=(int(recoded.sum()), levels))
        cat_ids = np.concatenate([ids[keep], new_ids])
        cat_codes = np.concatenate([changed[keep], new_codes])
        cat_pop = np.concatenate([(pop * rng.integers(0, 4, n_prev))[keep], rng.integers(0, 20, n_new)])
    table, stats = _stable(previous, cat_ids, cat_codes, cat_pop, config, pin_all_previous=ingest)
    assert_invariants(table, config)
    before, after = _tokens_by_id(previous), _tokens_by_id(table)
    kept = sum(after[i] == before.get(i) for i in after)
    assert kept >= stats.pinned
    if ingest:
        assert stats.pinned == n_prev and all(after[i] == before[i] for i in before)


def test_churn_and_remap_on_a_tiny_example():
    sid = pa.list_(pa.int32())
    previous = pa.table({"item_id": [1, 2, 3, 4], "sid": pa.array([[2, 5, 1], [2, 1], [3, 1], [4, 1]], sid)})
    # 2 unchanged, 3 longer, 4 same length but another token, 1 removed, 5 added; rows in another order.
    current = pa.table({"item_id": [5, 4, 3, 2], "sid": pa.array([[6, 1], [7, 1], [3, 9, 1], [2, 1]], sid)})
    churn, remap = sid_churn(previous, current)
    assert churn == {
        "previous": 4, "current": 4, "common": 3, "unchanged": 1,
        "changed": 2, "added": 1, "removed": 1, "churn": 2 / 3,
    }
    assert remap.to_pylist() == [
        {"item_id": 1, "old_sid": [2, 5, 1], "new_sid": None, "change": "removed"},
        {"item_id": 3, "old_sid": [3, 1], "new_sid": [3, 9, 1], "change": "changed"},
        {"item_id": 4, "old_sid": [4, 1], "new_sid": [7, 1], "change": "changed"},
        {"item_id": 5, "old_sid": None, "new_sid": [6, 1], "change": "added"},
    ]
    with pytest.raises(ValueError, match="repeats item ids"):
        sid_churn(previous, pa.concat_tables([current, current]))


def test_hysteresis_bits_is_validated_and_round_trips():
    with pytest.raises(ValueError, match="sid.hysteresis_bits"):
        SIDConfig(hysteresis_bits=-1)
    config = TokenizerConfig().with_overrides({"sid.hysteresis_bits": 2})
    assert TokenizerConfig.from_dict(json.loads(json.dumps(config.to_dict()))).sid.hysteresis_bits == 2


def test_a_stored_config_with_the_retired_depth_tolerance_still_loads(caplog):
    # Tokenizers and versions published before the mass band store sid.hysteresis_levels.
    stored = TokenizerConfig().to_dict()
    stored["sid"] = {**{k: v for k, v in stored["sid"].items() if k != "hysteresis_bits"}, "hysteresis_levels": 1}
    assert TokenizerConfig.from_dict(stored).sid == SIDConfig()
    assert "sid.hysteresis_levels is retired" in caplog.text
    with pytest.raises(ValueError, match="unknown config field.*hysteresis_level"):
        TokenizerConfig.from_dict({**stored, "sid": {**stored["sid"], "hysteresis_level": 1}})
