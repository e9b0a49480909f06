"""Retriever training in plain PyTorch: single process or data-parallel (Ray Train drives the latter).

Examples: a history request carries the target after its history and, as the successor of each
history item, one target per item after the first (:func:`make_batch` with ``every_position``); the
item-causal encoder encodes the history once for all of them. A step of ``batch_size`` requests
therefore trains on ~4.5x as many targets on Beauty (windows of 8 items plus the target, from
:func:`sa2crq.retrieval.data.training_requests`), and "examples" counts targets. On 2 CPU cores
(cpu shape, tuned allocator) a step of 64 windows (~290 targets) took 180 ms where one of 256
single-target requests took 351 ms: 2.2x the targets per second.

Loss: teacher-forced cross-entropy on the target item's SID tokens (EOS included), plus, for a
model with a dense head, ``dense_loss_weight`` times the dense head's cross-entropy of the target
against ``dense_negatives`` items drawn uniformly from the catalog for each step (shared by the
batch; a drawn item equal to a target is masked for that target), or against the whole catalog
when ``dense_negatives`` is 0. Uniform negatives estimate the full softmax without favouring
popular items; on Beauty's 12k items a 2-core step of 256 took 287 ms with 2,048 of them against
348 ms with the whole catalog. The SID loss is averaged over target tokens, the dense loss over
targets. Each rank trains on its own shard of the requests with gradients averaged across ranks;
every rank runs the same number of steps.

**Checkpoint selection** (DESIGN §5): every ``eval_every_steps`` optimiser steps (0: once per
epoch) the model is scored by ``select`` (the benchmark passes validation Recall@10 from
constrained beam search and the item scorer on a seeded sample of validation users; higher is
better); without one, by the negated teacher-forced validation loss. The best-scoring weights are
restored at the end, training stops after ``patience`` evaluations without improvement, and the
learning curve (metric against steps, examples and training seconds) is returned. The learning
rate warms up linearly, then stays constant (``schedule="constant"``, better than a cosine on 2 CPU
cores with selection by recall), decays on a cosine to 10% (``"cosine"``), or stays constant and
decays linearly to 10% over the last ``decay_fraction`` of the steps (``"stable-decay"``, the cpu
benchmark profile's fixed step budget). Deterministic under a seed on CPU; bf16 autocast on CUDA.

**Resuming:** after each evaluation the loop can hand out a :class:`TrainingState` (weights,
optimiser, schedule, every rank's random generators, curve and best so far), and a run given one
continues from it. On CPU a resumed run ends with the weights and curve of the run that was never
stopped; only its timings differ (the work lost after the state is not counted). On CUDA, dropout
draws from CUDA's generator, which the state does not hold: a resumed run with dropout takes other
masks from there on.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from sa2crq import distributed
from sa2crq.ids.trie import PAD
from sa2crq.progress import Progress
from sa2crq.retrieval.data import Requests, user_token
from sa2crq.retrieval.model import GenerativeRetriever, ItemFeatures, mixed_precision

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine", "stable-decay")


@dataclass(frozen=True)
class RetrieverTrainConfig:
    epochs: int = 30
    # Requests per step; a history request trains on each of its items' successors as well.
    batch_size: int = 256
    learning_rate: float = 2e-3
    weight_decay: float = 0.01
    warmup_steps: int = 200
    # After warm-up: "constant"; "cosine" decay to 10% of the peak over the run; or "stable-decay":
    # constant, then a linear decay to 10% of the peak over the last ``decay_fraction`` of the steps.
    schedule: str = "constant"
    decay_fraction: float = 0.25
    # Most recent items of a history fed to the encoder.
    max_history: int = 8
    user_buckets: int = 2000
    # Weight of the dense head's cross-entropy beside the SID loss (models with a dense head), and
    # the uniform negatives it is computed against per step (0 = the whole catalog).
    dense_loss_weight: float = 1.0
    dense_negatives: int = 2048
    # Evaluate for checkpoint selection every this many steps; 0 = at the end of every epoch.
    eval_every_steps: int = 0
    # Stop after this many evaluations without a better selection metric.
    patience: int = 3
    # Seeded validation requests: checkpoints are selected by Recall@10 on the first
    # ``select_users``, the item scorer is tuned on the first ``tune_users`` (DESIGN §5).
    select_users: int = 1000
    tune_users: int = 3000
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
        if self.schedule not in SCHEDULES:
            raise ValueError(f"retriever schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ValueError(f"retriever decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.select_users < 1 or self.tune_users < 1:
            raise ValueError("retriever select_users and tune_users must be >= 1")
        if self.dense_loss_weight < 0 or self.eval_every_steps < 0 or self.dense_negatives < 0:
            raise ValueError("retriever dense_loss_weight, dense_negatives and eval_every_steps must be >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainingState:
    """Where a :func:`train_retriever` run stood after an evaluation: what it needs to continue
    (``resume``) as though it had not stopped. Tensors are copies; stored as safetensors + JSON by
    :func:`sa2crq.retrieval.checkpoint.save_training_state`."""

    model: dict[str, torch.Tensor]
    optimiser: dict  # AdamW's state_dict
    scheduler: dict  # LambdaLR's state_dict (plain numbers)
    # (world, 3, S) uint8, one row per rank: its data generator (epoch order, negatives) as it was
    # at the start of the current epoch and as it is now, and torch's default CPU generator (dropout).
    generators: torch.Tensor
    steps: int
    examples: int  # targets trained on, over all ranks
    # Rank 0's timings and curve (its training losses are rank 0's): every rank resumes with them.
    train_seconds: float
    seconds: float
    curve: list[dict]
    best_model: dict[str, torch.Tensor]
    best_metric: float
    best_evaluation: int
    # The steps at which this run was resumed before.
    resumed_at: list[int]


@dataclass(frozen=True)
class Batch:
    """Encoder inputs of B requests and N targets decoded from them (N >= B when every position of
    a history is a target)."""

    history: torch.Tensor | None  # (B, H) dense item indices, -1 padded; None for query requests
    users: torch.Tensor | None  # (B,) user tokens; None for query requests
    decoder_input: torch.Tensor  # (N, T)
    target: torch.Tensor  # (N, T) SID tokens of the targets
    target_index: torch.Tensor  # (N,) dense index of each target item
    target_request: torch.Tensor  # (N,) the request (row of the encoder inputs) each target is decoded from
    # (N,) the last history slot each target sees: the item before it (the whole window for a
    # request's own target).
    target_slot: torch.Tensor
    query: torch.Tensor | None = None  # (B, D) query embeddings of query requests


def make_batch(
    requests: Requests, rows: np.ndarray, sid_tokens: torch.Tensor, user_offset: int, buckets: int, *, every_position: bool = False
) -> Batch:
    """Encoder inputs (history and user token, or the query), shifted decoder inputs (PAD as the
    start token) and targets for some requests.

    Each request's target is decoded from its whole history. With ``every_position`` (training)
    every history item's successor is a target too, decoded from the history up to that item: the
    item-causal encoder (:meth:`GenerativeRetriever.encode_with_slots`) encodes a window once for
    all of its next-item targets."""
    device = sid_tokens.device
    history = torch.as_tensor(requests.history[rows], device=device)
    width = history.shape[1]
    last = torch.as_tensor(requests.target[rows], device=device)[:, None]
    if every_position and width:
        successor = torch.cat([history[:, 1:], last], dim=1)
        request, slot = torch.nonzero((history >= 0) & (successor >= 0), as_tuple=True)
        target_index = successor[request, slot]
    else:
        request = torch.arange(len(rows), device=device)
        slot = torch.full_like(request, max(width - 1, 0))
        target_index = last[:, 0]
    target = sid_tokens[target_index]
    decoder_input = F.pad(target[:, :-1], (1, 0), value=PAD)
    if requests.query is not None:
        # A query request is encoded from its embedding alone: no history, no user token.
        query = torch.as_tensor(requests.query[rows], device=device)
        return Batch(None, None, decoder_input, target, target_index, request, slot, query)
    users = torch.as_tensor(user_token(requests.user_ids[rows], buckets, user_offset), device=device)
    return Batch(history, users, decoder_input, target, target_index, request, slot)


class Losses(NamedTuple):
    sid: torch.Tensor  # summed SID token cross-entropy over non-PAD target tokens
    tokens: int  # number of such tokens
    dense: torch.Tensor  # summed dense cross-entropy over the targets (0 without a dense head)
    targets: int


def batch_losses(
    model: GenerativeRetriever, batch: Batch, items: ItemFeatures, negatives: torch.Tensor | None = None, *, dense_loss: bool = True
) -> Losses:
    """The batch's summed losses. ``negatives`` (M,) dense item indices the dense head contrasts
    each target with; None: the whole catalog. ``dense_loss`` False leaves the dense head out (its
    loss 0): the SID loss alone costs nothing per catalog item."""
    with mixed_precision(batch.target.device):
        memory, mask, slots = model.encode_with_slots(batch.history, batch.users, items, batch.query)
        # Each target sees its request's memory up to (and including) its slot.
        visible = mask[batch.target_request] & (slots[batch.target_request] <= batch.target_slot[:, None])
        logits = model.decode(memory, visible, batch.decoder_input, batch.target_request)
        dense = None
        if model.config.dense_head and dense_loss:
            request = model.dense_request(memory, visible, batch.target_request)
            if negatives is None:
                dense, label = request @ model.item_vectors(items).T, batch.target_index
            else:
                # Column 0: the target itself; then the shared negatives, minus accidental hits.
                positive = (request * model.item_vectors(items, batch.target_index)).sum(-1, keepdim=True)
                sampled = request @ model.item_vectors(items, negatives).T
                sampled = sampled.masked_fill(negatives[None, :] == batch.target_index[:, None], float("-inf"))
                dense, label = torch.cat([positive, sampled], dim=1), torch.zeros_like(batch.target_index)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch.target.reshape(-1), ignore_index=PAD, reduction="sum")
    dense_loss = torch.zeros((), device=loss.device) if dense is None else F.cross_entropy(dense.float(), label, reduction="sum")
    return Losses(loss, int((batch.target != PAD).sum()), dense_loss, len(batch.target_index))


def train_retriever(
    model: GenerativeRetriever,
    train: Requests,
    valid: Requests,
    items: ItemFeatures,
    config: RetrieverTrainConfig,
    *,
    user_offset: int,
    select: Callable[[GenerativeRetriever], float] | None = None,
    on_evaluation: Callable[[TrainingState], None] | None = None,
    resume: TrainingState | None = None,
) -> dict:
    """Train in place on this rank's ``train`` shard and restore the best evaluated weights.

    ``select(model) -> float`` (higher is better) must give every rank the same value. Returns the
    history: the learning curve (one entry per evaluation), the best evaluation, steps, examples,
    seconds and training examples per second (evaluation time excluded), ``converged``: False
    when the best evaluation is the last one (the curve was still rising), and ``resumed_at``: the
    steps this run was resumed at. ``on_evaluation(state)`` is called on every rank after each
    evaluation (every rank's generators are gathered into the state); ``resume`` continues the run
    of the same data and config that handed out ``state``, with the same number of ranks.
    """
    generator = torch.Generator().manual_seed(config.seed + distributed.rank())
    optimiser = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = distributed.steps_per_epoch(len(train), config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    eval_every = config.eval_every_steps or steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: _lr_factor(s, config, total_steps))

    curve: list[dict] = []
    best: dict = {"metric": -math.inf, "state": copy.deepcopy(model.state_dict()), "evaluation": -1}
    train_seconds, loss_total, token_total, done, local_examples, examples = 0.0, 0.0, 0, 0, 0, 0
    resumed_at: list[int] = []
    started = time.perf_counter()
    order = np.zeros(0, dtype=np.int64)
    epoch_rng = generator.get_state()
    if resume is not None:
        if len(resume.generators) != distributed.world_size():
            raise ValueError(f"a training state of {len(resume.generators)} ranks cannot resume on {distributed.world_size()}")
        model.load_state_dict(resume.model)
        # A copy: the optimiser would otherwise take the state's tensors as its own and update them in place.
        optimiser.load_state_dict(copy.deepcopy(resume.optimiser))
        schedule.load_state_dict(resume.scheduler)
        # Fresh tensors: set_state on a row of the loaded tensor itself crashed the process (torch 2.13).
        epoch_rng, current_rng, dropout_rng = (state.clone() for state in resume.generators[distributed.rank()])
        # The current epoch's order, drawn again from the generator as it was when the epoch began.
        generator.set_state(epoch_rng)
        order = torch.randperm(max(len(train), 1), generator=generator).numpy()
        generator.set_state(current_rng)
        torch.set_rng_state(dropout_rng)
        done, examples, train_seconds = resume.steps, resume.examples, resume.train_seconds
        started -= resume.seconds
        curve = copy.deepcopy(resume.curve)
        best = {"metric": resume.best_metric, "state": resume.best_model, "evaluation": resume.best_evaluation}
        resumed_at = [*resume.resumed_at, resume.steps]

    def patience_spent() -> bool:
        return len(curve) - 1 - best["evaluation"] >= config.patience

    progress = Progress("retriever training", total=total_steps, unit="step")
    progress.update(done)
    while done < total_steps and not patience_spent():
        epoch_step = done % steps_per_epoch
        if epoch_step == 0:
            epoch_rng = generator.get_state()
            order = torch.randperm(max(len(train), 1), generator=generator).numpy()
        model.train()
        step_start = time.perf_counter()
        rows = order[np.arange(epoch_step * config.batch_size, (epoch_step + 1) * config.batch_size) % len(order)]
        negatives = None
        if config.dense_negatives and model.config.dense_head:
            negatives = torch.randint(len(items), (config.dense_negatives,), generator=generator).to(items.tokens.device)
        batch = make_batch(train, rows, items.tokens, user_offset, config.user_buckets, every_position=True)
        losses = batch_losses(model, batch, items, negatives)
        loss = losses.sid / max(losses.tokens, 1) + config.dense_loss_weight * losses.dense / max(losses.targets, 1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(model.parameters())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        loss_total += float(losses.sid.detach())
        token_total += losses.tokens
        local_examples += losses.targets
        done += 1
        train_seconds += time.perf_counter() - step_start
        progress.update(1, loss=float(loss.detach()))
        if done % eval_every and done < total_steps:
            continue
        valid_loss = validation_loss(model, valid, items, config, user_offset=user_offset)
        examples += _pooled(local_examples)
        metric = select(model) if select is not None else -valid_loss
        point = {
            "step": done, "examples": examples, "train_seconds": round(train_seconds, 2),
            "train_loss": loss_total / max(token_total, 1), "valid_loss": valid_loss, "metric": metric,
        }  # fmt: skip
        curve.append(point)
        progress.update(0, selection=metric)
        loss_total, token_total, local_examples = 0.0, 0, 0
        log.info("retriever step %d/%d train %.4f valid loss %.4f selection metric %.4f", done, total_steps, point["train_loss"], valid_loss, metric)
        if metric > best["metric"]:
            best = {"metric": metric, "state": copy.deepcopy(model.state_dict()), "evaluation": len(curve) - 1}
        if on_evaluation is not None:
            generators = torch.stack([epoch_rng, generator.get_state(), torch.get_rng_state()])
            state = TrainingState(
                model=copy.deepcopy(model.state_dict()), optimiser=copy.deepcopy(optimiser.state_dict()),
                scheduler=copy.deepcopy(schedule.state_dict()), generators=distributed.gather_rows(generators[None], 1), steps=done,
                examples=examples, train_seconds=train_seconds, seconds=time.perf_counter() - started, curve=copy.deepcopy(curve),
                best_model=best["state"], best_metric=best["metric"], best_evaluation=best["evaluation"], resumed_at=list(resumed_at),
            )  # fmt: skip
            on_evaluation(state)
        if patience_spent():
            log.info("early stop: no better selection metric for %d evaluations", config.patience)
    progress.close()
    model.load_state_dict(best["state"])
    best_point = curve[best["evaluation"]] if curve else {}
    return {
        "curve": curve,
        "selected_by": "select" if select is not None else "negative validation loss",
        "best_step": best_point.get("step", 0),
        "best_metric": best["metric"],
        "best_valid_loss": best_point.get("valid_loss", math.inf),
        "converged": bool(curve) and best["evaluation"] < len(curve) - 1,
        "steps": done,
        "examples": examples,
        "train_seconds": train_seconds,
        "examples_per_second": examples / max(train_seconds, 1e-9),
        "seconds": time.perf_counter() - started,
        "resumed_at": resumed_at,
    }


@torch.no_grad()
def validation_loss(model: GenerativeRetriever, valid: Requests, items: ItemFeatures, config: RetrieverTrainConfig, *, user_offset: int) -> float:
    """Mean SID token cross-entropy on the validation targets, pooled over ranks (the dense head's
    loss against the whole catalog would cost (targets x catalog) and is not reported)."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    step = config.batch_size * 4
    for start in range(0, len(valid), step):
        rows = np.arange(start, min(start + step, len(valid)))
        losses = batch_losses(model, make_batch(valid, rows, items.tokens, user_offset, config.user_buckets), items, dense_loss=False)
        total += torch.tensor([float(losses.sid), losses.tokens], dtype=torch.float64)
    distributed.all_reduce_sum_(total)
    return float(total[0] / total[1]) if total[1] > 0 else math.inf


def _pooled(count: int) -> int:
    """A count summed over ranks."""
    total = torch.tensor([count], dtype=torch.float64)
    distributed.all_reduce_sum_(total)
    return int(total[0])


def _lr_factor(step: int, config: RetrieverTrainConfig, total: int) -> float:
    """Linear warm-up, then constant, cosine decay to 10% of the peak, or constant followed by a
    linear decay to 10% over the last ``decay_fraction`` of the run."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "stable-decay":
        decay_steps = max(1, round(config.decay_fraction * total))
        return 1.0 - 0.9 * min(1.0, max(0, step - (total - decay_steps)) / decay_steps)
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

