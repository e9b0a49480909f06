"""Jobs read published versions through their manifests: a file changed after publishing fails the job,
naming it, and leaves the store as it was; a file added after publishing is never read."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from jobs.cli import VERIFY_FAILED, main
from jobs.config import SparkConfig, load_job_config
from jobs.engines import SparkStaging
from jobs.evaluate import run_evaluate
from sa2crq.config import SegmentConfig, SIDConfig
from sa2crq.data.segments import assign_segments
from sa2crq.ids.sid_table import assign_sids
from sa2crq.ids.trie import SIDTrie
from sa2crq.retrieval.checkpoint import save_retriever
from sa2crq.retrieval.model import GenerativeRetriever, RetrieverConfig
from sa2crq.storage import layout
from sa2crq.storage.filesystem import write_parquet
from sa2crq.storage.publish import Publisher
from sa2crq.storage.published import ManifestMismatchError, PublishedVersion

N, LEVELS, K, USERS = 40, 3, 4, 12

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("one_thread")]


def _publish_store(root: Path) -> str:
    """A SID version (SID table, embeddings, trie) and a retriever on it, published under ``root`` as
    recode and train-retriever publish theirs; returns the SID version."""
    rng = np.random.default_rng(0)
    item_ids = np.arange(100, 100 + N, dtype=np.int64)
    popularity = rng.integers(0, 20, N)
    table = assign_sids(item_ids, rng.integers(0, K, (N, LEVELS)), popularity, assign_segments(item_ids, popularity, SegmentConfig()),
                        (K,) * LEVELS, SIDConfig(max_bucket=4))  # fmt: skip
    sids = Publisher(str(root / "sids"))
    sid_version = sids.new_version()
    url = sids.version_url(sid_version)
    write_parquet(table.to_arrow(), f"{url}/{layout.SID_TABLE}/part-0.parquet")
    vectors = rng.normal(size=(N, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    write_parquet(pa.table({"item_id": item_ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), 8)}),
                  f"{url}/{layout.EMBEDDINGS}/part-0.parquet")  # fmt: skip
    SIDTrie.build(table.tokens, table.sid_len + 1, table.vocab.size).save(f"{url}/{layout.TRIE}")
    sids.publish(sid_version, parent=None, meta={"job": "recode", "vocab": table.vocab.to_dict()})

    retrievers = Publisher(str(root / "retrievers"))
    retriever_version = retrievers.new_version()
    model = GenerativeRetriever(RetrieverConfig(
        vocab_size=table.vocab.size, encoder_vocab_size=table.vocab.size + 10, d_model=16, num_heads=2, head_dim=8,
        d_ff=32, encoder_layers=1, decoder_layers=1,
    ))  # fmt: skip
    save_retriever(f"{retrievers.version_url(retriever_version)}/{layout.RETRIEVER}", model, sid_version=sid_version,
                   meta={"train_config": {"user_buckets": 10, "max_history": 3}})  # fmt: skip
    retrievers.publish(retriever_version, parent=None, meta={"job": "train-retriever", "sid_version": sid_version})
    return sid_version


@pytest.fixture
def store(tmp_path):
    """A published store, and histories and targets to evaluate on; one target names item 999, which
    only a file added to the SID table after publishing holds."""
    root = tmp_path / "store"
    sid_version = _publish_store(root)
    users = np.repeat(np.arange(USERS), 4)
    items = 100 + (users * 3 + np.tile(np.arange(4), USERS)) % N
    history = pa.table({"user_id": users, "item_id": items.astype(np.int64), "timestamp": np.tile(np.arange(4), USERS)})
    targets = pa.table({"user_id": np.arange(USERS), "item_id": np.r_[999, 100 + np.arange(1, USERS)].astype(np.int64),
                        "timestamp": np.full(USERS, 9)})  # fmt: skip
    write_parquet(history, str(tmp_path / "history.parquet"))
    write_parquet(targets, str(tmp_path / "targets.parquet"))
    assignments = [f"{key}={json.dumps(value)}" for key, value in {
        "storage.root": str(root), "history": str(tmp_path / "history.parquet"), "targets": str(tmp_path / "targets.parquet"),
        "generation.beam_width": 4, "hallucination_requests": 4, "out": str(tmp_path / "evaluation.json"),
        "max_reject_fraction": 0.1,  # one target of 12 is unknown
    }.items()]  # fmt: skip
    return root, sid_version, load_job_config("evaluate", None, assignments), assignments


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_evaluate_reads_only_the_files_the_manifests_list(store):
    root, sid_version, config, _ = store
    version_dir = root / "sids" / "versions" / sid_version
    # Added after publishing: an item the targets name, and a second copy of the trie's nodes (read,
    # it would fail the trie's own checks).
    write_parquet(pa.table({"item_id": [999], "sid": [[1, 2, 3]], "segment": ["tail"]}), str(version_dir / layout.SID_TABLE / "part-1.parquet"))
    (version_dir / layout.TRIE / "nodes" / "part-1.parquet").write_bytes((version_dir / layout.TRIE / "nodes" / "part-0.parquet").read_bytes())

    report = run_evaluate(config).report
    assert report["sid_version"] == sid_version and report["metrics"]["requests"] == USERS - 1
    assert report["input"]["targets"]["by_reason"] == {"unknown_item_id": 1}  # item 999 is not in the published version


@pytest.mark.parametrize("changed", [f"sids/{layout.EMBEDDINGS}/part-0.parquet", f"sids/{layout.TRIE}/trie.json",
                                     f"retrievers/{layout.RETRIEVER}/model.safetensors"])  # fmt: skip
@pytest.mark.fault_scenario(7)
def test_evaluate_fails_naming_a_file_changed_after_publish_and_leaves_the_store_as_it_was(store, changed, capsys):
    root, _, config, assignments = store
    kind, relative = changed.split("/", 1)
    version = Publisher(str(root / kind)).latest()
    path = root / kind / "versions" / version / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, another sha256
    path.write_bytes(bytes(data))
    before = _files(root)

    message = f"published version {version}: {relative} does not match its manifest: expected sha256"
    with pytest.raises(ManifestMismatchError, match=message):
        run_evaluate(config)
    # The command line prints it, without a traceback, and exits 4 as `sa2crq versions verify` does.
    assert main(["evaluate", *(arg for a in assignments for arg in ("--set", a))]) == VERIFY_FAILED
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert _files(root) == before  # nothing published, nothing repaired or removed
    assert not Path(config.out).exists()


@pytest.mark.fault_scenario(7)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_spark_reads_exactly_the_listed_parquet_files_each_checked(spark, request, tmp_path, where):
    """SparkStaging.read_published: Spark reads a local version's listed files in place, and an object
    store's through a checked copy; an added file is read by neither, a changed one fails both."""
    if where == "local":
        root = str(tmp_path / "sids")
    else:
        request.getfixturevalue("s3_endpoint")
        bucket = f"reads-{uuid.uuid4().hex[:12]}"
        fsspec.filesystem("s3").mkdir(bucket)
        root = f"s3://{bucket}/sids"
    publisher = Publisher(root)
    version = publisher.new_version()
    url = publisher.version_url(version)
    for part in range(2):
        write_parquet(pa.table({"item_id": [2 * part, 2 * part + 1]}), f"{url}/{layout.SID_TABLE}/part-{part}.parquet")
    publisher.publish(version, parent=None)
    write_parquet(pa.table({"item_id": [99]}), f"{url}/{layout.SID_TABLE}/part-2.parquet")  # added after publishing
    staging = SparkStaging(SparkConfig(staging_dir=str(tmp_path / "staging")))
    try:
        frame = staging.read_published(spark, PublishedVersion.open(publisher, version), layout.SID_TABLE)
        assert sorted(row["item_id"] for row in frame.collect()) == [0, 1, 2, 3]
        write_parquet(pa.table({"item_id": [5, 4]}), f"{url}/{layout.SID_TABLE}/part-1.parquet")  # rewritten after publishing
        with pytest.raises(ManifestMismatchError, match=f"{version}: {layout.SID_TABLE}/part-1.parquet does not match its manifest"):
            staging.read_published(spark, PublishedVersion.open(publisher, version), layout.SID_TABLE)
    finally:
        staging.cleanup()
