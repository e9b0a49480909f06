"""Generative retrieval: the encoder–decoder retriever and trie-constrained beam search (DESIGN §3.4)."""

from sa2crq.retrieval.beam import BeamResult, beam_search, score_sequences
from sa2crq.retrieval.model import DECODER_START, GenerativeRetriever, RetrieverConfig, shift_right

__all__ = [
    "DECODER_START",
    "BeamResult",
    "GenerativeRetriever",
    "RetrieverConfig",
    "beam_search",
    "score_sequences",
    "shift_right",
]
