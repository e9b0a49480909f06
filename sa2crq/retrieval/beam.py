"""Batched beam search over SIDs, constrained by the prefix trie of valid IDs (DESIGN §3.4).

All requests and all their beams decode together as one (B * W) batch: each step runs the
decoder over the prefixes so far (SIDs are a handful of tokens, so recomputing the short prefix
is cheaper than managing a KV cache), takes log-softmax, masks tokens the trie does not allow from
each beam's node (so EOS is legal only where an ID ends), and keeps the top W of the W x V
extensions per request. Finished beams (EOS emitted) keep their score and extend only with PAD
at log-prob 0, so they compete with longer prefixes on equal terms (no length normalisation: a
SID's score is its total log-probability, EOS included).

Unconstrained decoding (``trie=None``) is kept for measuring hallucination: pass the trie as
``validity_trie`` to label which generated sequences are real SIDs.

Everything stays on ``memory.device``; the step loop has no per-beam Python work and one host
sync per step (the early-stop test).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.model import DECODER_START, GenerativeRetriever


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


def _allowed_tokens(trie: SIDTrie, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """bool (*nodes.shape, vocab_size): trie mask, widened with False if the model vocab is larger."""
    mask = trie.next_token_mask(nodes)
    if trie.vocab_size < vocab_size:
        mask = torch.nn.functional.pad(mask, (0, vocab_size - trie.vocab_size), value=False)
    return mask


def _walk(trie: SIDTrie, tokens: torch.Tensor) -> torch.Tensor:
    """Trie node reached by each PAD-padded row of ``tokens`` (..., T); -1 where it leaves the trie."""
    node = torch.zeros(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
    for t in range(tokens.shape[-1]):
        tok = tokens[..., t]
        node = torch.where(tok != PAD, trie.step(node, tok), node)
    return node


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
    search; its mode is restored afterwards.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    vocab = model.config.vocab_size
    for name, t in (("trie", trie), ("validity_trie", validity_trie)):
        if t is not None and t.vocab_size > vocab:
            raise ValueError(f"{name} vocab_size {t.vocab_size} exceeds the model's {vocab}")
    if validity_trie is None:
        validity_trie = trie

    b, w, device = memory.shape[0], beam_width, memory.device
    dtype = _score_dtype(memory)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    # Row r = request r // W, beam r % W.
    memory = memory.repeat_interleave(w, dim=0)
    memory_mask = memory_mask.repeat_interleave(w, dim=0)

    # One live beam per request at the start: W copies of the start state would fill the beam
    # with duplicates of each first-step candidate.
    scores = torch.full((b, w), float("-inf"), dtype=dtype, device=device)
    scores[:, 0] = 0.0
    tokens = torch.full((b, w, 0), PAD, dtype=torch.long, device=device)
    finished = torch.zeros(b, w, dtype=torch.bool, device=device)
    nodes = torch.zeros(b, w, dtype=torch.long, device=device)  # trie node per beam (-1: empty)
    # A finished beam's only continuation: PAD at log-prob 0.
    pad_only = torch.full((vocab,), float("-inf"), dtype=dtype, device=device)
    pad_only[PAD] = 0.0
    request = torch.arange(b, device=device)[:, None]

    with _eval_mode(model):
        for _ in range(max_length):
            start = torch.full((b * w, 1), DECODER_START, dtype=torch.long, device=device)
            decoder_input = torch.cat([start, tokens.view(b * w, -1)], dim=1)
            logits = model.decode(memory, memory_mask, decoder_input)[:, -1]
            logp = torch.log_softmax(logits.to(dtype), dim=-1).view(b, w, vocab)
            # PAD is never part of an ID; the trie also enforces valid continuations and EOS placement.
            logp[..., PAD] = float("-inf")
            if trie is not None:
                logp = logp.masked_fill(~_allowed_tokens(trie, nodes, vocab), float("-inf"))
            logp = torch.where(finished[..., None], pad_only, logp)

            candidates = (scores[..., None] + logp).view(b, w * vocab)
            scores, flat = candidates.topk(w, dim=-1)  # sorted, best first
            parent = torch.div(flat, vocab, rounding_mode="floor")
            token = flat % vocab
            empty = scores == neg_inf  # fewer than W finite continuations for this request
            parent_finished = finished[request, parent]
            tokens = torch.cat([tokens[request, parent], token[..., None]], dim=-1)
            tokens = tokens.masked_fill(empty[..., None], PAD)
            if trie is not None:
                parent_nodes = nodes[request, parent]
                nodes = torch.where(parent_finished, parent_nodes, trie.step(parent_nodes, token))
                nodes = torch.where(empty, -1, nodes)
            finished = (parent_finished | (token == EOS)) & ~empty
            if bool((finished | empty).all()):
                break

    steps = tokens.shape[-1]
    tokens = torch.nn.functional.pad(tokens, (0, max_length - steps), value=PAD)
    if validity_trie is None:
        sid_index = torch.full((b, w), -1, dtype=torch.long, device=device)
    else:
        end = nodes if validity_trie is trie else _walk(validity_trie, tokens)
        sid_index = torch.where(finished, validity_trie.sid_at(end), -1)
    return BeamResult(tokens=tokens, log_probs=scores, sid_index=sid_index, finished=finished)


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
