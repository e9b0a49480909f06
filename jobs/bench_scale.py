"""``sa2crq bench scale``: the jobs end to end on a seeded synthetic catalog, per job wall time, rows
and peak memory.

Data, seeded and built with vectorised numpy: ``N`` items whose ``dim``-dimensional embeddings lie
around ``clusters`` centres (the items carry them, so no text model runs), Zipf item popularity
(exponent 1.1; most items are seen rarely or never), users whose histories are drawn from it (their
last item held out as the validation target), 1% new items for an ingest, and history requests.

Jobs, each a fresh ``sa2crq`` process so that each peak is its own: ``recode`` (tokenizer trained),
``recode --reuse-tokenizer`` (the nightly steady state), ``ingest`` of the new items,
``train-retriever`` (a small retriever on a step budget: this measures the pipeline, not quality),
``generate``, and ``generate`` again with the catalog's vectors in two shard actors
(``ray.catalog_shards``). Every job runs with the embedded engines (local Spark, local Ray) on local
storage, sized for a 2-core machine.

Memory: the peak resident set (``VmHWM``) of the job's own process (the driver) and of its largest
descendant (Spark's JVM, a Ray worker, the raylet), polled from ``/proc`` every 0.2 s (Linux).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sa2crq.data.columns import index_ranges, list_column

log = logging.getLogger(__name__)

# Small tokenizer and retriever budgets: the benchmark measures the jobs' cost per item, not quality.
TOKENIZER = {
    "method": "sa2crq",
    "rqvae": {"hidden_dims": [64], "latent_dim": 16, "levels": 3, "codebook_size": 64, "epochs": 2, "batch_size": 4096, "kmeans_iters": 10},
    "acrq": {"epochs_per_stage": 1},
}
RETRIEVER = {"d_model": 32, "num_heads": 2, "head_dim": 16, "d_ff": 64, "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0}
RETRIEVER_TRAIN = {"epochs": 1, "max_steps": 20, "batch_size": 256, "warmup_steps": 5, "max_history": 8, "user_buckets": 100,
                   "eval_every_steps": 20, "patience": 1, "select_users": 200, "tune_users": 200}  # fmt: skip
GENERATION = {"beam_width": 10, "k": 10, "batch_size": 256}
ENGINES = {
    "spark": {"master": "local[2]", "shuffle_partitions": 8},
    "ray": {"num_cpus": 2, "train_workers": 2, "cpus_per_train_worker": 0.5, "actors": 2, "cpus_per_actor": 0.5},
}


def write_synthetic_catalog(out: Path, n_items: int, *, seed: int = 0, dim: int = 32, clusters: int = 256,
                            requests: int = 10_000) -> dict[str, Any]:  # fmt: skip
    """Items, training interactions, validation targets, new items (1%) and history requests as
    parquet under ``out``; returns their paths and row counts."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_new = max(1, n_items // 100)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)

    def items_table(ids: np.ndarray) -> pa.Table:
        vectors = centres[rng.integers(0, clusters, len(ids))] + 0.35 * rng.normal(size=(len(ids), dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        titles = pc.binary_join_element_wise("item ", pa.array(ids.astype(str)), "")
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
        return pa.table({"item_id": ids, "title": titles, "embedding": embedding})

    item_ids = np.arange(n_items, dtype=np.int64)
    # Zipf popularity over a random order of the items; users draw 5-15 items each from it.
    weights = 1.0 / np.arange(1, n_items + 1) ** 1.1
    weights = weights[rng.permutation(n_items)]
    n_users = max(100, n_items // 10)
    lengths = rng.integers(5, 16, n_users)
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    items = rng.choice(item_ids, size=len(users), p=weights / weights.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    timestamps = (np.arange(len(users)) - starts).astype(np.int64)
    last = np.cumsum(lengths) - 1
    is_valid = np.zeros(len(users), dtype=bool)
    is_valid[last] = True
    interactions = pa.table({"user_id": users, "item_id": items, "timestamp": timestamps})

    # Requests: a seeded sample of users, their last 8 training items.
    train_starts, train_ends = np.cumsum(lengths) - lengths, last
    chosen = rng.choice(n_users, size=min(requests, n_users), replace=False)
    history_lengths = np.minimum(train_ends[chosen] - train_starts[chosen], 8)
    history = list_column(history_lengths, items[index_ranges(train_ends[chosen] - history_lengths, history_lengths)])
    request_table = pa.table({"request_id": chosen.astype(np.int64), "user_id": chosen.astype(np.int64), "history": history})

    paths = {name: str(out / f"{name}.parquet") for name in ("items", "train", "valid", "new_items", "requests")}
    pq.write_table(items_table(item_ids), paths["items"])
    pq.write_table(interactions.filter(pa.array(~is_valid)), paths["train"])
    pq.write_table(interactions.filter(pa.array(is_valid)), paths["valid"])
    pq.write_table(items_table(np.arange(n_items, n_items + n_new, dtype=np.int64)), paths["new_items"])
    # Several row groups: each is a shard of generate's work.
    pq.write_table(request_table, paths["requests"], row_group_size=max(1, len(request_table) // 4))
    counts = {"items": n_items, "train": int((~is_valid).sum()), "valid": n_users, "new_items": n_new, "requests": len(request_table)}
    return {"paths": paths, "rows": counts}


class PeakMemory:
    """Peak resident set (VmHWM, MiB) of one process, of its largest descendant, and of the largest
    descendant of each process name (a Ray actor's is its class, cut to 15 characters), polled from /proc."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid = pid
        self.driver_mib = 0.0
        self.largest_child_mib = 0.0
        self.largest_child = ""
        self.child_mib_by_name: dict[str, float] = {}
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self._every):
                self.sample()
                return

    def sample(self) -> None:
        self.driver_mib = max(self.driver_mib, _peak_mib(self.pid))
        for pid in _descendants(self.pid):
            peak, name = _peak_mib(pid), _name(pid)
            self.child_mib_by_name[name] = max(peak, self.child_mib_by_name.get(name, 0.0))
            if peak > self.largest_child_mib:
                self.largest_child_mib, self.largest_child = peak, name


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:  # the process has exited
        return ""


def _peak_mib(pid: int) -> float:
    for line in _status(pid).splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _name(pid: int) -> str:
    for line in _status(pid).splitlines():
        if line.startswith("Name:"):
            return line.split(maxsplit=1)[1]
    return "?"


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name (field 2) is in parentheses and may hold spaces: split after it.
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, stack = [], list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def run_job(name: str, job: str, config: dict[str, Any], work: Path, *extra: str) -> dict[str, Any]:
    """One ``sa2crq`` job in its own process: wall time, peak memory and its summary."""
    config_path, summary_path = work / f"{name}.json", work / f"{name}.summary.json"
    config_path.write_text(json.dumps(config, indent=2))
    command = [sys.executable, "-m", "jobs.cli", "--log-level", "WARNING", job, "--config", str(config_path),
               "--summary-json", str(summary_path), *extra]  # fmt: skip
    log.info("bench scale: %s", name)
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with PeakMemory(process.pid) as memory:
        output, _ = process.communicate()
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        log.error("%s failed (exit %d):\n%s", name, process.returncode, output[-4000:])
        raise RuntimeError(f"{name} failed (exit {process.returncode}): {_last_error(output)}")
    summary = json.loads(summary_path.read_text())
    return {
        "job": name,
        "seconds": round(seconds, 1),
        "driver_peak_mib": round(memory.driver_mib),
        "largest_child_peak_mib": round(memory.largest_child_mib),
        "largest_child": memory.largest_child,
        "child_peak_mib_by_name": {name: round(mib) for name, mib in sorted(memory.child_mib_by_name.items(), key=lambda kv: -kv[1])},
        "version": summary["version"],
        "outputs": {o["name"]: o["rows"] for o in summary["outputs"]},
        "stage_seconds": summary["report"].get("seconds", {}),
    }


def _last_error(output: str) -> str:
    """The job's last exception line (``SomeError: message``), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return (errors or lines or ["no output"])[-1][:300]


# The chain of jobs, each building on the ones before it (a key names where ``through`` stops).
CHAIN = ("recode", "reuse", "ingest", "train-retriever", "generate", "generate-sharded")


def run_scale_benchmark(n_items: int, work: Path, *, seed: int = 0, requests: int = 10_000, through: str = CHAIN[-1]) -> dict[str, Any]:
    """The jobs of :data:`CHAIN` up to ``through``, once each, on ``n_items`` synthetic items under
    ``work`` (emptied first)."""
    work = work.resolve()
    shutil.rmtree(work, ignore_errors=True)
    data = write_synthetic_catalog(work / "data", n_items, seed=seed, requests=requests)
    paths = data["paths"]
    common = {"storage": {"root": str(work / "storage")}, "ray": ENGINES["ray"]}
    spark = {**ENGINES["spark"], "staging_dir": str(work / "spark-staging")}
    recode = {"items": paths["items"], "interactions": paths["train"], "tokenizer": TOKENIZER, "shards": max(2, n_items // 100_000),
              "churn_limit": 1.0, "embedding_cache": None, "spark": spark, **common}  # fmt: skip
    train = {"interactions": paths["train"], "valid": paths["valid"], "model": RETRIEVER, "train": RETRIEVER_TRAIN, **common}
    generate = {"requests": paths["requests"], "out": str(work / "candidates"), "generation": GENERATION, **common}
    steps = [  # in CHAIN order
        ("recode", "recode", recode, ()),
        ("recode --reuse-tokenizer", "recode", recode, ("--reuse-tokenizer", None)),
        ("ingest (1% new items)", "ingest", {"items": paths["new_items"], "embedding_cache": None, "spark": spark, **common}, ()),
        ("train-retriever", "train-retriever", train, ()),
        (f"generate ({data['rows']['requests']:,} requests)", "generate", generate, ()),
        # The same requests with the catalog's vectors in 2 shard actors instead of every generation actor.
        (f"generate ({data['rows']['requests']:,} requests, 2 catalog shards)", "generate",
         {**generate, "out": str(work / "candidates-sharded"), "ray": {**ENGINES["ray"], "catalog_shards": 2}}, ()),
    ]
    jobs: list[dict[str, Any]] = []
    for name, job, config, extra in steps[: CHAIN.index(through) + 1]:
        extra = tuple(jobs[0]["version"] if arg is None else arg for arg in extra)  # the first recode's version
        try:
            jobs.append(run_job(name, job, config, work, *extra))
        except RuntimeError as failure:
            # Each job builds on the ones before: record where the chain broke and stop there.
            jobs.append({"job": name, "failed": str(failure)})
            break
    return {"items": n_items, "seed": seed, "hardware": f"{os.cpu_count()} CPUs", "data_rows": data["rows"], "through": through, "jobs": jobs,
            "engines": ENGINES, "tokenizer": TOKENIZER, "retriever": RETRIEVER, "generation": GENERATION}  # fmt: skip


def format_scale_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['items']:,} items, seed {result['seed']}, {result['hardware']}",
        "| job | wall s | driver peak MiB | largest child peak MiB (process) | rows |",
        "|---|---:|---:|---:|---|",
    ]
    for row in result["jobs"]:
        if "failed" in row:
            lines.append(f"| {row['job']} | failed: {row['failed']} | | | |")
            continue
        rows = ", ".join(f"{name} {count:,}" for name, count in row["outputs"].items() if count is not None)
        child = f"{row['largest_child_peak_mib']:,} ({row['largest_child']})"
        lines.append(f"| {row['job']} | {row['seconds']:,.1f} | {row['driver_peak_mib']:,} | {child} | {rows} |")
    return "\n".join(lines)
