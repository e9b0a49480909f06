"""Retriever training in plain PyTorch: single process or data-parallel (Ray Train drives the latter).

Teacher-forced cross-entropy on the target item's SID tokens (EOS included). Each rank trains on
its own shard of the examples with gradients averaged across ranks; every rank runs the same
number of steps. Early stopping watches the validation loss (teacher forced, all ranks pooled) and
restores the best epoch's weights. Deterministic under a seed on CPU; bf16 autocast on CUDA.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sa2crq import distributed
from sa2crq.ids.trie import PAD
from sa2crq.retrieval.data import Requests, encoder_tokens, user_token
from sa2crq.retrieval.model import GenerativeRetriever

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrieverTrainConfig:
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    # Most recent items of a history fed to the encoder.
    max_history: int = 20
    user_buckets: int = 2000
    # Stop after this many epochs without a better validation loss.
    patience: int = 3
    # Optimiser steps budget (0 = none): the benchmark's equal training budget for every variant.
    max_steps: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("retriever epochs and batch_size must be positive")
        if self.learning_rate <= 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("retriever learning_rate must be > 0, weight_decay and warmup_steps >= 0")
        if self.max_history < 1 or self.user_buckets < 1 or self.patience < 1 or self.max_steps < 0:
            raise ValueError("retriever max_history, user_buckets, patience must be >= 1, max_steps >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Batch:
    encoder: torch.Tensor | None  # None for query requests
    decoder_input: torch.Tensor
    target: torch.Tensor
    query: torch.Tensor | None = None  # (B, D) query embeddings of query requests


def make_batch(requests: Requests, rows: np.ndarray, sid_tokens: torch.Tensor, user_offset: int, buckets: int) -> Batch:
    """Encoder input (or the query), shifted decoder input (PAD as the start token) and targets for some requests."""
    device = sid_tokens.device
    target = sid_tokens[torch.as_tensor(requests.target[rows], device=device)]
    decoder_input = F.pad(target[:, :-1], (1, 0), value=PAD)
    if requests.query is not None:
        # A query request is encoded from its embedding alone: no history, no user token.
        return Batch(None, decoder_input, target, torch.as_tensor(requests.query[rows], device=device))
    history = torch.as_tensor(requests.history[rows], device=device)
    users = torch.as_tensor(user_token(requests.user_ids[rows], buckets, user_offset), device=device)
    return Batch(encoder_tokens(history, users, sid_tokens), decoder_input, target)


def sequence_loss(model: GenerativeRetriever, batch: Batch) -> tuple[torch.Tensor, int]:
    """Summed token cross-entropy over non-PAD targets, and the number of such tokens."""
    with _autocast(batch.target.device):
        logits = model(batch.encoder, batch.decoder_input, batch.query)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.target.reshape(-1), ignore_index=PAD, reduction="sum")
    return loss, int((batch.target != PAD).sum())


def train_retriever(
    model: GenerativeRetriever,
    train: Requests,
    valid: Requests,
    sid_tokens: torch.Tensor,
    config: RetrieverTrainConfig,
    *,
    user_offset: int,
) -> dict:
    """Train in place on this rank's ``train`` shard; returns the history (losses, best epoch, time)."""
    generator = torch.Generator().manual_seed(config.seed + distributed.rank())
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = distributed.steps_per_epoch(len(train), config.batch_size)
    total_steps = steps * config.epochs if not config.max_steps else min(steps * config.epochs, config.max_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _lr_factor(s, config.warmup_steps, total_steps))
    best = (math.inf, -1, copy.deepcopy(model.state_dict()))
    history: dict = {"train_loss": [], "valid_loss": [], "epoch_seconds": []}
    started = time.perf_counter()
    done = 0
    for epoch in range(config.epochs):
        model.train()
        epoch_start = time.perf_counter()
        order = torch.randperm(max(len(train), 1), generator=generator).numpy()
        total, tokens = 0.0, 0
        for step in range(min(steps, total_steps - done)):
            rows = order[np.arange(step * config.batch_size, (step + 1) * config.batch_size) % len(order)]
            loss_sum, n_tokens = sequence_loss(model, make_batch(train, rows, sid_tokens, user_offset, config.user_buckets))
            loss = loss_sum / max(n_tokens, 1)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(model.parameters())
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimiser.step()
            schedule.step()
            total += float(loss_sum.detach())
            tokens += n_tokens
            done += 1
        valid_loss = validation_loss(model, valid, sid_tokens, config, user_offset=user_offset)
        history["train_loss"].append(total / max(tokens, 1))
        history["valid_loss"].append(valid_loss)
        history["epoch_seconds"].append(time.perf_counter() - epoch_start)
        log.info("retriever epoch %d/%d train %.4f valid %.4f", epoch + 1, config.epochs, history["train_loss"][-1], valid_loss)
        if valid_loss < best[0]:
            best = (valid_loss, epoch, copy.deepcopy(model.state_dict()))
        if epoch - best[1] >= config.patience:
            log.info("early stop: no better validation loss for %d epochs", config.patience)
            break
        if done >= total_steps:
            log.info("step budget of %d spent in epoch %d", total_steps, epoch + 1)
            break
    model.load_state_dict(best[2])
    history.update(best_epoch=best[1] + 1, best_valid_loss=best[0], steps=done, seconds=time.perf_counter() - started)
    return history


@torch.no_grad()
def validation_loss(model: GenerativeRetriever, valid: Requests, sid_tokens: torch.Tensor, config: RetrieverTrainConfig, *, user_offset: int) -> float:
    """Mean token cross-entropy on the validation targets, pooled over ranks."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(valid), config.batch_size * 4):
        rows = np.arange(start, min(start + config.batch_size * 4, len(valid)))
        loss_sum, n_tokens = sequence_loss(model, make_batch(valid, rows, sid_tokens, user_offset, config.user_buckets))
        total += torch.tensor([float(loss_sum), n_tokens], dtype=torch.float64)
    distributed.all_reduce_sum_(total)
    return float(total[0] / total[1]) if total[1] > 0 else math.inf


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)
