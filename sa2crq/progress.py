"""Progress of long stages, in the form the place it runs expects, from one piece of code.

* On a terminal: a live bar with count, rate and ETA (tqdm), removed when the stage ends.
* Elsewhere (CI, Kubernetes and Ray logs, files): a plain log line every ``interval_s`` seconds
  with the same numbers, and one at the end of a stage that logged any.
* Off: nothing (``sa2crq --quiet``, for scripts).

The mode is ``SA2CRQ_PROGRESS`` (``bar``, ``lines`` or ``off``) when set, else ``bar`` when stderr
is a terminal and ``lines`` otherwise. It is an environment variable so that processes the jobs
start (Ray workers, Spark) inherit it. Without tqdm (the bare GPU machine) bars become lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

log = logging.getLogger(__name__)

ENV = "SA2CRQ_PROGRESS"
MODES = ("bar", "lines", "off")


def progress_mode() -> str:
    mode = os.environ.get(ENV)
    if mode is None:
        return "bar" if sys.stderr.isatty() else "lines"
    if mode not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


class Progress:
    """``with Progress("retriever training", total=steps, unit="step") as p: ... p.update(1, loss=2.3)``."""

    def __init__(self, description: str, total: int | None = None, unit: str = "it", *, interval_s: float = 30.0) -> None:
        self.description, self.total, self.unit, self.interval_s = description, total, unit, interval_s
        self.done = 0
        self.status: dict[str, Any] = {}
        self.mode = progress_mode()
        self._started = self._last_line = time.monotonic()
        self._lines = 0
        self._bar = None
        if self.mode == "bar":
            try:
                from tqdm import tqdm
            except ImportError:
                self.mode = "lines"
            else:
                self._bar = tqdm(total=total, desc=description, unit=unit, leave=False, dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **status: Any) -> None:
        """``n`` more done; ``status`` (e.g. the loss) is shown beside the count."""
        self.done += n
        self.status.update(status)
        if self._bar is not None:
            if status:
                self._bar.set_postfix({k: _short(v) for k, v in self.status.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines" and time.monotonic() - self._last_line >= self.interval_s:
            self._log()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self._lines:
            self._log()  # the end of a stage that reported along the way; short stages stay silent

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def line(self) -> str:
        """What a plain line says: count of total, elapsed, rate, ETA, status."""
        elapsed = time.monotonic() - self._started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.description}: {self.done:,}" + (f"/{self.total:,}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts[0] += f" ({self.done / self.total:.0%})"
        parts.append(f"{_duration(elapsed)} elapsed, {rate:,.1f} {self.unit}/s")
        if self.total and rate > 0 and self.done < self.total:
            parts.append(f"ETA {_duration((self.total - self.done) / rate)}")
        parts += [f"{k} {_short(v)}" for k, v in self.status.items()]
        return ", ".join(parts)

    def _log(self) -> None:
        log.info("%s", self.line())
        self._lines += 1
        self._last_line = time.monotonic()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
