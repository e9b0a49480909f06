"""Prefix trie of valid semantic IDs (DESIGN §3.3, §3.4), as compact flat arrays.

A SID is a sequence of integer tokens in ``[0, vocab_size)`` that ends with :data:`EOS`
(EOS nowhere else; :data:`PAD` never inside). A short ID and a longer ID extending it are
both valid (``[5, 1]`` and ``[5, 9, 1]``). Several items may share a SID (a bucket); the trie
is over *distinct* SIDs.

Layout (CSR, all numpy; ``n_nodes`` nodes, ``n_edges = n_nodes - 1`` edges):

* Nodes are numbered breadth-first: root is node 0 at depth 0, then every node of depth 1,
  then depth 2, ...; within a depth, nodes are ordered by (parent, token). Hence the node
  reached by edge ``e`` is node ``e + 1`` and ``child_nodes == arange(1, n_nodes)``.
* ``offsets`` int64 (n_nodes + 1): the children of node ``n`` are edges
  ``offsets[n]:offsets[n + 1]``, with ``child_tokens`` int32 (ascending within a node)
  and ``child_nodes`` int64.
* ``node_depth`` int32 (n_nodes,): number of tokens consumed to reach the node.
* ``terminal_sid`` int64 (n_nodes,): for a node reached by consuming EOS (a leaf), the
  index of its SID, else -1.
* SID index = rank of the SID among the distinct SIDs in lexicographic order of the token
  sequence (EOS sorts before every content token, so this is the depth-first leaf order of
  the trie, and the SIDs below any prefix form a contiguous range of indices).
* ``row_sid`` int64 (N,): for each row given to :meth:`SIDTrie.build`, its SID index
  (duplicate rows share one index).

Build: one lexicographic sort of the rows (columns packed into int64 keys), then a loop over
depth only, where new prefix groups are runs of the sorted rows (no per-row or per-node loop).
Decoding helpers (:meth:`SIDTrie.children`, :meth:`SIDTrie.next_token_mask`, :meth:`SIDTrie.step`, :meth:`SIDTrie.sid_at`)
are batched torch ops on the device of their input, with the arrays copied once per device and
cached. ``step`` finds an edge by ``searchsorted`` on
``edge_keys = parent * vocab_size + token``, which is strictly increasing by construction.

On disk (:meth:`SIDTrie.save`, format version 2): two parquet directories a distributed job can
write in shards, ``nodes/`` (one row per node: ``node``, ``parent`` (-1 at the root), ``token`` (of
the edge into the node; PAD at the root), ``depth``, ``terminal_sid``) and ``rows/`` (``row``,
``sid_index``: ``row_sid``), in any file and row order, then ``trie.json`` (format, version,
vocab_size, max_length, PAD, EOS, counts), written last. The CSR arrays are derived on load
(``offsets`` from the parents' child counts). No pickles.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable

import numpy as np
import pyarrow as pa
import torch

from sa2crq.storage.filesystem import read_parquet, resolve_filesystem, write_parquet

PAD = 0
EOS = 1

FORMAT_NAME = "sa2crq.sid_trie"
FORMAT_VERSION = 2
META_FILE = "trie.json"
NODES_DIR = "nodes"
ROWS_DIR = "rows"
NODE_COLUMNS = {"node": pa.int64(), "parent": pa.int64(), "token": pa.int32(), "depth": pa.int32(), "terminal_sid": pa.int64()}
ROW_COLUMNS = {"row": pa.int64(), "sid_index": pa.int64()}

_ARRAY_FIELDS = ("offsets", "child_tokens", "child_nodes", "node_depth", "terminal_sid", "row_sid")


@dataclass(frozen=True)
class TorchTrie:
    """The arrays :class:`SIDTrie` needs for decoding, as int64 tensors on one device."""

    offsets: torch.Tensor
    # Followed by max_fanout PADs, so a node's first max_fanout slots are always in range.
    child_tokens: torch.Tensor
    child_nodes: torch.Tensor
    edge_keys: torch.Tensor
    terminal_sid: torch.Tensor
    max_fanout: int
    # Most children of any node at each depth (index = depth); a decode step's gather width.
    depth_fanout: tuple[int, ...]


def _lex_order(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Permutation sorting the (validated, PAD-padded) rows lexicographically.

    Columns are packed into as few int64 keys as the token width allows (one key for
    T * ceil(log2 V) <= 63 bits, e.g. 7 columns of 9 bits), then argsort / lexsort.
    """
    n_rows, width = tokens.shape
    if n_rows == 0 or width == 0:
        return np.arange(n_rows, dtype=np.int64)
    bits = max(1, int(vocab_size - 1).bit_length())
    per_key = max(1, 63 // bits)
    keys = []
    for c0 in range(0, width, per_key):
        key = np.zeros(n_rows, dtype=np.int64)
        for c in range(c0, min(c0 + per_key, width)):
            key <<= bits
            key |= tokens[:, c].astype(np.int64)
        keys.append(key)
    if len(keys) == 1:
        return np.argsort(keys[0])  # equal keys are equal rows: stability not needed
    return np.lexsort(keys[::-1])


_VALIDATE_CHUNK = 1 << 22  # rows per validation chunk (bounds the (rows, T) temporaries)


def _validate_rows(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> None:
    """Raise ValueError naming the first offending row (and the first rule it breaks)."""
    for s in range(0, tokens.shape[0], _VALIDATE_CHUNK):
        e = s + _VALIDATE_CHUNK
        _validate_chunk(tokens[s:e], lengths[s:e], vocab_size, s)


def _validate_chunk(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, row0: int) -> None:
    n, t = tokens.shape
    pos = np.arange(t)[None, :]
    len_ok = (lengths >= 1) & (lengths <= t)
    safe_len = np.clip(lengths, 1, max(t, 1))
    inside = pos < safe_len[:, None]
    last = safe_len - 1
    last_tok = tokens[np.arange(n), last] if t > 0 else np.full(n, PAD)
    # (rule description, per-row bad mask) in the order they are reported for one row.
    checks = [
        (lambda i: f"length mismatch: length {lengths[i]} not in [1, {t}]", ~len_ok),
        (
            lambda i: f"token out of range [0, {vocab_size})",
            ((tokens < 0) | (tokens >= vocab_size)).any(axis=1),
        ),
        (
            lambda i: f"length mismatch: non-PAD token after length {lengths[i]}",
            len_ok & ((tokens != PAD) & ~inside).any(axis=1),
        ),
        (
            lambda i: f"PAD ({PAD}) inside the ID (before its length {lengths[i]})",
            len_ok & ((tokens == PAD) & inside).any(axis=1),
        ),
        (
            lambda i: f"EOS ({EOS}) missing at the end (position {lengths[i] - 1} holds {last_tok[i]})",
            len_ok & (last_tok != EOS),
        ),
        (
            lambda i: f"EOS ({EOS}) in the middle of the ID (before position {lengths[i] - 1})",
            len_ok & ((tokens == EOS) & (pos < (safe_len - 1)[:, None])).any(axis=1),
        ),
    ]
    first = n
    for _, bad in checks:
        hit = np.flatnonzero(bad)
        if hit.size:
            first = min(first, int(hit[0]))
    if first == n:
        return
    for describe, bad in checks:
        if bad[first]:
            raise ValueError(f"invalid SID at row {row0 + first}: {describe(first)}")
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True, eq=False)
class SIDTrie:
    """Prefix trie of distinct SIDs in CSR form; see the module docstring for the layout."""

    offsets: np.ndarray
    child_tokens: np.ndarray
    child_nodes: np.ndarray
    node_depth: np.ndarray
    terminal_sid: np.ndarray
    row_sid: np.ndarray
    vocab_size: int
    max_length: int

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, tokens: np.ndarray, lengths: np.ndarray, vocab_size: int) -> "SIDTrie":
        """Build from right-padded rows ``tokens`` (N, T) with true ``lengths`` (N,).

        Duplicate rows are allowed and share one SID index (``row_sid``). Raises ValueError
        naming the first offending row if a row breaks the SID rules.
        """
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths)
        vocab_size = int(vocab_size)
        if not (EOS < vocab_size <= np.iinfo(np.int32).max):
            raise ValueError(f"vocab_size must be in ({EOS}, 2**31), got {vocab_size}")
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be 2-D (N, T), got shape {tokens.shape}")
        if lengths.shape != (tokens.shape[0],):
            raise ValueError(f"lengths must have shape ({tokens.shape[0]},), got {lengths.shape}")
        if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integers, got {tokens.dtype}")
        if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
            raise ValueError(f"lengths must be integers, got {lengths.dtype}")
        lengths = lengths.astype(np.int64, copy=False)
        _validate_rows(tokens, lengths, vocab_size)

        n_rows, width = tokens.shape
        if (n_rows * width + 1) * vocab_size >= 2**62:
            raise ValueError("trie too large for int64 edge keys")
        # One lexicographic sort of the rows. Then, at every depth, the active rows (in sorted
        # order) have non-decreasing (parent, token), so new prefix groups are runs: no sort per
        # depth, and node ids come out breadth-first and ordered by (parent, token).
        order = _lex_order(tokens, vocab_size)
        len_s = lengths[order]
        cur = np.zeros(n_rows, dtype=np.int64)  # node of each sorted row after the tokens so far
        parents = [np.zeros(0, dtype=np.int64)]  # per depth d >= 1: parent node of each new node
        toks = [np.zeros(0, dtype=np.int32)]
        hi = 1  # first node id of the next depth
        for d in range(width):
            act = np.flatnonzero(len_s > d)
            if act.size == 0:
                break
            tok = tokens[order[act], d].astype(np.int32)
            par = cur[act]
            new = np.ones(act.size, dtype=bool)
            np.not_equal(par[1:], par[:-1], out=new[1:])
            new[1:] |= tok[1:] != tok[:-1]
            gid = np.cumsum(new, dtype=np.int64)
            first = np.flatnonzero(new)
            parents.append(par[first])
            toks.append(tok[first])
            cur[act] = hi - 1 + gid
            hi += first.size
        n_nodes = hi
        max_length = len(parents) - 1
        parent_of_edge = np.concatenate(parents)
        child_tokens = np.concatenate(toks)
        counts = np.bincount(parent_of_edge, minlength=n_nodes)
        offsets = np.zeros(n_nodes + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        child_nodes = np.arange(1, n_nodes, dtype=np.int64)
        node_depth = np.repeat(np.arange(len(parents), dtype=np.int32), [1] + [p.size for p in parents[1:]])

        # SID index = rank in lexicographic order = run index of equal rows in sorted order
        # (equal rows are adjacent; different rows end at different terminal nodes).
        new_sid = np.ones(n_rows, dtype=bool)
        np.not_equal(cur[1:], cur[:-1], out=new_sid[1:])
        sid_sorted = np.cumsum(new_sid, dtype=np.int64) - 1
        terminal_sid = np.full(n_nodes, -1, dtype=np.int64)
        terminal_sid[cur] = sid_sorted
        row_sid = np.empty(n_rows, dtype=np.int64)
        row_sid[order] = sid_sorted
        return cls(
            offsets=offsets,
            child_tokens=child_tokens,
            child_nodes=child_nodes,
            node_depth=node_depth,
            terminal_sid=terminal_sid,
            row_sid=row_sid.astype(np.int64, copy=False),
            vocab_size=vocab_size,
            max_length=int(max_length),
        )

    # ------------------------------------------------------------ properties
    @property
    def n_nodes(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def n_edges(self) -> int:
        return int(self.child_tokens.size)

    @cached_property
    def n_sids(self) -> int:
        """Number of distinct SIDs."""
        return int(np.count_nonzero(self.terminal_sid >= 0))

    @cached_property
    def sid_node(self) -> np.ndarray:
        """int64 (n_sids,): terminal node of each SID index (inverse of ``terminal_sid``)."""
        nodes = np.flatnonzero(self.terminal_sid >= 0)
        out = np.empty(nodes.size, dtype=np.int64)
        out[self.terminal_sid[nodes]] = nodes
        return out

    @cached_property
    def parent_of_edge(self) -> np.ndarray:
        """int64 (n_edges,): the node each edge leaves from."""
        return np.repeat(np.arange(self.n_nodes, dtype=np.int64), np.diff(self.offsets))

    @cached_property
    def edge_keys(self) -> np.ndarray:
        """int64 (n_edges,): ``parent * vocab_size + token``, strictly increasing."""
        return self.parent_of_edge * np.int64(self.vocab_size) + self.child_tokens.astype(np.int64)

    @cached_property
    def depth_fanout(self) -> np.ndarray:
        """int64 (max_length + 1,): the most children of any node at each depth."""
        out = np.zeros(self.max_length + 1, dtype=np.int64)
        np.maximum.at(out, self.node_depth, np.diff(self.offsets))
        return out

    # ------------------------------------------------------------ host-side
    def accepts(self, tokens_1d: Iterable[int]) -> bool:
        """True iff ``tokens_1d`` is exactly a SID in the trie (EOS included, no padding)."""
        node = 0
        for tok in np.asarray(list(tokens_1d)).ravel():
            a, b = self.offsets[node], self.offsets[node + 1]
            i = a + np.searchsorted(self.child_tokens[a:b], tok)
            if i >= b or self.child_tokens[i] != tok:
                return False
            node = int(self.child_nodes[i])
        return bool(self.terminal_sid[node] >= 0)

    def lookup(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """SID index of each padded row (N, T) of the given lengths, -1 where it is not a SID."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64)
        n_rows, width = tokens.shape
        node = np.where((lengths >= 1) & (lengths <= width), 0, -1).astype(np.int64)
        keys = self.edge_keys
        for d in range(width):
            act = np.flatnonzero((lengths > d) & (node >= 0))
            if act.size == 0:
                break
            tok = tokens[act, d].astype(np.int64)
            key = node[act] * np.int64(self.vocab_size) + tok
            pos = np.minimum(np.searchsorted(keys, key), keys.size - 1)
            ok = (tok >= 0) & (tok < self.vocab_size)
            if keys.size:
                ok &= keys[pos] == key
                node[act] = np.where(ok, self.child_nodes[pos], -1)
            else:
                node[act] = -1
        out = np.full(n_rows, -1, dtype=np.int64)
        good = node >= 0
        out[good] = self.terminal_sid[node[good]]
        return out

    def to_padded(self) -> tuple[np.ndarray, np.ndarray]:
        """All distinct SIDs in SID-index order: tokens (n_sids, max_length) PAD-padded, lengths."""
        nodes = self.sid_node
        lengths = self.node_depth[nodes].astype(np.int64)
        out = np.full((nodes.size, self.max_length), PAD, dtype=np.int32)
        parent = self.parent_of_edge
        cur = nodes.copy()
        for d in range(self.max_length, 0, -1):
            act = np.flatnonzero(lengths >= d)
            out[act, d - 1] = self.child_tokens[cur[act] - 1]  # node n is reached by edge n - 1
            cur[act] = parent[cur[act] - 1]
        return out, lengths

    def enumerate(self) -> list[tuple[int, ...]]:
        """All SIDs (EOS included), in SID-index order. For tests and debugging."""
        toks, lens = self.to_padded()
        return [tuple(int(x) for x in row[:n]) for row, n in zip(toks, lens)]

    def validate(self) -> None:
        """Check the structural invariants (vectorised); raise ValueError on the first violation."""
        n = self.n_nodes
        checks = [
            (n >= 1, "no root"),
            (self.offsets[0] == 0 and self.offsets[-1] == self.n_edges, "offsets do not span the edges"),
            (bool(np.all(np.diff(self.offsets) >= 0)), "offsets not non-decreasing"),
            (self.child_nodes.size == self.n_edges == n - 1, "edge/node count mismatch"),
            (np.array_equal(self.child_nodes, np.arange(1, n)), "nodes not numbered breadth-first"),
            (self.node_depth.shape == (n,) and self.terminal_sid.shape == (n,), "node array shapes"),
            (bool(np.all(np.diff(self.edge_keys) > 0)), "edges not sorted by (parent, token)"),
            (bool(np.all((self.child_tokens > PAD) & (self.child_tokens < self.vocab_size))), "edge token out of range"),
            (n == 1 or bool(np.all(self.node_depth[1:] == self.node_depth[self.parent_of_edge] + 1)), "node depths"),
            (self.max_length == int(self.node_depth.max(initial=0)), "max_length"),
            (
                np.array_equal(self.terminal_sid >= 0, self._reached_by_eos()),
                "terminal nodes are not exactly the nodes reached by EOS",
            ),
            (np.array_equal(np.sort(self.terminal_sid[self.terminal_sid >= 0]), np.arange(self.n_sids)), "SID indices"),
            (bool(np.all((self.row_sid >= 0) & (self.row_sid < self.n_sids))), "row_sid out of range"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"corrupt SIDTrie: {what}")

    def _reached_by_eos(self) -> np.ndarray:
        out = np.zeros(self.n_nodes, dtype=bool)
        out[self.child_nodes[self.child_tokens == EOS]] = True
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SIDTrie):
            return NotImplemented
        return (
            self.vocab_size == other.vocab_size
            and self.max_length == other.max_length
            and all(
                getattr(self, f).dtype == getattr(other, f).dtype and np.array_equal(getattr(self, f), getattr(other, f))
                for f in _ARRAY_FIELDS
            )
        )

    __hash__ = None  # type: ignore[assignment]

    # ---------------------------------------------------------------- torch
    @cached_property
    def _torch_cache(self) -> dict[torch.device, TorchTrie]:
        return {}

    def torch_arrays(self, device: torch.device | str | None = None) -> TorchTrie:
        """Decoding tensors on ``device``, copied on first use and cached."""
        dev = torch.empty(0, device=device).device  # normalise "cuda" -> "cuda:0"
        cached = self._torch_cache.get(dev)
        if cached is None:
            def t(a: np.ndarray) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev)

            depth_fanout = tuple(int(x) for x in self.depth_fanout)
            max_fanout = max(depth_fanout, default=0)
            cached = TorchTrie(
                offsets=t(self.offsets),
                child_tokens=t(np.concatenate([self.child_tokens, np.full(max_fanout, PAD)])),
                child_nodes=t(self.child_nodes),
                edge_keys=t(self.edge_keys),
                terminal_sid=t(self.terminal_sid),
                max_fanout=max_fanout,
                depth_fanout=depth_fanout,
            )
            self._torch_cache[dev] = cached
        return cached

    def to(self, device: torch.device | str) -> "SIDTrie":
        """Copy the decoding tensors to ``device`` now (cached); returns ``self``."""
        self.torch_arrays(device)
        return self

    def next_token_mask(self, nodes: torch.Tensor) -> torch.Tensor:
        """bool (*nodes.shape, V): True for tokens with a child edge. Node -1 gives all False.

        No host sync: gathers up to ``max_fanout`` (<= V) children per node and scatters them.
        """
        tt = self.torch_arrays(nodes.device)
        v = self.vocab_size
        flat = nodes.reshape(-1).long()
        b = flat.numel()
        mask = torch.zeros(b * v + 1, dtype=torch.bool, device=nodes.device)  # last slot: dump
        if tt.max_fanout > 0 and b > 0:
            valid_node = (flat >= 0) & (flat < self.n_nodes)
            n = torch.where(valid_node, flat, 0)
            start = tt.offsets[n]
            count = torch.where(valid_node, tt.offsets[n + 1] - start, 0)
            j = torch.arange(tt.max_fanout, device=nodes.device)
            ok = j[None, :] < count[:, None]
            edge = torch.where(ok, start[:, None] + j[None, :], 0)
            tok = tt.child_tokens[edge]
            row = torch.arange(b, device=nodes.device)[:, None]
            mask[torch.where(ok, row * v + tok, b * v)] = True
        return mask[: b * v].view(*nodes.shape, v)

    def children(self, nodes: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first ``width`` children of each node, gathered from the CSR arrays.

        Returns their tokens (*nodes.shape, width), ascending; a bool mask of the same shape, True
        in slots past the node's children (every slot of node -1), where the token is meaningless;
        and (*nodes.shape) the node reached through slot 0: slot j leads to node ``first + j``
        (breadth-first numbering). O(width) per node and no (..., vocab) mask: the sparse trie
        step of beam search, with ``width`` the depth's largest fanout (:attr:`depth_fanout`).
        """
        tt = self.torch_arrays(nodes.device)
        nodes = nodes.long()
        valid = (nodes >= 0) & (nodes < self.n_nodes)
        n = torch.where(valid, nodes, 0)
        start = tt.offsets[n]
        count = torch.where(valid, tt.offsets[n + 1] - start, 0)
        slot = torch.arange(width, device=nodes.device)
        past = slot >= count[..., None]
        if width > tt.max_fanout:
            raise ValueError(f"width {width} exceeds the trie's largest fanout {tt.max_fanout}")
        edge = start[..., None] + slot  # in range: child_tokens is padded by max_fanout
        tokens = tt.child_tokens.index_select(0, edge.view(-1)).view(edge.shape)
        return tokens, past, start + 1  # edge e leads to node e + 1

    def step(self, nodes: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Node reached from ``nodes`` by ``tokens`` (broadcast together), -1 where no such edge."""
        nodes, tokens = torch.broadcast_tensors(nodes.long(), tokens.to(nodes.device).long())
        tt = self.torch_arrays(nodes.device)
        if self.n_edges == 0:
            return torch.full_like(nodes, -1)
        valid = (nodes >= 0) & (nodes < self.n_nodes) & (tokens >= 0) & (tokens < self.vocab_size)
        key = nodes * self.vocab_size + tokens
        pos = torch.searchsorted(tt.edge_keys, key.contiguous()).clamp_(max=self.n_edges - 1)
        found = valid & (tt.edge_keys[pos] == key)
        return torch.where(found, tt.child_nodes[pos], -1)

    def sid_at(self, nodes: torch.Tensor) -> torch.Tensor:
        """SID index of each node (-1 where the node does not end a SID, or is -1)."""
        tt = self.torch_arrays(nodes.device)
        n = nodes.long()
        valid = (n >= 0) & (n < self.n_nodes)
        return torch.where(valid, tt.terminal_sid[torch.where(valid, n, 0)], -1)

    # ----------------------------------------------------------------- disk
    def node_table(self) -> pa.Table:
        """One row per node, as ``nodes/`` stores it (module docstring)."""
        parent = np.concatenate([[-1], self.parent_of_edge])
        token = np.concatenate([[PAD], self.child_tokens]).astype(np.int32)
        columns = (np.arange(self.n_nodes, dtype=np.int64), parent, token, self.node_depth, self.terminal_sid)
        return pa.table(dict(zip(NODE_COLUMNS, columns)), schema=pa.schema(list(NODE_COLUMNS.items())))

    def save(self, path_dir: str | os.PathLike) -> None:
        """Write ``nodes/``, ``rows/`` and then ``trie.json`` into ``path_dir`` (a local path or URL)."""
        d = os.fspath(path_dir)
        write_parquet(self.node_table(), f"{d}/{NODES_DIR}/part-0.parquet")
        rows = pa.table({"row": np.arange(self.row_sid.size, dtype=np.int64), "sid_index": self.row_sid}, schema=pa.schema(list(ROW_COLUMNS.items())))
        write_parquet(rows, f"{d}/{ROWS_DIR}/part-0.parquet")
        write_meta(d, vocab_size=self.vocab_size, max_length=self.max_length, n_nodes=self.n_nodes, n_sids=self.n_sids, n_rows=int(self.row_sid.size))

    @classmethod
    def load(cls, path_dir: str | os.PathLike, validate: bool = True) -> "SIDTrie":
        """Read a trie written by :meth:`save` (or by a distributed job in the same layout); checks the
        format, the counts and (by default) the invariants."""
        d = os.fspath(path_dir)
        fs, inner = resolve_filesystem(d)
        with fs.open_input_stream(f"{inner}/{META_FILE}") as f:
            meta = json.loads(f.read())
        return cls.from_stored(meta, read_parquet(f"{d}/{NODES_DIR}"), read_parquet(f"{d}/{ROWS_DIR}"), where=d, validate=validate)

    @classmethod
    def from_stored(cls, meta: dict, nodes: pa.Table, rows: pa.Table, *, where: str, validate: bool = True) -> "SIDTrie":
        """A trie from what :meth:`save` stores: the contents of ``trie.json``, ``nodes/`` and ``rows/``
        (read from a directory, or from a published version checked against its manifest)."""
        if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where}/{META_FILE}: not a {FORMAT_NAME} v{FORMAT_VERSION} file: {meta.get('format')!r} v{meta.get('version')!r}")
        if meta.get("pad") != PAD or meta.get("eos") != EOS:
            raise ValueError(f"{where}/{META_FILE}: PAD/EOS {meta.get('pad')}/{meta.get('eos')} differ from {PAD}/{EOS}")
        nodes = _sorted_columns(nodes, NODE_COLUMNS, "node", f"{where}/{NODES_DIR}")
        rows = _sorted_columns(rows, ROW_COLUMNS, "row", f"{where}/{ROWS_DIR}")
        n_nodes = nodes["node"].size
        counts = {"n_nodes": n_nodes, "n_rows": rows["row"].size}
        wrong = {k: (meta.get(k), v) for k, v in counts.items() if meta.get(k) != v}
        if wrong:
            raise ValueError(f"{where}: the files disagree with {META_FILE} (field: recorded, found): {wrong}")
        parent = nodes["parent"]
        # Breadth-first numbering: node e + 1 is reached by edge e, and edges are grouped by parent.
        if n_nodes == 0 or parent[0] != -1 or np.any(parent[1:] < 0) or np.any(parent[1:] >= np.arange(1, n_nodes)) or np.any(np.diff(parent[1:]) < 0):
            raise ValueError(f"corrupt SIDTrie at {where}: node parents are not in breadth-first order")
        offsets = np.zeros(n_nodes + 1, dtype=np.int64)
        np.cumsum(np.bincount(parent[1:], minlength=n_nodes), out=offsets[1:])
        trie = cls(
            offsets=offsets,
            child_tokens=nodes["token"][1:],
            child_nodes=np.arange(1, n_nodes, dtype=np.int64),
            node_depth=nodes["depth"],
            terminal_sid=nodes["terminal_sid"],
            row_sid=rows["sid_index"],
            vocab_size=int(meta["vocab_size"]),
            max_length=int(meta["max_length"]),
        )
        if trie.n_sids != meta.get("n_sids"):
            raise ValueError(f"{where}: {trie.n_sids} SIDs in the files, {meta.get('n_sids')} in {META_FILE}")
        if validate:
            trie.validate()
        return trie


def write_meta(path_dir: str, *, vocab_size: int, max_length: int, n_nodes: int, n_sids: int, n_rows: int) -> None:
    """``trie.json`` of a trie whose ``nodes/`` and ``rows/`` are already written under ``path_dir``."""
    meta = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "vocab_size": int(vocab_size), "max_length": int(max_length),
        "pad": PAD, "eos": EOS, "n_nodes": int(n_nodes), "n_sids": int(n_sids), "n_rows": int(n_rows),
    }  # fmt: skip
    fs, inner = resolve_filesystem(path_dir)
    fs.create_dir(inner, recursive=True)
    with fs.open_output_stream(f"{inner}/{META_FILE}") as out:
        out.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def _sorted_columns(table: pa.Table, schema: dict[str, pa.DataType], key: str, where: str) -> dict[str, np.ndarray]:
    """The columns of ``table`` as numpy arrays in ``key`` order, after checking names and types and
    that ``key`` is exactly 0..n-1."""
    for name, dtype in schema.items():
        if name not in table.column_names or table.schema.field(name).type != dtype:
            found = table.schema.field(name).type if name in table.column_names else "missing"
            raise ValueError(f"{where}: column {name} must be {dtype}, found {found}")
    # Writable (copied where pyarrow hands out a read-only view): callers may wrap them in torch tensors.
    columns = {name: np.require(table.column(name).to_numpy(), requirements="W") for name in schema}
    order = columns[key]
    if np.any(np.diff(order) < 0):  # files and rows of a distributed writer come in any order
        perm = np.argsort(order, kind="stable")
        columns = {name: values[perm] for name, values in columns.items()}
    if not np.array_equal(columns[key], np.arange(columns[key].size)):
        raise ValueError(f"{where}: {key} must number the rows 0..{columns[key].size - 1} once each")
    return columns
