"""Retriever checkpoints: the model's tensors (safetensors) plus its config and provenance (JSON).

The provenance names the SID version the retriever was trained on: generation refuses to serve a
retriever with another version's SIDs (DESIGN §3.3a), because the same token means a different
item there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.storage import layout
from sa2crq.storage.checkpoint import load_checkpoint, parse_checkpoint, save_checkpoint
from sa2crq.storage.filesystem import PathLike
from sa2crq.storage.published import PublishedVersion

KIND = "generative-retriever"
# How the retriever reads its input: its encoder attends causally over history items, and it reads
# each item's full code path. A checkpoint trained otherwise (by releases before these were
# recorded: bidirectionally, or reading SIDs) would load without error and rank differently, so it
# is refused.
INPUT_FORMAT = {"encoder_attention": "item-causal", "item_tokens": "full-code-path"}


@dataclass(frozen=True)
class RetrieverCheckpoint:
    model: GenerativeRetriever
    sid_version: str
    # Everything else recorded at training time: train config, user buckets, history, ...
    meta: dict[str, Any]


def save_retriever(directory: PathLike, model: GenerativeRetriever, *, sid_version: str, meta: dict[str, Any]) -> None:
    save_checkpoint(
        directory,
        dict(model.state_dict()),
        {"kind": KIND, **INPUT_FORMAT, "model_config": model.config.to_dict(), "sid_version": sid_version, **meta},
    )


def load_retriever(directory: PathLike) -> RetrieverCheckpoint:
    return _retriever(*load_checkpoint(directory), where=str(directory))


def load_published_retriever(version: PublishedVersion) -> RetrieverCheckpoint:
    """The retriever of a published retriever version, its files checked against the manifest."""
    tensors, meta = parse_checkpoint(lambda name: version.read_bytes(f"{layout.RETRIEVER}/{name}"), version.file_url(layout.RETRIEVER))
    return _retriever(tensors, meta, where=version.file_url(layout.RETRIEVER))


def _retriever(tensors: dict, meta: dict[str, Any], *, where: str) -> RetrieverCheckpoint:
    if meta.get("kind") != KIND:
        raise ValueError(f"{where}: checkpoint of kind {meta.get('kind')!r}, not a {KIND}")
    for key, expected in INPUT_FORMAT.items():
        if meta.get(key) != expected:
            raise ValueError(
                f"{where}: retriever trained with {key} {meta.get(key, 'unrecorded (an earlier release)')}; this release "
                f"reads {key} {expected}: retrain it (sa2crq train-retriever)"
            )
    model = GenerativeRetriever(RetrieverConfig.from_dict(meta.pop("model_config")))
    model.load_state_dict(tensors)
    model.eval()
    meta.pop("kind")
    for key in INPUT_FORMAT:
        meta.pop(key)
    meta.pop("format_version", None)
    return RetrieverCheckpoint(model, meta.pop("sid_version"), meta)
