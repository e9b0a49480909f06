"""Dense k-nearest-neighbour retrieval: the non-generative reference row (DESIGN §3.5).

:func:`knn_topk` is exact maximum-inner-product search of request embeddings against the catalog's
L2-normalised item text embeddings (so the score is the cosine similarity), with each request's own
history excluded from its results (DESIGN §5 excludes items of the user's training history for every
variant). Two interchangeable backends:

* ``"faiss"``: ``faiss.IndexFlatIP`` (exact). Exclusion over-fetches ``k + max_excluded`` neighbours per
  block of requests and drops excluded ones with one vectorised membership test, keeping order.
* ``"torch"``: blocked matmul + ``topk``, with excluded scores set to ``-inf`` before selection. Requests
  and items are both processed in blocks (a running top-k is merged across item blocks), so memory is
  bounded for large catalogs; it runs on any torch device (``device="cuda"``).
* ``"auto"``: faiss when it is importable and the computation is on the CPU, torch otherwise. faiss is
  imported lazily; the module needs only numpy and torch.

Both return the same neighbours (up to the order of exact ties). Slots a request cannot fill (the
catalog minus its exclusions has fewer than ``k`` items) hold index ``-1`` and score ``-inf``.

The request embedding is the item scorer's (:func:`sa2crq.retrieval.scorer.request_embeddings`), so
the dense row and the generative variants rank from the same request.

Per-request exclusion sets are CSR pairs ``(indptr, indices)``: the entries of
request ``r`` are ``indices[indptr[r]:indptr[r + 1]]``, dense item indices (positions in
``item_embeddings``).
"""

from __future__ import annotations

from types import ModuleType
from typing import Literal

import numpy as np
import torch

__all__ = ["Backend", "CSR", "knn_topk"]

Backend = Literal["auto", "torch", "faiss"]
CSR = tuple[np.ndarray, np.ndarray]

_SCORE_BUDGET = 1 << 25  # scores materialised per block (128 MiB of float32)
_ITEM_BLOCK = 1 << 18  # items scored per block by the torch backend
_FAISS_REQUEST_BLOCK = 4096


