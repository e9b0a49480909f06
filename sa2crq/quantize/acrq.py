"""ACRQ: Anchored Curriculum Residual Quantization (DESIGN §3.2).

Phase 1 fits the RQ-VAE on head items and freezes it (encoder, decoder, the K anchor codes per
level): the semantic manifold. Phase 2 adds a residual adapter A (last layer zero-initialised)
and K_ext extension codes per level, and trains only those on non-head items, fed in a cumulative
popularity curriculum: torso, then torso + tail, then torso + tail + cold. Its loss is

    nested reconstruction
    + codebook/commitment on the (level, item) pairs that took an extension code
    + lambda(t) * sum_l min_k ||r_{l-1} - sg(anchor_{l,k})||^2     (lambda decays linearly)
    + mu * ||A(x_head)||^2 on a replayed head batch every step.

Gating keeps head items on their phase-1 codes. The gate of a level is a high quantile (default
99.9%) of head items' squared distances to the nearest anchor at that level after phase 1. A level
may take an extension code only where the residual is farther than its gate from every anchor, and
the adapter is applied only to *novel* items, those exceeding some level's gate on the frozen
(anchors-only) path: z = E(x) + 1[novel(x)] * A(x). An item that is not novel keeps z = E(x) and
so, exactly, its phase-1 codes; by the calibration that is at least ~1 - L * (1 - quantile) of
the head. Why the indicator: with z = E(x) + A(x) everywhere, the replay penalty shrinks A on the
head only down to the optimiser's step noise, and at deep levels, where code margins are tiny,
that noise alone moved 1.5% (synthetic) to 53% (Amazon Beauty, mu = 10) of head items off their
codes. The replay penalty still keeps A small on head-like content, so novel items near the head
are not thrown far.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch

from sa2crq.config import ACRQConfig, RQVAEConfig
from sa2crq.data.segments import COLD, HEAD, TAIL, TORSO
from sa2crq import distributed
from sa2crq.quantize.kmeans import kmeans, squared_distances
from sa2crq.quantize.rqvae import RQVAE
from sa2crq.quantize.training import quantization_loss, run_epochs, train_rqvae

log = logging.getLogger(__name__)

# k-means wants about this many points per code for stable centroids.
POINTS_PER_CODE = 40


@dataclass(frozen=True)
class ACRQReport:
    """What phase 2 did to head and tail items (the two invariants of DESIGN §3.2)."""

    head_items: int
    non_head_items: int
    head_points_per_code: float
    warnings: tuple[str, ...]
    gates: tuple[float, ...]
    # Share of head items whose full code path is identical after phase 2.
    head_code_stability: float
    # Mean full-depth reconstruction error of non-head items, phase-1 model vs final model.
    tail_recon_error_phase1: float
    tail_recon_error_phase2: float
    # Mean ||z - E(x)|| (the adapter's effective shift) over non-head and over head items.
    adapter_norm_tail: float
    adapter_norm_head: float
    # Share of items the adapter may move (novel on the frozen path).
    novel_share_tail: float
    novel_share_head: float
    # Per level: distinct extension codes in use, and the share of non-head items taking one.
    extension_codes_used: tuple[int, ...]
    extension_item_share: tuple[float, ...]
    phase1_loss: tuple[float, ...]
    phase2_loss: tuple[float, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def train_acrq(
    x: torch.Tensor,
    segments: np.ndarray,
    rqvae_config: RQVAEConfig,
    acrq_config: ACRQConfig,
    generator: torch.Generator,
) -> tuple[RQVAE, ACRQReport]:
    """Train both phases on this rank's rows ``x`` with their ``segments``; returns the model and report."""
    seg = torch.as_tensor(segments)
    head = x[seg == HEAD]
    non_head = x[seg != HEAD]
    n_head_total = _global_count(head.shape[0])
    if n_head_total == 0:
        raise ValueError("ACRQ needs at least one head item (no item has training interactions)")
    warnings = []
    points_per_code = n_head_total / rqvae_config.codebook_size
    if points_per_code < POINTS_PER_CODE:
        warnings.append(
            f"head set has {n_head_total} items, {points_per_code:.1f} per code at K={rqvae_config.codebook_size} "
            f"(k-means wants ~{POINTS_PER_CODE}); phase 1 still fits K anchors on the head: k-means++ seeds "
            "spread them over the head, and dead-code reset moves unused anchors onto head residuals"
        )
        log.warning(warnings[-1])

    model = RQVAE(x.shape[1], rqvae_config).to(x.device)
    phase1_loss = train_rqvae(model, head, rqvae_config, generator, name="acrq phase 1 (head)")

    # Freeze the manifold and record what phase 2 must preserve.
    for p in model.parameters():
        p.requires_grad_(False)
    head_codes_phase1 = model.encode(head)
    tail_error_phase1 = _global_mean(model.reconstruction_error(non_head)) if non_head.numel() else float("nan")
    with torch.no_grad():
        head_dist = distributed.gather_rows(model.quantize(model.latent(head)).anchor_min_dist.T, 1 << 20)
        model.gates.copy_(torch.quantile(head_dist.float(), acrq_config.gate_quantile, dim=0))
    distributed.broadcast_(model.gates)

    model.add_adapter(acrq_config.adapter_hidden)
    _init_extensions(model, non_head, acrq_config, generator)

    stages = ((TORSO,), (TORSO, TAIL), (TORSO, TAIL, COLD))
    stage_rows = _cumulative_stages([torch.nonzero(torch.isin(seg, torch.tensor(s))).squeeze(1) for s in stages])
    total_epochs = max(1, acrq_config.epochs_per_stage * len(stage_rows))
    phase2_loss: list[float] = []
    epochs_done = 0
    for stage, rows in enumerate(stage_rows):
        xs = x[rows.to(x.device)]
        phase2_loss += _train_phase2_stage(
            model, xs, head, rqvae_config, acrq_config, generator, epoch_offset=epochs_done, total_epochs=total_epochs,
            name=f"acrq phase 2 stage {stage + 1}/{len(stage_rows)}",
        )
        epochs_done += acrq_config.epochs_per_stage

    for p in model.parameters():
        p.requires_grad_(False)
    report = _report(
        model, head, non_head, head_codes_phase1, tail_error_phase1, n_head_total, points_per_code,
        warnings, phase1_loss, phase2_loss,
    )
    return model, report


