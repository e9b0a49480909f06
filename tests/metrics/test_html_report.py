"""HTML reports render every plot as an embedded PNG, and a real headless browser shows them."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess

import numpy as np
import pytest

from sa2crq.config import SIDConfig
from sa2crq.data.segments import COLD, HEAD, TAIL, TORSO
from sa2crq.ids.sid_table import assign_sids
from sa2crq.metrics.html_report import evaluation_page, retriever_page, sid_version_page
from sa2crq.metrics.retrieval import RetrievalAccumulator
from sa2crq.metrics.tokenizer_report import tokenizer_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def figures(page: str) -> dict[str, bytes]:
    """alt text -> PNG bytes of every embedded image; each must be a real PNG."""
    found = {alt: base64.b64decode(data) for alt, data in re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', page)}
    assert page.count("<img") == len(found)
    for alt, png in found.items():
        assert png.startswith(PNG_SIGNATURE) and len(png) > 2000, alt
    return found


@pytest.fixture(scope="module")
def library_report():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 8, (400, 3))
    segments = np.repeat([HEAD, TORSO, TAIL, COLD], 100)
    table = assign_sids(np.arange(400), codes, rng.integers(0, 50, 400), segments, (8, 8, 8), SIDConfig())
    acrq = {"head_code_stability": 0.998, "tail_recon_error_phase1": 0.41, "tail_recon_error_phase2": 0.37, "extension_codes_used": [2, 1, 0]}
    return tokenizer_report(table, {"acrq": acrq}, method="sa2crq", max_bucket=32)


def test_sid_version_page_plots_lengths_buckets_codebooks_and_stability(library_report):
    page = sid_version_page(library_report, "SID version v1")
    assert set(figures(page)) == {"SID length by segment", "Bucket sizes", "Codebook utilisation and perplexity"}
    assert "ACRQ head-code stability</td><td>0.9980" in page
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page  # self-contained


def test_a_recode_report_adds_the_churn_against_its_parent(library_report):
    stats = {k: library_report[k] for k in ("items", "distinct_sids", "mean_sid_len", "collision_rate", "max_bucket", "vocab_size", "bucket_sizes", "segments", "codebook")}
    recode = {
        "version": "v2", "parent": "v1", "sids": stats, "tokenizer": {"fit": {"acrq": library_report["acrq"]}},
        "churn": {"previous": 400, "current": 410, "common": 395, "unchanged": 380, "changed": 15, "added": 15, "removed": 5, "churn": 15 / 395},
    }  # fmt: skip
    page = sid_version_page(recode, "SID version v2")
    assert "Churn against the parent version" in figures(page)
    assert "churn against the parent</td><td>3.80%" in page
    first = sid_version_page({**recode, "churn": {"churn": 0.0}}, "SID version v1")
    assert "Churn against the parent version" not in figures(first) and "(first version)" in first


def test_retriever_page_plots_the_learning_curve_and_names_the_selected_step():
    curve = [{"step": s, "examples": s * 300, "train_seconds": s / 5, "train_loss": 4 / (1 + s / 400), "valid_loss": 3 / (1 + s / 500), "metric": m}
             for s, m in ((400, 0.057), (800, 0.073), (1200, 0.072))]  # fmt: skip
    report = {"sid_version": "v1", "parameters": 512_000, "scorer": {"temperature": 0.05},
              "history": {"curve": curve, "best_step": 800, "steps": 1200, "converged": True, "best_metric": 0.073,
                          "selected_by": "select", "examples_per_second": 1590.0}}  # fmt: skip
    page = retriever_page(report, "retriever r1")
    assert set(figures(page)) == {"Learning curve"}
    assert "selected step / steps</td><td>800 / 1200</td>" in page


def test_evaluation_page_plots_metrics_by_segment_and_the_top_k_sources():
    acc = RetrievalAccumulator(item_index=np.arange(20), item_segments=np.repeat(np.arange(4, dtype=np.int8), 5), ks=(5, 10))
    rng = np.random.default_rng(1)
    topk = np.stack([rng.permutation(20)[:10] for _ in range(50)])
    acc.update(topk, rng.integers(0, 20, 50), from_bucket=rng.random((50, 10)) < 0.3, from_dense=rng.random((50, 10)) < 0.3)
    page = evaluation_page({"retriever_version": "r1", "sid_version": "v1", "metrics": acc.result()}, "evaluation of r1")
    assert set(figures(page)) == {"Recall and NDCG by segment", "Top-K sources"}


CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "chromium-headless-shell", "google-chrome") if shutil.which(name)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (Debian: apt-get install chromium)")
def test_a_headless_browser_renders_the_page_with_its_plots(library_report, tmp_path):
    """A real browser, no network: the screenshot is a page with plots in it, not a blank one."""
    import matplotlib.image

    path = tmp_path / "report.html"
    path.write_text(sid_version_page(library_report, "SID version v1"))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1200)
    # Plots put colour on the page: bars in several hues, far from the white background.
    coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.3
    assert coloured.mean() > 0.01
