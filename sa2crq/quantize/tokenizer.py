"""One interface for every quantizer of the comparison: fit on embeddings, encode to full-depth codes.

* :class:`ACRQTokenizer`  - two-phase anchored training (SA²CRQ and its no-SARQ ablation).
* :class:`RQVAETokenizer` - single-stage RQ-VAE on all items (TIGER, and SA²CRQ without ACRQ).
* :class:`RQKMeansTokenizer` - residual k-means on the raw embeddings (faiss), no encoder.

How codes become IDs (SARQ or fixed length, digits) is the SID step's job, not the tokenizer's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import torch

from sa2crq.config import RQVAEConfig, TokenizerConfig
from sa2crq.quantize.acrq import train_acrq
from sa2crq.quantize.kmeans import squared_distances
from sa2crq.quantize.rqvae import RQVAE
from sa2crq.quantize.training import train_rqvae
from sa2crq.storage.checkpoint import load_checkpoint, save_checkpoint


class Tokenizer(ABC):
    kind: ClassVar[str]

    def __init__(self, config: TokenizerConfig, input_dim: int) -> None:
        self.config = config
        self.input_dim = input_dim
        self.fit_report: dict[str, Any] = {}

    def fit(self, embeddings: np.ndarray, segments: np.ndarray) -> dict[str, Any]:
        """Train on this catalog; returns (and keeps, as ``fit_report``) a JSON-able fit report."""
        self.fit_report = self._fit(embeddings, segments)
        return self.fit_report

    @abstractmethod
    def _fit(self, embeddings: np.ndarray, segments: np.ndarray) -> dict[str, Any]: ...

    @abstractmethod
    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, L) int64 full-depth codes."""

    @abstractmethod
    def codebook_sizes(self) -> tuple[int, ...]: ...

    @abstractmethod
    def _tensors(self) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    def _meta(self) -> dict[str, Any]:
        return {}

    def save(self, directory: str) -> None:
        meta = {
            "kind": self.kind,
            "input_dim": self.input_dim,
            "config": self.config.to_dict(),
            "codebook_sizes": list(self.codebook_sizes()),
            **self._meta(),
        }
        save_checkpoint(directory, self._tensors(), meta)

    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.rqvae.seed)

    def _check_input(self, embeddings: np.ndarray) -> torch.Tensor:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.input_dim:
            raise ValueError(f"embeddings must be (N, {self.input_dim}), got {embeddings.shape}")
        return torch.tensor(np.asarray(embeddings, dtype=np.float32))  # a copy: inputs may be read-only


class _RQVAEBacked(Tokenizer):
    def __init__(self, config: TokenizerConfig, input_dim: int) -> None:
        super().__init__(config, input_dim)
        self.model = RQVAE(input_dim, config.rqvae)

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        return self.model.encode(self._check_input(embeddings)).numpy().astype(np.int64)

    def codebook_sizes(self) -> tuple[int, ...]:
        return self.model.codebook_sizes()

    def _tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.model.state_dict())

    def _meta(self) -> dict[str, Any]:
        return {
            "extension_sizes": [int(e.shape[0]) for e in self.model.extensions],
            "adapter_hidden": self.config.acrq.adapter_hidden if self.model.adapter is not None else None,
        }

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        for level, size in enumerate(meta["extension_sizes"]):
            self.model.set_extensions(level, torch.zeros(size, self.config.rqvae.latent_dim))
        if meta["adapter_hidden"] is not None:
            self.model.add_adapter(meta["adapter_hidden"])
        self.model.load_state_dict(tensors, strict=True)
        for p in self.model.parameters():
            p.requires_grad_(False)


class RQVAETokenizer(_RQVAEBacked):
    kind = "rqvae"

    def _fit(self, embeddings: np.ndarray, segments: np.ndarray) -> dict[str, Any]:
        x = self._check_input(embeddings)
        losses = train_rqvae(self.model, x, self.config.rqvae, self._generator(), name="rqvae")
        for p in self.model.parameters():
            p.requires_grad_(False)
        return {"loss": losses}


class ACRQTokenizer(_RQVAEBacked):
    kind = "acrq"

    def _fit(self, embeddings: np.ndarray, segments: np.ndarray) -> dict[str, Any]:
        x = self._check_input(embeddings)
        self.model, report = train_acrq(x, segments, self.config.rqvae, self.config.acrq, self._generator())
        return {"acrq": report.to_dict()}


class RQKMeansTokenizer(Tokenizer):
    """Residual k-means straight on the embeddings, one faiss k-means per level."""

    kind = "rqkmeans"

    def __init__(self, config: TokenizerConfig, input_dim: int) -> None:
        super().__init__(config, input_dim)
        rq: RQVAEConfig = config.rqvae
        self.codebooks = torch.zeros(rq.levels, rq.codebook_size, input_dim)

    def _fit(self, embeddings: np.ndarray, segments: np.ndarray) -> dict[str, Any]:
        import faiss  # baseline only: the learned tokenizers and the GPU path must not need faiss

        rq = self.config.rqvae
        residual = np.ascontiguousarray(self._check_input(embeddings).numpy())
        objective = []
        for level in range(rq.levels):
            km = faiss.Kmeans(self.input_dim, rq.codebook_size, niter=rq.kmeans_iters, seed=rq.seed + level, verbose=False)
            km.train(residual)
            _, assign = km.index.search(residual, 1)
            self.codebooks[level] = torch.from_numpy(km.centroids)
            residual = residual - km.centroids[assign[:, 0]]
            objective.append(float(km.obj[-1]) if len(km.obj) else float("nan"))
        return {"kmeans_objective": objective}

    def encode(self, embeddings: np.ndarray) -> np.ndarray:
        residual = self._check_input(embeddings)
        codes = []
        for book in self.codebooks:
            code = squared_distances(residual, book).argmin(1)
            residual = residual - book[code]
            codes.append(code)
        return torch.stack(codes, 1).numpy().astype(np.int64)

    def codebook_sizes(self) -> tuple[int, ...]:
        return tuple(int(self.codebooks.shape[1]) for _ in range(self.codebooks.shape[0]))

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self.codebooks}

    def _restore(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.codebooks = tensors["codebooks"]


TOKENIZERS: dict[str, type[Tokenizer]] = {
    "acrq": ACRQTokenizer,
    "rqvae": RQVAETokenizer,
    "rqkmeans": RQKMeansTokenizer,
}


def build_tokenizer(config: TokenizerConfig, input_dim: int) -> Tokenizer:
    return TOKENIZERS[config.quantizer](config, input_dim)


def load_tokenizer(directory: str) -> Tokenizer:
    tensors, meta = load_checkpoint(directory)
    config = TokenizerConfig.from_dict(meta["config"])
    tokenizer = build_tokenizer(config, int(meta["input_dim"]))
    tokenizer._restore(tensors, meta)
    return tokenizer
