"""The fault-injection table: which tests exercise each fault scenario and bad-input rule, and how they ended.

Tests say what they exercise with two markers (registered in pyproject.toml):
``@pytest.mark.fault_scenario(n)`` for scenario ``n`` of :data:`SCENARIOS` (issue 11's list), and
``@pytest.mark.bad_input(job, rule)`` for a job's input rule. At the end of a session run with
``--fault-table=PATH`` (or ``SA2CRQ_FAULT_TABLE=PATH``; with a space instead of ``=`` pytest takes an
existing PATH for a test path before this plugin is loaded) this plugin writes two markdown tables to
PATH and prints them in the terminal summary (``make faults``): every scenario with its tests, the
outcome and the seconds they took (setup, call and teardown, so a module fixture's work counts once,
where it ran), and every bad-input rule with its outcome. A scenario no collected test carries shows
"no test", and one whose tests were all deselected "not run", so a gap cannot hide.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

TABLE_ENV = "SA2CRQ_FAULT_TABLE"

SCENARIOS = {
    1: "publisher paused past any timeout while another commits (both orders)",
    2: "crash between every pair of publish steps (after data, after manifest, after commit)",
    3: "garbage/empty/foreign files under the commit prefix",
    4: "S3 server stopped mid-write and restarted",
    5: "a Ray Data actor killed mid-stage (embed, encode, generate)",
    6: "a Ray Train worker killed mid-epoch",
    7: "a published file modified after publish -> detected on read",
    8: "two concurrent ingests and a recode at once",
    9: "disk full on the local staging directory",
    10: "recode killed mid-run, rerun resumes",
}
JOBS = ("recode", "ingest", "generate", "train-retriever", "evaluate")


@dataclass
class _Test:
    """One marked test: what it exercises, and how its phases went."""

    nodeid: str
    scenarios: tuple[int, ...]
    bad_inputs: tuple[tuple[str, str], ...]
    selected: bool
    outcome: str | None = None  # "pass", "FAIL", "ERROR", "skip"; None until it ran
    seconds: float = 0.0


class FaultTable:
    """The plugin object (registered by :func:`pytest_configure`): its methods are pytest hooks."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tests: dict[str, _Test] = {}

    # -- collecting -------------------------------------------------------------------------------
    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        for item in items:
            self._add(item, selected=False)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for item in session.items:
            self._add(item, selected=True)

    def _add(self, item: pytest.Item, *, selected: bool) -> None:
        scenarios = tuple(int(mark.args[0]) for mark in item.iter_markers("fault_scenario"))
        bad_inputs = tuple((str(mark.args[0]), str(mark.args[1])) for mark in item.iter_markers("bad_input"))
        for number in scenarios:
            if number not in SCENARIOS:
                raise pytest.UsageError(f"{item.nodeid}: fault_scenario({number}) names no scenario (1..{len(SCENARIOS)})")
        for job, _ in bad_inputs:
            if job not in JOBS:
                raise pytest.UsageError(f"{item.nodeid}: bad_input job {job!r} is none of {', '.join(JOBS)}")
        if scenarios or bad_inputs:
            self.tests[item.nodeid] = _Test(item.nodeid, scenarios, bad_inputs, selected)

    # -- running ----------------------------------------------------------------------------------
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        test = self.tests.get(report.nodeid)
        if test is None:
            return
        test.seconds += report.duration
        if report.failed:
            test.outcome = "FAIL" if report.when == "call" else "ERROR"
        elif report.skipped and test.outcome is None:
            test.outcome = "skip"
        elif report.when == "call" and report.passed and test.outcome is None:
            test.outcome = "pass"

    # -- writing ----------------------------------------------------------------------------------
    def pytest_terminal_summary(self, terminalreporter) -> None:
        text = self.markdown()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        Path(self.path).write_text(text)
        terminalreporter.write_sep("=", "fault scenarios and bad input")
        terminalreporter.write(text)
        terminalreporter.write_line(f"(written to {self.path})")

    def markdown(self) -> str:
        lines = ["| # | scenario | tests | result | seconds |", "|---|---|---|---|---|"]
        by_scenario: dict[int, list[_Test]] = defaultdict(list)
        by_rule: dict[tuple[str, str], list[_Test]] = defaultdict(list)
        for test in self.tests.values():
            for number in test.scenarios:
                by_scenario[number].append(test)
            for rule in test.bad_inputs:
                by_rule[rule].append(test)
        for number, text in SCENARIOS.items():
            tests = by_scenario[number]
            lines.append(f"| {number} | {text} | {_names(tests)} | {_result(tests)} | {_seconds(tests)} |")
        lines += ["", "| job | rule | tests | result | seconds |", "|---|---|---|---|---|"]
        if not by_rule:
            lines.append("| | | | **no test** | |")
        for job, rule in sorted(by_rule, key=lambda r: (JOBS.index(r[0]), r[1])):
            tests = by_rule[(job, rule)]
            lines.append(f"| {job} | {rule} | {_names(tests)} | {_result(tests)} | {_seconds(tests)} |")
        return "\n".join(lines) + "\n"


def _names(tests: list[_Test]) -> str:
    return "<br>".join(f"`{_short(t.nodeid)}`" for t in sorted(tests, key=lambda t: t.nodeid))


def _short(nodeid: str) -> str:
    """The node id without the test file's directory (test file names are unique)."""
    path, name = nodeid.split("::", 1)
    return f"{path.rsplit('/', 1)[-1]}::{name}"


def _result(tests: list[_Test]) -> str:
    """pass / FAIL naming the failed tests / skip / not run; "no test" where nothing carries the marker."""
    if not tests:
        return "**no test**"
    ran = [t for t in tests if t.outcome is not None]
    if not ran:
        return "not run (deselected)" if not any(t.selected for t in tests) else "not run"
    bad = [t for t in ran if t.outcome in ("FAIL", "ERROR")]
    if bad:
        return f"**FAIL** ({len(bad)} of {len(ran)}: " + ", ".join(f"`{t.nodeid.rsplit('::', 1)[-1]}` {t.outcome}" for t in bad) + ")"
    passed = sum(t.outcome == "pass" for t in ran)
    if not passed:
        return "skip"
    note = f", {len(ran) - passed} skipped" if passed < len(ran) else ""
    unrun = f", {len(tests) - len(ran)} not run" if len(ran) < len(tests) else ""
    return f"pass ({passed}{note}{unrun})"


def _seconds(tests: list[_Test]) -> str:
    ran = [t for t in tests if t.outcome is not None]
    return f"{sum(t.seconds for t in ran):.1f}" if ran else ""


# -- the plugin's entry points (pytest_plugins in tests/conftest.py) --------------------------------
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fault-table", metavar="PATH", default=os.environ.get(TABLE_ENV) or None,
                     help=f"write the fault-scenario and bad-input tables (markdown) here and print them (env {TABLE_ENV})")  # fmt: skip


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--fault-table")
    if path:
        config.pluginmanager.register(FaultTable(path), "fault-table")
