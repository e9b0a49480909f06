"""Every job on a small catalog through the real engines: local Spark, local Ray, a real S3 server.

The tests share one storage root and run in file order, as the jobs do in production: recode
publishes the first version, the retriever is trained on it and generates, then recodes with a
reused and a fresh tokenizer exercise stability and the churn guard, then ingests add items.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from jobs.config import load_job_config
from jobs.evaluate import run_evaluate
from jobs.generate import PARTS, run_generate
from jobs.ingest import run_ingest
from jobs.recode import ChurnLimitExceeded, run_recode
from jobs.recode_attempts import STAGES
from jobs.train_retriever import run_train_retriever
from ray_workers.shards import input_fingerprint
from sa2crq.data.segments import segment_codes
from sa2crq.data.splits import history_requests
from sa2crq.retrieval.data import synthetic_queries
from sa2crq.ids.sid_table import assign_sids
from sa2crq.retrieval.serving import VersionMismatchError, load_catalog_view
from sa2crq.storage import layout
from sa2crq.storage.checkpoint import TENSORS_FILE
from sa2crq.storage.filesystem import read_parquet
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import ManifestMismatchError, PublishedVersion
from sa2crq.storage.versions import verify_version

from tests.conftest import make_catalog

pytestmark = [pytest.mark.timeout(600), pytest.mark.usefixtures("s3_endpoint", "spark", "ray_local")]

ROOT = "s3://jobs-e2e/catalog"
N_ITEMS, DIM = 400, 16
TOKENIZER = {
    "method": "sa2crq",
    "rqvae": {"codebook_size": 16, "latent_dim": 8, "hidden_dims": [32], "epochs": 8, "batch_size": 128},
    "acrq": {"epochs_per_stage": 3},
}
COMMON = {"storage.root": ROOT, "ray.train_workers": 2, "ray.cpus_per_train_worker": 0.5, "ray.actors": 2, "ray.cpus_per_actor": 0.5}


def _assign(overrides: dict) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in {**COMMON, **overrides}.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    """Items carrying their own embeddings (no text model needed), one of them broken; interactions
    drawn from a heavy-tailed popularity; a validation and a test item per user; requests in 3 shards."""
    base = tmp_path_factory.mktemp("jobs-data")
    catalog = make_catalog(n=N_ITEMS, dim=DIM, clusters=12, seed=3)
    ids = catalog.item_ids
    embeddings = [list(map(float, row)) for row in catalog.embeddings]
    embeddings[5] = None  # no embedding and no title: quarantined
    titles = [f"item {i}" for i in ids]
    titles[5] = None
    items = pa.table({"item_id": ids, "title": titles, "embedding": pa.array(embeddings, pa.list_(pa.float32()))})
    rng = np.random.default_rng(0)
    weights = (catalog.popularity + 0.2) / (catalog.popularity + 0.2).sum()
    users = np.repeat(np.arange(150), 12)
    chosen = rng.choice(ids, size=len(users), p=weights)
    chosen[:3] = ids[5]  # interactions with the quarantined item are quarantined with it
    timestamps = np.tile(np.arange(12), 150)
    interactions = pa.table({"user_id": users, "item_id": chosen, "timestamp": timestamps})
    last = timestamps == 11
    second = timestamps == 10
    paths = {name: str(base / f"{name}.parquet") for name in ("items", "train", "valid", "test", "history", "requests")}
    pq.write_table(items, paths["items"])
    pq.write_table(interactions.filter(pa.array(~last & ~second)), paths["train"])
    pq.write_table(interactions.filter(pa.array(second)), paths["valid"])
    pq.write_table(interactions.filter(pa.array(last)), paths["test"])
    history = interactions.filter(pa.array(~last))
    pq.write_table(history, paths["history"])
    pq.write_table(history_requests(history), paths["requests"], row_group_size=50)  # 3 shards
    return paths


def _recode(data: dict[str, str], **overrides):
    config = load_job_config("recode", None, _assign({"items": data["items"], "interactions": data["train"], "tokenizer": TOKENIZER, **overrides}))
    return config


def _candidates(out: str) -> pa.Table:
    """The committed candidate set under ``out``, read through its manifest."""
    store = Publisher(out)
    return PublishedVersion.open(store, store.latest()).read_parquet(PARTS)


def _sid_table(version: str) -> pa.Table:
    return read_parquet(f"{Publisher(f'{ROOT}/sids').version_url(version)}/{layout.SID_TABLE}").sort_by("item_id")


# ------------------------------------------------------------------------------------------------------


def test_recode_publishes_a_version_whose_spark_sids_equal_the_library(data):
    summary = run_recode(_recode(data))
    publisher = Publisher(f"{ROOT}/sids")
    assert summary.published and publisher.latest() == summary.version
    files = publisher.manifest(summary.version).files
    for part in (layout.SID_TABLE, layout.EMBEDDINGS, layout.CODES, layout.CATALOG, layout.TOKENIZER, layout.TRIE, layout.REJECTS):
        assert any(name.startswith(part + "/") for name in files), part
    assert layout.REPORT in files and not any(name.startswith((layout.WORK, layout.STAGES)) for name in files)

    report = summary.report
    assert report["resumed"] == []
    items_in = report["input"]["items"]
    assert items_in == {"rows_in": N_ITEMS, "rows_out": N_ITEMS - 1, "rejected": 1, "by_reason": {"no_text_or_embedding": 1}}
    bad_item = pq.read_table(data["items"]).column("item_id")[5]
    with_bad_item = pc.sum(pc.equal(pq.read_table(data["train"]).column("item_id"), bad_item)).as_py()
    assert with_bad_item >= 3 and report["input"]["interactions"]["by_reason"] == {"unknown_item_id": with_bad_item}

    # The Spark SARQ finalisation equals the library's on the same codes and popularity, bit for bit.
    url = publisher.version_url(summary.version)
    codes = read_parquet(f"{url}/{layout.CODES}").sort_by("item_id")
    levels = codes.column("codes").type.list_size
    expected = assign_sids(
        codes.column("item_id").to_numpy(),
        codes.column("codes").combine_chunks().flatten().to_numpy().reshape(-1, levels),
        codes.column("popularity").to_numpy(),
        segment_codes(codes.column("segment")),
        tuple(publisher.manifest(summary.version).meta["vocab"]["codebook_sizes"]),
        _recode(data).tokenizer.sid,
    ).to_arrow()
    table = _sid_table(summary.version)
    assert table.column("item_id").equals(expected.column("item_id"))
    for column in ("sid", "code_depth", "digit", "bucket_size"):
        assert table.column(column).to_pylist() == expected.column(column).to_pylist(), column

    view = load_catalog_view(PublishedVersion.open(publisher, summary.version))  # the serving view of the version loads and is consistent
    assert len(view.index) == N_ITEMS - 1 and view.trie.n_sids == len(set(map(tuple, table.column("sid").to_pylist())))


@pytest.mark.fault_scenario(10)
@pytest.mark.slow_fault  # 78 s: `make faults` runs it (CI too)
def test_a_recode_killed_mid_run_leaves_the_previous_version_and_its_rerun_resumes(data, tmp_path, caplog):
    """Fault scenario 10. The killed recode reuses the latest version's tokenizer on that version's
    inputs, so an undisturbed run publishes exactly its SID table (the stability rule keeps every
    item whose codes did not change): the resumed run must publish that table."""
    publisher = Publisher(f"{ROOT}/sids")
    if publisher.latest() is None:  # run alone (`make faults`): the version the module's first test publishes
        run_recode(_recode(data))
    before = (publisher.latest(), publisher.versions())
    config = tmp_path / "recode.json"
    overrides = {"items": data["items"], "interactions": data["train"], "tokenizer": TOKENIZER, "reuse_tokenizer": before[0],
                 "storage": {"root": ROOT},
                 "ray": {"num_cpus": 1, "train_workers": 2, "cpus_per_train_worker": 0.5, "actors": 1, "cpus_per_actor": 0.5},
                 "spark": {"master": "local[1]", "staging_dir": str(tmp_path / "staging")}}  # fmt: skip
    config.write_text(json.dumps(overrides))
    env = {**os.environ, "RAY_ADDRESS": ""}  # its own Ray, as a separate job would have
    job = subprocess.Popen([sys.executable, "-m", "jobs.cli", "recode", "--config", str(config)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    versions = "jobs-e2e/catalog/sids/versions"
    try:
        # Kill it mid-run, once its embed stage is recorded complete.
        deadline = time.monotonic() + 300
        while not (recorded := fs.glob(f"{versions}/*/{layout.STAGES}/embed.json")):
            assert job.poll() is None, "the recode ended before it could be killed"
            assert time.monotonic() < deadline, "the recode never completed its embed stage"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    attempt = recorded[0].split("/")[4]
    assert (publisher.latest(), publisher.versions()) == before  # nothing published, nothing lost
    assert verify_version(publisher, before[0]).ok  # the previous version is whole
    completed = [stage for stage in STAGES if fs.exists(f"{versions}/{attempt}/{layout.STAGES}/{stage}.json")]
    assert completed[:2] == ["split", "embed"] and len(completed) < len(STAGES)

    with caplog.at_level(logging.INFO, logger="jobs.recode"):
        resumed = run_recode(load_job_config("recode", str(config), []))
    assert resumed.published and resumed.version == attempt and publisher.latest() == attempt
    assert publisher.versions() == [*before[1], attempt] and publisher.manifest(attempt).parent == before[0]
    assert resumed.report["resumed"] == completed
    assert f"resuming {attempt}: skipping stages {', '.join(completed)}" in caplog.text
    assert not {"validate", "catalog split", "embed"} & resumed.report["seconds"].keys()  # skipped stages did not run
    assert verify_version(publisher, attempt).ok  # its records and scratch are gone, every file is listed
    assert resumed.report["stability"]["pinned"] == N_ITEMS - 1
    expected, table = _sid_table(before[0]), _sid_table(attempt)
    assert table.column_names == expected.column_names
    for column in expected.column_names:  # types and values; only not-null flags differ between Spark's two SID paths
        assert table.column(column).equals(expected.column(column)), column


def test_train_generate_resume_and_evaluate(data, tmp_path):
    trained = run_train_retriever(load_job_config("train-retriever", None, _assign({
        "interactions": data["train"], "valid": data["valid"],
        "model": {"d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "encoder_layers": 1, "decoder_layers": 1},
        "train": {"epochs": 2, "batch_size": 64, "warmup_steps": 5, "max_history": 5, "user_buckets": 50},
    })))  # fmt: skip
    sid_version = Publisher(f"{ROOT}/sids").latest()
    assert trained.published and Publisher(f"{ROOT}/retrievers").manifest(trained.version).meta["sid_version"] == sid_version

    out = f"{ROOT}/candidates/test"
    generate = load_job_config("generate", None, _assign({"requests": data["requests"], "out": out, "generation": {"beam_width": 5, "k": 10}}))
    first = run_generate(generate)
    assert first.published and first.report["shards"] == 3 and first.report["shards_done"] == 3
    store = Publisher(out)
    assert store.versions() == [first.version]
    meta = store.manifest(first.version).meta
    fingerprint = input_fingerprint(data["requests"])
    assert (meta["requests"], meta["requests_in"], meta["candidate_rows"]) == (fingerprint, 150, 150)
    assert (meta["retriever_version"], meta["sid_version"]) == (trained.version, sid_version)
    candidates = _candidates(out)
    assert candidates.num_rows == 150
    assert set(candidates.column("sid_version").to_pylist()) == {sid_version}
    lengths = pc.list_value_length(candidates.column("item_ids")).to_numpy()
    # Up to K items: 5 beams over shared IDs may expand to fewer once the history is excluded.
    assert (lengths >= 1).all() and (lengths <= 10).all() and lengths.mean() > 8
    assert pc.list_value_length(candidates.column("scores")).equals(pc.list_value_length(candidates.column("item_ids")))

    # The same run again: already committed, nothing written.
    again = run_generate(generate)
    assert not again.published and again.report["already_committed"] and store.versions() == [first.version]

    # What a generate killed before its commit leaves (parts, one of them lost, no commit) is no version...
    fs = fsspec.filesystem("s3", use_listings_cache=False)
    base = out.removeprefix("s3://")
    fs.rm(f"{base}/_commits", recursive=True)
    fs.rm(f"{base}/LATEST")
    fs.rm(sorted(fs.ls(f"{base}/versions/{first.version}/{PARTS}"))[1])
    assert Publisher(out).versions() == [] and Publisher(out).latest() is None
    # ...and its rerun reuses the finished parts, redoes the lost one and commits the same candidates,
    # this time with the catalog's vectors held by two shard actors instead of each generation actor.
    resumed = run_generate(load_job_config("generate", None, _assign({
        "requests": data["requests"], "out": out, "generation": {"beam_width": 5, "k": 10},
        "ray.catalog_shards": 2, "ray.cpus_per_catalog_shard": 0.25,
    })))  # fmt: skip
    assert resumed.published and resumed.version == first.version
    assert (resumed.report["shards_done"], resumed.report["shards_skipped"]) == (1, 2)
    resumed_rows, first_rows = _candidates(out).sort_by("request_id"), candidates.sort_by("request_id")
    assert resumed_rows.drop_columns(["scores"]).equals(first_rows.drop_columns(["scores"]))
    # The shards' dense-head item vectors and log-normaliser are summed in another order: equal to float rounding.
    np.testing.assert_allclose(pc.list_flatten(resumed_rows.column("scores")), pc.list_flatten(first_rows.column("scores")), rtol=1e-5)

    # Other requests into the same out are refused, naming both fingerprints; the version stays.
    other = str(tmp_path / "other-requests.parquet")
    pq.write_table(pq.read_table(data["requests"]).slice(0, 100), other, row_group_size=50)
    changed = load_job_config("generate", None, _assign({"requests": other, "out": out, "generation": {"beam_width": 5, "k": 10}}))
    pattern = f"requests {re.escape(fingerprint)} .*this run has requests {re.escape(input_fingerprint(other))} .*write these candidates to a new out"
    with pytest.raises(VersionMismatchError, match=pattern):
        run_generate(changed)
    assert Publisher(out).versions() == [first.version]

    evaluated = run_evaluate(load_job_config("evaluate", None, [f"{k}={v}" for k, v in {
        "history": data["history"], "targets": data["test"], "storage.root": ROOT, "generation.beam_width": 5,
    }.items()]))  # fmt: skip
    metrics = evaluated.report["metrics"]
    assert metrics["requests"] == 150 and metrics["constrained_invalid"] == 0.0
    assert 0.0 <= metrics["recall@5"] <= metrics["recall@10"] <= 1.0


def test_reused_tokenizer_keeps_sids_and_the_churn_guard_refuses_a_new_one(data, tmp_path):
    publisher = Publisher(f"{ROOT}/sids")
    v1 = publisher.latest()
    # More traffic on a few items: SARQ would lengthen some IDs, the hysteresis keeps them.
    train = pq.read_table(data["train"])
    extra = train.slice(0, 40).set_column(2, "timestamp", pa.array(np.full(40, 99)))
    more = str(tmp_path / "train-more.parquet")
    pq.write_table(pa.concat_tables([train, extra]), more)
    reused = run_recode(_recode(data, interactions=more, reuse_tokenizer=v1))
    assert reused.published and reused.report["churn"]["churn"] <= 0.05
    before, after = _sid_table(v1), _sid_table(reused.version)
    assert before.column("item_id").equals(after.column("item_id"))
    assert reused.report["stability"]["pinned"] >= 0.95 * before.num_rows

    # A freshly trained tokenizer (another seed) moves most SIDs: refused, LATEST stays.
    fresh = _recode(data, **{"tokenizer": {**TOKENIZER, "rqvae": {**TOKENIZER["rqvae"], "seed": 7}}})
    with pytest.raises(ChurnLimitExceeded, match="exceeds the limit"):
        run_recode(fresh)
    assert publisher.latest() == reused.version
    forced = run_recode(fresh, force=True)
    assert forced.published and publisher.latest() == forced.version and forced.report["churn"]["churn"] > 0.05
    assert forced.report["resumed"] == list(STAGES)  # it publishes the refused attempt's files, computing nothing again
    remap = read_parquet(f"{publisher.version_url(forced.version)}/{layout.REMAP}")
    assert remap.num_rows == forced.report["churn"]["changed"]

    # The retriever was trained on v1: generating over the new latest version is refused.
    generate = load_job_config("generate", None, _assign({"requests": data["requests"], "out": f"{ROOT}/candidates/mismatch"}))
    with pytest.raises(VersionMismatchError, match="was trained on SID version"):
        run_generate(generate)


def _new_items(first_id: int, n: int, seed: int) -> pa.Table:
    catalog = make_catalog(n=n, dim=DIM, clusters=12, seed=seed)
    return pa.table({
        "item_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "title": [f"new {i}" for i in range(n)],
        "embedding": pa.array([list(map(float, row)) for row in catalog.embeddings], pa.list_(pa.float32())),
    })  # fmt: skip


def test_ingest_keeps_published_sids_and_a_rerun_changes_nothing(tmp_path):
    publisher = Publisher(f"{ROOT}/sids")
    parent = publisher.latest()
    batch = str(tmp_path / "batch.parquet")
    pq.write_table(_new_items(10_000, 30, seed=11), batch)
    config = load_job_config("ingest", None, _assign({"items": batch}))
    # A file of the parent changed after its commit: ingest stops, naming it, and publishes nothing.
    tensors = f"{publisher.version_path(parent)}/{layout.TOKENIZER}/{TENSORS_FILE}"
    original = publisher.fs.cat_file(tensors)
    publisher.fs.pipe_file(tensors, original + b"changed")
    try:
        with pytest.raises(ManifestMismatchError, match=f"{parent}: {layout.TOKENIZER}/{TENSORS_FILE} does not match its manifest"):
            run_ingest(config)
    finally:
        publisher.fs.pipe_file(tensors, original)
    assert publisher.latest() == parent
    done = run_ingest(config)
    assert done.published and publisher.manifest(done.version).parent == parent
    before, after = _sid_table(parent), _sid_table(done.version)
    kept = after.filter(pc.is_in(after.column("item_id"), value_set=before.column("item_id")))
    assert kept.column("sid").to_pylist() == before.column("sid").to_pylist()  # existing items never change
    assert after.num_rows == before.num_rows + 30 and done.report["delta_rows"] == 30
    assert len(load_catalog_view(PublishedVersion.open(publisher, done.version)).index) == after.num_rows
    # A delta: the parent's embeddings are listed where the parent holds them, only the batch's are written.
    embeddings = {path: entry for path, entry in publisher.manifest(done.version).files.items() if path.startswith(f"{layout.EMBEDDINGS}/")}
    assert {p: e for p, e in embeddings.items() if "version" in e} == PublishedVersion.open(publisher, parent).references(layout.EMBEDDINGS)
    written = [p for p, e in embeddings.items() if "version" not in e]
    assert written and all(p.rsplit("/", 1)[1].startswith(done.version) for p in written)
    assert verify_version(publisher, done.version).ok

    again = run_ingest(config)
    assert not again.published and publisher.latest() == done.version and again.report["already_published"] == 30


def test_two_concurrent_ingests_lose_nothing(tmp_path):
    publisher = Publisher(f"{ROOT}/sids")
    parent = publisher.latest()
    batches = []
    for k, first_id in enumerate((20_000, 30_000)):
        path = str(tmp_path / f"batch-{k}.parquet")
        pq.write_table(_new_items(first_id, 20, seed=20 + k), path)
        batches.append(load_job_config("ingest", None, _assign({"items": path})))
    results, errors = [None, None], []
    start = threading.Barrier(2)

    def ingest(k: int) -> None:
        try:
            start.wait()
            results[k] = run_ingest(batches[k])
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=ingest, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    latest = _sid_table(publisher.latest())
    ids = set(latest.column("item_id").to_pylist())
    assert set(range(20_000, 20_020)) <= ids and set(range(30_000, 30_020)) <= ids
    # One built on the other: the second published on top of the first, not of the old parent.
    parents = {publisher.manifest(r.version).parent for r in results}
    assert parent in parents and {r.version for r in results} & parents
    before = _sid_table(parent)
    kept = latest.filter(pc.is_in(latest.column("item_id"), value_set=before.column("item_id")))
    assert kept.column("sid").to_pylist() == before.column("sid").to_pylist()


def test_a_wrong_config_field_is_an_error_naming_it():
    with pytest.raises(ValueError, match="storage.rooot"):
        load_job_config("recode", None, ["items=a", "interactions=b", "storage.rooot=s3://x/y"])
    with pytest.raises(ValueError, match="tokenizer: .*rqvae.epochz"):
        load_job_config("recode", None, ["items=a", "interactions=b", "tokenizer.rqvae.epochz=3"])



def test_query_retriever_trains_on_a_query_log_and_generates_for_queries(data, tmp_path):
    """Mechanics only: the query log is SYNTHETIC (derived from item text), so no quality is claimed.

    Its own catalog of text-only items: the item scorer compares query and item embeddings, so the
    items are embedded from their text by the same model as the queries (MiniLM, offline)."""
    root = "s3://jobs-e2e/text-catalog"
    rng = np.random.default_rng(5)
    colours, kinds = ["red", "blue", "green", "black", "pink"], ["lipstick", "shampoo", "nail polish", "perfume"]
    names = [f"{colours[i % 5]} {kinds[i % 4]} no. {i}" for i in range(N_ITEMS)]
    items = pa.table({"item_id": np.arange(N_ITEMS, dtype=np.int64), "title": names})
    users = np.repeat(np.arange(150), 8)
    popular = rng.zipf(1.5, len(users)) % N_ITEMS  # heavy-tailed, like real traffic
    interactions = pa.table({"user_id": users, "item_id": popular.astype(np.int64), "timestamp": np.tile(np.arange(8), 150)})
    paths = {name: str(tmp_path / f"{name}.parquet") for name in ("items", "interactions", "train", "valid", "requests")}
    pq.write_table(items, paths["items"])
    pq.write_table(interactions, paths["interactions"])
    cache = {"embedding_cache": str(tmp_path / "cache"), "storage.root": root}
    run_recode(_recode({"items": paths["items"], "train": paths["interactions"]}, **cache))

    log = synthetic_queries(items, seed=0, words=2)
    pq.write_table(log, paths["train"])
    pq.write_table(log.slice(0, 20), paths["valid"])
    pq.write_table(pa.table({"request_id": log.column("query_id").slice(0, 30), "query": log.column("query").slice(0, 30)}),
                   paths["requests"], row_group_size=15)  # fmt: skip
    trained = run_train_retriever(load_job_config("train-retriever", None, _assign({
        "request_kind": "query", "interactions": paths["train"], "valid": paths["valid"], **cache,
        "model": {"d_model": 16, "num_heads": 2, "head_dim": 8, "d_ff": 32, "encoder_layers": 1, "decoder_layers": 1},
        "train": {"epochs": 1, "batch_size": 32, "warmup_steps": 2},
    })))  # fmt: skip
    assert trained.published
    out = f"{root}/candidates/queries"
    done = run_generate(load_job_config("generate", None, _assign({
        "requests": paths["requests"], "request_kind": "query", "out": out, **cache, "generation": {"beam_width": 5, "k": 5},
    })))  # fmt: skip
    candidates = _candidates(out)
    assert done.report["shards"] == 2 and candidates.num_rows == 30
    assert (pc.list_value_length(candidates.column("item_ids")).to_numpy() >= 1).all()
    # A history request set cannot be served by a query retriever.
    with pytest.raises(ValueError, match="answers query requests, not history"):
        run_generate(load_job_config("generate", None, _assign({"requests": data["requests"], "out": f"{root}/candidates/mixed", **cache})))
