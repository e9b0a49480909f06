"""ACRQ (DESIGN §3.2): both invariants together, the zero-initialised adapter, gating, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sa2crq.data.segments import HEAD, assign_segments
from sa2crq.quantize.rqvae import RQVAE, ResidualAdapter
from sa2crq.quantize.tokenizer import build_tokenizer, load_tokenizer
from tests.conftest import small_config


@pytest.fixture(scope="module")
def trained(catalog):
    config = small_config("sa2crq")
    segments = assign_segments(catalog.item_ids, catalog.popularity, config.segments)
    tokenizer = build_tokenizer(config, catalog.embeddings.shape[1])
    report = tokenizer.fit(catalog.embeddings, segments)["acrq"]
    return tokenizer, report, segments


def test_phase2_keeps_head_codes_and_improves_the_tail(trained):
    _, report, _ = trained
    # Invariant 1: the head keeps its phase-1 codes.
    assert report["head_code_stability"] >= 0.99
    # Invariant 2: phase 2 did something for the tail, on all three counts.
    assert report["tail_recon_error_phase2"] < report["tail_recon_error_phase1"]
    assert report["adapter_norm_tail"] > 0
    assert sum(report["extension_codes_used"]) > 0
    assert max(report["extension_item_share"]) > 0


def test_extension_codes_extend_every_level(trained):
    tokenizer, _, _ = trained
    config = tokenizer.config
    k, k_ext = config.rqvae.codebook_size, config.acrq.extension_size(config.rqvae.codebook_size)
    assert tokenizer.codebook_sizes() == (k + k_ext,) * config.rqvae.levels


def test_gating_never_gives_an_extension_code_below_the_gate(trained, catalog):
    tokenizer, _, _ = trained
    model = tokenizer.model
    with torch.no_grad():
        x = torch.as_tensor(catalog.embeddings)
        q = model.quantize(model.latent(x))
    took_new = q.codes.T >= model.config.codebook_size
    below_gate = q.anchor_min_dist <= model.gates[:, None]
    assert not (took_new & below_gate).any()


def test_head_items_sit_on_the_frozen_manifold(trained, catalog):
    tokenizer, report, segments = trained
    assert report["adapter_norm_head"] < report["adapter_norm_tail"]


def test_adapter_starts_at_zero_but_can_learn():
    adapter = ResidualAdapter(12, 8, 4)
    x = torch.randn(5, 12)
    assert torch.equal(adapter(x), torch.zeros(5, 4))
    adapter(x).sum().backward()
    assert adapter.net[-1].weight.grad.abs().sum() > 0


def test_checkpoint_round_trip_encodes_identically(trained, catalog, tmp_path):
    tokenizer, _, _ = trained
    tokenizer.save(str(tmp_path / "tok"))
    restored = load_tokenizer(str(tmp_path / "tok"))
    np.testing.assert_array_equal(restored.encode(catalog.embeddings), tokenizer.encode(catalog.embeddings))
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.pt"))


def test_warns_when_the_head_is_too_small_for_kmeans(trained):
    _, report, segments = trained
    assert (segments == HEAD).sum() < 40 * 32
    assert any("k-means wants" in w for w in report["warnings"])


@pytest.mark.parametrize("method", ["tiger", "rqkmeans", "sa2crq-no-acrq"])
def test_single_stage_baselines_encode_to_their_depth(method, catalog):
    config = small_config(method, **{"rqvae.epochs": 5})
    tokenizer = build_tokenizer(config, catalog.embeddings.shape[1])
    tokenizer.fit(catalog.embeddings, np.zeros(len(catalog.item_ids), dtype=np.int8))
    codes = tokenizer.encode(catalog.embeddings)
    assert codes.shape == (len(catalog.item_ids), config.rqvae.levels)
    assert codes.min() >= 0 and (codes.max(0) < np.array(tokenizer.codebook_sizes())).all()
    assert isinstance(getattr(tokenizer, "model", None), (RQVAE, type(None)))
