"""The minibatch loop shared by single-stage RQ-VAE training and both ACRQ phases.

Data-parallel ready: each rank passes its own shard; every rank runs the same number of steps
(shorter shards wrap around) so the gradient all-reduce never waits on a rank that has finished.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from sa2crq.config import RQVAEConfig
from sa2crq import distributed
from sa2crq.progress import Progress
from sa2crq.quantize.rqvae import RQVAE, Quantized

log = logging.getLogger(__name__)

# (step, batch indices into the stage's rows) -> scalar loss
LossFn = Callable[[int, torch.Tensor], torch.Tensor]


def run_epochs(
    *,
    n_rows: int,
    epochs: int,
    batch_size: int,
    parameters: Iterable[nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    loss_fn: LossFn,
    generator: torch.Generator,
    after_epoch: Callable[[int], None] | None = None,
    name: str = "train",
) -> list[float]:
    """Plain AdamW over shuffled minibatches of ``n_rows`` rows; returns the mean loss per epoch."""
    params = [p for p in parameters if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    steps = distributed.steps_per_epoch(n_rows, batch_size)
    history: list[float] = []
    step = 0
    progress = Progress(f"tokenizer {name}", total=epochs * steps, unit="step")
    for epoch in range(epochs):
        order = torch.randperm(max(n_rows, 1), generator=generator)
        total = 0.0
        for s in range(steps):
            if n_rows:
                loss = loss_fn(step, order[torch.arange(s * batch_size, (s + 1) * batch_size) % order.numel()])
            else:
                # This rank's shard holds none of the rows (e.g. no torso items in an ACRQ stage) while
                # others do: it still joins every gradient average, with zero gradients.
                loss = sum((p * 0).sum() for p in params)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(params)
            optimiser.step()
            total += float(loss.detach())
            step += 1
            progress.update(1)
        history.append(total / steps)
        progress.update(0, epoch=epoch + 1, loss=history[-1])
        if after_epoch is not None:
            after_epoch(epoch)
        if epoch == 0 or (epoch + 1) % max(1, epochs // 5) == 0:
            log.info("%s epoch %d/%d loss %.5f", name, epoch + 1, epochs, history[-1])
    progress.close()
    return history


def quantization_loss(q: Quantized, beta: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over levels of codebook loss ||sg(r) - e||^2 + beta ||r - sg(e)||^2, averaged over items.
    ``mask`` (L, N) restricts both terms to the chosen (level, item) pairs."""
    codebook = (q.residuals.detach() - q.chosen).pow(2).sum(-1)
    commit = (q.residuals - q.chosen.detach()).pow(2).sum(-1)
    per = codebook + beta * commit
    if mask is not None:
        per = per * mask
    return per.sum(0).mean()


def train_rqvae(model: RQVAE, x: torch.Tensor, config: RQVAEConfig, generator: torch.Generator, name: str) -> list[float]:
    """Single-stage RQ-VAE training on rows ``x``: k-means init, then nested reconstruction +
    codebook/commitment, with dead codes reset every few epochs (not in the last quarter, so the
    final codebooks are the trained ones)."""
    if not bool(model.initialised):
        model.init_codebooks(x, generator)

    def loss_fn(step: int, idx: torch.Tensor) -> torch.Tensor:
        xb = x[idx.to(x.device)]
        z = model.latent(xb)
        q = model.quantize(z)
        return model.nested_reconstruction(xb, z, q).mean() + quantization_loss(q, config.beta)

    def after_epoch(epoch: int) -> None:
        if (epoch + 1) % config.dead_code_every == 0 and epoch + 1 <= 0.75 * config.epochs:
            model.reset_dead_codes(x, generator, min_count=config.dead_code_min_count)

    return run_epochs(
        n_rows=x.shape[0],
        epochs=config.epochs,
        batch_size=config.batch_size,
        parameters=model.parameters(),
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        loss_fn=loss_fn,
        generator=generator,
        after_epoch=after_epoch,
        name=name,
    )
