"""`sa2crq bench tokenizer-epochs` on a small synthetic catalog (no shared data)."""

from __future__ import annotations

import json
import math

import pytest

from sa2crq.bench.tokenizer_epochs import run_tokenizer_epochs_benchmark
from sa2crq.cli import main
from tests.pipeline.test_tokenize_cli import write_catalog


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_catalog(tmp_path_factory.mktemp("epochs"), n=300, seed=3)


def test_one_row_per_method_and_budget_with_what_the_profile_needs(data_dir, capsys):
    out = data_dir / "epochs.json"
    assert main(["--log-level", "WARNING", "bench", "tokenizer-epochs", "--data", str(data_dir),
                 "--methods", "tiger", "sa2crq", "--epochs", "6", "1", "--out", str(out)]) == 0  # fmt: skip
    result = json.loads(out.read_text())
    assert [(r["method"], r["epochs"]) for r in result["rows"]] == [("tiger", 1), ("tiger", 6), ("sa2crq", 1), ("sa2crq", 6)]
    for row in result["rows"]:
        levels = 3 if row["method"] == "tiger" else 4
        assert len(row["utilisation"]) == len(row["perplexity"]) == levels
        assert all(0 < u <= 1 for u in row["utilisation"])
        assert math.isfinite(row["reconstruction_error"]) and row["reconstruction_error"] > 0
        assert 0 <= row["full_path_collision_rate"] <= 1
    # Phase 2 of ACRQ scales with the budget (the cpu profile's 25 : 6), at least one epoch a stage.
    assert [r["acrq_epochs_per_stage"] for r in result["rows"]] == [None, None, 1, 1]
    # More epochs from the same seed fit the catalog better.
    tiger = {r["epochs"]: r["reconstruction_error"] for r in result["rows"] if r["method"] == "tiger"}
    assert tiger[6] < tiger[1]
    assert "| tiger | 6 |" in capsys.readouterr().out


def test_residual_kmeans_has_no_epochs_to_measure(data_dir):
    with pytest.raises(ValueError, match="no epochs to measure"):
        run_tokenizer_epochs_benchmark(data_dir, ["rqkmeans"], [1])
