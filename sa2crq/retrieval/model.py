"""Generative retriever: a T5-style encoder–decoder over SID tokens (DESIGN §3.4).

The encoder reads the request: a hashed user token (an encoder-only token numbered from
``vocab_size`` on), then the history items' SID tokens (EOS included, padding squeezed out), each
token's embedding plus, when ``item_content_dim`` is set, a linear projection of its item's content
embedding (projected once per item); a query text embedding, projected by a linear layer to
``query_tokens`` input vectors, is prepended. Attention is causal over history items (a token sees
its own and earlier items, never a later one; :meth:`GenerativeRetriever.encode_with_slots`), so the
encoding of a history cut after any item is part of the encoding of the whole history, and training
decodes every next-item target of a history from one encoder pass. The encoder's positions are most
of a training step's cost on CPU: that pass amortises them over ~4.5 targets per Beauty history,
where two cheaper inputs were measured and rejected: one pooled position per item (no faster on 2
cores, generation learned less than half as fast) and leaving each item's EOS out (~0.1 nats higher
training loss after the same steps). The decoder writes the target item's SID tokens, then EOS.

With ``dense_head`` the encoder's last visible position (the most recent item's EOS, or the last
query token) is also projected to a request vector whose inner product with every item's vector
(the mean of its SID code tokens' encoder embeddings plus its projected content, so cold items
have one too) gives a dense log-probability over the catalog, trained beside the SID loss (as
LIGER does); the item scorer combines it with the SID's beam log-probability.

Architecture (T5 v1.1-like): pre-norm RMSNorm, attention with inner width ``num_heads * head_dim``
projected back to ``d_model``, bucketed relative position bias (bidirectional buckets in the
encoder, within its item-causal mask; causal in decoder self-attention; one bias table per stack
shared by its layers, none in cross-attention), ReLU feed-forward, dropout, separate
encoder/decoder embeddings and an untied output layer.

Token conventions (shared with :mod:`sa2crq.ids.trie`): PAD = 0, EOS = 1. PAD in the encoder input
is padding (masked out; the encoder packs it to the right). PAD is also the decoder start token, as in T5: for a
target SID ``y`` (EOS-terminated, PAD-padded), ``decoder_input = [PAD] + y[:-1]``
(:func:`shift_right`) and the loss ignores PAD targets.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from sa2crq.ids.trie import EOS, PAD

DECODER_START = PAD


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class RetrieverConfig:
    """Shape of the generative retriever. Defaults are TIGER's (DESIGN §3.4).

    ``vocab_size`` is the SID (decoder) vocabulary, PAD and EOS included. ``encoder_vocab_size``
    (default: ``vocab_size``) adds the encoder-only tokens after the SID tokens, e.g. hashed user
    ids. ``query_dim`` is the query text-embedding width, 0 for a model without query input.
    """

    vocab_size: int
    encoder_vocab_size: int | None = None
    query_dim: int = 0
    query_tokens: int = 4
    # Width of the items' content embeddings fed to the encoder and the dense head; 0 = SID tokens only.
    item_content_dim: int = 0
    # A dense request-item head trained beside the SID loss (module docstring).
    dense_head: bool = False
    d_model: int = 128
    num_heads: int = 6
    head_dim: int = 64
    d_ff: int = 1024
    encoder_layers: int = 4
    decoder_layers: int = 4
    dropout: float = 0.1
    relative_attention_buckets: int = 32
    relative_attention_max_distance: int = 128

    def __post_init__(self) -> None:
        if self.encoder_vocab_size is None:
            object.__setattr__(self, "encoder_vocab_size", self.vocab_size)
        ints = (
            "vocab_size", "encoder_vocab_size", "query_dim", "query_tokens", "item_content_dim", "d_model", "num_heads", "head_dim",
            "d_ff", "encoder_layers", "decoder_layers", "relative_attention_buckets", "relative_attention_max_distance",
        )  # fmt: skip
        for name in ints:
            value = getattr(self, name)
            _require(isinstance(value, int) and not isinstance(value, bool), f"retriever.{name} must be an int, got {value!r}")
        _require(self.vocab_size > EOS + 1, f"retriever.vocab_size must exceed {EOS + 1} (PAD, EOS, codes), got {self.vocab_size}")
        _require(
            self.encoder_vocab_size >= self.vocab_size,
            f"retriever.encoder_vocab_size ({self.encoder_vocab_size}) must be >= vocab_size ({self.vocab_size})",
        )
        _require(self.query_dim >= 0, f"retriever.query_dim must be >= 0, got {self.query_dim}")
        _require(self.item_content_dim >= 0, f"retriever.item_content_dim must be >= 0, got {self.item_content_dim}")
        _require(isinstance(self.dense_head, bool), f"retriever.dense_head must be a bool, got {self.dense_head!r}")
        _require(self.query_tokens >= 1, f"retriever.query_tokens must be >= 1, got {self.query_tokens}")
        for name in ("d_model", "num_heads", "head_dim", "d_ff", "encoder_layers", "decoder_layers"):
            _require(getattr(self, name) >= 1, f"retriever.{name} must be >= 1, got {getattr(self, name)}")
        _require(0.0 <= self.dropout < 1.0, f"retriever.dropout must be in [0, 1), got {self.dropout}")
        # Bidirectional buckets split in two halves, each half an exact range plus a log range.
        _require(
            self.relative_attention_buckets >= 4,
            f"retriever.relative_attention_buckets must be >= 4, got {self.relative_attention_buckets}",
        )
        _require(
            self.relative_attention_max_distance > self.relative_attention_buckets // 2,
            "retriever.relative_attention_max_distance must exceed relative_attention_buckets // 2",
        )

    @property
    def inner_dim(self) -> int:
        """Attention width, ``num_heads * head_dim`` (T5-style, independent of ``d_model``)."""
        return self.num_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RetrieverConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        _require(not unknown, f"unknown retriever config field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**data)


def shift_right(targets: torch.Tensor) -> torch.Tensor:
    """Teacher-forcing decoder input for PAD-padded targets (..., T): ``[PAD] + targets[..., :-1]``."""
    start = torch.full_like(targets[..., :1], DECODER_START)
    return torch.cat([start, targets[..., :-1]], dim=-1)


def relative_position_bucket(
    relative_position: torch.Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """T5's bucketing of ``key_pos - query_pos``: exact for small distances, log-spaced up to
    ``max_distance``, one bucket beyond. Bidirectional uses half the buckets per direction; causal
    maps every future offset to bucket 0 (it is masked anyway)."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # clamp(min=1) only keeps log() finite where the small branch is taken anyway.
    large = max_exact + (
        torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
    """Learned per-head scalar bias per relative-position bucket; computed once per stack."""

    def __init__(self, num_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, query_len: int, key_len: int, device: torch.device) -> torch.Tensor:
        """(1, H, query_len, key_len) additive bias."""
        q = torch.arange(query_len, device=device)[:, None]
        k = torch.arange(key_len, device=device)[None, :]
        bucket = relative_position_bucket(
            k - q, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        return self.embedding(bucket).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    """Multi-head attention with T5 inner width ``num_heads * head_dim`` and no biases."""

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        inner = config.inner_dim
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.dropout = config.dropout

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, num_heads * head_dim) -> (B, num_heads, N, head_dim)."""
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """``attn_bias`` is additive, broadcastable to (B, H, Tq, Tk), masked entries at dtype min."""
        return self.attend(self.split_heads(self.q(x)), *self.keys_values(kv), attn_bias)

    def keys_values(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``kv`` (B, Tk, d_model), each (B, H, Tk, head_dim)."""
        return self.split_heads(self.k(kv)), self.split_heads(self.v(kv))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        """Attention of queries (B, H, Tq, head_dim) over keys and values (B, H, Tk, head_dim),
        projected back to (B, Tq, d_model)."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        b, _, n, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.dropout(F.relu(self.wi(x))))


class EncoderLayer(nn.Module):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.attn = Attention(config)
        self.ff_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        h = self.attn_norm(x)
        x = x + self.dropout(self.attn(h, h, attn_bias))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.self_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.self_attn = Attention(config)
        self.cross_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.cross_attn = Attention(config)
        self.ff_norm = nn.RMSNorm(config.d_model, eps=1e-6)
        self.ff = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, self_bias: torch.Tensor, cross_kv: tuple[torch.Tensor, torch.Tensor], cross_bias: torch.Tensor
    ) -> torch.Tensor:
        """``cross_kv``: this layer's cross-attention keys and values of the memory (``keys_values``)."""
        h = self.self_norm(x)
        x = x + self.dropout(self.self_attn(h, h, self_bias))
        cross = self.cross_attn
        x = x + self.dropout(cross.attend(cross.split_heads(cross.q(self.cross_norm(x))), *cross_kv, cross_bias))
        return x + self.dropout(self.ff(self.ff_norm(x)))


def mixed_precision(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (training and generation alike); full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)


def _mask_value(dtype: torch.dtype) -> float:
    # A finite minimum rather than -inf: a row with no visible key gives finite garbage, not NaN.
    return torch.finfo(dtype).min


def _memory_padding_bias(memory_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, 1, S) additive cross-attention bias hiding the memory's padding positions."""
    bias = torch.zeros(memory_mask.shape, dtype=dtype, device=memory_mask.device)
    return bias.masked_fill(~memory_mask, _mask_value(dtype))[:, None, None, :]


@dataclass(frozen=True, eq=False)
class ItemFeatures:
    """Every catalog item, addressed by dense index (the SID table row): its SID tokens (N, T),
    EOS-terminated and PAD-filled (what training decodes); its full code path (N, T')
    (:func:`sa2crq.ids.sid_table.code_path_tokens`: what the encoder reads of a history item and
    the dense head's item vector is made of; None when every SID is its item's full path, as
    fixed-length IDs are); and, for a model with ``item_content_dim``, its content embedding
    (N, item_content_dim)."""

    tokens: torch.Tensor
    content: torch.Tensor | None = None
    path_tokens: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"item tokens must be (N, T), got {tuple(self.tokens.shape)}")
        if self.path_tokens is not None and (self.path_tokens.dim() != 2 or len(self.path_tokens) != len(self.tokens)):
            raise ValueError(f"item path tokens must be (N={len(self.tokens)}, T), got {tuple(self.path_tokens.shape)}")
        if self.content is not None and (self.content.dim() != 2 or len(self.content) != len(self.tokens)):
            raise ValueError(f"item content must be (N={len(self.tokens)}, D), got {tuple(self.content.shape)}")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def read_tokens(self) -> torch.Tensor:
        """(N, T') the tokens the encoder and the dense head read of each item."""
        return self.tokens if self.path_tokens is None else self.path_tokens

    def to(self, device: torch.device | str) -> "ItemFeatures":
        content = None if self.content is None else self.content.to(device=device, dtype=torch.float32)
        path = None if self.path_tokens is None else self.path_tokens.to(device)
        return ItemFeatures(self.tokens.to(device), content, path)


