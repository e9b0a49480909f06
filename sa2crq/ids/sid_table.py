"""From full-depth codes to semantic IDs: lengths, buckets, disambiguation and the token layout.

Token layout (:class:`SIDVocabulary`): 0 = PAD, 1 = EOS, then the codes of level 1, level 2, ...
(each level its own token range, sized to that level's codebook including ACRQ extensions), then
the ``digit_vocab`` disambiguation digits. A SID is its code tokens, an optional digit, and EOS,
so a short ID and a longer one that extends it are both valid and distinct.

Collision rules (DESIGN §3.3):
* Items whose SID is a full-depth path shared with other items get a disambiguation digit, ranked
  by popularity (descending), then item id. ``always_digit`` gives every full-depth ID a digit
  (TIGER). A group larger than the digit vocabulary overflows: its first ``digit_vocab - 1`` items
  get digits 0..digit_vocab-2 and the rest share the last digit as one bucket (reported as
  ``digit_overflow_items``), so the vocabulary stays bounded and no item is dropped.
* Items truncated to the same short SID form a bucket; retrieval expands the bucket into its items.
* ``one_item_per_id``: every shared SID, truncated or not, is disambiguated; a group that would
  overflow the digit vocabulary is an error naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from sa2crq.config import SIDConfig
from sa2crq.data.columns import list_column
from sa2crq.data.segments import SEGMENT_NAMES
from sa2crq.ids.trie import EOS, PAD
from sa2crq.quantize.sarq import prefix_group_ids, sarq_lengths

FIRST_CODE_TOKEN = 2


@dataclass(frozen=True)
class SIDVocabulary:
    codebook_sizes: tuple[int, ...]
    digit_vocab: int

    @property
    def level_offsets(self) -> np.ndarray:
        return FIRST_CODE_TOKEN + np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]).astype(np.int64)

    @property
    def digit_offset(self) -> int:
        return FIRST_CODE_TOKEN + int(sum(self.codebook_sizes))

    @property
    def size(self) -> int:
        return self.digit_offset + self.digit_vocab

    @property
    def max_tokens(self) -> int:
        """Longest SID in tokens, EOS included."""
        return len(self.codebook_sizes) + 2

    def to_dict(self) -> dict:
        return {"codebook_sizes": list(self.codebook_sizes), "digit_vocab": self.digit_vocab}

    @classmethod
    def from_dict(cls, data: dict) -> "SIDVocabulary":
        return cls(tuple(int(k) for k in data["codebook_sizes"]), int(data["digit_vocab"]))


@dataclass(frozen=True)
class SIDTable:
    item_ids: np.ndarray
    segments: np.ndarray  # int8 segment codes
    popularity: np.ndarray
    codes: np.ndarray  # (N, L) full-depth codes
    code_depth: np.ndarray  # code levels kept in the SID
    digit: np.ndarray  # disambiguation digit, -1 for none
    tokens: np.ndarray  # (N, L + 2) SID tokens, EOS-terminated, PAD-filled
    sid_index: np.ndarray  # dense id of the distinct SID
    bucket_size: np.ndarray  # items sharing this item's SID
    vocab: SIDVocabulary
    tau: float | None
    threshold: int | None
    digit_overflow_items: int

    @property
    def path_tokens(self) -> np.ndarray:
        """(N, L + 2) :func:`code_path_tokens` of every item."""
        return code_path_tokens(self.codes, self.digit, self.vocab)

    @property
    def sid_len(self) -> np.ndarray:
        """Tokens before EOS (code levels plus the digit, if any)."""
        return self.code_depth + (self.digit >= 0)

    def to_arrow(self) -> pa.Table:
        n_tokens = self.sid_len + 1
        mask = np.arange(self.tokens.shape[1])[None, :] < n_tokens[:, None]
        sid = list_column(n_tokens, self.tokens[mask].astype(np.int32))
        levels = self.codes.shape[1]
        codes = pa.FixedSizeListArray.from_arrays(pa.array(self.codes.reshape(-1).astype(np.int32)), levels)
        return pa.table(
            {
                "item_id": pa.array(self.item_ids),
                "sid": sid,
                "sid_len": pa.array(self.sid_len.astype(np.int16)),
                "code_depth": pa.array(self.code_depth.astype(np.int16)),
                "digit": pa.array(self.digit.astype(np.int16)),
                "bucket_size": pa.array(self.bucket_size.astype(np.int32)),
                "segment": pa.array(np.asarray(SEGMENT_NAMES)[self.segments]),
                "popularity": pa.array(self.popularity.astype(np.int64)),
                "codes": codes,
            }
        )


def assign_sids(
    item_ids: np.ndarray,
    codes: np.ndarray,
    popularity: np.ndarray,
    segments: np.ndarray,
    codebook_sizes: tuple[int, ...],
    config: SIDConfig,
) -> SIDTable:
    """Vectorised over items: SARQ (or fixed) depths, then disambiguation digits, then tokens."""
    item_ids = np.asarray(item_ids)
    codes = np.asarray(codes, dtype=np.int64)
    popularity = np.asarray(popularity, dtype=np.int64)
    n, levels = codes.shape
    if n == 0:
        raise ValueError("cannot assign SIDs to an empty catalog")
    if len(np.unique(item_ids)) != n:
        raise ValueError("item ids must be unique")
    vocab = SIDVocabulary(tuple(int(k) for k in codebook_sizes), config.digit_vocab)

    groups = prefix_group_ids(codes)
    if config.adaptive_length:
        depth, tau, threshold = sarq_lengths(codes, popularity, config)
    else:
        depth, tau, threshold = np.full(n, levels, dtype=np.int64), None, None

    before_digit = sid_groups(groups, depth)
    group_size = np.bincount(before_digit)[before_digit]
    needs_digit = digit_required(group_size, depth == levels, config)
    rank = rank_within_groups(before_digit, popularity, item_ids)
    if config.one_item_per_id:
        overflow = needs_digit & (rank >= config.digit_vocab)
        if overflow.any():
            worst = before_digit[overflow][0]
            size = int((before_digit == worst).sum())
            raise ValueError(
                f"one_item_per_id: {int(overflow.sum())} items exceed the digit vocabulary of {config.digit_vocab}; "
                f"e.g. the group of item {item_ids[before_digit == worst][0]!r} has {size} items; raise sid.digit_vocab"
            )
    digit = np.where(needs_digit, np.minimum(rank, config.digit_vocab - 1), -1)
    return build_sid_table(item_ids, segments, popularity, codes, depth, digit, before_digit, vocab, tau, threshold)


def sid_groups(groups: list[np.ndarray], depth: np.ndarray) -> np.ndarray:
    """Dense id per item such that items share a SID before digits iff they share depth and the
    prefix at that depth; ``groups`` are the prefix ids of :func:`prefix_group_ids`."""
    prefix_at_depth = np.stack(groups, axis=1)[np.arange(len(depth)), depth - 1]
    _, before_digit = np.unique(depth * (int(prefix_at_depth.max()) + 1) + prefix_at_depth, return_inverse=True)
    return before_digit.reshape(-1)


def digit_required(group_size: np.ndarray, full: np.ndarray, config: SIDConfig) -> np.ndarray:
    """Which items need a disambiguation digit, from their SID group size and whether they are full depth."""
    shared = group_size > 1
    needs_digit = (shared | config.always_digit) & full
    if config.one_item_per_id:
        needs_digit |= shared
    return needs_digit


def build_sid_table(
    item_ids: np.ndarray,
    segments: np.ndarray,
    popularity: np.ndarray,
    codes: np.ndarray,
    depth: np.ndarray,
    digit: np.ndarray,
    before_digit: np.ndarray,
    vocab: SIDVocabulary,
    tau: float | None,
    threshold: int | None,
) -> SIDTable:
    """Tokens, SID index and bucket sizes from settled depths and digits (``before_digit`` from :func:`sid_groups`).

    Items on the last digit whose SID is shared are the digit overflow (see the module docstring).
    """
    n, levels = codes.shape
    _, sid_index = np.unique(before_digit * (vocab.digit_vocab + 1) + (digit + 1), return_inverse=True)
    sid_index = sid_index.reshape(-1).astype(np.int64)
    bucket_size = np.bincount(sid_index)[sid_index]

    tokens = token_rows(codes, depth, digit, vocab)
    return SIDTable(
        item_ids=item_ids,
        segments=np.asarray(segments, dtype=np.int8),
        popularity=popularity,
        codes=codes,
        code_depth=depth,
        digit=digit.astype(np.int64),
        tokens=tokens,
        sid_index=sid_index,
        bucket_size=bucket_size,
        vocab=vocab,
        tau=tau,
        threshold=threshold,
        digit_overflow_items=int(((digit == vocab.digit_vocab - 1) & (bucket_size > 1)).sum()),
    )


def token_rows(codes: np.ndarray, depth: np.ndarray, digit: np.ndarray, vocab: SIDVocabulary) -> np.ndarray:
    """(N, L + 2) int64 token rows: the first ``depth`` codes of each item, its digit (if >= 0), EOS, PAD-filled."""
    n, levels = codes.shape
    tokens = np.full((n, levels + 2), PAD, dtype=np.int64)
    keep = np.arange(levels)[None, :] < depth[:, None]
    tokens[:, :levels] = np.where(keep, vocab.level_offsets[None, :] + codes, PAD)
    rows = np.arange(n)
    has_digit = digit >= 0
    tokens[rows[has_digit], depth[has_digit]] = vocab.digit_offset + digit[has_digit]
    tokens[rows, depth + has_digit] = EOS
    return tokens


def code_path_tokens(codes: np.ndarray, digit: np.ndarray, vocab: SIDVocabulary) -> np.ndarray:
    """(N, L + 2) every item's full code path as tokens: all L code levels whatever its SID keeps,
    its digit if it has one, EOS. What the retriever reads of an item (its history input and dense
    item vector): a SARQ-shortened SID names a bucket, while the path still tells its items apart.
    For fixed-length IDs the path is the SID."""
    return token_rows(codes, np.full(len(codes), codes.shape[1]), digit, vocab)


def rank_within_groups(groups: np.ndarray, popularity: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
    """0-based rank of each item inside its group: most popular first, ties by item id."""
    _, id_order = np.unique(item_ids, return_inverse=True)
    order = np.lexsort((id_order.reshape(-1), -popularity, groups))
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    group_start = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order)) - group_start
    return rank
