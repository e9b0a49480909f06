"""What stops a recode from publishing over its parent: SID churn among kept items, and lost items
(a truncated or stale snapshot has little churn, since the items it kept did not move)."""

from __future__ import annotations

import re

import pytest

from jobs.config import RecodeConfig
from jobs.recode import publish_refusal

CONFIG = RecodeConfig(items="/data/items", interactions="/data/interactions", churn_limit=0.05, removed_limit=0.10)


def counts(previous: int, common: int, changed: int) -> dict:
    return {"previous": previous, "common": common, "changed": changed, "removed": previous - common,
            "churn": changed / common if common else 0.0}  # fmt: skip


@pytest.mark.parametrize(
    "churn, reason",
    [
        (counts(1000, 1000, 50), None),  # at the churn limit
        (counts(1000, 1000, 51), r"SID churn 5\.10% exceeds the limit of 5\.00% \(51 of 1,000 items changed SID\)"),
        (counts(1000, 900, 0), None),  # 10% gone: at the removal limit
        (counts(1000, 100, 0), r"900 of the previous version's 1,000 items \(90\.00%\) are missing.*truncated or stale"),
        (counts(1000, 0, 0), r"1,000 of the previous version's 1,000 items \(100\.00%\) are missing"),  # churn 0: nothing in common
    ],
)
def test_refusal_names_the_rule(churn, reason):
    refusal = publish_refusal(churn, CONFIG)
    if reason is None:
        assert refusal is None
    else:
        assert refusal is not None and re.search(reason, refusal), refusal


def test_removed_limit_is_validated():
    with pytest.raises(ValueError, match=r"removed_limit must be in \[0, 1\]"):
        RecodeConfig(items="/a", interactions="/b", removed_limit=1.5)