class GenerativeRetriever(nn.Module):
    """T5-style encoder–decoder from a request to the SID of the item to retrieve.

    Weights are drawn from the global torch RNG: seed with ``torch.manual_seed`` before
    construction for a reproducible model.
    """

    def __init__(self, config: RetrieverConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.encoder_embedding = nn.Embedding(config.encoder_vocab_size, d)
        self.decoder_embedding = nn.Embedding(config.vocab_size, d)
        self.query_projection = nn.Linear(config.query_dim, config.query_tokens * d) if config.query_dim > 0 else None
        self.content_projection = nn.Linear(config.item_content_dim, d, bias=False) if config.item_content_dim > 0 else None
        self.dense_projection = nn.Linear(d, d, bias=False) if config.dense_head else None
        self.encoder_position_bias = RelativePositionBias(
            config.num_heads, config.relative_attention_buckets, config.relative_attention_max_distance, bidirectional=True
        )
        self.decoder_position_bias = RelativePositionBias(
            config.num_heads, config.relative_attention_buckets, config.relative_attention_max_distance, bidirectional=False
        )
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        self.encoder_norm = nn.RMSNorm(d, eps=1e-6)
        self.decoder_norm = nn.RMSNorm(d, eps=1e-6)
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(d, config.vocab_size, bias=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- encoder ---------------------------------------------------------------------------
    def item_vectors(self, items: ItemFeatures, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(*rows.shape, d_model) vectors of the items at dense indices ``rows`` (all items when None);
        the vector of a negative index (padding) is zero. Mean of the code path tokens' encoder
        embeddings, plus the projected content embedding when the model reads content."""
        index = torch.arange(len(items), device=items.tokens.device) if rows is None else rows
        safe = index.clamp_min(0)
        tokens = items.read_tokens[safe]
        codes = ((tokens != PAD) & (tokens != EOS)).to(self.encoder_embedding.weight.dtype)
        summed = (self.encoder_embedding(tokens) * codes[..., None]).sum(-2)
        vectors = summed / codes.sum(-1, keepdim=True).clamp_min(1.0)
        if self.content_projection is not None:
            vectors = vectors + self.content_projection(self._content(items)[safe].to(vectors.dtype))
        return vectors * (index >= 0)[..., None].to(vectors.dtype)

    def _content(self, items: ItemFeatures) -> torch.Tensor:
        if items.content is None:
            raise ValueError(f"this retriever reads item content (item_content_dim {self.config.item_content_dim}): pass ItemFeatures.content")
        return items.content

    @staticmethod
    def _history_tokens(history: torch.Tensor, items: ItemFeatures) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) the history items' code path tokens, oldest item first, EOS kept (it ends each item, and
        the EOS positions learn better than without them), padding squeezed out to the right; and
        (B, L) the history slot (column of ``history``) each token belongs to, 0 at padding."""
        rows = items.read_tokens[history.clamp_min(0)]  # (B, H, T)
        real = (history >= 0)[:, :, None] & (rows != PAD)
        tokens = rows.masked_fill(~real, PAD).flatten(1)
        slots = torch.arange(history.shape[1], device=history.device)[None, :, None].expand_as(rows).flatten(1)
        # A stable sort on "is padding" moves real tokens to the front, in order.
        order = torch.sort((~real).flatten(1).to(torch.int8), dim=1, stable=True).indices
        width = int(real.flatten(1).sum(1).max()) if tokens.numel() else 0
        order = order[:, :width]
        tokens = tokens.gather(1, order)
        return tokens, slots.gather(1, order).masked_fill(tokens == PAD, 0)

    def encode(
        self,
        history: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
        items: ItemFeatures | None = None,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of requests.

        ``history`` (B, H) dense item indices, oldest first, -1 = padding (needs ``items``);
        ``users`` (B,) encoder-only user tokens; ``query`` (B, query_dim) float. Returns
        ``memory`` (B, S, d_model) and ``memory_mask`` (B, S) bool, True at real positions, in the
        order query tokens, user token, history items.
        """
        memory, mask, _ = self.encode_with_slots(history, users, items, query)
        return memory, mask

    def encode_with_slots(
        self,
        history: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
        items: ItemFeatures | None = None,
        query: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`encode`, plus (B, S) the history slot (column of ``history``) of every memory
        position: -1 for the query and user tokens, ``H`` at padding.

        Attention is causal over history items: a position sees the query and user tokens and the
        tokens of its own and earlier items, never a later item's. So the memory positions of
        slots <= c are exactly the encoding of the history cut after item c, and training reads
        every next-item target of a history from one pass (:func:`sa2crq.retrieval.training.make_batch`).
        """
        parts: list[torch.Tensor] = []
        slots: list[torch.Tensor] = []
        if query is not None:
            if self.query_projection is None:
                raise ValueError("this retriever has no query input (config.query_dim == 0)")
            if query.dim() != 2 or query.shape[1] != self.config.query_dim:
                raise ValueError(f"query must be (B, {self.config.query_dim}), got {tuple(query.shape)}")
            q = self.query_projection(query.to(self.query_projection.weight.dtype))
            parts.append(q.view(query.shape[0], self.config.query_tokens, self.config.d_model))
            slots.append(torch.full((query.shape[0], self.config.query_tokens), -1, dtype=torch.long, device=query.device))
        if users is not None:
            if users.dim() != 1:
                raise ValueError(f"users must be (B,), got {tuple(users.shape)}")
            parts.append(self.encoder_embedding(users)[:, None, :])
            slots.append(torch.full((users.shape[0], 1), -1, dtype=torch.long, device=users.device))
        if history is not None:
            if history.dim() != 2:
                raise ValueError(f"history must be (B, H), got {tuple(history.shape)}")
            if items is None:
                raise ValueError("encoding a history needs the catalog's ItemFeatures")
            tokens, token_slots = self._history_tokens(history, items)
            x = self.encoder_embedding(tokens)
            if self.content_projection is not None:
                # Projected once per history item, then copied to each of its tokens (none to padding).
                content = self.content_projection(self._content(items)[history.clamp_min(0)].to(x.dtype))  # (B, H, d)
                per_token = content.gather(1, token_slots[:, :, None].expand(-1, -1, content.shape[-1]))
                x = x + per_token.masked_fill((tokens == PAD)[:, :, None], 0.0)
            parts.append(x)
            slots.append(token_slots.masked_fill(tokens == PAD, history.shape[1]))
        if not parts:
            raise ValueError("encode needs a history, a user token or a query")
        if len({p.shape[0] for p in parts}) > 1:
            raise ValueError(f"batch size mismatch between request parts: {[p.shape[0] for p in parts]}")
        x = torch.cat(parts, dim=1)
        slot = torch.cat(slots, dim=1)
        # Padding carries slot H, every real position a smaller one.
        mask = slot < (history.shape[1] if history is not None else 0)

        # Real inputs are contiguous from position 0 (padding only at the right), so a request's
        # relative positions do not depend on how much padding its batch needs.
        seq = x.shape[1]
        bias = self.encoder_position_bias(seq, seq, x.device)  # (1, H, S, S)
        visible = mask[:, None, :] & (slot[:, None, :] <= slot[:, :, None])  # (B, S query, S key)
        bias = bias.masked_fill(~visible[:, None], _mask_value(bias.dtype))  # (B, H, S, S)
        x = self.dropout(x)
        for layer in self.encoder_layers:
            x = layer(x, bias)
        return self.dropout(self.encoder_norm(x)), mask, slot

    def dense_request(self, memory: torch.Tensor, memory_mask: torch.Tensor, memory_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(N, d_model) the dense head's request vectors: the projected last position of each row of
        ``memory_mask`` (N, S) (the most recent visible item's EOS, or the last query token), read
        from ``memory`` row ``memory_rows[n]`` (default: row n)."""
        if self.dense_projection is None:
            raise ValueError("this retriever has no dense head (config.dense_head is false)")
        last = (memory_mask.long().cumsum(1) * memory_mask).argmax(1)
        rows = torch.arange(memory_mask.shape[0], device=memory.device) if memory_rows is None else memory_rows
        return self.dense_projection(memory[rows, last])

    def dense_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """(B, N) dense request-item logits against ``item_vectors`` (N, d_model) of :meth:`item_vectors`."""
        return self.dense_request(memory, memory_mask) @ item_vectors.T

    # -- decoder ---------------------------------------------------------------------------
    def decode(
        self, memory: torch.Tensor, memory_mask: torch.Tensor, decoder_input: torch.Tensor, memory_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Causal decoder: ``decoder_input`` (N, T) long, starting with PAD (see :func:`shift_right`).

        Row n attends to ``memory`` row ``memory_rows[n]`` (default: row n) where ``memory_mask``
        (N, S) is True, so several targets can share one encoded request, each seeing its own part
        of it; the memory's keys and values are projected once per memory row. Returns logits
        (N, T, vocab_size); position t sees decoder_input[:, :t + 1].
        """
        n_rows = memory.shape[0] if memory_rows is None else memory_rows.shape[0]
        if decoder_input.dim() != 2 or decoder_input.shape[0] != n_rows or memory_mask.shape[0] != n_rows:
            raise ValueError(f"decoder_input and memory_mask must have N={n_rows} rows, got {tuple(decoder_input.shape)}, {tuple(memory_mask.shape)}")
        t = decoder_input.shape[1]
        x = self.decoder_embedding(decoder_input)
        bias = self.decoder_position_bias(t, t, x.device)  # (1, H, T, T)
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        self_bias = bias.masked_fill(future, _mask_value(bias.dtype))
        cross_bias = _memory_padding_bias(memory_mask, x.dtype)
        x = self.dropout(x)
        for layer in self.decoder_layers:
            keys, values = layer.cross_attn.keys_values(memory)
            if memory_rows is not None:
                keys, values = keys.index_select(0, memory_rows), values.index_select(0, memory_rows)
            x = layer(x, self_bias, (keys, values), cross_bias)
        return self.output(self.dropout(self.decoder_norm(x)))

    def forward(
        self,
        decoder_input: torch.Tensor,
        *,
        history: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
        items: ItemFeatures | None = None,
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, T, vocab_size)."""
        memory, memory_mask = self.encode(history, users, items, query)
        return self.decode(memory, memory_mask, decoder_input)


class IncrementalDecoder:
    """:meth:`GenerativeRetriever.decode` one position at a time for the beams of a batch of requests.

    Equal, up to float rounding, to decoding each beam's full prefix over a copy of its request's
    memory (what :func:`sa2crq.retrieval.beam.reference_beam_search` does, the test oracle), at a
    fraction of the cost:

    * each decoder layer's cross-attention keys and values are projected once per request, and a
      request's beams attend to them as the query positions of one attention call (no per-beam copy
      of the memory);
    * self-attention keys and values of earlier positions are cached, so a step computes one new
      position per beam; :meth:`step` first gathers each beam's cache rows from its parent beam.

    Inference only: the model must be in eval mode (no dropout), and no gradients flow.
    """

    def __init__(self, model: GenerativeRetriever, memory: torch.Tensor, memory_mask: torch.Tensor, max_length: int) -> None:
        if model.training:
            raise ValueError("IncrementalDecoder needs the model in eval mode")
        self.model = model
        with torch.no_grad():
            self.cross = [layer.cross_attn.keys_values(memory) for layer in model.decoder_layers]
        self.cross_bias = _memory_padding_bias(memory_mask, memory.dtype)
        self.position_bias = model.decoder_position_bias(max_length, max_length, memory.device)  # (1, H, L, L)
        # Per layer, position-major (t, B * W, H, head_dim), so reordering beams is one
        # index_select per layer straight into the grown cache (no gather-then-concatenate copy).
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.length = 0

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, parent: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, W, vocab_size) of the next token after ``tokens`` (B, W), the token at position
        ``self.length`` of each beam. ``parent`` (B, W): the beam of the previous step each beam
        extends (None at the first step)."""
        model, b, w = self.model, tokens.shape[0], tokens.shape[1]
        t = self.length
        if t >= self.position_bias.shape[-1]:
            raise ValueError(f"decoding past max_length {self.position_bias.shape[-1]}")
        if t > 0:  # the cache row each beam continues
            if parent is None:
                raise ValueError("every step after the first needs each beam's parent")
            cached_width = self.keys[0].shape[1] // b
            # A first step may have run one beam per request; every beam then descends from it.
            rows = (torch.arange(b, device=tokens.device)[:, None] * cached_width + parent.clamp(max=cached_width - 1)).reshape(-1)
        self_bias = self.position_bias[:, :, t : t + 1, : t + 1]  # the new position sees 0..t
        heads, head_dim = model.config.num_heads, model.config.head_dim
        x = model.decoder_embedding(tokens)  # (B, W, d)
        for i, layer in enumerate(model.decoder_layers):
            attn = layer.self_attn
            h = layer.self_norm(x).reshape(b * w, 1, -1)
            new_k, new_v = (y.reshape(1, b * w, heads, head_dim) for y in attn.keys_values(h))
            if t == 0:
                k, v = new_k, new_v
                self.keys.append(k)
                self.values.append(v)
            else:
                k = self.keys[i] = self._grow(self.keys[i], new_k, rows)
                v = self.values[i] = self._grow(self.values[i], new_v, rows)
            out = attn.attend(attn.split_heads(attn.q(h)), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3), self_bias)
            x = x + out.view(b, w, -1)
            cross = layer.cross_attn
            x = x + cross.attend(cross.split_heads(cross.q(layer.cross_norm(x))), *self.cross[i], self.cross_bias)
            x = x + layer.ff(layer.ff_norm(x))
        self.length += 1
        return model.output(model.decoder_norm(x))

    @staticmethod
    def _grow(cache: torch.Tensor, new: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``cache`` (t, R, H, D) with its rows reordered by ``rows`` and ``new`` (1, len(rows), H, D) appended."""
        out = cache.new_empty((cache.shape[0] + 1, rows.numel(), *cache.shape[2:]))
        torch.index_select(cache, 1, rows, out=out[:-1])
        out[-1] = new[0]
        return out
