"""The ``sa2crq`` command line: the library's commands plus the distributed jobs.

Each job takes a typed config file (``--config FILE.yaml`` or ``.json``) and ``--set section.field=value``
overrides (precedence: defaults < file < --set; see :mod:`jobs.config`); ``--print-config`` shows
the result with each value's source and runs nothing. A job ends by printing
what it wrote where, with row counts. Exit codes: 0 done, 2 bad input or config, 3 refused
(churn above the limit, a retriever / SID version mismatch, or another job committed on the version
this one built on), 4 verification failed (``sa2crq versions verify`` found a published file
missing, changed, or not in its manifest; or a commit log holds a file that is not a commit), 5 the
local S3 server's directory (``storage.local_server_dir``) is in use by another job's server, 6 the
local disk under ``spark.staging_dir`` is full.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from jobs.bench_scale import CHAIN
from jobs.config import JOB_CONFIGS, StorageConfig, load_job_config
from sa2crq.cli import add_library_commands, base_parser, run
from sa2crq.config import describe_config

JOB_HELP = {
    "recode": "full-catalog recode: split, embed, train or reuse the tokenizer, assign SIDs, publish a version",
    "ingest": "cold-start ingest: give new items SIDs consistent with the published table, publish the delta",
    "train-retriever": "train the generative retriever on a published SID version",
    "generate": "offline candidate generation: requests -> constrained beam search -> candidate parquet",
    "evaluate": "retrieval metrics of a published retriever on held-out targets",
}
REFUSED = 3
VERIFY_FAILED = 4
LOCAL_SERVER_DIR_IN_USE = 5
STAGING_DISK_FULL = 6


def main(argv: list[str] | None = None) -> int:
    from jobs.object_store import LocalS3ServerInUse
    from sa2crq.storage.publish import CommitLogError

    try:
        return run(build_parser(), argv)
    except LocalS3ServerInUse as in_use:  # the message says whose server it is and what to do: no traceback
        print(f"error: {in_use}", file=sys.stderr)
        return LOCAL_SERVER_DIR_IN_USE
    except CommitLogError as damaged:  # names the file and the repair; nothing was read or published
        print(f"error: {damaged}", file=sys.stderr)
        return VERIFY_FAILED


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
    _add_versions_commands(commands)
    for job, help_text in JOB_HELP.items():
        sub = commands.add_parser(job, help=help_text, description=help_text)
        sub.add_argument("--config", help=f"YAML (.yaml, .yml) or JSON (.json) file of {JOB_CONFIGS[job].__name__} fields")
        sub.add_argument("--set", dest="assignments", action="append", default=[], metavar="SECTION.FIELD=VALUE")
        sub.add_argument(
            "--print-config", action="store_true",
            help="print the effective config (defaults < file < --set) as YAML with each value's source, and run nothing",
        )  # fmt: skip
        sub.add_argument("--summary-json", type=Path, help="also write what the job wrote where, as JSON, to this file")
        if job == "recode":
            sub.add_argument("--reuse-tokenizer", metavar="VERSION", help="encode with this published version's tokenizer")
            sub.add_argument("--force", action="store_true", help="publish even when SID churn exceeds the limit")
        sub.set_defaults(run=_run_job, job=job)
    return parser


def _add_versions_commands(commands: argparse._SubParsersAction) -> None:
    """``sa2crq versions list|show|diff|verify``: read a store's published versions, write nothing."""
    versions = commands.add_parser("versions", help="list, show, diff and verify the published versions of a store")
    actions = versions.add_subparsers(dest="versions_command", required=True)

    def store(sub: argparse.ArgumentParser, *, kind: bool = True) -> argparse.ArgumentParser:
        sub.add_argument("--root", required=True, help="the storage root (storage.root): a local path, file:// or s3://bucket/prefix")
        if kind:
            sub.add_argument("--kind", choices=["sids", "retrievers"], default="sids", help="which versions (default: sids)")
        else:
            sub.set_defaults(kind="sids")
        sub.add_argument("--endpoint-url", default=StorageConfig.endpoint_url,
                         help="S3 endpoint (storage.endpoint_url; default AWS_ENDPOINT_URL, else the local server)")
        sub.add_argument("--local-server-dir", default=StorageConfig.local_server_dir,
                         help="data directory of the local S3 server used when no endpoint is configured")
        sub.set_defaults(run=_versions)
        return sub

    store(actions.add_parser("list", help="every published version, oldest first: commit, parent, time, rows, size; LATEST marked"))
    show = store(actions.add_parser("show", help="a version's manifest (files by part, sizes), meta and report"))
    show.add_argument("version", help="a published version, or LATEST")
    show.add_argument("--files", action="store_true", help="list every file, not one line per part")
    show.add_argument("--page", metavar="PATH.html", help="also copy the version's report page (plots) to this local file")
    diff = store(actions.add_parser("diff", help="SID churn and remap between two SID versions"), kind=False)
    diff.add_argument("previous", help="the older version (or LATEST)")
    diff.add_argument("current", help="the newer version (or LATEST)")
    diff.add_argument("--examples", type=int, default=5, help="remap rows to print")
    verify = store(actions.add_parser("verify", help=f"check files against the manifest: size, sha256, unlisted files (exit {VERIFY_FAILED} on any mismatch)"))
    which = verify.add_mutually_exclusive_group(required=True)
    which.add_argument("version", nargs="?", help="a published version, or LATEST")
    which.add_argument("--all", action="store_true", help="every published version")


