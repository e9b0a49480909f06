"""Retriever checkpoints: the model's tensors (safetensors) plus its config and provenance (JSON).

The provenance names the SID version the retriever was trained on: generation refuses to serve a
retriever with another version's SIDs (DESIGN §3.3a), because the same token means a different
item there. A training state (:class:`sa2crq.retrieval.training.TrainingState`, what an interrupted
training run resumes from) is stored the same way, as a checkpoint of its own kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.retrieval.training import TrainingState
from sa2crq.storage import layout
from sa2crq.storage.checkpoint import load_checkpoint, parse_checkpoint, save_checkpoint
from sa2crq.storage.filesystem import PathLike
from sa2crq.storage.published import PublishedVersion

KIND = "generative-retriever"
TRAINING_STATE_KIND = "retriever-training-state"
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
    _require_kind(meta, KIND, where)
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


def save_training_state(directory: PathLike, state: TrainingState) -> None:
    """The state's tensors by name (``model/...``, ``best_model/...``, ``optimiser/{param}/{name}``,
    ``generators``), everything else as JSON."""
    tensors = {f"model/{name}": t for name, t in state.model.items()}
    tensors |= {f"best_model/{name}": t for name, t in state.best_model.items()}
    tensors |= {f"optimiser/{param}/{name}": t for param, entries in state.optimiser["state"].items() for name, t in entries.items()}
    tensors["generators"] = state.generators
    meta = {
        "kind": TRAINING_STATE_KIND, "optimiser_param_groups": state.optimiser["param_groups"], "scheduler": state.scheduler,
        "steps": state.steps, "examples": state.examples, "train_seconds": state.train_seconds, "seconds": state.seconds,
        "curve": state.curve, "best_metric": state.best_metric, "best_evaluation": state.best_evaluation, "resumed_at": state.resumed_at,
    }  # fmt: skip
    save_checkpoint(directory, tensors, meta)


def load_training_state(directory: PathLike) -> TrainingState:
    tensors, meta = load_checkpoint(directory)
    _require_kind(meta, TRAINING_STATE_KIND, str(directory))
    parts: dict[str, dict[str, Any]] = {"model": {}, "best_model": {}, "optimiser": {}}
    for key, tensor in tensors.items():
        if key == "generators":
            continue
        part, name = key.split("/", 1)
        if part == "optimiser":
            param, name = name.split("/")
            parts["optimiser"].setdefault(int(param), {})[name] = tensor
        else:
            parts[part][name] = tensor
    return TrainingState(
        model=parts["model"], optimiser={"state": parts["optimiser"], "param_groups": meta["optimiser_param_groups"]},
        scheduler=meta["scheduler"], generators=tensors["generators"], steps=meta["steps"], examples=meta["examples"],
        train_seconds=meta["train_seconds"], seconds=meta["seconds"], curve=meta["curve"], best_model=parts["best_model"],
        best_metric=meta["best_metric"], best_evaluation=meta["best_evaluation"], resumed_at=meta["resumed_at"],
    )  # fmt: skip


def _require_kind(meta: dict[str, Any], kind: str, where: str) -> None:
    if meta.get("kind") != kind:
        raise ValueError(f"{where}: checkpoint of kind {meta.get('kind')!r}, not a {kind}")