def knn_topk(
    request_embeddings: np.ndarray | torch.Tensor,
    item_embeddings: np.ndarray | torch.Tensor,
    k: int,
    exclude: CSR | None = None,
    *,
    backend: Backend = "auto",
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` items by inner product for every request, best first, excluded items never returned.

    ``request_embeddings`` (B, D) and ``item_embeddings`` (N, D) float32; ``exclude`` a CSR of dense
    item indices per request (or None). ``device`` picks the torch device (default: the device of
    ``request_embeddings`` when it is a tensor, else CPU). Returns ``(indices, scores)``: (B, k) int64
    dense item indices and (B, k) float32 scores, as numpy arrays.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n_requests, dim = _shape2(request_embeddings, "request_embeddings")
    n_items, item_dim = _shape2(item_embeddings, "item_embeddings")
    if dim != item_dim:
        raise ValueError(f"request dim {dim} != item dim {item_dim}")
    indptr, indices = _check_csr(exclude, n_requests, n_items)

    if device is None:
        device = request_embeddings.device if isinstance(request_embeddings, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    use_faiss = _resolve_backend(backend, device)
    if use_faiss:
        return _faiss_topk(_to_numpy(request_embeddings), _to_numpy(item_embeddings), k, indptr, indices)
    return _torch_topk(request_embeddings, item_embeddings, k, indptr, indices, device)


# ------------------------------------------------------------------------------------------- backends


def _torch_topk(
    requests: np.ndarray | torch.Tensor,
    items: np.ndarray | torch.Tensor,
    k: int,
    indptr: np.ndarray,
    indices: np.ndarray,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    n_requests, n_items = requests.shape[0], items.shape[0]
    items_t = torch.as_tensor(items, dtype=torch.float32).to(device)
    requests_t = torch.as_tensor(requests, dtype=torch.float32)
    item_block = min(n_items, _ITEM_BLOCK)
    request_block = max(1, _SCORE_BUDGET // max(item_block, 1))
    keep = min(k, n_items)
    out_idx = np.full((n_requests, k), -1, dtype=np.int64)
    out_scores = np.full((n_requests, k), -np.inf, dtype=np.float32)

    with torch.no_grad():
        for r0 in range(0, n_requests, request_block):  # blocks of requests, not single requests
            r1 = min(r0 + request_block, n_requests)
            query = requests_t[r0:r1].to(device)
            ex_rows = torch.as_tensor(np.repeat(np.arange(r1 - r0), np.diff(indptr[r0 : r1 + 1])), device=device)
            ex_cols = torch.as_tensor(indices[indptr[r0] : indptr[r1]], dtype=torch.int64, device=device)
            best_scores = best_idx = None
            for i0 in range(0, n_items, item_block):
                i1 = min(i0 + item_block, n_items)
                scores = query @ items_t[i0:i1].T
                in_block = (ex_cols >= i0) & (ex_cols < i1)
                scores[ex_rows[in_block], ex_cols[in_block] - i0] = -torch.inf
                top_scores, top_idx = scores.topk(min(keep, i1 - i0), dim=1)
                top_idx += i0
                if best_scores is None:
                    best_scores, best_idx = top_scores, top_idx
                else:
                    merged_scores = torch.cat([best_scores, top_scores], dim=1)
                    merged_idx = torch.cat([best_idx, top_idx], dim=1)
                    best_scores, pick = merged_scores.topk(min(keep, merged_scores.shape[1]), dim=1)
                    best_idx = merged_idx.gather(1, pick)
            best_idx = torch.where(torch.isneginf(best_scores), -1, best_idx)
            width = best_idx.shape[1]
            out_idx[r0:r1, :width] = best_idx.cpu().numpy()
            out_scores[r0:r1, :width] = best_scores.cpu().numpy()
    return out_idx, out_scores


def _faiss_topk(
    requests: np.ndarray, items: np.ndarray, k: int, indptr: np.ndarray, indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    faiss = _import_faiss()
    n_requests, n_items = requests.shape[0], items.shape[0]
    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    out_idx = np.full((n_requests, k), -1, dtype=np.int64)
    out_scores = np.full((n_requests, k), -np.inf, dtype=np.float32)
    counts = np.diff(indptr)

    for r0 in range(0, n_requests, _FAISS_REQUEST_BLOCK):
        r1 = min(r0 + _FAISS_REQUEST_BLOCK, n_requests)
        fetch = min(n_items, k + int(counts[r0:r1].max(initial=0)))
        scores, found = index.search(np.ascontiguousarray(requests[r0:r1], dtype=np.float32), fetch)
        dropped = found < 0
        if indptr[r1] > indptr[r0]:
            # Membership of (request, item) pairs, as int64 keys request * n_items + item.
            ex_keys = np.repeat(np.arange(r1 - r0, dtype=np.int64), counts[r0:r1]) * n_items + indices[
                indptr[r0] : indptr[r1]
            ]
            keys = np.arange(r1 - r0, dtype=np.int64)[:, None] * n_items + found
            dropped |= np.isin(keys, ex_keys)
        # A stable sort on the drop flag moves kept neighbours to the front, in faiss's score order.
        order = np.argsort(dropped, axis=1, kind="stable")[:, :k]
        kept = ~np.take_along_axis(dropped, order, axis=1)
        width = order.shape[1]
        out_idx[r0:r1, :width] = np.where(kept, np.take_along_axis(found, order, axis=1), -1)
        out_scores[r0:r1, :width] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
    return out_idx, out_scores


# ------------------------------------------------------------------------------------------- helpers


def _resolve_backend(backend: Backend, device: torch.device) -> bool:
    """True for faiss, False for torch."""
    if backend == "torch":
        return False
    if backend == "faiss":
        if device.type != "cpu":
            raise ValueError(f"the faiss backend runs on the CPU; got device {device}")
        _import_faiss()
        return True
    if backend == "auto":
        if device.type != "cpu":
            return False
        try:
            _import_faiss()
        except ImportError:
            return False
        return True
    raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")


def _import_faiss() -> ModuleType:
    import faiss

    return faiss


def _shape2(x: np.ndarray | torch.Tensor, name: str) -> tuple[int, int]:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-d, got shape {tuple(x.shape)}")
    return int(x.shape[0]), int(x.shape[1])


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _check_csr(csr: CSR | None, n_rows: int, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(indptr, indices)`` as int64 arrays; an empty CSR for None."""
    if csr is None:
        return np.zeros(n_rows + 1, dtype=np.int64), np.empty(0, dtype=np.int64)
    indptr = np.asarray(csr[0]).astype(np.int64, copy=False)
    indices = np.asarray(csr[1]).astype(np.int64, copy=False)
    if indptr.shape != (n_rows + 1,):
        raise ValueError(f"indptr has shape {indptr.shape}, expected ({n_rows + 1},)")
    if indptr[0] != 0 or indptr[-1] != len(indices) or np.any(np.diff(indptr) < 0):
        raise ValueError("indptr must start at 0, be non-decreasing and end at len(indices)")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise ValueError(f"CSR indices must be dense item indices in [0, {n_cols})")
    return indptr, indices
