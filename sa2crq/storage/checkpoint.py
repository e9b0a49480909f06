"""Checkpoints are a safetensors file of tensors plus a JSON file of everything else. Never pickles."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyarrow.fs as pafs
import torch

from sa2crq.storage.filesystem import PathLike, resolve_filesystem

TENSORS_FILE = "model.safetensors"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 1


def save_checkpoint(directory: PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the tensors, then the JSON: a reader that finds the JSON finds complete tensors."""
    from safetensors.torch import save as save_tensors

    fs, root = resolve_filesystem(directory)
    fs.create_dir(root, recursive=True)
    payload = save_tensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()})
    with fs.open_output_stream(f"{root}/{TENSORS_FILE}") as f:
        f.write(payload)
    with fs.open_output_stream(f"{root}/{META_FILE}") as f:
        f.write(json.dumps({"format_version": FORMAT_VERSION, **meta}, indent=2, sort_keys=True).encode())


def load_checkpoint(directory: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    fs, root = resolve_filesystem(directory)
    if fs.get_file_info(f"{root}/{META_FILE}").type != pafs.FileType.File:
        raise FileNotFoundError(f"no checkpoint at {directory} ({META_FILE} missing)")

    def read(name: str) -> bytes:
        with fs.open_input_stream(f"{root}/{name}") as f:
            return f.read()

    return parse_checkpoint(read, str(directory))


def parse_checkpoint(read: Callable[[str], bytes], where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint from ``read(name)``, the bytes of its file ``name`` (a directory's, or a
    published version's checked against its manifest); ``where`` names it in errors."""
    from safetensors.torch import load as load_tensors

    meta = json.loads(read(META_FILE))
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: checkpoint format {meta.get('format_version')} is not {FORMAT_VERSION}")
    return load_tensors(read(TENSORS_FILE)), meta
