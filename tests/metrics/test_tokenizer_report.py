"""Tokenizer report metrics against hand-computed values on a tiny SID table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sa2crq.config import SIDConfig
from sa2crq.data.segments import COLD, HEAD, TAIL
from sa2crq.ids.sid_table import assign_sids
from sa2crq.metrics.tokenizer_report import compare_reports, format_report, tokenizer_report


@pytest.fixture()
def report():
    # Five items, 2 levels, K = 4, fixed length, no digits on collisions... except full-depth ones.
    codes = np.array([[0, 1], [0, 1], [0, 2], [3, 3], [0, 1]])
    segments = np.array([HEAD, TAIL, COLD, TAIL, COLD])
    table = assign_sids(np.arange(5), codes, np.array([5, 1, 0, 2, 0]), segments, (4, 4), SIDConfig(adaptive_length=False, digit_vocab=2))
    return tokenizer_report(table, {}, method="m", max_bucket=32)


def test_collisions_and_buckets(report):
    # Path (0,1) is shared by items 0, 1, 4: digits 0 (pop 5), 1 (pop 1), and item 4 overflows into
    # the last digit with item 1, so items 1 and 4 share a SID.
    assert report["full_path_collision_rate"] == pytest.approx(3 / 5)
    assert report["collision_rate"] == pytest.approx(2 / 5)
    assert report["bucket_sizes"] == {"1": 3, "2": 2}
    assert report["digit_overflow_items"] == 2  # items in the overflow bucket
    assert report["distinct_sids"] == 4


def test_codebook_utilisation_and_perplexity(report):
    level1, level2 = report["codebook"]
    assert level1["used"] == 2 and level1["utilisation"] == pytest.approx(2 / 4)
    p = np.array([4, 1]) / 5
    assert level1["perplexity"] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert level2["used"] == 3


def test_segments_and_cold_sharing(report):
    assert report["segments"]["cold"]["items"] == 2
    # Cold item 4 shares its SID with warm item 1; cold item 2 is alone.
    assert (report["cold_sharing_warm"], report["cold_items"]) == (1, 2)
    assert report["segments"]["head"]["mean_sid_len"] == 3.0  # two codes + digit
    assert report["segments"]["tail"]["collision_rate"] == pytest.approx(1 / 2)


def test_human_readable_forms(report):
    assert "tokenizer report: m" in format_report(report)
    table = compare_reports([report, {**report, "method": "other"}])
    assert table.splitlines()[0] == "| metric | m | other |"


def test_sid_length_histograms_count_each_segments_items_by_length(report):
    for name, seg in report["segments"].items():
        hist = {int(length): items for length, items in seg["sid_length_histogram"].items()}
        assert sum(hist.values()) == seg["items"], name
        if seg["items"]:
            assert sum(length * items for length, items in hist.items()) / seg["items"] == pytest.approx(seg["mean_sid_len"])
    assert report["segments"]["tail"]["sid_length_histogram"] == {"2": 1, "3": 1}  # (3,3) alone; (0,1) with a digit
