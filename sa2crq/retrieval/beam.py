"""Batched beam search over SIDs, constrained by the prefix trie of valid IDs (DESIGN §3.4).

All requests and their W beams decode together. Each step takes every live beam's next-token
log-probabilities, allows only tokens with a child in the beam's trie node (so EOS is legal only
where an ID ends), and keeps the top W extensions per request. Finished beams (EOS emitted) keep
their score and extend only with PAD at log-prob 0, so they compete with longer prefixes on equal
terms (no length normalisation: a SID's score is its total log-probability, EOS included).

Two implementations return the same beams and scores (up to float rounding; the tests pin it on
random tries and models):

* :func:`beam_search`, the one the product runs. The decoder runs incrementally
  (:class:`~sa2crq.retrieval.model.IncrementalDecoder`): cross-attention keys and values once per
  request, shared by its beams, and a self-attention cache, so a step costs one new position per
  beam; the first step runs one beam per request, not W copies. The trie step is sparse: a beam's
  candidates are its node's children, gathered from the CSR arrays
  (:meth:`~sa2crq.ids.trie.SIDTrie.children`, as wide as the depth's largest fanout), so the
  constraint costs O(children) per beam and never builds a (B, W, vocab) mask.
* :func:`reference_beam_search`, the straightforward implementation kept as the test oracle and
  the benchmark's baseline: every step re-runs the whole decoder over each beam's full prefix
  against a per-beam copy of the memory, and masks a dense (B, W, vocab) trie mask.

Both loops take their logits from a :data:`LogitsSource` (:func:`search_beams`,
:func:`search_beams_reference`), so the benchmark can time the search alone by replaying recorded
logits. Unconstrained decoding (``trie=None``) is kept for measuring hallucination: pass the trie
as ``validity_trie`` to label which generated sequences are real SIDs.

Everything stays on the device of the inputs; the step loop has no per-beam Python work and one
host sync per step (the early-stop test).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.model import DECODER_START, GenerativeRetriever, IncrementalDecoder

LogitsSource = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``source(tokens, parent)`` -> next-token logits (B, W, V): ``tokens`` (B, W) is each beam's
latest token (the decoder start token at the first step) and ``parent`` (B, W) the beam of the
previous step it extends (None at the first step)."""


@dataclass
class BeamResult:
    """Top-W sequences per request, best first.

    ``tokens`` (B, W, max_length) long: generated tokens, EOS included, PAD after EOS and in
    empty slots. ``log_probs`` (B, W): total log-probability, -inf for empty slots (fewer than W
    valid continuations exist). ``sid_index`` (B, W) long: trie SID index, -1 where the sequence is
    not a valid SID (or the slot is empty, or no trie was given). ``finished`` (B, W) bool: the
    sequence ended with EOS within ``max_length``.
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    sid_index: torch.Tensor
    finished: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """(B, W) number of tokens before the PAD tail (EOS included)."""
        return (self.tokens != PAD).sum(dim=-1)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Inference without dropout; restores the caller's train/eval mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _score_dtype(memory: torch.Tensor) -> torch.dtype:
    # Accumulate in at least float32 even when the model runs in half precision.
    return torch.promote_types(memory.dtype, torch.float32)


def sparse_constraint(
    trie: SIDTrie, logits: torch.Tensor, nodes: torch.Tensor, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast path's trie step: the logits (B, W, width) of each beam's node's children, -inf in
    slots past its children, with their tokens and the node of slot 0 (:meth:`SIDTrie.children`)."""
    child_tokens, past, first_child = trie.children(nodes, width)
    child_logits = logits.expand(*nodes.shape, logits.shape[-1]).gather(-1, child_tokens)
    return child_logits.masked_fill_(past, float("-inf")), child_tokens, first_child


