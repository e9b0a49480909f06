"""Progress: bars on a terminal, plain lines with rate and ETA elsewhere, nothing when quiet."""

from __future__ import annotations

import logging
import os
import time

import pytest

from jobs.cli import main
from sa2crq.progress import ENV, Progress, progress_mode


def test_lines_report_count_rate_eta_and_status(monkeypatch, caplog):
    monkeypatch.setenv(ENV, "lines")
    caplog.set_level(logging.INFO, logger="sa2crq.progress")
    with Progress("retriever training", total=4, unit="step", interval_s=0.0) as progress:
        progress.update(1, loss=2.34567)
        progress.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # one per update (interval 0), one at the end
    assert lines[0].startswith("retriever training: 1/4 step (25%), ") and "step/s" in lines[0] and "ETA" in lines[0]
    assert lines[0].endswith("loss 2.346")
    assert lines[-1].startswith("retriever training: 2/4 step (50%)") and "loss 2.346" in lines[-1]


def test_a_short_stage_logs_nothing_in_lines_mode(monkeypatch, caplog):
    monkeypatch.setenv(ENV, "lines")
    caplog.set_level(logging.INFO, logger="sa2crq.progress")
    with Progress("generation", total=10, unit="request", interval_s=3600) as progress:
        progress.update(10)
    assert not caplog.records


def test_bars_show_rate_on_stderr_and_off_shows_nothing(monkeypatch, capsys, caplog):
    monkeypatch.setenv(ENV, "bar")
    with Progress("embedding", total=100, unit="text") as progress:
        time.sleep(0.2)  # past the bar's minimum redraw interval
        progress.update(60)
    err = capsys.readouterr().err
    assert "embedding" in err and "60/100" in err and "text/s" in err
    monkeypatch.setenv(ENV, "off")
    caplog.set_level(logging.INFO, logger="sa2crq.progress")
    with Progress("embedding", total=100, unit="text", interval_s=0.0) as progress:
        progress.update(60)
    assert capsys.readouterr().err == "" and not caplog.records


def test_the_mode_follows_the_terminal_unless_set(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert progress_mode() == "lines"  # pytest's stderr is not a terminal
    monkeypatch.setenv(ENV, "loud")
    with pytest.raises(ValueError, match="SA2CRQ_PROGRESS must be one of bar, lines, off, got 'loud'"):
        progress_mode()


def test_quiet_on_the_command_line_reaches_the_processes_a_job_starts(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV, "lines")
    assert main(["--quiet", "versions", "list", "--root", str(tmp_path)]) == 0
    assert os.environ[ENV] == "off"
