"""The few collective operations training needs, as no-ops outside a process group.

The training code calls these unconditionally, so one code path serves a single process, a
``torchrun``/gloo group and Ray Train's ``TorchTrainer`` (which initialises the group for us).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank ends with rank ``src``'s values."""
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_gradients(parameters) -> None:
    """Average gradients across ranks: what DDP does, but tolerant of parameters a phase leaves unused."""
    if not is_distributed():
        return
    scale = 1.0 / world_size()
    for p in parameters:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.mul_(scale)


def gather_rows(x: torch.Tensor, max_rows: int) -> torch.Tensor:
    """Rows from every rank, concatenated (the same number from each: all_gather needs equal shapes)."""
    if not is_distributed():
        return x[:max_rows]
    n = torch.tensor([min(x.shape[0], max_rows)], device=x.device)
    dist.all_reduce(n, op=dist.ReduceOp.MIN)
    local = x[: int(n)].contiguous()
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts)


def steps_per_epoch(n_local: int, batch_size: int) -> int:
    """The same on every rank: the largest shard decides, shorter shards wrap around."""
    n = torch.tensor([n_local], dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return max(1, -(-int(n.item()) // batch_size))
