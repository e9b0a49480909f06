"""``sa2crq bench generate``: speed of candidate generation, fast path against the reference.

What is timed: a batch of requests encoded and searched by trie-constrained beam search
(:func:`~sa2crq.retrieval.beam.beam_search`, and :func:`~sa2crq.retrieval.beam.reference_beam_search`
in the same run, so the speed-up is a ratio measured on the same machine at the same time). The item
scorer is not included (it is the same for both).

The setup is seeded and synthetic, so it runs on a fresh machine with torch and numpy only: a
catalog of 12,101 items (Amazon Beauty's size) with TIGER-style IDs, three codes of 256 (the first
level Zipf-skewed, as trained quantizers use their first codebook unevenly) and a collision digit,
then EOS; requests of a hashed user token and a 20-item history; untrained weights (the cost does
not depend on training: every ID has the same length, so no beam finishes early).

Per configuration (shape x beam x batch x implementation), each in a fresh child process so that
its peak memory is its own:

* requests/s and ms per request, over at least ``requests`` requests or ``max_seconds``;
* the search loop alone and its trie constraint alone, in microseconds per request: the logits of
  one batch are recorded, then replayed, so the model is out of it. The loop is everything but
  the model (log-softmax normaliser, constraint, top-k, beam bookkeeping); the constraint is
  :func:`~sa2crq.retrieval.beam.sparse_constraint` (fast) or
  :func:`~sa2crq.retrieval.beam.dense_constraint` (reference) on the trie nodes the search stood on;
* peak memory: on CUDA the peak allocated by torch; on CPU the growth of the process's peak
  resident set over what it held before the first batch.

The glibc allocator thresholds (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) change
torch CPU timings by up to 1.7x: the result records them as the children saw them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from sa2crq.bench import hardware
from sa2crq.ids.trie import EOS, PAD, SIDTrie
from sa2crq.retrieval.beam import (
    ReferenceDecoder,
    beam_search,
    dense_constraint,
    reference_beam_search,
    search_beams,
    search_beams_reference,
    sparse_constraint,
)
from sa2crq.retrieval.model import GenerativeRetriever, IncrementalDecoder, ItemFeatures, RetrieverConfig, mixed_precision

CATALOG_ITEMS = 12_101
CODEBOOK_SIZE = 256
CODE_LEVELS = 3
HISTORY_ITEMS = 20
USER_BUCKETS = 2_000
# The retriever shapes: the cpu profile's and the demo's (0.5M parameters) and TIGER's (the
# RetrieverConfig defaults, 4 + 4 layers, d_model 128, 6 heads x 64, d_ff 1024).
SHAPES: dict[str, dict[str, int]] = {
    "cpu": {"d_model": 64, "num_heads": 4, "head_dim": 16, "d_ff": 256, "encoder_layers": 2, "decoder_layers": 2},
    "tiger": {},
}
IMPLEMENTATIONS = ("fast", "reference")
# A public TIGER implementation with the TIGER shape, 81 encoder positions, on the same machine
# class (2 cores, tuned allocator), as measured for the issue that asked for this benchmark.
ANCHOR_REQUESTS_PER_SECOND = {("tiger", 10): 22.0, ("tiger", 20): 11.3}
ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@dataclass(frozen=True)
class Setting:
    shape: str
    beam_width: int
    batch_size: int
    implementation: str
    requests: int
    max_seconds: float
    device: str
    seed: int


def synthetic_catalog(seed: int) -> tuple[np.ndarray, int]:
    """SID tokens (N, 5) of :data:`CATALOG_ITEMS` items, EOS-terminated, and the vocabulary size."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, CODEBOOK_SIZE + 1)
    first = rng.choice(CODEBOOK_SIZE, CATALOG_ITEMS, p=(1 / ranks) / (1 / ranks).sum())
    codes = np.stack([first, *(rng.integers(0, CODEBOOK_SIZE, CATALOG_ITEMS) for _ in range(CODE_LEVELS - 1))], axis=1)
    # The collision digit numbers the items that share all three codes.
    key = (codes[:, 0] * CODEBOOK_SIZE + codes[:, 1]) * CODEBOOK_SIZE + codes[:, 2]
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    group_start = np.flatnonzero(np.r_[True, sorted_key[1:] != sorted_key[:-1]])
    digit = np.empty(CATALOG_ITEMS, dtype=np.int64)
    digit[order] = np.arange(CATALOG_ITEMS) - np.repeat(group_start, np.diff(np.r_[group_start, CATALOG_ITEMS]))
    digit_offset = 2 + CODE_LEVELS * CODEBOOK_SIZE
    tokens = np.full((CATALOG_ITEMS, CODE_LEVELS + 2), PAD, dtype=np.int64)
    tokens[:, :CODE_LEVELS] = 2 + codes + np.arange(CODE_LEVELS) * CODEBOOK_SIZE
    tokens[:, CODE_LEVELS] = digit_offset + digit
    tokens[:, CODE_LEVELS + 1] = EOS
    return tokens, int(digit_offset + digit.max() + 1)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(setting: Setting) -> dict[str, object]:
    """One configuration, in the calling process (the benchmark runs it in a fresh child)."""
    device = torch.device(setting.device)
    tokens, vocab = synthetic_catalog(setting.seed)
    trie = SIDTrie.build(tokens, (tokens != PAD).sum(1), vocab).to(device)
    torch.manual_seed(setting.seed)
    config = RetrieverConfig(vocab_size=vocab, encoder_vocab_size=vocab + USER_BUCKETS, dropout=0.0, **SHAPES[setting.shape])
    model = GenerativeRetriever(config).to(device).eval()
    items = ItemFeatures(torch.from_numpy(tokens).to(device))
    rng = np.random.default_rng(setting.seed + 1)
    batches = max(1, -(-setting.requests // setting.batch_size))
    history = torch.from_numpy(rng.integers(0, CATALOG_ITEMS, (batches, setting.batch_size, HISTORY_ITEMS))).to(device)
    users = torch.from_numpy(rng.integers(vocab, vocab + USER_BUCKETS, (batches, setting.batch_size))).to(device)
    search = beam_search if setting.implementation == "fast" else reference_beam_search
    autocast = mixed_precision(device)

    def generate(i: int, rows: int) -> None:
        with autocast:
            memory, mask = model.encode(history[i, :rows], users[i, :rows], items)
            search(model, memory, mask, beam_width=setting.beam_width, max_length=trie.max_length, trie=trie)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad():
        generate(0, min(setting.batch_size, 8))  # warm-up: threads, allocator, kernels
        sync()
        baseline = _current_rss_mb()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        done, start = 0, time.perf_counter()
        while True:
            generate(done // setting.batch_size % batches, setting.batch_size)
            sync()
            done += setting.batch_size
            seconds = time.perf_counter() - start
            if done >= setting.requests or seconds >= setting.max_seconds:
                break
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb() - baseline
        loop_seconds, constraint_seconds = _replay_seconds(model, history[0], users[0], items, trie, setting, autocast, sync)
    return {
        **asdict(setting),
        "parameters": model.num_parameters(),
        "vocab_size": vocab,
        "requests_timed": done,
        "requests_per_second": round(done / seconds, 1),
        "ms_per_request": round(1000 * seconds / done, 3),
        "search_loop_us_per_request": round(1e6 * loop_seconds / setting.batch_size, 1),
        "constraint_us_per_request": round(1e6 * constraint_seconds / setting.batch_size, 1),
        "peak_memory_mb": round(peak, 1),
    }


def _replay_seconds(
    model: GenerativeRetriever,
    history: torch.Tensor,
    users: torch.Tensor,
    items: ItemFeatures,
    trie: SIDTrie,
    setting: Setting,
    autocast: contextlib.AbstractContextManager,
    sync: Callable[[], None],
    repeats: int = 3,
) -> tuple[float, float]:
    """Seconds per batch, best of ``repeats``, of (the search loop, its trie constraint alone),
    replaying the logits recorded from one real search of the batch."""
    fast = setting.implementation == "fast"
    with autocast:
        memory, mask = model.encode(history, users, items)
        source = IncrementalDecoder(model, memory, mask, trie.max_length).step if fast else ReferenceDecoder(model, memory, mask, setting.beam_width)
        recorded: list[torch.Tensor] = []

        def record(tokens: torch.Tensor, parent: torch.Tensor | None) -> torch.Tensor:
            recorded.append(source(tokens, parent).float())
            return recorded[-1]

        loop = search_beams if fast else search_beams_reference
        common = dict(batch=memory.shape[0], beam_width=setting.beam_width, max_length=trie.max_length, trie=trie, device=memory.device)
        beams = loop(record, **common)
    # The trie nodes the search stood on at each step, walked along the surviving beams' prefixes.
    nodes, node = [], torch.zeros(beams.tokens.shape[:2], dtype=torch.long, device=memory.device)
    for step, logits in enumerate(recorded):
        nodes.append(node[:, : logits.shape[1]])
        node = trie.step(node, beams.tokens[..., step])
    fanout = trie.depth_fanout

    def constraint() -> None:
        for step, (logits, at) in enumerate(zip(recorded, nodes)):
            if fast:
                sparse_constraint(trie, logits, at, int(fanout[step]))
            else:
                dense_constraint(trie, logits, at)

    def replay() -> None:
        steps = iter(recorded)
        loop(lambda tokens, parent: next(steps), **common)

    return _best_seconds(replay, sync, repeats), _best_seconds(constraint, sync, repeats)


def _best_seconds(work: Callable[[], None], sync: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        work()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def run_generation_benchmark(
    *,
    shapes: Iterable[str] = tuple(SHAPES),
    beams: Iterable[int] = (10, 20, 50),
    batches: Iterable[int] = (1, 32, 256),
    implementations: Iterable[str] = IMPLEMENTATIONS,
    requests: int = 512,
    max_seconds: float = 10.0,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, object]:
    """Every configuration in its own fresh child process, one at a time; returns the rows and
    the conditions they were measured under."""
    unknown = sorted(set(shapes) - set(SHAPES)) + sorted(set(implementations) - set(IMPLEMENTATIONS))
    if unknown:
        raise ValueError(f"unknown shape or implementation {unknown}; known: {sorted(SHAPES)}, {list(IMPLEMENTATIONS)}")
    settings = [
        Setting(shape, beam, batch, implementation, requests, max_seconds, device, seed)
        for shape in shapes for beam in beams for batch in batches for implementation in implementations
    ]  # fmt: skip
    started = time.perf_counter()
    rows = []
    context = multiprocessing.get_context("spawn")
    for setting in settings:
        with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            rows.append(pool.submit(measure, setting).result())
    return {
        "hardware": hardware() if device == "cpu" else f"{torch.cuda.get_device_name(device)} (host: {hardware()})",
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "allocator": {name: os.environ.get(name, "glibc default") for name in ALLOCATOR_VARIABLES},
        "catalog": f"{CATALOG_ITEMS} synthetic items, {CODE_LEVELS} codes of {CODEBOOK_SIZE} + collision digit + EOS",
        "history_items": HISTORY_ITEMS,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }


def format_generation_table(result: dict[str, object]) -> str:
    """Markdown table: one line per shape x beam x batch, fast and reference side by side."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        by_key.setdefault((row["shape"], row["beam_width"], row["batch_size"]), {})[row["implementation"]] = row
    lines = [
        "| shape (parameters) | beam | batch | requests/s | ms/request | reference requests/s | speed-up | constraint µs/request "
        "(reference) | search loop µs/request (reference) | peak MB (reference) | anchor requests/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (shape, beam, batch), impl in by_key.items():
        fast, ref = impl.get("fast"), impl.get("reference")

        def cell(row, key):
            return "-" if row is None else f"{row[key]:,}"

        speedup = f"{fast['requests_per_second'] / ref['requests_per_second']:.1f}x" if fast and ref else "-"
        params = (fast or ref)["parameters"]
        anchor = ANCHOR_REQUESTS_PER_SECOND.get((shape, beam), "-") if batch == 256 else "-"
        lines.append(
            f"| {shape} ({params / 1e6:.1f}M) | {beam} | {batch} | {cell(fast, 'requests_per_second')} | {cell(fast, 'ms_per_request')} "
            f"| {cell(ref, 'requests_per_second')} | {speedup} | {cell(fast, 'constraint_us_per_request')} "
            f"({cell(ref, 'constraint_us_per_request')}) | {cell(fast, 'search_loop_us_per_request')} "
            f"({cell(ref, 'search_loop_us_per_request')}) | {cell(fast, 'peak_memory_mb')} ({cell(ref, 'peak_memory_mb')}) | {anchor} |"
        )
    return "\n".join(lines)
