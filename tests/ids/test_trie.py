"""Tests for sa2crq.ids.trie: the prefix trie of valid SIDs (DESIGN §3.3, §3.4)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sa2crq.ids.trie import EOS, PAD, SIDTrie


def pad_rows(sids: list[tuple[int, ...]], extra: int = 0) -> tuple[np.ndarray, np.ndarray]:
    width = max((len(s) for s in sids), default=0) + extra
    tokens = np.full((len(sids), width), PAD, dtype=np.int32)
    for i, s in enumerate(sids):
        tokens[i, : len(s)] = s
    return tokens, np.array([len(s) for s in sids], dtype=np.int64)


@st.composite
def sid_sets(draw):
    """A vocab size and a list of SID rows with duplicates and prefix-extensions."""
    v = draw(st.integers(3, 12))
    content = st.lists(st.integers(2, v - 1), min_size=1, max_size=5)
    base = draw(st.lists(content, min_size=1, max_size=25))
    rows = [tuple(c) for c in base]
    # Prefix-extensions: a shorter ID of an existing one, or a longer ID extending one.
    for c in draw(st.lists(st.sampled_from(base), max_size=8)):
        cut = draw(st.integers(1, len(c)))
        rows.append(tuple(c[:cut]))
        if len(c) < 5:
            rows.append(tuple(c) + (draw(st.integers(2, v - 1)),))
    # Duplicates.
    rows += draw(st.lists(st.sampled_from(rows), max_size=10))
    rows = draw(st.permutations(rows))
    return v, [r + (EOS,) for r in rows]


def reference_children(sids: set[tuple[int, ...]]) -> dict[tuple[int, ...], set[int]]:
    """Naive reference: for every prefix (incl. empty and full SIDs), the set of next tokens."""
    children: dict[tuple[int, ...], set[int]] = {}
    for s in sids:
        for k in range(len(s) + 1):
            children.setdefault(s[:k], set())
            if k < len(s):
                children[s[:k]].add(s[k])
    return children


def walk_all(trie: SIDTrie) -> dict[int, tuple[int, ...]]:
    """Every reachable node with its path, discovered with `step` only (BFS, all V tokens at once)."""
    v = trie.vocab_size
    paths = {0: ()}
    frontier = [0]
    while frontier:
        nodes = torch.tensor(frontier).repeat_interleave(v)
        toks = torch.arange(v).repeat(len(frontier))
        nxt = trie.step(nodes, toks).tolist()
        new = []
        for n, t, c in zip(nodes.tolist(), toks.tolist(), nxt):
            if c >= 0:
                assert c not in paths
                paths[c] = paths[n] + (t,)
                new.append(c)
        frontier = new
    return paths


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sid_sets(), st.integers(0, 2), st.randoms(use_true_random=False))
def test_trie_matches_reference(case, extra_pad, rnd):
    v, rows = case
    distinct = set(rows)
    tokens, lengths = pad_rows(rows, extra=extra_pad)
    trie = SIDTrie.build(tokens, lengths, v)
    trie.validate()

    # enumerate() is exactly the distinct SIDs, in lexicographic (= SID index) order.
    assert trie.enumerate() == sorted(distinct)
    assert trie.n_sids == len(distinct)
    assert trie.max_length == max(len(s) for s in distinct)

    # accepts(): every input, and nothing else.
    for s in distinct:
        assert trie.accepts(s)
        assert trie.accepts(np.array(s))
        assert not trie.accepts(s[:-1])  # prefix without EOS
        assert not trie.accepts(s + (EOS,))
        assert not trie.accepts(s + (PAD,))
        for t in range(v):
            assert not trie.accepts(s + (t,))  # a valid ID with an extra token after EOS
        for t in range(v):
            if s[:-1] + (t, EOS) not in distinct:
                assert not trie.accepts(s[:-1] + (t, EOS))  # an extra content token before EOS
            if s[:-2] + (t, EOS) not in distinct:
                assert not trie.accepts(s[:-2] + (t, EOS))  # wrong last content token
    assert not trie.accepts(())
    for _ in range(20):
        s = tuple(rnd.randrange(v) for _ in range(rnd.randint(0, 6)))
        assert trie.accepts(s) == (s in distinct)

    # next_token_mask and step agree with the reference at every reachable node.
    ref = reference_children(distinct)
    paths = walk_all(trie)
    assert sorted(paths.values()) == sorted(ref)
    assert len(paths) == trie.n_nodes
    nodes = torch.arange(trie.n_nodes)
    mask = trie.next_token_mask(nodes)
    assert mask.shape == (trie.n_nodes, v) and mask.dtype == torch.bool
    for n, path in paths.items():
        expect = ref[path]
        assert set(torch.nonzero(mask[n]).flatten().tolist()) == expect
        # EOS legal exactly where an ID ends.
        assert bool(mask[n, EOS]) == (path + (EOS,) in distinct)
        assert trie.node_depth[n] == len(path)
        is_full = path in distinct
        assert (trie.terminal_sid[n] >= 0) == is_full
        if is_full:
            assert trie.terminal_sid[n] == sorted(distinct).index(path)
            assert int(trie.sid_at(torch.tensor([n]))[0]) == trie.terminal_sid[n]
    # Batched step agrees with the mask (all nodes x all tokens in one call, 2-D broadcast).
    nxt = trie.step(nodes[:, None], torch.arange(v)[None, :])
    assert torch.equal(nxt >= 0, mask)
    # The sparse step: each node's children, ascending; no real slot past its fanout (or for node -1).
    depth_fanout = trie.depth_fanout
    for depth in range(trie.max_length + 1):
        at_depth = nodes[torch.from_numpy(trie.node_depth == depth)]
        width = int(depth_fanout[depth])
        assert width == max((len(ref[paths[int(n)]]) for n in at_depth), default=0)
        child_tokens, past, first_child = trie.children(torch.cat([at_depth, torch.tensor([-1])]), width)
        assert child_tokens.shape == past.shape == (at_depth.numel() + 1, width) and past[-1].all()
        children = first_child[:, None] + torch.arange(width)
        for n, toks, kids, is_child in zip(at_depth.tolist(), child_tokens, children, ~past):
            assert toks[is_child].tolist() == sorted(ref[paths[n]])
            assert torch.equal(kids[is_child], nxt[n, toks[is_child]])

    # Breadth-first numbering, ordered by (parent, token) within a depth.
    assert np.all(np.diff(trie.node_depth) >= 0)
    assert np.array_equal(trie.child_nodes, np.arange(1, trie.n_nodes))
    assert np.all(np.diff(trie.edge_keys) > 0)

    # row_sid: each row maps to its own SID; duplicates share one index.
    enum = trie.enumerate()
    assert [enum[i] for i in trie.row_sid] == rows
    assert np.array_equal(trie.lookup(tokens, lengths), trie.row_sid)
    # terminal_sid round-trips through sid_node.
    assert np.array_equal(trie.terminal_sid[trie.sid_node], np.arange(trie.n_sids))


def test_small_example_layout():
    rows = [(5, EOS), (5, 9, EOS), (5, EOS), (3, EOS), (5, 9, 2, EOS)]
    tokens, lengths = pad_rows(rows)
    trie = SIDTrie.build(tokens, lengths, vocab_size=10)
    # depth 1: 3, 5; depth 2: (3,1), (5,1), (5,9); depth 3: (5,9,1), (5,9,2); depth 4: (5,9,2,1)
    assert trie.offsets.tolist() == [0, 2, 3, 5, 5, 5, 7, 7, 8, 8]
    assert trie.child_tokens.tolist() == [3, 5, 1, 1, 9, 1, 2, 1]
    assert trie.node_depth.tolist() == [0, 1, 1, 2, 2, 2, 3, 3, 4]
    assert trie.terminal_sid.tolist() == [-1, -1, -1, 0, 1, -1, 2, -1, 3]
    assert trie.row_sid.tolist() == [1, 2, 1, 0, 3]
    assert trie.row_sid[0] == trie.row_sid[2]
    assert trie.max_length == 4
    assert trie.child_tokens.dtype == np.int32 and trie.offsets.dtype == np.int64
    assert trie.child_nodes.dtype == np.int64 and trie.node_depth.dtype == np.int32
    assert trie.terminal_sid.dtype == np.int64 and trie.row_sid.dtype == np.int64
    # SID index -> terminal node -> SID index.
    assert trie.sid_node.tolist() == [3, 4, 6, 8]
    # Lookup of unknown rows gives -1.
    q_tokens, q_lengths = pad_rows([(5, 9, EOS), (5, 9, 9, EOS), (4, EOS), (5,)])
    assert trie.lookup(q_tokens, q_lengths).tolist() == [2, -1, -1, -1]
    assert trie.to_padded()[0].tolist() == [[3, 1, 0, 0], [5, 1, 0, 0], [5, 9, 1, 0], [5, 9, 2, 1]]


def test_torch_helpers_edge_cases():
    tokens, lengths = pad_rows([(5, EOS), (5, 9, EOS)])
    trie = SIDTrie.build(tokens, lengths, vocab_size=10)
    assert trie.to("cpu") is trie
    assert trie.torch_arrays("cpu") is trie.torch_arrays(torch.device("cpu"))  # cached
    nodes = torch.tensor([[0, -1], [99, 1]])
    mask = trie.next_token_mask(nodes)
    assert mask.shape == (2, 2, 10)
    assert mask[0, 0].nonzero().flatten().tolist() == [5]
    assert not mask[0, 1].any() and not mask[1, 0].any()  # -1 and out-of-range nodes
    assert mask[1, 1].nonzero().flatten().tolist() == [EOS, 9]
    out = trie.step(torch.tensor([0, 0, -1, 1, 1, 1]), torch.tensor([5, 4, 5, -3, 10, EOS]))
    assert out[0] == 1 and out[1:5].tolist() == [-1, -1, -1, -1] and out[5] >= 0
    assert int(trie.sid_at(out[5:])[0]) == 0
    assert trie.sid_at(torch.tensor([-1, 0])).tolist() == [-1, -1]
    empty = trie.next_token_mask(torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0, 10)


def test_empty_trie():
    trie = SIDTrie.build(np.zeros((0, 3), dtype=np.int32), np.zeros(0, dtype=np.int64), vocab_size=8)
    trie.validate()
    assert trie.n_nodes == 1 and trie.n_sids == 0 and trie.enumerate() == []
    assert not trie.accepts((EOS,))
    assert not trie.next_token_mask(torch.tensor([0])).any()
    assert trie.step(torch.tensor([0]), torch.tensor([EOS])).tolist() == [-1]


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n = 500
    lengths = rng.integers(2, 5, n)
    tokens = np.zeros((n, 4), dtype=np.int32)
    tokens[:, :3] = rng.integers(2, 6, (n, 3))
    tokens[np.arange(4)[None, :] >= lengths[:, None]] = PAD
    tokens[np.arange(n), lengths - 1] = EOS
    trie = SIDTrie.build(tokens, lengths, vocab_size=6)
    trie.save(tmp_path / "trie")
    back = SIDTrie.load(tmp_path / "trie")
    assert back == trie
    assert back.vocab_size == 6 and back.max_length == trie.max_length
    for f in ("offsets", "child_tokens", "child_nodes", "node_depth", "terminal_sid", "row_sid"):
        assert getattr(back, f).dtype == getattr(trie, f).dtype
        assert np.array_equal(getattr(back, f), getattr(trie, f))
    assert back.enumerate() == trie.enumerate()
    assert sorted(p.name for p in (tmp_path / "trie").iterdir()) == ["nodes", "rows", "trie.json"]
    # A different trie is not equal.
    other = SIDTrie.build(tokens[:-1], lengths[:-1], vocab_size=6)
    assert other != trie


def _shard(table, directory, parts, rng):
    """Rewrite ``directory`` as ``parts`` parquet files of shuffled rows, as a distributed writer may."""
    import pyarrow.parquet as pq

    for f in directory.iterdir():
        f.unlink()
    shuffled = table.take(rng.permutation(table.num_rows))
    for i, piece in enumerate(np.array_split(np.arange(table.num_rows), parts)):
        pq.write_table(shuffled.take(piece), directory / f"part-{parts - i:05d}.parquet")


def test_load_reads_sharded_files_in_any_order_and_checks_them(tmp_path):
    rng = np.random.default_rng(4)
    tokens, lengths = pad_rows([(5, EOS), (5, 7, EOS), (6, EOS), (5, EOS), (6, 2, 3, EOS)])
    trie = SIDTrie.build(tokens, lengths, vocab_size=10)
    trie.save(tmp_path)
    import pyarrow.parquet as pq

    nodes = pq.read_table(tmp_path / "nodes")
    _shard(nodes, tmp_path / "nodes", 3, rng)
    _shard(pq.read_table(tmp_path / "rows"), tmp_path / "rows", 2, rng)
    assert SIDTrie.load(tmp_path) == trie

    # A node whose parent comes after it cannot be a breadth-first trie.
    parent = nodes.column("parent").to_numpy().copy()
    parent[-1] = trie.n_nodes - 1
    _shard(nodes.set_column(1, "parent", pa.array(parent)), tmp_path / "nodes", 1, rng)
    with pytest.raises(ValueError, match="breadth-first"):
        SIDTrie.load(tmp_path)
    # A lost file: the counts no longer match trie.json.
    _shard(nodes.slice(0, trie.n_nodes - 1), tmp_path / "nodes", 1, rng)
    with pytest.raises(ValueError, match="disagree with trie.json"):
        SIDTrie.load(tmp_path)
    # A node numbered twice.
    _shard(pa.concat_tables([nodes.slice(0, 1), nodes.slice(0, trie.n_nodes - 1)]), tmp_path / "nodes", 1, rng)
    with pytest.raises(ValueError, match="once each"):
        SIDTrie.load(tmp_path)


def test_load_rejects_wrong_format(tmp_path):
    tokens, lengths = pad_rows([(5, EOS)])
    SIDTrie.build(tokens, lengths, vocab_size=10).save(tmp_path)
    meta = tmp_path / "trie.json"
    meta.write_text(meta.read_text().replace('"version": 2', '"version": 99'))
    with pytest.raises(ValueError, match="v2"):
        SIDTrie.load(tmp_path)


@pytest.mark.parametrize(
    "rows, lengths, bad_row, rule",
    [
        ([(5, EOS, 0), (5, 9, 0)], [2, 2], 1, "EOS .* missing at the end"),
        ([(5, EOS, 0), (6, EOS, 0), (5, EOS, 9)], [2, 2, 3], 2, "EOS .* missing at the end"),
        ([(5, EOS, 0, 0), (5, EOS, 9, EOS)], [2, 4], 1, "EOS .* in the middle"),
        ([(5, EOS, 0), (5, 0, EOS)], [2, 3], 1, "PAD .* inside"),
        ([(5, EOS, 0), (5, 9, EOS)], [2, 2], 1, "length mismatch"),
        ([(5, EOS, 0), (5, 9, EOS)], [2, 4], 1, "length mismatch"),
        ([(5, EOS, 0), (5, 9, EOS)], [2, 0], 1, "length mismatch"),
        ([(5, EOS, 0), (5, 12, EOS)], [2, 3], 1, "out of range"),
        ([(5, EOS, 0), (5, -2, EOS)], [2, 3], 1, "out of range"),
        # The first offending row is reported, whatever the rule of later rows.
        ([(5, EOS, 0), (5, 9, 0), (5, 0, EOS), (EOS, 5, EOS)], [2, 2, 3, 3], 1, "EOS .* missing"),
        ([(5, 9, EOS), (5, 0, EOS), (5, 9, 0)], [3, 3, 2], 1, "PAD .* inside"),
    ],
)
def test_validation_errors_name_the_row(rows, lengths, bad_row, rule):
    tokens = np.array(rows, dtype=np.int64)
    with pytest.raises(ValueError, match=rf"row {bad_row}\b.*{rule}"):
        SIDTrie.build(tokens, np.array(lengths), vocab_size=10)


def test_validation_shape_errors():
    with pytest.raises(ValueError, match="2-D"):
        SIDTrie.build(np.array([5, EOS]), np.array([2]), 10)
    with pytest.raises(ValueError, match="lengths"):
        SIDTrie.build(np.array([[5, EOS]]), np.array([2, 2]), 10)
    with pytest.raises(ValueError, match="vocab_size"):
        SIDTrie.build(np.array([[5, EOS]]), np.array([2]), 1)


def test_million_row_build():
    """A 10^6-row build, to show the construction is vectorised (no per-row loop)."""
    rng = np.random.default_rng(1)
    n, depth, k = 1_000_000, 4, 256
    v = k + 2
    codes = rng.integers(2, v, (n, depth), dtype=np.int32)
    codes[:, 0] = rng.integers(2, 2 + 64, n)  # shared first-level prefixes
    lengths = rng.integers(1, depth + 1, n) + 1  # content 1..4, then EOS
    tokens = np.zeros((n, depth + 1), dtype=np.int32)
    tokens[:, :depth] = codes
    pos = np.arange(depth + 1)[None, :]
    tokens[pos >= lengths[:, None]] = PAD
    tokens[np.arange(n), lengths - 1] = EOS
    trie = SIDTrie.build(tokens, lengths, v)
    assert trie.row_sid.shape == (n,)
    assert trie.max_length == depth + 1
    sample = rng.integers(0, n, 1000)
    assert np.array_equal(trie.lookup(tokens[sample], lengths[sample]), trie.row_sid[sample])


@pytest.mark.parametrize("vocab_size", [8, 300, 2**21, 2**31 - 1])
def test_large_vocab_multi_key_sort(vocab_size):
    """Row sorting packs columns into int64 keys; wide tokens need several keys (lexsort path)."""
    rng = np.random.default_rng(vocab_size)
    alphabet = np.array(sorted({2, 3, vocab_size - 1, vocab_size // 2 + 1} - {0, 1}))
    n, width = 3000, 7
    lengths = rng.integers(2, width + 1, n)
    tokens = alphabet[rng.integers(0, alphabet.size, (n, width))].astype(np.int64)
    tokens[np.arange(width)[None, :] >= lengths[:, None]] = PAD
    tokens[np.arange(n), lengths - 1] = EOS
    rows = [tuple(int(x) for x in r[:k]) for r, k in zip(tokens, lengths)]
    trie = SIDTrie.build(tokens, lengths, vocab_size)
    trie.validate()
    enum = trie.enumerate()
    assert enum == sorted(set(rows))
    assert [enum[i] for i in trie.row_sid] == rows
    assert np.array_equal(trie.lookup(tokens, lengths), trie.row_sid)
    first = trie.step(torch.zeros(alphabet.size, dtype=torch.long), torch.from_numpy(alphabet))
    assert set(alphabet[(first >= 0).numpy()].tolist()) == {r[0] for r in rows}
