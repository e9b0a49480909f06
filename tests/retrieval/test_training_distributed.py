"""Retriever training under data parallelism: a real 2-process gloo group on CPU, each rank its own shard."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.candidates import CandidateGenerator, GenerationConfig, validation_recall
from sa2crq.retrieval.checkpoint import load_training_state, save_training_state
from sa2crq.retrieval.data import ItemIndex, Sequences, training_requests
from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.retrieval.scorer import ItemSIDs
from sa2crq.retrieval.training import RetrieverTrainConfig, train_retriever

WORLD = 2


def _requests(rank: int):
    rng = np.random.default_rng(rank)  # different users and items per rank, as shards are
    users = np.repeat(np.arange(20) + 100 * rank, 5)
    inter = pa.table({"user_id": users, "item_id": rng.integers(0, 30, len(users)), "timestamp": np.tile(np.arange(5), 20)})
    return training_requests(Sequences.from_interactions(inter, ItemIndex(np.arange(30))), max_history=4)


CONFIG = RetrieverTrainConfig(epochs=2, batch_size=16, warmup_steps=2, max_history=4, user_buckets=8, eval_every_steps=2, seed=0)


def _train(rank: int, config: RetrieverTrainConfig, init_seed: int = 0, **kwargs) -> tuple[GenerativeRetriever, dict]:
    ids = np.arange(30)
    tokens = np.stack([2 + ids % 5, 7 + ids // 5, np.full(30, EOS)], 1)
    embeddings = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    torch.manual_seed(init_seed)  # identical initial replicas, as DDP's broadcast would make them
    # Item content and a dense head: their gradients are averaged like the rest.
    model = GenerativeRetriever(RetrieverConfig(vocab_size=20, encoder_vocab_size=28, item_content_dim=4, dense_head=True,
                                                d_model=16, num_heads=2, head_dim=8, d_ff=32, encoder_layers=1, decoder_layers=1))
    requests = _requests(rank)
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), 20)
    generator = CandidateGenerator(model, tokens, trie, ItemSIDs.build(trie.row_sid), embeddings, GenerationConfig(beam_width=3, k=5),
                                   user_offset=20, user_buckets=8)
    # Selection by validation recall, pooled over the ranks' shards (each rank a few of its own requests).
    select_requests = requests.subset(np.arange(10 + 5 * rank))
    history = train_retriever(model, requests, requests, generator.items, config, user_offset=20,
                              select=lambda _: validation_recall(generator, select_requests), **kwargs)
    return model, history


def _worker(rank: int, store: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model, history = _train(rank, CONFIG)
        out = {f"w.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        out["valid_loss"] = torch.tensor([p["valid_loss"] for p in history["curve"]], dtype=torch.float64)
        out["metric"] = torch.tensor([p["metric"] for p in history["curve"]], dtype=torch.float64)
        out["best_step"] = torch.tensor(history["best_step"])
        save_file(out, os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def _resume_worker(rank: int, store: str, out_dir: str) -> None:
    """Train 6 steps (2 an epoch, evaluations at 3 and 6), then again from the stored state of step
    3, mid-epoch, from another initialisation; record whether both runs end alike on this rank."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        config = replace(CONFIG, epochs=3, eval_every_steps=3)
        states = []
        model, history = _train(rank, config, on_evaluation=states.append)
        directory = os.path.join(out_dir, "state")
        if rank == 0:  # as Ray's rank 0 does: one state holds every rank's generators
            save_training_state(directory, states[0])
        dist.barrier()
        resumed, resumed_history = _train(rank, config, init_seed=1, resume=load_training_state(directory))
        weights, resumed_weights = model.state_dict(), resumed.state_dict()

        def curve(h: dict) -> list:  # the values pooled over ranks (the state's train losses are rank 0's)
            return [[p["step"], p["examples"], p["valid_loss"], p["metric"]] for p in h["curve"]]

        result = {
            "state_steps": [state.steps for state in states], "resumed_at": resumed_history["resumed_at"],
            "same_weights": all(torch.equal(weights[k], resumed_weights[k]) for k in weights),
            "same_curve": curve(history) == curve(resumed_history),
            "ranks_generators_differ": not torch.equal(states[0].generators[0], states[0].generators[1]),
        }  # fmt: skip
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_replicas_stay_identical_and_validation_loss_is_pooled(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(WORLD)]
    for key in (k for k in ranks[0] if k.startswith("w.")):
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=1e-6, atol=1e-7)
    # Each rank validated on its own shard; the all-reduced loss is the same number on both.
    assert len(ranks[0]["valid_loss"]) >= 2
    torch.testing.assert_close(ranks[0]["valid_loss"], ranks[1]["valid_loss"], rtol=0, atol=0)
    # So is the pooled selection metric, hence the selected (restored) step.
    torch.testing.assert_close(ranks[0]["metric"], ranks[1]["metric"], rtol=0, atol=0)
    assert int(ranks[0]["best_step"]) == int(ranks[1]["best_step"])


@pytest.mark.timeout(180)
def test_every_rank_resumes_from_the_stored_state_to_the_uninterrupted_end(tmp_path):
    mp.start_processes(_resume_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")
    for rank in range(WORLD):
        with open(tmp_path / f"rank{rank}.json") as f:
            result = json.load(f)
        assert result["state_steps"] == [3, 6] and result["resumed_at"] == [3]
        # Each rank's own data order and draws, gathered into the one state, taken up again.
        assert result["ranks_generators_differ"] and result["same_weights"] and result["same_curve"], (rank, result)