def _train_phase2_stage(
    model: RQVAE,
    x: torch.Tensor,
    head: torch.Tensor,
    rq: RQVAEConfig,
    cfg: ACRQConfig,
    generator: torch.Generator,
    *,
    epoch_offset: int,
    total_epochs: int,
    name: str,
) -> list[float]:
    assert model.adapter is not None
    trainable = [*model.adapter.parameters(), *model.extensions]
    for p in trainable:
        p.requires_grad_(True)
    n_anchor = rq.codebook_size
    steps = distributed.steps_per_epoch(x.shape[0], rq.batch_size)

    def loss_fn(step: int, idx: torch.Tensor) -> torch.Tensor:
        progress = min(1.0, (epoch_offset + step / steps) / total_epochs)
        anchor_weight = cfg.anchor_weight_start + (cfg.anchor_weight_end - cfg.anchor_weight_start) * progress
        xb = x[idx.to(x.device)]
        z = model.latent(xb)
        q = model.quantize(z)
        took_new = (q.codes.T >= n_anchor).to(z.dtype)
        loss = model.nested_reconstruction(xb, z, q).mean() + quantization_loss(q, rq.beta, mask=took_new)
        if anchor_weight > 0:
            pull = sum(
                squared_distances(q.residuals[level], model.anchors[level].detach()).min(1).values.mean()
                for level in range(model.levels)
            )
            loss = loss + anchor_weight * pull
        if cfg.head_replay_weight > 0 and head.shape[0] > 0:
            replay = head[torch.randint(head.shape[0], (min(rq.batch_size, head.shape[0]),), generator=generator).to(head.device)]
            loss = loss + cfg.head_replay_weight * model.adapter(replay).pow(2).sum(1).mean()
        return loss

    def after_epoch(epoch: int) -> None:
        if (epoch + 1) % rq.dead_code_every == 0 and epoch + 1 <= 0.75 * cfg.epochs_per_stage:
            model.reset_dead_codes(x, generator, min_count=rq.dead_code_min_count, anchors_frozen=True)

    return run_epochs(
        n_rows=x.shape[0],
        epochs=cfg.epochs_per_stage,
        batch_size=rq.batch_size,
        parameters=trainable,
        learning_rate=cfg.learning_rate,
        weight_decay=0.0,
        loss_fn=loss_fn,
        generator=generator,
        after_epoch=after_epoch,
        name=name,
    )