def dense_constraint(trie: SIDTrie, logp: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """The reference's trie step: ``logp`` (B, W, V) with every token the beam's node has no child
    for set to -inf, through a dense (B, W, V) mask (widened with False past the trie's vocabulary)."""
    mask = trie.next_token_mask(nodes)
    if trie.vocab_size < logp.shape[-1]:
        mask = torch.nn.functional.pad(mask, (0, logp.shape[-1] - trie.vocab_size), value=False)
    return logp.masked_fill(~mask, float("-inf"))


def _walk(trie: SIDTrie, tokens: torch.Tensor) -> torch.Tensor:
    """Trie node reached by each PAD-padded row of ``tokens`` (..., T); -1 where it leaves the trie."""
    node = torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
    for t in range(tokens.shape[-1]):
        tok = tokens[..., t]
        node = torch.where(tok != PAD, trie.step(node, tok), node)
    return node


def _check_arguments(beam_width: int, max_length: int, vocab_size: int, trie: SIDTrie | None, validity_trie: SIDTrie | None) -> None:
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    for name, t in (("trie", trie), ("validity_trie", validity_trie)):
        if t is not None and t.vocab_size > vocab_size:
            raise ValueError(f"{name} vocab_size {t.vocab_size} exceeds the model's {vocab_size}")


def _result(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    nodes: torch.Tensor,
    finished: torch.Tensor,
    max_length: int,
    trie: SIDTrie | None,
    validity_trie: SIDTrie | None,
) -> BeamResult:
    tokens = torch.nn.functional.pad(tokens, (0, max_length - tokens.shape[-1]), value=PAD)
    if validity_trie is None:
        sid_index = torch.full(scores.shape, -1, dtype=torch.long, device=scores.device)
    else:
        end = nodes if validity_trie is trie else _walk(validity_trie, tokens)
        sid_index = torch.where(finished, validity_trie.sid_at(end), -1)
    return BeamResult(tokens=tokens, log_probs=scores, sid_index=sid_index, finished=finished)


@torch.no_grad()
def beam_search(
    model: GenerativeRetriever,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    *,
    beam_width: int,
    max_length: int,
    trie: SIDTrie | None,
    validity_trie: SIDTrie | None = None,
) -> BeamResult:
    """Top-``beam_width`` SIDs for each request of an encoded batch (``model.encode`` output).

    ``trie`` constrains decoding to valid SIDs (None: unconstrained). ``validity_trie`` (default:
    ``trie``) is only used to fill ``sid_index``. ``max_length`` counts tokens including EOS
    (``SIDVocabulary.max_tokens`` or ``trie.max_length``). The model runs in eval mode for the
    search; its mode is restored afterwards. Runs under the caller's autocast, if any.
    """
    _check_arguments(beam_width, max_length, model.config.vocab_size, trie, validity_trie)
    with _eval_mode(model):
        decoder = IncrementalDecoder(model, memory, memory_mask, max_length)
        return search_beams(
            decoder.step, batch=memory.shape[0], beam_width=beam_width, max_length=max_length, trie=trie,
            validity_trie=validity_trie, device=memory.device, dtype=_score_dtype(memory),
        )  # fmt: skip


@torch.no_grad()
def search_beams(
    source: LogitsSource,
    *,
    batch: int,
    beam_width: int,
    max_length: int,
    trie: SIDTrie | None,
    validity_trie: SIDTrie | None = None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> BeamResult:
    """:func:`beam_search`'s loop with its logits taken from ``source``; scores accumulate in ``dtype``."""
    if validity_trie is None:
        validity_trie = trie
    b, w = batch, beam_width
    fanout = trie.torch_arrays(device).depth_fanout if trie is not None else ()
    # One live beam per request at the start: W copies of the start state would fill the beam
    # with duplicates of each first-step candidate.
    scores = torch.zeros(b, 1, dtype=dtype, device=device)
    tokens = torch.full((b, 1, 0), PAD, dtype=torch.long, device=device)
    finished = torch.zeros(b, 1, dtype=torch.bool, device=device)
    nodes = torch.zeros(b, 1, dtype=torch.long, device=device)  # trie node per beam (-1: empty)
    last = torch.full((b, 1), DECODER_START, dtype=torch.long, device=device)
    parent: torch.Tensor | None = None
    request = torch.arange(b, device=device)[:, None]
    for step in range(max_length):
        logits = source(last, parent).to(dtype)
        if trie is None:
            # Slot = token over the whole vocabulary; PAD is only a finished beam's continuation.
            candidates = torch.log_softmax(logits, dim=-1)
            candidates[..., PAD] = float("-inf")
            pad_only = torch.full_like(candidates[0, 0], float("-inf"))
            pad_only[PAD] = 0.0
            candidates = torch.where(finished[..., None], pad_only, candidates)
        else:
            # Slot 0: a finished beam's PAD continuation; slot 1 + j: the beam node's j-th child.
            child_logits, child_tokens, first_child = sparse_constraint(trie, logits, nodes, fanout[step] if step < len(fanout) else 0)
            child_logp = (child_logits - logits.logsumexp(-1, keepdim=True)).masked_fill_(finished[..., None], float("-inf"))
            pad = torch.where(finished, 0.0, float("-inf")).to(dtype)[..., None]
            candidates = torch.cat([pad, child_logp], dim=-1)
        slots = candidates.shape[-1]
        flat_scores = (scores[..., None] + candidates).view(b, -1)
        if flat_scores.shape[1] < w:  # fewer candidates than beams: the rest are empty slots
            flat_scores = torch.nn.functional.pad(flat_scores, (0, w - flat_scores.shape[1]), value=float("-inf"))
        scores, flat = flat_scores.topk(w, dim=-1)  # sorted, best first
        parent = torch.div(flat, slots, rounding_mode="floor").clamp_(max=candidates.shape[1] - 1)
        slot = flat % slots
        empty = scores == float("-inf")  # fewer than W finite continuations for this request
        parent_finished = finished[request, parent]
        if trie is None:
            token = slot
        else:
            child = (slot - 1).clamp_(min=0)
            token = torch.where(slot == 0, PAD, child_tokens[request, parent, child])
            nodes = torch.where(slot == 0, nodes[request, parent], first_child[request, parent] + child)
            nodes = torch.where(empty, -1, nodes)
        tokens = torch.cat([tokens[request, parent], token[..., None]], dim=-1).masked_fill(empty[..., None], PAD)
        finished = (parent_finished | (token == EOS)) & ~empty
        last = token
        if bool((finished | empty).all()):
            break
    return _result(tokens, scores, nodes, finished, max_length, trie, validity_trie)


class ReferenceDecoder:
    """The oracle's :data:`LogitsSource`: the whole decoder over each beam's full prefix, against a
    per-beam copy of its request's memory."""

    def __init__(self, model: GenerativeRetriever, memory: torch.Tensor, memory_mask: torch.Tensor, beam_width: int) -> None:
        self.model = model
        self.memory = memory.repeat_interleave(beam_width, dim=0)  # row r = request r // W, beam r % W
        self.memory_mask = memory_mask.repeat_interleave(beam_width, dim=0)
        self.prefix: torch.Tensor | None = None

    def __call__(self, tokens: torch.Tensor, parent: torch.Tensor | None) -> torch.Tensor:
        b, w = tokens.shape
        if parent is None:
            self.prefix = tokens[..., None]
        else:
            request = torch.arange(b, device=tokens.device)[:, None]
            self.prefix = torch.cat([self.prefix[request, parent], tokens[..., None]], dim=-1)
        logits = self.model.decode(self.memory, self.memory_mask, self.prefix.view(b * w, -1))[:, -1]
        return logits.view(b, w, -1)


@torch.no_grad()
def reference_beam_search(
    model: GenerativeRetriever,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    *,
    beam_width: int,
    max_length: int,
    trie: SIDTrie | None,
    validity_trie: SIDTrie | None = None,
) -> BeamResult:
    """:func:`beam_search`, computed the straightforward way (module docstring): the test oracle."""
    _check_arguments(beam_width, max_length, model.config.vocab_size, trie, validity_trie)
    with _eval_mode(model):
        return search_beams_reference(
            ReferenceDecoder(model, memory, memory_mask, beam_width), batch=memory.shape[0], beam_width=beam_width,
            max_length=max_length, trie=trie, validity_trie=validity_trie, device=memory.device, dtype=_score_dtype(memory),
        )  # fmt: skip


@torch.no_grad()
def search_beams_reference(
    source: LogitsSource,
    *,
    batch: int,
    beam_width: int,
    max_length: int,
    trie: SIDTrie | None,
    validity_trie: SIDTrie | None = None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> BeamResult:
    """:func:`reference_beam_search`'s loop with its logits taken from ``source`` (always W beams
    per request, a dense trie mask)."""
    if validity_trie is None:
        validity_trie = trie
    b, w = batch, beam_width
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    scores = torch.full((b, w), float("-inf"), dtype=dtype, device=device)
    scores[:, 0] = 0.0
    tokens = torch.full((b, w, 0), PAD, dtype=torch.long, device=device)
    finished = torch.zeros(b, w, dtype=torch.bool, device=device)
    nodes = torch.zeros(b, w, dtype=torch.long, device=device)
    last = torch.full((b, w), DECODER_START, dtype=torch.long, device=device)
    parent: torch.Tensor | None = None
    request = torch.arange(b, device=device)[:, None]
    for _ in range(max_length):
        logits = source(last, parent)
        vocab = logits.shape[-1]
        logp = torch.log_softmax(logits.to(dtype), dim=-1)
        logp[..., PAD] = float("-inf")
        if trie is not None:
            logp = dense_constraint(trie, logp, nodes)
        pad_only = torch.full((vocab,), float("-inf"), dtype=dtype, device=device)
        pad_only[PAD] = 0.0
        logp = torch.where(finished[..., None], pad_only, logp)

        candidates = (scores[..., None] + logp).view(b, w * vocab)
        scores, flat = candidates.topk(w, dim=-1)
        parent = torch.div(flat, vocab, rounding_mode="floor")
        token = flat % vocab
        empty = scores == neg_inf
        parent_finished = finished[request, parent]
        tokens = torch.cat([tokens[request, parent], token[..., None]], dim=-1)
        tokens = tokens.masked_fill(empty[..., None], PAD)
        if trie is not None:
            parent_nodes = nodes[request, parent]
            nodes = torch.where(parent_finished, parent_nodes, trie.step(parent_nodes, token))
            nodes = torch.where(empty, -1, nodes)
        finished = (parent_finished | (token == EOS)) & ~empty
        last = token
        if bool((finished | empty).all()):
            break
    return _result(tokens, scores, nodes, finished, max_length, trie, validity_trie)


@torch.no_grad()
def score_sequences(
    model: GenerativeRetriever,
    memory: torch.Tensor,
    memory_mask: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Teacher-forced total log-probability of N given sequences per request.

    ``tokens`` (B, N, T) long (EOS-terminated SIDs, anything after ``lengths`` is ignored),
    ``lengths`` (B, N) tokens to score, EOS included. Returns (B, N) in at least float32. Runs the
    model in eval mode (restored afterwards).
    """
    if tokens.dim() != 3 or tokens.shape[0] != memory.shape[0] or lengths.shape != tokens.shape[:2]:
        raise ValueError(f"tokens must be (B={memory.shape[0]}, N, T) and lengths (B, N); got {tuple(tokens.shape)}, {tuple(lengths.shape)}")
    b, n, t = tokens.shape
    dtype = _score_dtype(memory)
    if n == 0 or t == 0:
        return torch.zeros(b, n, dtype=dtype, device=memory.device)
    positions = torch.arange(t, device=tokens.device)
    inside = positions < lengths[..., None]
    # Only the scored prefix enters the decoder (the tail may hold anything, e.g. -1).
    targets = torch.where(inside, tokens, PAD).view(b * n, t)
    start = torch.full((b * n, 1), DECODER_START, dtype=torch.long, device=tokens.device)
    decoder_input = torch.cat([start, targets[:, :-1]], dim=1)
    with _eval_mode(model):
        logits = model.decode(memory.repeat_interleave(n, dim=0), memory_mask.repeat_interleave(n, dim=0), decoder_input)
    logp = torch.log_softmax(logits.to(dtype), dim=-1).gather(-1, targets[..., None]).squeeze(-1).view(b, n, t)
    return logp.masked_fill(~inside, 0.0).sum(dim=-1)
