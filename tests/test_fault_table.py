"""The fault table plugin (tests/fault_table.py) on a small suite of its own: every scenario gets a
row, a failure names its test, deselected tests show as not run, and a scenario no test carries
shows "no test"."""

from __future__ import annotations

from fault_table import SCENARIOS

SUITE = """
import pytest

@pytest.mark.fault_scenario(1)
def test_paused():
    pass

@pytest.mark.fault_scenario(2)
@pytest.mark.parametrize("point", ["data", "commit"])
def test_crash(point):
    assert point == "data"

@pytest.mark.fault_scenario(3)
@pytest.mark.slow_fault
def test_slow():
    pass

@pytest.mark.bad_input("ingest", "null_item_id")
def test_null_ids():
    pass

@pytest.mark.bad_input("recode", "duplicate_item_id")
def test_duplicates():
    pytest.skip("no data")

def test_unmarked():
    pass
"""


def test_the_tables_give_every_scenario_a_row_and_every_marked_test_its_outcome(pytester):
    pytester.makepyfile(test_suite=SUITE)
    table = pytester.path / "out" / "tables.md"
    result = pytester.runpytest("-p", "fault_table", "--fault-table", str(table), "-m", "not slow_fault")
    result.assert_outcomes(passed=4, failed=1, skipped=1, deselected=1)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.read_text().splitlines() if line.startswith("| ")}
    assert "pass (1) |" in rows["1"] and "`test_suite.py::test_paused`" in rows["1"]
    assert "**FAIL** (1 of 2: `test_crash[commit]` FAIL)" in rows["2"]
    assert "not run (deselected)" in rows["3"]
    for number in range(4, len(SCENARIOS) + 1):
        assert rows[str(number)] == f"| {number} | {SCENARIOS[number]} |  | **no test** |  |"
    assert rows["recode"].startswith("| recode | duplicate_item_id | `test_suite.py::test_duplicates` | skip |")
    assert rows["ingest"].startswith("| ingest | null_item_id | `test_suite.py::test_null_ids` | pass (1) |")
    assert "test_unmarked" not in table.read_text()
    result.stdout.fnmatch_lines(["*fault scenarios and bad input*", f"(written to {table})"])
