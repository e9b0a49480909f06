"""What a store's published versions hold, for operators (``sa2crq versions``): list, show, diff, verify.

Everything goes by the commit log and the manifests of :class:`~sa2crq.storage.publish.Publisher`
and only reads. Verifying compares each version's files with its manifest (size, then sha256) and
names every file that is missing, differs, or is present without being listed: a published version
never changes, so any difference is damage or tampering after the commit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sa2crq.storage import layout
from sa2crq.storage.publish import LATEST, MANIFEST, Commit, Manifest, Publisher
from sa2crq.storage.published import ManifestMismatchError, PublishedVersion

# The meta key under which the SID jobs (recode, ingest) record their table's rows.
ROW_COUNT_KEY = "items"
# Reports a version may carry, by kind: a SID version's report.json, a retriever's train_report.json,
# and each as a page with plots.
REPORT_NAMES = (layout.REPORT, layout.TRAIN_REPORT)
REPORT_PAGES = (layout.REPORT_PAGE, layout.TRAIN_REPORT_PAGE)


@dataclass(frozen=True)
class VersionSummary:
    commit: int
    version: str
    parent: str | None
    committed_at: str
    job: str | None  # the job that published it, where the meta names one
    items: int | None  # rows of its SID table, where the meta has them
    files: int
    size: int  # bytes, over every file the manifest lists
    latest: bool


@dataclass(frozen=True)
class PartSummary:
    name: str  # a part of the version (sa2crq/storage/layout.py) or a file at its top level
    files: int
    size: int


@dataclass(frozen=True)
class VersionDetail:
    summary: VersionSummary
    manifest: Manifest
    parts: tuple[PartSummary, ...]
    report_name: str | None
    report: dict[str, Any] | None


@dataclass(frozen=True)
class SIDDiff:
    previous: str
    current: str
    counts: dict[str, Any]  # sid_churn's: previous, current, common, unchanged, changed, added, removed, churn
    remap: pa.Table  # item_id, old_sid, new_sid, change: one row per changed, added or removed item
    longer: int  # changed items whose SID gained tokens
    shorter: int  # changed items whose SID lost tokens


@dataclass(frozen=True)
class FileProblem:
    path: str  # relative to the version's directory
    kind: str  # "missing", "size", "sha256", "unlisted" or "manifest"
    detail: str


@dataclass(frozen=True)
class VersionCheck:
    version: str
    checked: int  # files the manifest lists
    problems: tuple[FileProblem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def published_version(publisher: Publisher, name: str) -> str:
    """The published version ``name`` names (``LATEST``: the newest commit's); a ValueError otherwise."""
    history = publisher.versions()
    version = history[-1] if name == LATEST and history else name
    if version not in history:
        raise ValueError(
            f"{name} is not a published version under {publisher.root_url} "
            f"({len(history)} published; `sa2crq versions list` names them)"
        )
    return version


def list_versions(publisher: Publisher) -> list[VersionSummary]:
    """Every published version, oldest first (commit order)."""
    history = publisher.commits()
    return [_summary(commit, publisher.manifest(commit.version), latest=commit is history[-1]) for commit in history]


def show_version(publisher: Publisher, version: str) -> VersionDetail:
    """A published version's commit, manifest, files by part and report (if it has one)."""
    version = published_version(publisher, version)
    history = publisher.commits()
    commit = next(c for c in history if c.version == version)
    try:
        manifest = publisher.manifest(version)
    except OSError as err:  # published, then damaged: a message, not a traceback
        raise ValueError(f"version {version}: its manifest cannot be read ({err}); `sa2crq versions verify {version}` says what else is wrong") from err
    by_part: dict[str, list[int]] = {}
    for relative, recorded in manifest.files.items():
        by_part.setdefault(relative.split("/", 1)[0], []).append(int(recorded["size"]))
    parts = tuple(PartSummary(name, len(sizes), sum(sizes)) for name, sizes in sorted(by_part.items()))
    report_name = next((name for name in REPORT_NAMES if name in manifest.files), None)
    report = None
    if report_name is not None:
        report = PublishedVersion(publisher.version_url(version), version, manifest.files).read_json(report_name)
    return VersionDetail(_summary(commit, manifest, latest=commit is history[-1]), manifest, parts, report_name, report)


def save_report_page(publisher: Publisher, version: str, path: str) -> str:
    """Copy a published version's report page (``report.html`` / ``train_report.html``) to a local
    ``path`` to open in a browser (an object store's files cannot be opened there)."""
    files = PublishedVersion.open(publisher, published_version(publisher, version))
    name = next((name for name in REPORT_PAGES if name in files.files), None)
    if name is None:
        raise ValueError(f"version {files.version} has no report page (published before pages were written)")
    data = files.read_bytes(name)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(data)
    return path


def diff_sid_versions(publisher: Publisher, previous: str, current: str) -> SIDDiff:
    """Churn and remap between two published SID versions' ``sid_table`` parts (:func:`sid_churn`)."""
    from sa2crq.ids.stability import sid_churn

    previous, current = published_version(publisher, previous), published_version(publisher, current)
    old, new = (PublishedVersion.open(publisher, v).read_parquet(layout.SID_TABLE, columns=["item_id", "sid"]) for v in (previous, current))
    counts, remap = sid_churn(old, new)
    changed = remap.filter(pc.equal(remap.column("change"), "changed"))
    growth = (pc.list_value_length(changed.column("new_sid")).to_numpy(zero_copy_only=False)
              - pc.list_value_length(changed.column("old_sid")).to_numpy(zero_copy_only=False))  # fmt: skip
    return SIDDiff(previous, current, counts, remap, longer=int((growth > 0).sum()), shorter=int((growth < 0).sum()))


def verify_version(publisher: Publisher, version: str) -> VersionCheck:
    """Every file the manifest lists exists with its recorded size and sha256 (checked as a job's
    reader checks it, :meth:`PublishedVersion.check`; a file another version holds is checked
    there), and nothing else is in the version's directory."""
    version = published_version(publisher, version)
    base = publisher.version_path(version)
    try:
        manifest = publisher.manifest(version)
    except (OSError, ValueError, TypeError) as err:  # gone, unreadable JSON, or not a manifest's fields
        return VersionCheck(version, 0, (FileProblem(MANIFEST, "manifest", f"the manifest cannot be read ({err}): nothing to check against"),))
    if manifest.version != version:  # a manifest copied from another version would vouch for the wrong files
        return VersionCheck(version, 0, (FileProblem(MANIFEST, "manifest", f"names version {manifest.version}, not {version}"),))
    listing = publisher.fs.find(base, detail=True) if publisher.fs.exists(base) else {}
    found = {path[len(base) + 1 :]: info for path, info in listing.items()}
    found.pop(MANIFEST, None)
    problems = []
    files = PublishedVersion(publisher.version_url(version), version, manifest.files)
    for relative in sorted(manifest.files):
        try:
            files.check(relative)
        except ManifestMismatchError as err:
            problems.append(FileProblem(relative, err.kind, f"the manifest records {err.expected}, found {err.found}"))
    held = {relative for relative, entry in manifest.files.items() if "version" not in entry}
    for relative in sorted(found.keys() - held):
        problems.append(FileProblem(relative, "unlisted", f"present ({int(found[relative]['size']):,} bytes) but not in the manifest"))
    return VersionCheck(version, len(manifest.files), tuple(problems))


# -- text for people --------------------------------------------------------------------------------
def format_version_list(summaries: list[VersionSummary]) -> str:
    lines = ["| # | version | parent | committed (UTC) | job | items | files | size | |", "|---:|---|---|---|---|---:|---:|---:|---|"]
    for s in summaries:
        items = f"{s.items:,}" if s.items is not None else ""
        lines.append(f"| {s.commit} | {s.version} | {s.parent or '-'} | {s.committed_at} | {s.job or ''} | {items} | "
                     f"{s.files:,} | {format_size(s.size)} | {'LATEST' if s.latest else ''} |")  # fmt: skip
    return "\n".join(lines)


def format_version_detail(detail: VersionDetail, *, every_file: bool = False) -> str:
    s, manifest = detail.summary, detail.manifest
    lines = [
        f"version {s.version}{' (LATEST)' if s.latest else ''}",
        f"commit #{s.commit} at {s.committed_at}; manifest written {manifest.created_at}",
        f"parent {s.parent or '-'}",
        f"{_count(s.files, 'file')}, {format_size(s.size)}",
    ]
    if every_file:
        lines += [f"  {format_size(int(f['size'])):>10}  {path}{_held_by(f)}" for path, f in sorted(manifest.files.items())]
    else:
        lines += [f"  {format_size(p.size):>10}  {p.name}{'' if p.name in manifest.files else '/'} ({_count(p.files, 'file')})" for p in detail.parts]
    lines += ["meta:", _indent(_pretty_json(manifest.meta))]
    if detail.report is not None:
        lines += [f"{detail.report_name} (lists abridged):", _indent(_pretty_json(abridged(detail.report)))]
    return "\n".join(lines)


def format_sid_diff(diff: SIDDiff, *, examples: int = 5) -> str:
    c = diff.counts
    lines = [
        f"{diff.previous} -> {diff.current}",
        f"items: {c['previous']:,} -> {c['current']:,}",
        f"added {c['added']:,}, removed {c['removed']:,}, in both {c['common']:,}: "
        f"same SID {c['unchanged']:,}, changed SID {c['changed']:,} (churn {c['churn']:.2%}; "
        f"{diff.longer:,} longer, {diff.shorter:,} shorter, {c['changed'] - diff.longer - diff.shorter:,} same length)",
    ]
    if examples > 0 and diff.remap.num_rows:
        lines.append(f"remap, first {min(examples, diff.remap.num_rows)} of {diff.remap.num_rows:,} rows by item id:")
        for row in diff.remap.slice(0, examples).to_pylist():
            lines.append(f"  {row['change']:>8}  item {row['item_id']}: {row['old_sid']} -> {row['new_sid']}")
    return "\n".join(lines)


def format_check(check: VersionCheck) -> str:
    if check.ok:
        return f"ok {check.version}: {_count(check.checked, 'file')} match the manifest"
    lines = [f"FAILED {check.version}: {_count(len(check.problems), 'problem')} ({_count(check.checked, 'file')} listed)"]
    lines += [f"  {p.kind:>8}  {p.path}: {p.detail}" for p in check.problems]
    return "\n".join(lines)


def format_size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    exponent = min(int(math.log(size, 1024)), len(_SIZE_UNITS))
    return f"{size / 1024**exponent:.1f} {_SIZE_UNITS[exponent - 1]}"


_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB")


def abridged(value: Any, keep: int = 6) -> Any:
    """A JSON value with every list past ``keep`` entries cut to its first ``keep`` and a count of the
    rest (learning curves and per-level lists would bury the rest of a report)."""
    if isinstance(value, dict):
        return {key: abridged(item, keep) for key, item in value.items()}
    if isinstance(value, list):
        head = [abridged(item, keep) for item in value[:keep]]
        return head + [f"... {len(value) - keep} more"] if len(value) > keep else head
    return value


def _summary(commit: Commit, manifest: Manifest, *, latest: bool) -> VersionSummary:
    items = manifest.meta.get(ROW_COUNT_KEY)
    return VersionSummary(
        commit=commit.number, version=commit.version, parent=commit.parent, committed_at=commit.committed_at,
        job=manifest.meta.get("job"), items=int(items) if isinstance(items, (int, float)) else None,
        files=len(manifest.files), size=sum(int(f["size"]) for f in manifest.files.values()), latest=latest,
    )  # fmt: skip


def _held_by(entry: dict[str, Any]) -> str:
    return f" (held by {entry['version']})" if "version" in entry else ""


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _pretty_json(value: Any) -> str:
    """Indented JSON with every list of plain values on one line (per-level statistics, curves)."""
    text = json.dumps(value, indent=2)
    return _FLAT_LIST.sub(lambda m: "[" + ", ".join(part.strip() for part in m.group(1).split(",\n")) + "]", text)


# A JSON list spread over lines whose entries hold no list or object (JSON strings never hold a raw newline).
_FLAT_LIST = re.compile(r"\[\n([^\[\]{}]*?)\n\s*\]")


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())
