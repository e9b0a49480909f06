"""The bad-input table (issue 11): every class of bad input through every job that reads it.

``TABLE`` is the table as data, one row per (job, input, rule): the outcome is ``quarantined`` (the
rows go to the rejects the job writes, with the reason), ``error`` (the job stops with a message naming
the rule, and the rows where it names any, and publishes nothing) or ``counted`` (generate answers the
request and reports, per request, the history items the SID version does not know). ``checked`` says
how: through the job's entry point, or through the job's own validation step (the function the job
calls; a run of the whole job would cost a tokenizer or retriever training). Each job's quarantine
classes sit together in one input, validated once (module-scoped fixtures), so rows in = rows out +
rejected is checked over all of them at once. README's "Bad input" section shows this table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.config import load_job_config
from jobs.engines import SparkStaging
from jobs.evaluate import rejects_url, run_evaluate
from jobs.evaluate import validate_inputs as evaluate_validation
from jobs.generate import run_generate
from jobs.ingest import run_ingest, validate_batch
from jobs.recode import run_recode
from jobs.recode import validate_inputs as recode_validation
from jobs.train_retriever import run_train_retriever
from jobs.train_retriever import valid_rows
from jobs.train_retriever import validate_inputs as train_retriever_validation
from sa2crq.data.validation import REJECT_REASON_COLUMN, InputError, readable_rows
from sa2crq.retrieval.candidates import GenerationConfig
from sa2crq.retrieval.serving import load_server
from sa2crq.storage import layout
from sa2crq.storage.filesystem import read_parquet
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import PublishedVersion
from tests.data.test_data_validation import unchecked_strings
from tests.jobs.test_published_reads import _publish_store

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("spark", "ray_local")]

VIA_JOB, VIA_STEP = "via job", "via the job's validation step"


@dataclass(frozen=True)
class Case:
    job: str
    input: str
    rule: str  # a reject reason, or the table-level rule
    outcome: str  # "quarantined", "error" or "counted"
    expected: str  # quarantined: the reject reason; error: a regex of the message
    checked: str  # VIA_JOB or VIA_STEP


def _quarantined(job: str, input: str, reasons: list[str]) -> list[Case]:
    return [Case(job, input, reason, "quarantined", reason, VIA_STEP) for reason in reasons]


ITEM_REASONS = ["null_item_id", "duplicate_item_id", "invalid_utf8", "embedding_wrong_dimension", "embedding_non_finite",
                "embedding_zero_norm", "no_text_or_embedding"]  # fmt: skip
INTERACTION_REASONS = ["null_user_id", "null_item_id", "null_timestamp", "invalid_utf8", "unknown_item_id", "duplicate_interaction"]
QUERY_REASONS = ["null_query_id", "null_item_id", "invalid_utf8", "blank_query", "unknown_item_id"]
BOTH_INTEGER = "both must be integer or both string"

TABLE: list[Case] = [
    # recode: Spark validation, as the recode job runs it (jobs.recode.validate_inputs)
    *_quarantined("recode", "items", ITEM_REASONS),
    *_quarantined("recode", "interactions", INTERACTION_REASONS),
    Case("recode", "items", "missing column", "error", r"items: missing required column 'item_id'", VIA_JOB),
    Case("recode", "items", "item_id type", "error", r"items: column 'item_id' has type double, breaks rule 'int64 or string'", VIA_JOB),
    Case("recode", "interactions", "item_id types differ across tables", "error",
         rf"interactions: column 'item_id' has type string but the items' item_id has type int64: {BOTH_INTEGER}", VIA_JOB),
    Case("recode", "interactions", "timestamp type", "error",
         r"interactions: column 'timestamp' has type string, breaks rule 'integer or timestamp'", VIA_JOB),
    Case("recode", "items", "max_reject_fraction", "error",
         r"items: 3 of 4 rows rejected \(75\.00%\), above max_reject_fraction=5\.00%; by reason \{'no_text_or_embedding': 3\}", VIA_JOB),
    # ingest: the library's validation of the batch (jobs.ingest.validate_batch)
    *_quarantined("ingest", "items", ITEM_REASONS),
    Case("ingest", "items", "missing column", "error", r"items: missing required column 'item_id'", VIA_JOB),
    Case("ingest", "items", "item_id types differ across tables", "error",
         rf"items: column 'item_id' has type string but the published version \S+'s item_id has type int64: {BOTH_INTEGER}", VIA_JOB),
    Case("ingest", "items", "max_reject_fraction", "error",
         r"items: 3 of 4 rows rejected \(75\.00%\).*examples: item_id=1: no_text_or_embedding", VIA_JOB),
    # train-retriever: both inputs validated in Spark against the SID version's items (jobs.train_retriever.validate_inputs)
    *_quarantined("train-retriever", "interactions", INTERACTION_REASONS),
    *_quarantined("train-retriever", "query log", QUERY_REASONS),
    Case("train-retriever", "interactions", "missing column", "error",
         r"interactions \(\S+\): interactions: missing required column 'timestamp'", VIA_JOB),
    Case("train-retriever", "interactions", "item_id types differ across tables", "error",
         rf"interactions \(\S+\): interactions: column 'item_id' has type string but the items' item_id has type int64: {BOTH_INTEGER}", VIA_JOB),
    Case("train-retriever", "valid", "max_reject_fraction", "error",
         r"valid \(\S+\): interactions: 3 of 4 rows rejected \(75\.00%\).*\{'unknown_item_id': 3\}", VIA_JOB),
    Case("train-retriever", "query log", "missing column", "error", r"queries: missing required column 'query'", VIA_JOB),
    # evaluate: both inputs validated against the SID version's items (jobs.evaluate.validate_inputs)
    *_quarantined("evaluate", "history", INTERACTION_REASONS),
    Case("evaluate", "targets", "missing column", "error", r"targets \(\S+\): interactions: missing required column 'timestamp'", VIA_JOB),
    Case("evaluate", "history", "item_id types differ across tables", "error",
         rf"history \(\S+\): interactions: column 'item_id' has type string but the items' item_id has type int64: {BOTH_INTEGER}", VIA_JOB),
    Case("evaluate", "targets", "max_reject_fraction", "error",
         r"targets \(\S+\): interactions: 3 of 4 rows rejected \(75\.00%\).*\{'unknown_item_id': 3\}", VIA_JOB),
    # generate: the request file's schema before any actor starts; its rows in the actors (Server.history_requests)
    Case("generate", "requests", "missing column", "error", r"requests: missing required column 'history'", VIA_JOB),
    Case("generate", "requests", "item_id types differ across tables", "error",
         rf"requests: column 'history' has type string but this SID version's item_id has type int64: {BOTH_INTEGER}", VIA_JOB),
    Case("generate", "requests", "null request_id", "error",
         r"generate: 1 of 1 shards of \S+ refused their input; shard \S+: requests: 1 rows have a null 'request_id' \(rule: not null\), e.g. rows \[1\]",
         VIA_JOB),
    Case("generate", "requests", "null history", "error", r"requests: 1 rows have a null 'history' \(rule: not null\), e.g. rows \[2\]", VIA_STEP),
    Case("generate", "requests", "invalid_utf8", "error",
         r"requests: 1 rows hold a string that is not valid UTF-8 \(rule: invalid_utf8\), e.g. rows \[1\]", VIA_STEP),
    Case("generate", "requests", "unknown_item_id", "counted", "unknown_history_items", VIA_STEP),
]  # fmt: skip


def _params(outcome: str) -> list:
    return [
        pytest.param(case, marks=pytest.mark.bad_input(case.job, case.rule), id=f"{case.job}-{case.input}-{case.rule}")
        for case in TABLE if case.outcome == outcome
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------------------
# Inputs holding every quarantine class at once, and the rows each class must reject (by key)
# --------------------------------------------------------------------------------------------------------

GOOD_VECTOR = [0.5, 0.25, 0.0, 1.0]
STORE_ITEMS = np.arange(100, 140)  # the item ids _publish_store publishes


def _bad_items() -> tuple[pa.Table, dict[str, list]]:
    """250 good items and 11 bad ones (4.2%, under the jobs' 5% ceiling); float64 vectors, so that a
    value beyond float32's range can be written."""
    good = [(1000 + i, f"item {i}".encode(), GOOD_VECTOR) for i in range(250)]
    bad = {
        "null_item_id": [(None, b"no id", GOOD_VECTOR)],
        "duplicate_item_id": [(2000, b"first copy", GOOD_VECTOR), (2000, b"second copy", GOOD_VECTOR)],
        "invalid_utf8": [(2001, b"caf\xff", GOOD_VECTOR)],
        "embedding_wrong_dimension": [(2002, b"short", [1.0, 0.0, 0.0])],
        "embedding_non_finite": [(2003, b"nan", [np.nan, 1, 0, 0]), (2004, b"inf", [np.inf, 1, 0, 0]), (2005, b"big", [1e39, 1, 0, 0])],
        "embedding_zero_norm": [(2006, b"zero", [0.0, 0.0, 0.0, 0.0])],
        "no_text_or_embedding": [(2007, " \t\u3000".encode(), None), (2008, None, None)],  # whitespace only, no title
    }  # fmt: skip
    rows = good + [row for reason_rows in bad.values() for row in reason_rows]
    table = pa.table({
        "item_id": pa.array([r[0] for r in rows], pa.int64()),
        "title": unchecked_strings([r[1] for r in rows]),
        "embedding": pa.array([r[2] for r in rows], pa.list_(pa.float64())),
    })  # fmt: skip
    return table, {reason: [r[0] for r in reason_rows] for reason, reason_rows in bad.items()}


def _bad_interactions(item_ids: np.ndarray, quarantined_item: int | None) -> tuple[pa.Table, dict[str, list]]:
    """300 good events of 30 users (string ids, so that a user id can be invalid UTF-8) and 7 bad ones."""
    good = [(f"u{u}".encode(), int(item_ids[(u * 7 + t) % len(item_ids)]), t) for u in range(30) for t in range(10)]
    unknown = [(b"u3", 999_999, 50)] + ([(b"u4", quarantined_item, 51)] if quarantined_item is not None else [])
    bad = {
        "null_user_id": [(None, int(item_ids[0]), 60)],
        "null_item_id": [(b"u1", None, 61)],
        "null_timestamp": [(b"u2", int(item_ids[1]), None)],
        "invalid_utf8": [(b"u\xff", int(item_ids[2]), 62)],
        "unknown_item_id": unknown,  # absent from the catalog, or quarantined with the items
        "duplicate_interaction": [good[0]],  # a re-sent event: the first copy is kept
    }
    rows = good + [row for reason_rows in bad.values() for row in reason_rows]
    table = pa.table({
        "user_id": unchecked_strings([r[0] for r in rows]),
        "item_id": pa.array([r[1] for r in rows], pa.int64()),
        "timestamp": pa.array([r[2] for r in rows], pa.int64()),
    })  # fmt: skip
    return table, {reason: [(_as_read(r[0]), r[1]) for r in reason_rows] for reason, reason_rows in bad.items()}


def _as_read(value: bytes | None) -> str | bytes | None:
    """A string as :func:`readable_rows` shows it: decoded where it is valid UTF-8, its bytes where not."""
    try:
        return None if value is None else value.decode()
    except UnicodeDecodeError:
        return value


def _bad_queries() -> tuple[pa.Table, dict[str, list]]:
    """200 good queries and 6 bad ones."""
    good = [(i, f"red lipstick {i}".encode(), int(STORE_ITEMS[i % len(STORE_ITEMS)])) for i in range(200)]
    bad = {
        "null_query_id": [(None, b"blue shampoo", 100)],
        "null_item_id": [(500, b"green perfume", None)],
        "invalid_utf8": [(501, b"caf\xff", 101)],
        "blank_query": [(502, " \t\u3000".encode(), 102), (503, None, 103)],
        "unknown_item_id": [(504, b"pink nail polish", 999_999)],
    }
    rows = good + [row for reason_rows in bad.values() for row in reason_rows]
    table = pa.table({
        "query_id": pa.array([r[0] for r in rows], pa.int64()),
        "query": unchecked_strings([r[1] for r in rows]),
        "item_id": pa.array([r[2] for r in rows], pa.int64()),
    })  # fmt: skip
    return table, {reason: [(r[0], r[2]) for r in reason_rows] for reason, reason_rows in bad.items()}


# --------------------------------------------------------------------------------------------------------
# Stores, configs, and one validation run per job input
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def store(base) -> Path:
    """A published SID version (items 100-139) and a retriever on it, as the jobs publish them."""
    _publish_store(base / "store")
    return base / "store"


def _write(base: Path, name: str, table: pa.Table) -> str:
    path = base / "inputs" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return str(path)


def _config(job: str, base: Path, root: Path, **fields):
    common = {"storage.root": str(root)}
    if job != "evaluate":  # evaluate runs in its own process, without Ray
        common |= {"ray.train_workers": 1, "ray.cpus_per_train_worker": 0.5, "ray.actors": 1, "ray.cpus_per_actor": 0.5}
    if job in ("recode", "ingest", "train-retriever"):  # the jobs that use Spark
        common["spark.staging_dir"] = str(base / "staging")
    return load_job_config(job, None, [f"{key}={json.dumps(value)}" for key, value in {**common, **fields}.items()])


@dataclass(frozen=True)
class Quarantine:
    """One validation run: the input's row count, the counts the job reports, the rejects it wrote, and
    the rows each reason must reject, by key."""

    rows_in: int
    counts: dict
    rejects: pa.Table
    expected: dict[str, list]
    keys: tuple[str, ...]


@pytest.fixture(scope="module")
def recode_run(spark, base) -> dict[str, Quarantine]:
    items, bad_items = _bad_items()
    interactions, bad_interactions = _bad_interactions(np.arange(1000, 1250), quarantined_item=2000)
    config = _config("recode", base, base / "recode-store", items=_write(base, "recode-items", items),
                     interactions=_write(base, "recode-interactions", interactions))  # fmt: skip
    url = str(base / "recode-version")
    staging = SparkStaging(config.spark)
    try:
        valid_items, valid_interactions = recode_validation(config, spark, staging, url)
    finally:
        staging.cleanup()
    rejects = {name: read_parquet(f"{url}/{layout.REJECTS}/{name}") for name in ("items", "interactions")}
    return {
        "items": Quarantine(items.num_rows, valid_items.counts, rejects["items"], bad_items, ("item_id",)),
        "interactions": Quarantine(interactions.num_rows, valid_interactions.counts, rejects["interactions"], bad_interactions,
                                   ("user_id", "item_id")),
    }  # fmt: skip


@pytest.fixture(scope="module")
def ingest_run(store, base) -> dict[str, Quarantine]:
    items, bad_items = _bad_items()
    config = _config("ingest", base, store, items=_write(base, "ingest-items", items))
    sids = Publisher(str(store / "sids"))
    url = str(base / "ingest-version")
    validated = validate_batch(config, PublishedVersion.open(sids, sids.latest()), url)
    rejects = read_parquet(f"{url}/{layout.REJECTS}/items")
    return {"items": Quarantine(items.num_rows, validated.counts, rejects, bad_items, ("item_id",))}


@pytest.fixture(scope="module")
def train_retriever_run(spark, store, base) -> dict[str, Quarantine]:
    sids = Publisher(str(store / "sids"))
    version = PublishedVersion.open(sids, sids.latest())
    interactions, bad_interactions = _bad_interactions(STORE_ITEMS, quarantined_item=None)
    queries, bad_queries = _bad_queries()
    clean_valid = {"history": interactions.slice(0, 30), "query": queries.slice(0, 30)}
    runs = {}
    for kind, name, table, expected, keys in (("history", "interactions", interactions, bad_interactions, ("user_id", "item_id")),
                                              ("query", "query log", queries, bad_queries, ("query_id", "item_id"))):  # fmt: skip
        config = _config("train-retriever", base, store, request_kind=kind, interactions=_write(base, f"train-{kind}", table),
                         valid=_write(base, f"valid-{kind}", clean_valid[kind]))  # fmt: skip
        url = str(base / f"retriever-version-{kind}")
        staging = SparkStaging(config.spark)
        try:
            counts = train_retriever_validation(config, spark, staging, version, url)
        finally:
            staging.cleanup()
        assert counts["valid"]["rejected"] == 0
        # The workers read the rows that passed, and only those, in the input's order.
        passed = read_parquet(valid_rows(url, "interactions"))
        assert passed.num_rows == counts["interactions"]["rows_out"]
        assert passed.column(keys[0]).to_pylist() == table.slice(0, passed.num_rows).column(keys[0]).to_pylist()
        rejects = read_parquet(f"{url}/{layout.REJECTS}/interactions")
        runs[name] = Quarantine(table.num_rows, counts["interactions"], rejects, expected, keys)
    return runs


@pytest.fixture(scope="module")
def evaluate_run(base) -> dict[str, Quarantine]:
    history, bad_history = _bad_interactions(STORE_ITEMS, quarantined_item=None)
    targets = history.slice(0, 30)
    out = str(base / "evaluation.json")
    config = _config("evaluate", base, base / "store", history=_write(base, "evaluate-history", history),
                     targets=_write(base, "evaluate-targets", targets), out=out)  # fmt: skip
    validated = evaluate_validation(config, pa.array(STORE_ITEMS), out)
    assert validated["targets"].counts["rejected"] == 0 and validated["history"].valid.num_rows == validated["history"].counts["rows_out"]
    rejects = read_parquet(rejects_url(out, "history"))
    return {"history": Quarantine(history.num_rows, validated["history"].counts, rejects, bad_history, ("user_id", "item_id"))}


QUARANTINE_RUNS = {"recode": "recode_run", "ingest": "ingest_run", "train-retriever": "train_retriever_run", "evaluate": "evaluate_run"}


# --------------------------------------------------------------------------------------------------------
# The table's rows
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", _params("quarantined"))
def test_quarantined_rows_go_to_the_rejects_with_their_reason(case: Case, request):
    run: Quarantine = request.getfixturevalue(QUARANTINE_RUNS[case.job])[case.input]
    rejected = [row for row in readable_rows(run.rejects) if row[REJECT_REASON_COLUMN] == case.expected]
    keys = [tuple(row[k] for k in run.keys) if len(run.keys) > 1 else row[run.keys[0]] for row in rejected]
    assert sorted(keys, key=repr) == sorted(run.expected[case.expected], key=repr)
    # Every row is accounted for: rows in = rows out + rejected, and the rejects written are the rejected rows.
    assert run.counts["rows_in"] == run.rows_in == run.counts["rows_out"] + run.counts["rejected"]
    assert run.counts["rejected"] == run.rejects.num_rows == sum(len(rows) for rows in run.expected.values())
    assert run.counts["by_reason"][case.expected] == len(keys)


def _refusing_inputs(case: Case) -> dict[str, pa.Table]:
    """The inputs of one error case: each breaks the case's rule and nothing else."""
    ids = pa.array([1, 2, 3, 4], pa.int64())
    items = pa.table({"item_id": ids, "title": ["a", "b", "c", "d"]})
    events = pa.table({"user_id": [1, 1, 2, 2], "item_id": pa.array([1, 2, 3, 4], pa.int64()), "timestamp": [1, 2, 1, 2]})
    store_events = events.set_column(1, "item_id", pa.array(STORE_ITEMS[:4]))
    queries = pa.table({"query_id": [1, 2], "item_id": pa.array(STORE_ITEMS[:2])})
    return {
        ("recode", "items", "missing column"): {"items": items.drop_columns(["item_id"]), "interactions": events},
        ("recode", "items", "item_id type"): {"items": items.set_column(0, "item_id", ids.cast(pa.float64())), "interactions": events},
        ("recode", "interactions", "item_id types differ across tables"):
            {"items": items, "interactions": events.set_column(1, "item_id", events["item_id"].cast(pa.string()))},
        ("recode", "interactions", "timestamp type"):
            {"items": items, "interactions": events.set_column(2, "timestamp", pa.array(["1", "2", "1", "2"]))},
        ("recode", "items", "max_reject_fraction"): {"items": items.set_column(1, "title", pa.array(["a", " ", None, "\t"])),
                                                     "interactions": events},
        ("ingest", "items", "missing column"): {"items": items.drop_columns(["item_id"])},
        ("ingest", "items", "item_id types differ across tables"): {"items": items.set_column(0, "item_id", ids.cast(pa.string()))},
        ("ingest", "items", "max_reject_fraction"): {"items": items.set_column(1, "title", pa.array([" ", None, "\t", "d"]))},
        ("train-retriever", "interactions", "missing column"): {"interactions": store_events.drop_columns(["timestamp"]),
                                                                "valid": store_events},
        ("train-retriever", "interactions", "item_id types differ across tables"):
            {"interactions": store_events.set_column(1, "item_id", store_events["item_id"].cast(pa.string())), "valid": store_events},
        ("train-retriever", "valid", "max_reject_fraction"):
            {"interactions": store_events, "valid": store_events.set_column(1, "item_id", pa.array([100, 7, 8, 9], pa.int64()))},
        ("train-retriever", "query log", "missing column"): {"interactions": queries, "valid": queries},
        ("evaluate", "targets", "missing column"): {"history": store_events, "targets": store_events.drop_columns(["timestamp"])},
        ("evaluate", "history", "item_id types differ across tables"):
            {"history": store_events.set_column(1, "item_id", store_events["item_id"].cast(pa.string())), "targets": store_events},
        ("evaluate", "targets", "max_reject_fraction"):
            {"history": store_events, "targets": store_events.set_column(1, "item_id", pa.array([100, 7, 8, 9], pa.int64()))},
        ("generate", "requests", "missing column"): {"requests": pa.table({"request_id": [1, 2]})},
        ("generate", "requests", "item_id types differ across tables"):
            {"requests": pa.table({"request_id": [1], "history": pa.array([["100"]], pa.list_(pa.string()))})},
        ("generate", "requests", "null request_id"): {"requests": GENERATE_ROWS["null request_id"]},
    }[case.job, case.input, case.rule]  # fmt: skip


def _versions(root: Path) -> list[str]:
    return Publisher(str(root)).versions()


@pytest.mark.parametrize("case", [p for p in _params("error") if p.values[0].checked == VIA_JOB])
def test_the_job_stops_naming_the_rule_and_publishes_nothing(case: Case, store, base):
    inputs = {name: _write(base, f"{case.job}-{case.rule}-{name}".replace(" ", "-"), table)
              for name, table in _refusing_inputs(case).items()}  # fmt: skip
    if case.job == "recode":
        root = base / f"recode-refused-{case.rule}".replace(" ", "-")
        with pytest.raises(InputError, match=case.expected):
            run_recode(_config("recode", base, root, **inputs))
        assert _versions(root / "sids") == [] and not any((root / "sids" / "versions").iterdir())  # the attempt is discarded
        return
    before = {kind: _versions(store / kind) for kind in ("sids", "retrievers")}
    if case.job == "ingest":
        with pytest.raises(InputError, match=case.expected):
            run_ingest(_config("ingest", base, store, **inputs))
    elif case.job == "train-retriever":
        kind = "query" if case.input == "query log" else "history"
        with pytest.raises(InputError, match=case.expected):
            run_train_retriever(_config("train-retriever", base, store, request_kind=kind, **inputs))
    elif case.job == "evaluate":
        out = base / f"evaluation-{case.rule}.json".replace(" ", "-")
        with pytest.raises(InputError, match=case.expected):
            run_evaluate(_config("evaluate", base, store, out=str(out), **inputs))
        assert not out.exists() and not Path(rejects_url(str(out), "history")).exists()  # no report, no rejects
    else:
        out = base / f"candidates-{case.rule}".replace(" ", "-")
        with pytest.raises(InputError, match=case.expected):
            run_generate(_config("generate", base, store, out=str(out), **inputs))
        assert Publisher(str(out)).versions() == [] and not list(out.rglob("*.parquet"))  # no candidates, none committed
        if "null" not in case.rule:  # a table-level refusal comes before anything is written, the run's pin included
            assert not out.exists()
    assert {kind: _versions(store / kind) for kind in ("sids", "retrievers")} == before
    for kind in ("sids", "retrievers"):  # the refused attempt's files are gone, not left unpublished
        assert sorted(p.name for p in (store / kind / "versions").iterdir()) == before[kind]


@pytest.fixture(scope="module")
def server(store):
    sids, retrievers = Publisher(str(store / "sids")), Publisher(str(store / "retrievers"))
    return load_server(PublishedVersion.open(sids, sids.latest()), PublishedVersion.open(retrievers, retrievers.latest()),
                       GenerationConfig(), device="cpu")  # fmt: skip


GENERATE_ROWS = {
    "null request_id": pa.table({"request_id": pa.array([1, None, 3], pa.int64()), "history": [[100], [101], [102]]}),
    "null history": pa.table({"request_id": [1, 2, 3], "history": pa.array([[100], [101], None], pa.list_(pa.int64()))}),
    "invalid_utf8": pa.table({"request_id": unchecked_strings([b"r1", b"r\xff"]), "history": [[100], [101]]}),
    "unknown_item_id": pa.table({"request_id": [1, 2, 3], "history": [[100, 999_999], [101], [7, 8, 102]]}),
}


@pytest.mark.parametrize("case", [p for p in _params("error") if p.values[0].checked == VIA_STEP])
def test_generate_refuses_a_bad_request_row_naming_the_rows(case: Case, server):
    """What each generate actor runs on its shard before generating: a refusal fails the job before its
    commit, naming the shard (the null request_id case above, through the job)."""
    with pytest.raises(InputError, match=case.expected):
        server.history_requests(GENERATE_ROWS[case.rule])


@pytest.mark.parametrize("case", _params("counted"))
def test_generate_counts_history_items_the_sid_version_does_not_know(case: Case, server):
    requests = GENERATE_ROWS[case.rule]
    built, unknown = server.history_requests(requests)
    assert len(built) == requests.num_rows  # every request is answered: rows in = rows out
    assert unknown.tolist() == [1, 0, 2]  # and reported in the candidates' unknown_history_items
