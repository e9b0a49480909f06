"""The ``sa2crq`` command line: the library's commands plus the distributed jobs.

Each job takes a typed config file (``--config FILE.json``) and ``--set section.field=value``
overrides (precedence: defaults < file < --set; see :mod:`jobs.config`). A job ends by printing
what it wrote where, with row counts. Exit codes: 0 done, 2 bad input or config, 3 refused
(churn above the limit, or a retriever / SID version mismatch).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jobs.bench_scale import CHAIN
from jobs.config import JOB_CONFIGS, load_job_config
from sa2crq.cli import add_library_commands, base_parser, run

JOB_HELP = {
    "recode": "full-catalog recode: split, embed, train or reuse the tokenizer, assign SIDs, publish a version",
    "ingest": "cold-start ingest: give new items SIDs consistent with the published table, publish the delta",
    "train-retriever": "train the generative retriever on a published SID version",
    "generate": "offline candidate generation: requests -> constrained beam search -> candidate parquet",
    "evaluate": "retrieval metrics of a published retriever on held-out targets",
}
REFUSED = 3


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


def build_parser() -> argparse.ArgumentParser:
    """The whole ``sa2crq`` parser (library commands and jobs), built without running anything."""
    parser, commands = base_parser()
    benchmarks = add_library_commands(commands)
    scale = benchmarks.add_parser("scale", help="every job end to end on a synthetic catalog: wall time, rows, peak memory")
    scale.add_argument("--items", nargs="+", type=int, default=[100_000], help="catalog sizes, one run each")
    scale.add_argument("--requests", type=int, default=10_000, help="history requests for generate")
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument("--through", default=CHAIN[-1], choices=CHAIN,
                       help="run the chain recode -> recode --reuse-tokenizer (reuse) -> ingest -> train-retriever -> generate up to this job")
    scale.add_argument("--work", type=Path, default=Path("out/bench/scale"), help="data and storage (one directory per size, emptied first)")
    scale.add_argument("--out", type=Path, help="also write the JSON result here")
    scale.set_defaults(run=_bench_scale)
    for job, help_text in JOB_HELP.items():
        sub = commands.add_parser(job, help=help_text, description=help_text)
        sub.add_argument("--config", help=f"JSON file of {JOB_CONFIGS[job].__name__} fields")
        sub.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.FIELD=VALUE")
        sub.add_argument("--summary-json", type=Path, help="also write what the job wrote where, as JSON, to this file")
        if job == "recode":
            sub.add_argument("--reuse-tokenizer", metavar="VERSION", help="encode with this published version's tokenizer")
            sub.add_argument("--force", action="store_true", help="publish even when SID churn exceeds the limit")
        sub.set_defaults(run=_run_job, job=job)
    return parser


# Engine chatter that is not progress: py4j logs its connection retries with tracebacks at INFO, and
# Ray Data logs every operator's state every few seconds (map_shards logs each finished shard).
QUIET_LOGGERS = ("py4j", "ray.data")


def _run_job(args: argparse.Namespace) -> int:
    from jobs.recode import ChurnLimitExceeded
    from sa2crq.retrieval.serving import VersionMismatchError

    if args.log_level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    assignments = list(args.assignments)
    if getattr(args, "reuse_tokenizer", None):
        assignments.append(f"reuse_tokenizer={args.reuse_tokenizer}")
    config = load_job_config(args.job, args.config, assignments)
    try:
        summary = _job(args.job)(config, **({"force": args.force} if args.job == "recode" else {}))
    except (ChurnLimitExceeded, VersionMismatchError) as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return REFUSED
    print(summary.format())
    if args.summary_json is not None:
        args.summary_json.write_text(summary.to_json())
    return 0


def _bench_scale(args: argparse.Namespace) -> int:
    from jobs.bench_scale import format_scale_table, run_scale_benchmark

    results = []
    for n_items in args.items:
        results.append(run_scale_benchmark(n_items, args.work / f"items-{n_items}", seed=args.seed, requests=args.requests, through=args.through))
        print(format_scale_table(results[-1]), flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def _job(name: str):
    if name == "recode":
        from jobs.recode import run_recode

        return run_recode
    if name == "ingest":
        from jobs.ingest import run_ingest

        return run_ingest
    if name == "train-retriever":
        from jobs.train_retriever import run_train_retriever

        return run_train_retriever
    if name == "generate":
        from jobs.generate import run_generate

        return run_generate
    from jobs.evaluate import run_evaluate

    return run_evaluate


if __name__ == "__main__":
    sys.exit(main())
