"""Checkpoints are a safetensors file of tensors plus a JSON file of everything else. Never pickles."""

from __future__ import annotations

import json
from typing import Any

import fsspec
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

TENSORS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 1


def save_checkpoint(directory: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the tensors, then the JSON: a reader that finds the JSON finds complete tensors."""
    fs, root = fsspec.core.url_to_fs(directory)
    fs.makedirs(root, exist_ok=True)
    payload = save_tensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
    with fs.open(f"{root}/{TENSORS_FILE}", "wb") as f:
        f.write(payload)
    with fs.open(f"{root}/{META_FILE}", "w") as f:
        json.dump({"format_version": FORMAT_VERSION, **meta}, f, indent=2, sort_keys=True)


def load_checkpoint(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    fs, root = fsspec.core.url_to_fs(directory)
    meta_path = f"{root}/{META_FILE}"
    if not fs.exists(meta_path):
        raise FileNotFoundError(f"no checkpoint at {directory} ({META_FILE} missing)")
    with fs.open(meta_path, "r") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    with fs.open(f"{root}/{TENSORS_FILE}", "rb") as f:
        tensors = load_tensors(f.read())
    return tensors, meta
