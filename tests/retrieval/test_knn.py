"""Dense k-NN reference row: backends agree, exclusions hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sa2crq.retrieval import knn as knn_module
from sa2crq.retrieval.knn import knn_topk

try:
    import faiss  # noqa: F401

    HAS_FAISS = True
except ImportError:  # faiss is optional: the torch backend is tested either way
    HAS_FAISS = False

needs_faiss = pytest.mark.skipif(not HAS_FAISS, reason="faiss is not installed")
FAISS = pytest.param("faiss", marks=needs_faiss)


def _normalised(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _random_csr(rng: np.random.Generator, n_rows: int, n_cols: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(0, max_len + 1, n_rows)
    indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    return indptr, rng.integers(0, n_cols, int(lengths.sum())).astype(np.int64)  # duplicates allowed


def _brute_force(queries, items, k, indptr, indices):
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    rows = np.repeat(np.arange(len(queries)), np.diff(indptr))
    scores[rows, indices] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    items = _normalised(rng, 500, 16)
    queries = _normalised(rng, 70, 16)
    exclude = _random_csr(rng, 70, 500, max_len=30)
    return queries, items, exclude


@pytest.mark.parametrize("backend", ["torch", FAISS])
def test_backends_match_brute_force_and_each_other(data, backend):
    queries, items, exclude = data
    idx, scores = knn_topk(queries, items, 10, exclude, backend=backend)
    assert idx.shape == scores.shape == (70, 10)
    assert idx.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_array_equal(idx, _brute_force(queries, items, 10, *exclude))
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ items.T, idx, axis=1), rtol=1e-5, atol=1e-6)

@needs_faiss
def test_torch_and_faiss_agree_on_larger_data():
    rng = np.random.default_rng(3)
    items = _normalised(rng, 5000, 32)
    queries = _normalised(rng, 300, 32)
    exclude = _random_csr(rng, 300, 5000, max_len=50)
    by_torch, torch_scores = knn_topk(queries, items, 20, exclude, backend="torch")
    by_faiss, faiss_scores = knn_topk(queries, items, 20, exclude, backend="faiss")
    np.testing.assert_array_equal(by_torch, by_faiss)
    np.testing.assert_allclose(torch_scores, faiss_scores, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", FAISS, "auto"])
def test_excluded_items_never_appear(data, backend):
    queries, items, (indptr, indices) = data
    # Exclude each query's own 20 nearest items: they would otherwise fill its top-10.
    nearest = np.argsort(-(queries @ items.T), axis=1)[:, :20]
    exclude = (np.arange(0, 20 * 71, 20), nearest.ravel())
    idx, _ = knn_topk(queries, items, 10, exclude, backend=backend)
    assert not (idx[:, :, None] == nearest[:, None, :]).any()
    assert (idx >= 0).all()


def test_torch_item_blocks_merge_to_the_same_answer(data, monkeypatch):
    queries, items, exclude = data
    expected, expected_scores = knn_topk(queries, items, 10, exclude, backend="torch")
    monkeypatch.setattr(knn_module, "_ITEM_BLOCK", 37)  # many blocks, some narrower than k
    monkeypatch.setattr(knn_module, "_SCORE_BUDGET", 37 * 9)  # several request blocks
    idx, scores = knn_topk(queries, items, 10, exclude, backend="torch")
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-6)


@pytest.mark.parametrize("backend", ["torch", FAISS])
def test_unfillable_slots_are_padded(backend):
    rng = np.random.default_rng(1)
    items = _normalised(rng, 6, 4)
    queries = _normalised(rng, 2, 4)
    exclude = (np.array([0, 4, 4]), np.array([0, 1, 2, 3]))  # request 0 has 2 items left, request 1 has 6
    idx, scores = knn_topk(queries, items, 8, exclude, backend=backend)
    assert set(idx[0, :2]) == {4, 5} and (idx[0, 2:] == -1).all() and np.isneginf(scores[0, 2:]).all()
    assert set(idx[1, :6]) == set(range(6)) and (idx[1, 6:] == -1).all()
    assert np.all(np.diff(scores[:, :2], axis=1) <= 0)


def test_torch_tensors_and_device_argument(data):
    queries, items, exclude = data
    expected, _ = knn_topk(queries, items, 5, exclude, backend="torch")
    idx, _ = knn_topk(torch.from_numpy(queries), torch.from_numpy(items), 5, exclude, device="cpu")
    np.testing.assert_array_equal(idx, expected)
    if torch.cuda.is_available():
        idx_gpu, _ = knn_topk(queries, items, 5, exclude, device="cuda")
        np.testing.assert_array_equal(idx_gpu, expected)


def test_invalid_arguments_raise(data):
    queries, items, _ = data
    with pytest.raises(ValueError, match="backend"):
        knn_topk(queries, items, 5, backend="annoy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dim"):
        knn_topk(queries[:, :8], items, 5)
    with pytest.raises(ValueError, match="indptr"):
        knn_topk(queries, items, 5, (np.array([0, 1]), np.array([3])))
    with pytest.raises(ValueError, match="indices"):
        knn_topk(queries[:1], items, 5, (np.array([0, 1]), np.array([500])))
