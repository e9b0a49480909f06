"""The library's command line (tokenize, datasets, reports, benchmarks): parse, call the library, print.

The ``sa2crq`` console script (:mod:`jobs.cli`) adds the distributed jobs to these commands.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sa2crq.config import METHODS, load_tokenizer_config
from sa2crq.progress import ENV as PROGRESS_ENV, MODES

DEFAULT_CACHE = Path(os.environ.get("SA2CRQ_CACHE", ".cache"))
BAD_INPUT = 2  # exit code: bad input or config (a refused input included)
# A run's ceiling on the share of rows quarantined (the jobs' configs default to the same).
DEFAULT_MAX_REJECT_FRACTION = 0.05


def main(argv: list[str] | None = None) -> int:
    """The library's commands alone (no Ray, no Spark): what a bare GPU machine can run."""
    parser, commands = base_parser()
    add_library_commands(commands)
    return run(parser, argv)


def base_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="sa2crq", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument(
        "--progress", choices=MODES,
        help="progress of long stages: live bars (default on a terminal), plain log lines with rate and ETA (default elsewhere), or off",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_const", const="off", dest="progress", help="no progress (same as --progress off)")
    return parser, parser.add_subparsers(dest="command", required=True)


def run(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    args = parser.parse_args(argv)
    if args.progress is not None:  # in the environment, so the processes a job starts (Ray workers) inherit it
        os.environ[PROGRESS_ENV] = args.progress
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except ValueError as err:  # bad input or config: a clear message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT


def add_library_commands(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The library's commands; returns the ``bench`` subcommands, to which the jobs add theirs."""
    tok = commands.add_parser("tokenize", help="give every item a semantic ID and write the tokenizer report")
    tok.add_argument("--items", required=True, help="items parquet (item_id, text fields, optional embedding)")
    tok.add_argument("--interactions", required=True, help="training interactions parquet (user_id, item_id, timestamp)")
    tok.add_argument("--method", default="sa2crq", choices=METHODS)
    tok.add_argument("--out", required=True, help="output directory")
    tok.add_argument("--config", help="YAML or JSON file of config overrides (see sa2crq/config.py)")
    tok.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    tok.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="embedding cache directory")
    tok.add_argument("--max-reject-fraction", type=float, default=DEFAULT_MAX_REJECT_FRACTION)
    tok.set_defaults(run=_tokenize)

    check = commands.add_parser(
        "validate", help="run every input check of a run (accepted / quarantined / refused) without embedding or training"
    )
    check.add_argument("--items", required=True, help="items parquet (item_id, text fields, optional embedding)")
    check.add_argument("--interactions", required=True, help="interactions parquet (user_id, item_id, timestamp)")
    check.add_argument("--out", type=Path, help="also write the rejects files and validation.json here")
    check.add_argument("--max-reject-fraction", type=float, default=DEFAULT_MAX_REJECT_FRACTION)
    check.set_defaults(run=_validate)

    data = commands.add_parser("datasets", help="write a public dataset as items/interactions parquet")
    data.add_argument("name", choices=["amazon-beauty", "movielens-100k"])
    data.add_argument("--split", choices=["full", "leave-one-out", "cold-start"], default="full")
    data.add_argument("--cold-fraction", type=float, default=0.1)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--out", required=True, type=Path)
    data.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    data.add_argument(
        "--with-embeddings", action="store_true",
        help="add the MiniLM text embedding as an `embedding` column (for machines without the text model)",
    )
    data.set_defaults(run=_datasets)

    compare = commands.add_parser("compare-reports", help="side-by-side markdown table of tokenizer reports")
    compare.add_argument("reports", nargs="+", type=Path, help="report.json files")
    compare.set_defaults(run=_compare_reports)

    bench = commands.add_parser("bench", help="benchmarks that print numbers")
    bench_kind = bench.add_subparsers(dest="benchmark", required=True)
    sarq = bench_kind.add_parser("sarq", help="SARQ + SID assignment speed on synthetic codes")
    sarq.add_argument("--items", type=int, default=1_000_000)
    sarq.add_argument("--levels", type=int, default=4)
    sarq.add_argument("--codebook-size", type=int, default=256)
    sarq.add_argument("--seed", type=int, default=0)
    sarq.set_defaults(run=_bench_sarq)

    quality = bench_kind.add_parser("quality", help="tokenizer variants + retriever under the DESIGN §5 protocol")
    quality.add_argument("--data", required=True, type=Path, help="directory with items.parquet and interactions.parquet")
    quality.add_argument("--profile", choices=["smoke", "cpu", "cpu-ablations", "gpu"], default="smoke")
    quality.add_argument("--out", required=True, type=Path, help="JSON results file (rewritten after every row)")
    quality.add_argument("--device", help="torch device (default: cuda when available)")
    quality.add_argument("--variants", nargs="+", help="only these tokenizer variants, in this order (default: the profile's)")
    quality.add_argument("--seeds", nargs="+", type=int, help="run-1 seeds (default: the profile's)")
    quality.add_argument("--cold-seeds", nargs="*", type=int, help="run-2 seeds (default: the profile's); none leaves run 2 out")
    quality.set_defaults(run=_bench_quality)

    epochs = bench_kind.add_parser("tokenizer-epochs", help="tokenizer reconstruction and code use against training epochs")
    epochs.add_argument("--data", required=True, type=Path, help="directory with items.parquet and interactions.parquet")
    epochs.add_argument("--methods", nargs="+", default=["tiger", "sa2crq"], help="methods with a learned tokenizer")
    epochs.add_argument("--epochs", nargs="+", type=int, default=[5, 10, 25, 50, 100], help="rqvae.epochs budgets")
    epochs.add_argument("--seed", type=int, default=0)
    epochs.add_argument("--out", type=Path, help="also write the JSON result here")
    epochs.set_defaults(run=_bench_tokenizer_epochs)

    generate = bench_kind.add_parser("generate", help="candidate-generation speed: fast beam search against the reference")
    generate.add_argument("--shapes", nargs="+", default=["cpu", "tiger"], help="retriever shapes: cpu, tiger")
    generate.add_argument("--beams", nargs="+", type=int, default=[10, 20, 50])
    generate.add_argument("--batches", nargs="+", type=int, default=[1, 32, 256])
    generate.add_argument("--implementations", nargs="+", default=["fast", "reference"])
    generate.add_argument("--requests", type=int, default=512, help="requests timed per configuration (or --max-seconds)")
    generate.add_argument("--max-seconds", type=float, default=10.0, help="stop timing a configuration after this (one batch at least)")
    generate.add_argument("--device", default="cpu")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--out", type=Path, help="also write the JSON result here")
    generate.set_defaults(run=_bench_generate)
    return bench_kind


def _tokenize(args: argparse.Namespace) -> int:
    from sa2crq.data.datasets import read_interactions, read_items
    from sa2crq.data.embed import TextEmbedder
    from sa2crq.metrics.tokenizer_report import format_report
    from sa2crq.tokenize_catalog import tokenize_catalog, write_result

    config = load_tokenizer_config(args.method, args.config, args.assignments)
    result = tokenize_catalog(
        read_items(args.items),
        read_interactions(args.interactions),
        config,
        embedder=TextEmbedder(args.cache / "embeddings"),
        max_reject_fraction=args.max_reject_fraction,
    )
    paths = write_result(result, args.out)
    print(format_report(result.report))
    print()
    for name, path in paths.items():
        print(f"wrote {name}: {path}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from sa2crq.data.datasets import read_interactions, read_items
    from sa2crq.input_check import check_input, format_input_check, write_input_check

    check = check_input(
        read_items(args.items), read_interactions(args.interactions), max_reject_fraction=args.max_reject_fraction
    )
    print(format_input_check(check, {"items": args.items, "interactions": args.interactions}))
    if args.out:
        print()
        for name, path in write_input_check(check, args.out).items():
            print(f"wrote {name}: {path}")
    return 0 if check.accepted else BAD_INPUT


def _datasets(args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sa2crq.data.datasets import load_amazon_beauty, load_movielens_100k
    from sa2crq.data.splits import cold_start_split, history_requests, leave_one_out

    if args.name == "amazon-beauty":
        items, interactions = load_amazon_beauty()
    else:
        items, interactions = load_movielens_100k(args.cache)
    if args.with_embeddings:
        from sa2crq.data.embed import TextEmbedder
        from sa2crq.tokenize_catalog import item_embeddings

        vectors = item_embeddings(items, TextEmbedder(args.cache / "embeddings"))
        items = items.append_column("embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]))
    args.out.mkdir(parents=True, exist_ok=True)
    tables = {"items": items}
    if args.split == "full":
        tables["interactions"] = interactions
    else:
        if args.split == "leave-one-out":
            split = leave_one_out(interactions)
        else:
            split = cold_start_split(
                items.column("item_id").to_numpy(), interactions, fraction=args.cold_fraction, seed=args.seed
            )
        tables.update(interactions=split.train, valid=split.valid, test=split.test)
        # What a test-time request sees: the training and validation items, oldest first.
        tables["history"] = pa.concat_tables([split.train, split.valid])
        tables["requests"] = history_requests(tables["history"])
    for name, table in tables.items():
        # Requests in row groups of 256: each row group is one shard of the generate job.
        pq.write_table(table, args.out / f"{name}.parquet", row_group_size=256 if name == "requests" else None)
        print(f"wrote {name}: {args.out / f'{name}.parquet'} ({table.num_rows} rows)")
    return 0


def _compare_reports(args: argparse.Namespace) -> int:
    import json

    from sa2crq.metrics.tokenizer_report import compare_reports

    print(compare_reports([json.loads(path.read_text()) for path in args.reports]))
    return 0


def _bench_sarq(args: argparse.Namespace) -> int:
    from sa2crq.bench.sarq_speed import run_sarq_benchmark

    for name, value in run_sarq_benchmark(args.items, args.levels, args.codebook_size, args.seed).items():
        print(f"{name}: {value}")
    return 0


def _bench_quality(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from sa2crq.bench.quality import PROFILES, VARIANTS, format_quality_table, run_quality_benchmark

    profile = PROFILES[args.profile]
    if args.variants:
        unknown = sorted(set(args.variants) - set(VARIANTS))
        if unknown:
            print(f"sa2crq bench quality: --variants: unknown {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
            return 2
        profile = replace(profile, variants=tuple(args.variants))
    if args.seeds:
        profile = replace(profile, seeds=tuple(args.seeds))
    if args.cold_seeds is not None:
        profile = replace(profile, cold_seeds=tuple(args.cold_seeds))
    result = run_quality_benchmark(args.data, profile, args.out, device=args.device)
    print(f"profile {result['profile']} on {result['hardware']}, seeds {result['seeds']} (run 2: {result['cold_seeds']}), "
          f"split seed {result['split_seed']}, {result['seconds']} s")
    print(format_quality_table(result))
    print(f"wrote {args.out}")
    return 0


def _bench_tokenizer_epochs(args: argparse.Namespace) -> int:
    from sa2crq.bench.tokenizer_epochs import format_tokenizer_epochs_table, run_tokenizer_epochs_benchmark

    result = run_tokenizer_epochs_benchmark(args.data, args.methods, args.epochs, args.out, seed=args.seed)
    print(f"{result['hardware']}, seed {result['seed']}, {result['seconds']} s")
    print(format_tokenizer_epochs_table(result))
    return 0


def _bench_generate(args: argparse.Namespace) -> int:
    from sa2crq.bench.generation_speed import format_generation_table, run_generation_benchmark

    result = run_generation_benchmark(
        shapes=args.shapes, beams=args.beams, batches=args.batches, implementations=args.implementations,
        requests=args.requests, max_seconds=args.max_seconds, device=args.device, seed=args.seed,
    )  # fmt: skip
    allocator = ", ".join(f"{k}={v}" for k, v in result["allocator"].items())
    print(f"{result['hardware']}, torch {result['torch']}, {result['threads']} threads, allocator {allocator}; "
          f"{result['catalog']}, {result['history_items']}-item histories, seed {result['seed']}, {result['seconds']} s")
    print(format_generation_table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