@torch.no_grad()
def _init_extensions(model: RQVAE, tail: torch.Tensor, cfg: ACRQConfig, generator: torch.Generator) -> None:
    """Level by level, k-means over the tail residuals the anchors serve worst (rank 0, broadcast)."""
    k_ext = cfg.extension_size(model.config.codebook_size)
    for level in range(model.levels):
        q = model.quantize(model.latent(tail))
        dist = q.anchor_min_dist[level]
        n_worst = max(1, int(round(cfg.worst_served_fraction * dist.numel()))) if dist.numel() else 0
        worst = q.residuals[level][dist.argsort(descending=True)[:n_worst]]
        pooled = distributed.gather_rows(worst, 1 << 18)
        codes = torch.zeros(k_ext, model.config.latent_dim, device=tail.device)
        if distributed.rank() == 0 and pooled.shape[0] > 0:
            codes = kmeans(pooled, k_ext, iters=model.config.kmeans_iters, generator=generator)
        distributed.broadcast_(codes)
        model.set_extensions(level, codes)


@torch.no_grad()
def _report(
    model: RQVAE,
    head: torch.Tensor,
    non_head: torch.Tensor,
    head_codes_phase1: torch.Tensor,
    tail_error_phase1: float,
    n_head_total: int,
    points_per_code: float,
    warnings: list[str],
    phase1_loss: list[float],
    phase2_loss: list[float],
) -> ACRQReport:
    assert model.adapter is not None
    head_codes = model.encode(head)
    stable = _global_mean((head_codes == head_codes_phase1).all(1).double()) if head.numel() else 1.0
    n_anchor = model.config.codebook_size
    used, share = [], []
    if non_head.numel():
        tail_codes = model.encode(non_head)
        for level in range(model.levels):
            new = tail_codes[:, level] >= n_anchor
            counts = torch.bincount(tail_codes[:, level], minlength=model.codebook_sizes()[level])
            used.append(int((distributed.all_reduce_sum_(counts.double())[n_anchor:] > 0).sum()))
            share.append(_global_mean(new.double()))
    return ACRQReport(
        head_items=n_head_total,
        non_head_items=_global_count(non_head.shape[0]),
        head_points_per_code=points_per_code,
        warnings=tuple(warnings),
        gates=tuple(float(g) for g in model.gates),
        head_code_stability=stable,
        tail_recon_error_phase1=tail_error_phase1,
        tail_recon_error_phase2=_global_mean(model.reconstruction_error(non_head)) if non_head.numel() else float("nan"),
        adapter_norm_tail=_global_mean(_adapter_shift(model, non_head)) if non_head.numel() else 0.0,
        adapter_norm_head=_global_mean(_adapter_shift(model, head)),
        novel_share_tail=_global_mean(model.novel(model.encoder(non_head)).double()) if non_head.numel() else 0.0,
        novel_share_head=_global_mean(model.novel(model.encoder(head)).double()),
        extension_codes_used=tuple(used),
        extension_item_share=tuple(share),
        phase1_loss=tuple(phase1_loss),
        phase2_loss=tuple(phase2_loss),
    )


def _adapter_shift(model: RQVAE, x: torch.Tensor) -> torch.Tensor:
    """||z - E(x)|| per item: how far the adapter actually moved each latent."""
    return (model.latent(x) - model.encoder(x)).norm(dim=1)


def _cumulative_stages(stages: list[torch.Tensor]) -> list[torch.Tensor]:
    """Drop a stage that is empty or adds no rows to the one before it (e.g. no cold items)."""
    kept: list[torch.Tensor] = []
    previous = 0
    for rows in stages:
        n = _global_count(rows.numel())
        if n > previous:
            kept.append(rows)
            previous = n
    return kept


def _global_count(n: int) -> int:
    return int(distributed.all_reduce_sum_(torch.tensor([float(n)], dtype=torch.float64)).item())


def _global_mean(values: torch.Tensor) -> float:
    total = distributed.all_reduce_sum_(torch.tensor([float(values.double().sum()), float(values.numel())], dtype=torch.float64))
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")
