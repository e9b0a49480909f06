"""Reports are JSON; numpy scalars and arrays in them become plain numbers and lists."""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def dumps_report(report: Any) -> str:
    return json.dumps(report, indent=2, default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
