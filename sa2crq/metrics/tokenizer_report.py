"""Tokenizer quality report (DESIGN §5): JSON for machines, a table for people.

Metrics, each over the SID table of one catalog:
* ``collision_rate``: share of items whose SID is shared with another item (they form a bucket).
* ``full_path_collision_rate``: share of items whose full-depth code path is shared, before any
  truncation or digit; a property of the quantizer alone.
* ``bucket_sizes``: histogram of items by the size of the bucket they are in; ``max_bucket``.
* ``mean_sid_len`` / ``mean_code_depth`` per segment: tokens before EOS / code levels kept;
  ``sid_length_histogram``: items by SID length (tokens before EOS), ``{"length": items}``.
* ``codebook``: per level, utilisation (distinct codes used / codebook size) and perplexity
  (exp of the entropy of the code distribution; K means perfectly even use).
* ``cold_sharing_warm``: cold items whose SID is also carried by at least one warm item.
* ``acrq``: the phase-2 invariants (head-code stability, tail reconstruction before and after,
  adapter norms, extension codes in use), for methods trained with ACRQ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sa2crq.data.segments import COLD, SEGMENT_NAMES
from sa2crq.ids.sid_table import SIDTable
from sa2crq.quantize.sarq import prefix_group_ids


def tokenizer_report(table: SIDTable, fit_report: dict[str, Any], *, method: str, max_bucket: int) -> dict[str, Any]:
    n, levels = table.codes.shape
    shared = table.bucket_size > 1
    full_group = prefix_group_ids(table.codes)[-1]
    full_shared = np.bincount(full_group)[full_group] > 1
    segments: dict[str, Any] = {}
    for code, name in enumerate(SEGMENT_NAMES):
        mask = table.segments == code
        count = int(mask.sum())
        segments[name] = {
            "items": count,
            "mean_sid_len": _mean(table.sid_len[mask]),
            "mean_code_depth": _mean(table.code_depth[mask]),
            "code_depth_histogram": _histogram(table.code_depth[mask], 1, levels),
            "sid_length_histogram": _value_counts(table.sid_len[mask]),
            "collision_rate": _mean(shared[mask]),
            "full_path_collision_rate": _mean(full_shared[mask]),
        }
    warm_sid = np.zeros(int(table.sid_index.max()) + 1, dtype=bool)
    warm_sid[table.sid_index[table.segments != COLD]] = True
    cold = table.segments == COLD
    report: dict[str, Any] = {
        "method": method,
        "items": n,
        "distinct_sids": int(table.sid_index.max()) + 1,
        "levels": levels,
        "codebook_sizes": list(table.vocab.codebook_sizes),
        "vocab_size": table.vocab.size,
        "tau": table.tau,
        "keep_threshold": table.threshold,
        "mean_sid_len": _mean(table.sid_len),
        "collision_rate": _mean(shared),
        "full_path_collision_rate": _mean(full_shared),
        "bucket_sizes": _value_counts(table.bucket_size),
        "max_bucket": int(table.bucket_size.max()),
        "bucket_cap": max_bucket,
        "truncated_buckets_over_cap": int(
            len(np.unique(table.sid_index[(table.bucket_size > max_bucket) & (table.code_depth < levels)]))
        ),
        "digit_overflow_items": table.digit_overflow_items,
        "cold_items": int(cold.sum()),
        "cold_sharing_warm": int(warm_sid[table.sid_index[cold]].sum()),
        "segments": segments,
        "codebook": [codebook_stats(np.bincount(table.codes[:, level], minlength=size), size) for level, size in enumerate(table.vocab.codebook_sizes)],
    }
    report.update({k: v for k, v in fit_report.items() if k != "loss"})
    return report


def format_report(report: dict[str, Any]) -> str:
    """A readable table of the headline numbers."""
    lines = [
        f"tokenizer report: {report['method']}  ({report['items']} items, {report['distinct_sids']} distinct SIDs, "
        f"vocab {report['vocab_size']})",
        f"  tau {report['tau']}  keep threshold {report['keep_threshold']}  "
        f"collision rate {report['collision_rate']:.4f}  full-path collisions {report['full_path_collision_rate']:.4f}",
        f"  max bucket {report['max_bucket']} (cap {report['bucket_cap']}, truncated over cap "
        f"{report['truncated_buckets_over_cap']})  digit overflow {report['digit_overflow_items']}  "
        f"cold items sharing a SID with warm items {report['cold_sharing_warm']}/{report['cold_items']}",
        "",
        f"  {'segment':<8}{'items':>8}{'sid len':>9}{'depth':>7}{'collide':>9}   depth histogram (1..L)",
    ]
    for name, seg in report["segments"].items():
        lines.append(
            f"  {name:<8}{seg['items']:>8}{_fmt(seg['mean_sid_len']):>9}{_fmt(seg['mean_code_depth']):>7}"
            f"{_fmt(seg['collision_rate'], 4):>9}   {seg['code_depth_histogram']}"
        )
    lines += ["", f"  {'level':<8}{'size':>6}{'used':>7}{'util':>7}{'perplexity':>12}"]
    for level, stats in enumerate(report["codebook"], start=1):
        lines.append(
            f"  {level:<8}{stats['size']:>6}{stats['used']:>7}{stats['utilisation']:>7.3f}{stats['perplexity']:>12.1f}"
        )
    acrq = report.get("acrq")
    if acrq:
        lines += [
            "",
            f"  ACRQ: head-code stability {acrq['head_code_stability']:.4f}  "
            f"tail recon error {acrq['tail_recon_error_phase1']:.4f} -> {acrq['tail_recon_error_phase2']:.4f}  "
            f"adapter norm tail {acrq['adapter_norm_tail']:.4f} head {acrq['adapter_norm_head']:.4f}",
            f"        extension codes used per level {list(acrq['extension_codes_used'])}  "
            f"tail share on extensions {[round(s, 4) for s in acrq['extension_item_share']]}",
        ]
        lines += [f"  warning: {w}" for w in acrq["warnings"]]
    return "\n".join(lines)


def codebook_stats(counts: np.ndarray, size: int) -> dict[str, Any]:
    """One level's codebook use from ``counts[c]``, the items holding code c (the recode job's Spark
    aggregate hands over the same counts)."""
    counts = np.asarray(counts, dtype=np.float64)
    p = counts[counts > 0] / counts.sum()
    return {
        "size": int(size),
        "used": int((counts > 0).sum()),
        "utilisation": float((counts > 0).sum() / size),
        "perplexity": float(np.exp(-(p * np.log(p)).sum())),
    }


def _value_counts(values: np.ndarray) -> dict[str, int]:
    """``{"value": count}`` of an integer array, ascending (JSON keys are strings)."""
    distinct, counts = np.unique(values, return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(distinct, counts)}


def _histogram(values: np.ndarray, low: int, high: int) -> list[int]:
    return np.bincount(values - low, minlength=high - low + 1).astype(int).tolist() if len(values) else [0] * (high - low + 1)


def _mean(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def compare_reports(reports: list[dict[str, Any]]) -> str:
    """Side-by-side markdown table of several reports (one column per method)."""
    rows: list[tuple[str, Any]] = [
        ("items", lambda r: r["items"]),
        ("distinct SIDs", lambda r: r["distinct_sids"]),
        ("max depth (levels)", lambda r: r["levels"]),
        ("tau (bits)", lambda r: _fmt(r["tau"]) if r["tau"] is not None else "-"),
        ("mean SID length, all", lambda r: _fmt(r["mean_sid_len"])),
        *[
            (f"mean SID length, {seg}", (lambda s: lambda r: _fmt(r["segments"][s]["mean_sid_len"]))(seg))
            for seg in SEGMENT_NAMES
        ],
        ("collision rate (shared SID), all", lambda r: _fmt(r["collision_rate"], 4)),
        *[
            (f"collision rate, {seg}", (lambda s: lambda r: _fmt(r["segments"][s]["collision_rate"], 4))(seg))
            for seg in SEGMENT_NAMES
        ],
        ("full-path collision rate", lambda r: _fmt(r["full_path_collision_rate"], 4)),
        ("max bucket (cap)", lambda r: f"{r['max_bucket']} ({r['bucket_cap']})"),
        ("truncated buckets over cap", lambda r: r["truncated_buckets_over_cap"]),
        ("cold items sharing a SID with warm", lambda r: f"{r['cold_sharing_warm']}/{r['cold_items']}"),
        ("codebook utilisation per level", lambda r: " / ".join(f"{c['utilisation']:.2f}" for c in r["codebook"])),
        ("codebook perplexity per level", lambda r: " / ".join(f"{c['perplexity']:.0f}" for c in r["codebook"])),
        ("ACRQ head-code stability", lambda r: _fmt(r["acrq"]["head_code_stability"], 4) if "acrq" in r else "-"),
        (
            "ACRQ tail recon error phase 1 -> 2",
            lambda r: f"{r['acrq']['tail_recon_error_phase1']:.4f} -> {r['acrq']['tail_recon_error_phase2']:.4f}"
            if "acrq" in r
            else "-",
        ),
        (
            "ACRQ adapter norm tail / head",
            lambda r: f"{r['acrq']['adapter_norm_tail']:.4f} / {r['acrq']['adapter_norm_head']:.4f}" if "acrq" in r else "-",
        ),
        (
            "ACRQ extension codes used per level",
            lambda r: " / ".join(str(u) for u in r["acrq"]["extension_codes_used"]) if "acrq" in r else "-",
        ),
    ]
    header = "| metric | " + " | ".join(r["method"] for r in reports) + " |"
    lines = [header, "|---" * (len(reports) + 1) + "|"]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(str(get(r)) for r in reports) + " |")
    return "\n".join(lines)
