"""Codebook init and dead-code reset under data parallelism: a real 2-process gloo group on CPU.

Each rank holds a different shard. The claims (DESIGN §3.1): one k-means, broadcast, so every
replica starts from the same codebooks, equal to single-process k-means over the gathered rows;
dead-code statistics are summed over ranks; after training every replica holds the same weights.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sa2crq.config import RQVAEConfig
from sa2crq.quantize.rqvae import RQVAE
from sa2crq.quantize.training import run_epochs, train_rqvae

CONFIG = RQVAEConfig(hidden_dims=(32,), latent_dim=8, levels=3, codebook_size=16, epochs=6, batch_size=64, dead_code_every=2)
WORLD = 2
ROWS = 200


def shard(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(ROWS, 24, generator=g) + 3.0 * rank  # different distributions per rank
    return x / x.norm(dim=1, keepdim=True)


def fresh_model() -> RQVAE:
    torch.manual_seed(7)
    return RQVAE(24, CONFIG)


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = fresh_model()
        x = shard(rank)
        model.init_codebooks(x, torch.Generator().manual_seed(0))
        out = {f"init_{l}": model.anchors[l].detach().clone() for l in range(CONFIG.levels)}
        # Kill two codes on every rank the same way; usage counts must be global sums.
        with torch.no_grad():
            model.anchors[0][:2] = 1e3
        counts = model.code_usage(x)
        out.update({f"count_{l}": c for l, c in enumerate(counts)})
        reset = model.reset_dead_codes(x, torch.Generator().manual_seed(rank), min_count=1)
        out["reset"] = torch.tensor([reset])
        out.update({f"after_reset_{l}": model.anchors[l].detach().clone() for l in range(CONFIG.levels)})
        train_rqvae(model, x, CONFIG, torch.Generator().manual_seed(rank), name=f"rank{rank}")
        out.update({f"trained.{k}": v.detach().clone() for k, v in model.state_dict().items()})
        # A stage whose rows all sit on rank 1 (e.g. no torso items in rank 0's shard): rank 0 has
        # nothing to draw a batch from, yet joins every gradient average and ends identical.
        rows = x if rank == 1 else x[:0]
        losses = run_epochs(
            n_rows=rows.shape[0], epochs=2, batch_size=64, parameters=list(model.encoder.parameters()), learning_rate=1e-2,
            weight_decay=0.0, loss_fn=lambda step, idx: model.latent(rows[idx]).pow(2).mean(), generator=torch.Generator().manual_seed(rank),
        )  # fmt: skip
        out["uneven_losses"] = torch.tensor(losses)
        out.update({f"uneven.{k}": v.detach().clone() for k, v in model.encoder.state_dict().items()})
        save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True, start_method="spawn")
    return [load_file(str(out / f"rank{r}.safetensors")) for r in range(WORLD)]


@pytest.mark.timeout(180)
def test_one_kmeans_broadcast_equals_single_process_kmeans_on_gathered_rows(ranks):
    single = fresh_model()
    single.init_codebooks(torch.cat([shard(r) for r in range(WORLD)]), torch.Generator().manual_seed(0))
    for level in range(CONFIG.levels):
        torch.testing.assert_close(ranks[0][f"init_{level}"], ranks[1][f"init_{level}"], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0][f"init_{level}"], single.anchors[level].detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.timeout(180)
def test_code_usage_is_summed_over_ranks(ranks):
    for level in range(CONFIG.levels):
        assert int(ranks[0][f"count_{level}"].sum()) == WORLD * ROWS
        torch.testing.assert_close(ranks[0][f"count_{level}"], ranks[1][f"count_{level}"], rtol=0, atol=0)
    # The two codes pushed far away are dead globally, not just on one rank.
    assert ranks[0]["count_0"][:2].sum() == 0


@pytest.mark.timeout(180)
def test_dead_code_reset_keeps_replicas_identical(ranks):
    assert int(ranks[0]["reset"]) >= 2 and int(ranks[0]["reset"]) == int(ranks[1]["reset"])
    for level in range(CONFIG.levels):
        torch.testing.assert_close(ranks[0][f"after_reset_{level}"], ranks[1][f"after_reset_{level}"], rtol=0, atol=0)
    assert ranks[0]["after_reset_0"][:2].abs().max() < 10  # revived onto real residuals


@pytest.mark.timeout(180)
def test_training_keeps_replicas_identical(ranks):
    trained = [k for k in ranks[0] if k.startswith("trained.")]
    assert trained
    for key in trained:
        np.testing.assert_allclose(ranks[0][key].numpy(), ranks[1][key].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(180)
def test_a_rank_without_rows_in_a_stage_still_joins_every_step(ranks):
    assert ranks[0]["uneven_losses"].tolist() == [0.0, 0.0] and (ranks[1]["uneven_losses"] > 0).all()
    uneven = [k for k in ranks[0] if k.startswith("uneven.")]
    for key in uneven:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)
    # The step did move the weights (rank 1's gradients, averaged).
    assert any(not torch.equal(ranks[0][key], ranks[0][key.replace("uneven.", "trained.encoder.")]) for key in uneven)
