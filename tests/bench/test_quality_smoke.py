"""The quality benchmark's smoke profile, end to end, on a small synthetic catalog (no shared data)."""

from __future__ import annotations

import json

import pytest

from sa2crq.cli import main
from tests.pipeline.test_tokenize_cli import write_catalog


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = write_catalog(tmp_path_factory.mktemp("quality"), n=400, seed=2)
    assert main(["--log-level", "WARNING", "bench", "quality", "--data", str(root), "--profile", "smoke", "--out", str(root / "q.json")]) == 0
    return json.loads((root / "q.json").read_text())


@pytest.mark.timeout(600)
def test_every_variant_and_the_knn_row_are_reported(result):
    assert set(result["rows"]) == {"sa2crq", "tiger", "rqkmeans", "sa2crq-no-sarq", "sa2crq-no-acrq", "dense-knn"}
    for name, row in result["rows"].items():
        for run in ("run1", "run2"):
            for key in ("recall@5", "ndcg@5", "recall@10", "ndcg@10"):
                assert 0.0 <= row[run][key] <= 1.0, (name, run, key)
        assert row["run1"]["ndcg@10"] <= row["run1"]["recall@10"]
        assert row["run1"]["recall@5"] <= row["run1"]["recall@10"]


def test_constrained_decoding_never_emits_an_invalid_id(result):
    for name, row in result["rows"].items():
        if name != "dense-knn":
            assert row["run1"]["constrained_invalid"] == 0.0
            assert 0.0 <= row["run1"]["hallucination"] <= 1.0


def test_differences_to_tiger_come_with_intervals_pooled_over_two_seeds(result):
    assert len(result["seeds"]) >= 2
    ci = result["rows"]["sa2crq"]["vs_tiger"]["run1/recall@10"]
    assert ci["low"] <= ci["mean_diff"] <= ci["high"]
    assert "vs_tiger" not in result["rows"]["tiger"]


def test_variants_that_share_a_quantizer_share_their_codes(result):
    # sa2crq and its no-SARQ ablation differ only in SID rules: the same quantizer, full-depth IDs differ.
    full, adaptive = result["rows"]["sa2crq-no-sarq"]["tokenizer"], result["rows"]["sa2crq"]["tokenizer"]
    assert full["mean_sid_len_tail"] >= adaptive["mean_sid_len_tail"]


def test_the_page_beside_the_json_holds_the_table_and_the_learning_curves(result):
    page = open(result["page"]).read()
    assert result["page"].endswith("q.html") and page.startswith("<!DOCTYPE html>")
    assert page.count("<tr>") == 1 + len(result["rows"])  # the header, then one row per variant
    assert 'alt="Learning curves" src="data:image/png;base64,' in page
