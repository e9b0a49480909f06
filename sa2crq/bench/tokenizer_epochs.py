"""`sa2crq bench tokenizer-epochs`: how many epochs each learned tokenizer needs (issue 8, item 4).

Fits each method's tokenizer on a catalog at several epoch budgets, each from the same seed, and
reports per budget what the quality profile depends on: full-depth reconstruction error of every
item (mean ``||x - Dec(z_hat)||^2`` on the unit-norm content embeddings), per-level codebook
utilisation and perplexity, the share of items whose full code path collides, and the wall time of
the whole tokenization (fit, encode, SIDs). A budget past which these stop moving is enough; the
``cpu`` quality profile's budget is checked against it.

A budget ``e`` means ``rqvae.epochs = e``; for ACRQ methods phase 2 scales with it
(``acrq.epochs_per_stage = max(1, round(e * ACRQ_STAGE_SHARE))``, the ``cpu`` profile's 25 : 6
ratio). Popularity and segments come from the leave-one-out training interactions (run 1 of the
quality benchmark), so the fits are the ones the quality profile trains.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sa2crq.bench import hardware
from sa2crq.bench.quality import embedded_items
from sa2crq.config import TokenizerConfig
from sa2crq.data.datasets import read_interactions, read_items
from sa2crq.data.splits import leave_one_out
from sa2crq.storage.reports import dumps_report
from sa2crq.tokenize_catalog import tokenize_catalog

# Phase-2 epochs per curriculum stage per phase-1 epoch: the cpu profile's 6 per 25.
ACRQ_STAGE_SHARE = 6 / 25


def epoch_overrides(config: TokenizerConfig, epochs: int) -> dict[str, Any]:
    overrides: dict[str, Any] = {"rqvae.epochs": epochs}
    if config.quantizer == "acrq":
        overrides["acrq.epochs_per_stage"] = max(1, round(epochs * ACRQ_STAGE_SHARE))
    return overrides


def run_tokenizer_epochs_benchmark(
    data_dir: Path, methods: list[str], budgets: list[int], out_path: Path | None = None, seed: int = 0
) -> dict[str, Any]:
    started = time.perf_counter()
    # Embedded once, here: every fit reads the same `embedding` column.
    items, embeddings = embedded_items(read_items(data_dir / "items.parquet"))
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    train = leave_one_out(read_interactions(data_dir / "interactions.parquet")).train
    rows: list[dict[str, Any]] = []
    for method in methods:
        base = TokenizerConfig.for_method(method)
        if base.quantizer == "rqkmeans":
            raise ValueError(f"{method}: residual k-means has no epochs to measure")
        for epochs in sorted(budgets):
            config = base.with_overrides({**epoch_overrides(base, epochs), "rqvae.seed": seed})
            tokenize_started = time.perf_counter()
            result = tokenize_catalog(items, train, config, embedder=None)
            seconds = time.perf_counter() - tokenize_started
            report = result.report
            model = result.tokenizer.model
            # The tokenizer saw the validated catalog: the same rows as `x` only when nothing was rejected.
            rejected = items.num_rows - result.items.valid.num_rows
            if rejected:
                raise ValueError(f"{rejected} items were rejected; the benchmark needs a clean catalog")
            rows.append({
                "method": method,
                "epochs": epochs,
                "acrq_epochs_per_stage": config.acrq.epochs_per_stage if config.quantizer == "acrq" else None,
                "reconstruction_error": float(model.reconstruction_error(x).mean()),
                "utilisation": [round(level["utilisation"], 4) for level in report["codebook"]],
                "perplexity": [round(level["perplexity"], 1) for level in report["codebook"]],
                "full_path_collision_rate": report["full_path_collision_rate"],
                "tokenize_seconds": round(seconds, 1),
            })  # fmt: skip
    result = {
        "data": str(data_dir),
        "hardware": hardware(),
        "seed": seed,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(dumps_report(result))
    return result


def format_tokenizer_epochs_table(result: dict[str, Any]) -> str:
    lines = [
        "| method | epochs (ACRQ per stage) | recon. error | utilisation per level | perplexity per level | full-path collisions | tokenize s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        stage = "" if row["acrq_epochs_per_stage"] is None else f" ({row['acrq_epochs_per_stage']})"
        lines.append(
            f"| {row['method']} | {row['epochs']}{stage} | {row['reconstruction_error']:.4f} | "
            f"{' / '.join(f'{u:.2f}' for u in row['utilisation'])} | {' / '.join(f'{p:.0f}' for p in row['perplexity'])} | "
            f"{row['full_path_collision_rate']:.4f} | {row['tokenize_seconds']} |"
        )
    return "\n".join(lines)
