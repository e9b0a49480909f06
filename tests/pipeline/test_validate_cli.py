"""`sa2crq validate`: the dry run reports what a real run accepts, quarantines and refuses, no more and no less.

Every expectation is computed by the code a run uses (validate_items / validate_interactions, and
`sa2crq tokenize` itself on the same files), never written out by hand, so a dry run that drifts
from the run fails here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from sa2crq.cli import main
from sa2crq.data.validation import (
    INTERACTION_REJECT_REASONS,
    ITEM_REJECT_REASONS,
    InputError,
    validate_interactions,
    validate_items,
)
from tests.bench.test_minimal_dependencies import run_blocked
from tests.data.test_data_validation import unchecked_strings
from tests.pipeline.test_tokenize_cli import FAST, catalog_tables

DIM = 24
DUPLICATED_COLD_ID_ROWS = 2  # a duplicated id rejects every copy
NO_TEXT_ID = 10**9 + 5
NAN_ID = 10**9 + 2
BAD_UTF8_ID = 10**9 + 6
UNKNOWN_ID = 999_999_999


def messy_tables(n: int = 300) -> tuple[pa.Table, pa.Table]:
    """A clean catalog plus one row of every quarantine class of both tables, under the 5% ceiling."""
    items, interactions = catalog_tables(n=n, seed=1)
    # Variable-length lists, so that a wrong dimension can be written at all.
    items = items.cast(pa.schema([items.schema.field(0), items.schema.field(1), pa.field("embedding", pa.list_(pa.float32()))]))
    popular = pc.value_counts(interactions["item_id"]).field("values")
    cold_id = pc.filter(items["item_id"], pc.invert(pc.is_in(items["item_id"], value_set=popular)))[0].as_py()
    good = [0.1] * DIM
    bad_items = pa.table(
        {
            "item_id": pa.array([None, cold_id, 10**9 + 1, NAN_ID, 10**9 + 3, 10**9 + 4, NO_TEXT_ID, BAD_UTF8_ID], pa.int64()),
            "title": unchecked_strings([b"orphan", b"second copy", b"short", b"nan", b"zero", b"", b"  \t ", b"bad \xff"]),
            "embedding": pa.array(
                [good, good, [0.1] * 5, [float("nan")] + good[1:], [0.0] * DIM, good, None, good], pa.list_(pa.float32())
            ),
        }
    )  # 10**9 + 4 has a blank title but a valid embedding: accepted, an embedding needs no text
    first = interactions.slice(0, 1).to_pylist()[0]
    bad_interactions = pa.table(
        {
            "user_id": pa.array([None, 1, 2, 3, 4, first["user_id"], 5], pa.int64()),
            # cold_id is quarantined as a duplicate, so an interaction naming it is unknown (the cross-table rule)
            "item_id": pa.array([first["item_id"], None, first["item_id"], UNKNOWN_ID, cold_id, first["item_id"], first["item_id"]], pa.int64()),
            "timestamp": pa.array([1, 2, None, 4, 5, first["timestamp"], 7], pa.int64()),
            # an extra column, passed through, holding bytes that are not UTF-8 in the last row
            "source": unchecked_strings([b"app"] * 6 + [b"\xfe"]),
        }
    )
    interactions = interactions.append_column("source", pa.array(["app"] * interactions.num_rows))
    return pa.concat_tables([items, bad_items]), pa.concat_tables([interactions, bad_interactions])


def write(root: Path, items: pa.Table, interactions: pa.Table) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(items, root / "items.parquet")
    pq.write_table(interactions, root / "interactions.parquet")
    return root / "items.parquet", root / "interactions.parquet"


def validate(items: Path, interactions: Path, *extra: str) -> int:
    return main(["validate", "--items", str(items), "--interactions", str(interactions), *extra])


def tokenize(items: Path, interactions: Path, out: Path) -> int:
    return main(
        ["tokenize", "--items", str(items), "--interactions", str(interactions), "--method", "tiger",
         "--out", str(out), "--cache", str(out / "cache"), *[arg for setting in FAST for arg in ("--set", setting)]]
    )  # fmt: skip


def printed_counts(stdout: str) -> dict[str, dict]:
    """The printout parsed back: per table rows in / accepted / quarantined and the rows per reason."""
    counts: dict[str, dict] = {}
    table = None
    for line in stdout.splitlines():
        head = re.match(r"(items|interactions) \(.*\): rows in (\d+) = accepted (\d+) \+ quarantined (\d+) ", line)
        if head:
            table = head.group(1)
            rows_in, rows_out, rejected = map(int, head.group(2, 3, 4))
            counts[table] = {"rows_in": rows_in, "rows_out": rows_out, "rejected": rejected, "by_reason": {}}
        reason = re.match(r"  (\w+): (\d+) rows?$", line)
        if reason and table:
            counts[table]["by_reason"][reason.group(1)] = int(reason.group(2))
    return counts


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    items, interactions = messy_tables()
    return (*write(root, items, interactions), root, items, interactions)


def test_accepted_input_reports_what_the_rules_quarantine(messy, capsys):
    items_path, interactions_path, root, items, interactions = messy
    assert validate(items_path, interactions_path, "--out", str(root / "check")) == 0
    stdout = capsys.readouterr().out

    expected_items = validate_items(items)
    expected_interactions = validate_interactions(interactions, known_item_ids=expected_items.valid.column("item_id"))
    expected = {"items": expected_items.counts, "interactions": expected_interactions.counts}
    # Every quarantine class is present, so none can silently go missing from the dry run.
    assert set(expected["items"]["by_reason"]) == set(ITEM_REJECT_REASONS)
    assert set(expected["interactions"]["by_reason"]) == set(INTERACTION_REJECT_REASONS)
    assert expected["items"]["by_reason"]["duplicate_item_id"] == DUPLICATED_COLD_ID_ROWS
    assert expected["interactions"]["by_reason"]["unknown_item_id"] == 2  # absent, and quarantined as duplicate

    assert printed_counts(stdout) == expected
    summary = json.loads((root / "check" / "validation.json").read_text())
    assert summary["input"] == expected and summary["accepted"] is True and summary["refusals"] == []
    for name, table in (("items", items), ("interactions", interactions)):
        counts = summary["input"][name]
        assert counts["rows_in"] == table.num_rows == counts["rows_out"] + counts["rejected"]
    assert f"accepted: a run would go on with {expected['items']['rows_out']} items" in stdout
    # Examples: the id and the offending value, cut short.
    examples = summary["examples"]["items"]
    assert {"item_id": str(NAN_ID), "embedding": "[nan, 0.1, 0.1, 0.1, …] (24 values)"} in examples["embedding_non_finite"]
    assert {"item_id": str(NO_TEXT_ID), "title": repr("  \t "), "embedding": "null"} in examples["no_text_or_embedding"]
    assert {"item_id": str(BAD_UTF8_ID), "title": "b'bad \\xff'"} in examples["invalid_utf8"]  # the bytes, shown
    assert {"user_id": "3", "item_id": str(UNKNOWN_ID), "timestamp": "4"} in summary["examples"]["interactions"]["unknown_item_id"]
    assert f"item_id={NAN_ID}  embedding=[nan, 0.1, 0.1, 0.1, …] (24 values)" in stdout


def test_dry_run_writes_what_tokenize_writes(messy, capsys):
    """The same files through `sa2crq tokenize`: the same counts in its report and the same rejects files."""
    items_path, interactions_path, root, _, _ = messy
    assert validate(items_path, interactions_path, "--out", str(root / "dry")) == 0
    assert tokenize(items_path, interactions_path, root / "run") == 0
    capsys.readouterr()
    report = json.loads((root / "run" / "report.json").read_text())
    assert json.loads((root / "dry" / "validation.json").read_text())["input"] == report["input"]
    for name in ("rejected_items.parquet", "rejected_interactions.parquet"):
        # Byte for byte (a NaN embedding is never equal to itself, so tables would not compare).
        assert (root / "dry" / name).read_bytes() == (root / "run" / name).read_bytes()


def refusal_cases(items: pa.Table, interactions: pa.Table) -> dict[str, tuple[pa.Table, pa.Table, str]]:
    """Inputs a run refuses, each with the rule its message must name."""
    too_many_unknown = interactions.set_column(
        1, "item_id", pc.if_else(pc.equal(pc.bit_wise_and(interactions["timestamp"], 7), 0), UNKNOWN_ID, interactions["item_id"])
    )  # one interaction in 8 names an item that does not exist: 12.5%, over the 5% ceiling
    text_only = items.slice(0, 3).set_column(2, "embedding", pa.nulls(3, items.schema.field("embedding").type))
    return {
        "items ceiling": (pa.concat_tables([items.slice(0, 10), items.slice(items.num_rows - 7)]), interactions, "above max_reject_fraction=5.00%"),
        "interactions ceiling": (items, too_many_unknown, "above max_reject_fraction=5.00%"),
        "item_id type": (items.set_column(0, "item_id", items["item_id"].cast(pa.float64())), interactions, "breaks rule 'int64 or string'"),
        "item_id types across tables": (
            items, interactions.set_column(1, "item_id", interactions["item_id"].cast(pa.string())), "both must be integer or both string"
        ),
        "missing timestamp": (items, interactions.drop(["timestamp"]), "missing required column 'timestamp'"),
        "empty items": (items.slice(0, 0), interactions, "input is empty"),
        # Refused when the run embeds, after validation: 24-dimensional own vectors beside 384-dimensional text ones.
        "own embeddings beside text": (pa.concat_tables([text_only, items.slice(3)]), interactions, "give every item an embedding or none"),
    }  # fmt: skip


@pytest.mark.parametrize("case", list(refusal_cases(*messy_tables()).keys()))
def test_refused_input_exits_2_with_the_message_a_run_gives(case, tmp_path, capsys):
    items, interactions, rule = refusal_cases(*messy_tables())[case]
    items_path, interactions_path = write(tmp_path, items, interactions)
    assert tokenize(items_path, interactions_path, tmp_path / "run") == 2
    run_error = capsys.readouterr().err.strip().splitlines()[-1]
    assert run_error.startswith("error: ") and rule in run_error

    assert validate(items_path, interactions_path, "--out", str(tmp_path / "check")) == 2
    stdout = capsys.readouterr().out
    assert f"refused: a run would stop with\n  {run_error}\n" in stdout + "\n"
    summary = json.loads((tmp_path / "check" / "validation.json").read_text())
    assert summary["accepted"] is False and f"error: {summary['refusals'][0]}" == run_error
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_ceiling_breach_still_shows_every_quarantined_row(tmp_path, capsys):
    items, interactions, _ = refusal_cases(*messy_tables())["interactions ceiling"]
    items_path, interactions_path = write(tmp_path, items, interactions)
    assert validate(items_path, interactions_path, "--out", str(tmp_path / "check")) == 2
    stdout = capsys.readouterr().out
    expected_items = validate_items(items)
    expected = validate_interactions(interactions, known_item_ids=expected_items.valid.column("item_id"))
    with pytest.raises(InputError) as refusal:
        validate_interactions(interactions, known_item_ids=expected_items.valid.column("item_id"), max_reject_fraction=0.05)
    assert printed_counts(stdout)["interactions"] == expected.counts
    assert pq.read_table(tmp_path / "check" / "rejected_interactions.parquet").equals(expected.rejects)
    assert json.loads((tmp_path / "check" / "validation.json").read_text())["refusals"] == [str(refusal.value)]


def test_every_problem_is_reported_in_one_look(tmp_path, capsys):
    """Both tables broken: the first refusal is the run's, the next is the one a rerun would meet."""
    items, interactions = messy_tables()
    items_path, interactions_path = write(
        tmp_path, items.set_column(0, "item_id", items["item_id"].cast(pa.float64())), interactions.drop(["timestamp"])
    )
    assert validate(items_path, interactions_path) == 2
    stdout = capsys.readouterr().out
    first = stdout.index("breaks rule 'int64 or string'")
    assert first < stdout.index("a rerun would next stop with") < stdout.index("missing required column 'timestamp'")
    assert "rows in" not in stdout  # neither table could be judged row by row


def test_validate_runs_without_ray_or_spark(messy):
    items_path, interactions_path, _, _, _ = messy
    run_blocked(
        f"""
        from sa2crq.cli import main
        code = main(["validate", "--items", {str(items_path)!r}, "--interactions", {str(interactions_path)!r}])
        sys.exit(code)
        """
    )
