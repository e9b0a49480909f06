"""Seeded k-means in plain torch, so codebook init runs wherever the model runs (CPU or CUDA, no faiss)."""

from __future__ import annotations

import torch


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(N, K) squared Euclidean distances, clamped at 0 against rounding."""
    return (
        x.pow(2).sum(1, keepdim=True) - 2.0 * x @ centroids.T + centroids.pow(2).sum(1)[None, :]
    ).clamp_min_(0.0)


def kmeans(x: torch.Tensor, k: int, *, iters: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding; returns (k, d) centroids.

    With fewer distinct points than ``k`` the surplus centroids are copies of data points plus
    tiny noise: they start dead and the dead-code reset revives them during training.
    """
    x = x.detach().float()
    n = x.shape[0]
    if n == 0:
        raise ValueError("k-means needs at least one point")
    centroids = _kmeans_plus_plus(x, min(k, n), generator)
    if centroids.shape[0] < k:
        extra = x[torch.randint(n, (k - centroids.shape[0],), generator=generator, device="cpu").to(x.device)]
        noise = 1e-4 * torch.randn(extra.shape, generator=generator, device="cpu").to(x.device)
        centroids = torch.cat([centroids, extra + noise])
    for _ in range(iters):
        assign = squared_distances(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centroids = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centroids)
    return centroids


def _kmeans_plus_plus(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    x_sq = x.pow(2).sum(1)

    def distance_to(i: int) -> torch.Tensor:
        return (x_sq - 2.0 * (x @ x[i]) + x_sq[i]).clamp_min_(0.0)

    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = distance_to(first)
    for _ in range(1, k):
        total = closest.sum()
        if total <= 0:  # every point already coincides with a centroid
            probs = torch.full((n,), 1.0 / n)
        else:
            probs = (closest / total).cpu()
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        chosen.append(nxt)
        closest = torch.minimum(closest, distance_to(nxt))
    return x[torch.tensor(chosen, device=x.device)].clone()