def _versions(args: argparse.Namespace) -> int:
    from jobs.object_store import object_store
    from sa2crq.storage.publish import Publisher
    from sa2crq.storage.versions import (
        diff_sid_versions, format_check, format_sid_diff, format_version_detail, format_version_list, list_versions,
        save_report_page, show_version, verify_version,
    )  # fmt: skip

    storage = StorageConfig(root=args.root, endpoint_url=args.endpoint_url, local_server_dir=args.local_server_dir)
    with object_store(storage, create_bucket=False):
        publisher = Publisher(storage.sids if args.kind == "sids" else storage.retrievers)
        if args.versions_command == "list":
            summaries = list_versions(publisher)
            print(format_version_list(summaries) if summaries else f"no {args.kind} version is published under {publisher.root_url}")
        elif args.versions_command == "show":
            print(format_version_detail(show_version(publisher, args.version), every_file=args.files))
            if args.page:
                print(f"report page: {save_report_page(publisher, args.version, args.page)}")
        elif args.versions_command == "diff":
            print(format_sid_diff(diff_sid_versions(publisher, args.previous, args.current), examples=args.examples))
        else:
            checks = [verify_version(publisher, v) for v in (publisher.versions() if args.all else [args.version])]
            print("\n".join(format_check(check) for check in checks) or f"no {args.kind} version is published under {publisher.root_url}")
            return 0 if all(check.ok for check in checks) else VERIFY_FAILED
    return 0


# Engine chatter that is not progress: py4j logs its connection retries with tracebacks at INFO, and
# Ray Data logs every operator's state every few seconds (map_shards logs each finished shard).
QUIET_LOGGERS = ("py4j", "ray.data")


def _run_job(args: argparse.Namespace) -> int:
    from jobs.engines import StagingDiskFull
    from jobs.recode import ChurnLimitExceeded
    from sa2crq.retrieval.serving import VersionMismatchError
    from sa2crq.storage.publish import ConcurrentPublishError
    from sa2crq.storage.published import ManifestMismatchError

    if args.log_level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    assignments = list(args.assignments)
    if getattr(args, "reuse_tokenizer", None):
        assignments.append(f"reuse_tokenizer={args.reuse_tokenizer}")
    config = load_job_config(args.job, args.config, assignments)
    if args.print_config:
        print(describe_config(config, args.config, assignments))
        return 0
    try:
        summary = _job(args.job)(config, **({"force": args.force} if args.job == "recode" else {}))
    except (ChurnLimitExceeded, VersionMismatchError) as refused:
        print(f"refused: {refused}", file=sys.stderr)
        return REFUSED
    except ConcurrentPublishError as moved:  # another job committed first; this attempt was discarded: run it again
        print(f"refused: {moved} (nothing was published: run the job again)", file=sys.stderr)
        return REFUSED
    except ManifestMismatchError as damaged:  # a published file changed after its commit: nothing was published
        print(f"error: {damaged}", file=sys.stderr)
        return VERIFY_FAILED
    except StagingDiskFull as full:  # names the directory and what to do; the job discarded its attempt
        print(f"error: {full}; nothing was published", file=sys.stderr)
        return STAGING_DISK_FULL
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
