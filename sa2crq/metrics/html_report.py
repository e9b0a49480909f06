"""Self-contained HTML reports to look at: every plot an embedded PNG, no script, no network.

One page per report kind, each rendered from the JSON report it sits beside:

* :func:`sid_version_page`, a SID version (the recode job's ``report.json`` or ``sa2crq tokenize``'s):
  SID length per segment, bucket sizes, codebook utilisation and perplexity per level, ACRQ's
  head-code stability, churn against the parent version;
* :func:`retriever_page`, a retriever version (``train_report.json``): the learning curve (the
  selection metric and the training and validation losses against training examples), the
  selected checkpoint, the tuned scorer;
* :func:`evaluation_page`, an evaluation: Recall and NDCG by segment, where the top-K came from
  (generated buckets, the dense path);
* :func:`quality_page`, the quality benchmark: the side-by-side table with its intervals and the
  learning curves.

matplotlib is imported when a page is rendered (Agg backend, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import json
from typing import Any, Sequence

SEGMENTS = ("head", "torso", "tail", "cold")
# The figure's alt text names the plot: tests and people look for it.
Figure = tuple[str, bytes]  # (alt text, PNG)


def sid_version_page(report: dict[str, Any], title: str) -> str:
    """A SID version's page. Reads the library's tokenizer report or recode's (statistics under
    ``sids``, the tokenizer's fit under ``tokenizer.fit``, churn under ``churn``)."""
    recode = "sids" in report
    stats = report["sids"] if recode else report
    fit = report["tokenizer"]["fit"] if recode else report
    plt = _pyplot()
    figures: list[Figure] = []

    fig, ax = plt.subplots(figsize=(7, 3.6))
    histograms = {name: stats["segments"][name].get("sid_length_histogram", {}) for name in SEGMENTS if name in stats["segments"]}
    lengths = sorted({int(length) for h in histograms.values() for length in h})
    width = 0.8 / max(len(histograms), 1)
    for i, (name, hist) in enumerate(histograms.items()):
        total = sum(hist.values()) or 1
        ax.bar([x + i * width for x in lengths], [hist.get(str(x), 0) / total for x in lengths], width, label=f"{name} ({total:,})")
    ax.set(xlabel="SID length (tokens before EOS)", ylabel="share of the segment's items", title="SID length by segment")
    ax.set_xticks([x + width * (len(histograms) - 1) / 2 for x in lengths], [str(x) for x in lengths])
    ax.legend(fontsize=8)
    figures.append(("SID length by segment", _png(fig)))

    fig, ax = plt.subplots(figsize=(7, 3.6))
    sizes = sorted((int(size), items) for size, items in stats["bucket_sizes"].items())
    ax.bar([str(size) for size, _ in sizes], [items for _, items in sizes], color="tab:purple")
    ax.set_yscale("log")
    ax.set(xlabel="items sharing the SID (bucket size)", ylabel="items", title="Bucket sizes")
    figures.append(("Bucket sizes", _png(fig)))

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    levels = [str(level) for level in range(1, len(stats["codebook"]) + 1)]
    left.bar(levels, [c["utilisation"] for c in stats["codebook"]], color="tab:green")
    left.set(xlabel="level", ylabel="codes used / codebook size", title="Codebook utilisation", ylim=(0, 1.05))
    right.bar(levels, [c["perplexity"] for c in stats["codebook"]], color="tab:orange", label="perplexity")
    right.plot(levels, [c["size"] for c in stats["codebook"]], "k_", markersize=25, label="codebook size")
    right.set(xlabel="level", ylabel="perplexity", title="Codebook perplexity")
    right.legend(fontsize=8)
    figures.append(("Codebook utilisation and perplexity", _png(fig)))

    churn = report.get("churn")
    if churn and "common" in churn:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        kinds = ("unchanged", "changed", "added", "removed")
        ax.barh(kinds, [churn[k] for k in kinds], color=["tab:gray", "tab:red", "tab:green", "tab:blue"])
        ax.set(xlabel="items", title=f"Against parent {report.get('parent')}: churn {churn['churn']:.2%} of the items in both")
        figures.append(("Churn against the parent version", _png(fig)))

    summary = [
        ("items", f"{stats['items']:,}"),
        ("distinct SIDs", f"{stats['distinct_sids']:,}"),
        ("mean SID length", _num(stats.get("mean_sid_len"), 3)),
        ("collision rate", _num(stats.get("collision_rate"), 4)),
        ("largest bucket", str(stats.get("max_bucket"))),
        ("vocabulary", f"{stats['vocab_size']:,}"),
    ]
    acrq = fit.get("acrq")
    if acrq:
        summary += [
            ("ACRQ head-code stability", _num(acrq["head_code_stability"], 4)),
            ("tail reconstruction error, phase 1 -> 2", f"{_num(acrq['tail_recon_error_phase1'], 4)} -> {_num(acrq['tail_recon_error_phase2'], 4)}"),
            ("extension codes used per level", str(list(acrq["extension_codes_used"]))),
        ]
    if churn:
        summary.append(("churn against the parent", f"{churn['churn']:.2%}" + ("" if "common" in churn else " (first version)")))
    segment_rows = [
        [name, f"{seg['items']:,}", _num(seg.get("mean_sid_len"), 2), _num(seg.get("collision_rate"), 4)]
        for name, seg in stats["segments"].items()
    ]
    body = [
        _table(None, summary),
        _table(["segment", "items", "mean SID length", "collision rate"], segment_rows),
        *(_img(alt, png) for alt, png in figures),
    ]
    return _page(title, body)


def retriever_page(report: dict[str, Any], title: str) -> str:
    """A retriever version's page from its train report (``history`` holds the learning curve)."""
    history = report["history"]
    curve = history.get("curve", [])
    plt = _pyplot()
    fig, metric_axis = plt.subplots(figsize=(8, 4))
    examples = [point["examples"] for point in curve]
    metric_axis.plot(examples, [point["metric"] for point in curve], "o-", color="tab:blue", label="selection metric")
    best = [point for point in curve if point["step"] == history.get("best_step")]
    metric_axis.plot([p["examples"] for p in best], [p["metric"] for p in best], "o", markersize=14, fillstyle="none", color="tab:blue")
    metric_axis.set(xlabel="training examples (targets)", ylabel=f"selection metric ({history.get('selected_by', '')})")
    loss_axis = metric_axis.twinx()
    loss_axis.plot(examples, [point["train_loss"] for point in curve], "--", color="tab:red", label="train loss")
    loss_axis.plot(examples, [point["valid_loss"] for point in curve], ":", color="tab:red", label="validation loss")
    loss_axis.set_ylabel("SID token cross-entropy")
    metric_axis.set_title("Learning curve (circle: the selected checkpoint)")
    lines = metric_axis.get_legend_handles_labels()
    more = loss_axis.get_legend_handles_labels()
    metric_axis.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    summary = [
        ("SID version", str(report.get("sid_version"))),
        ("parameters", f"{report.get('parameters', 0):,}"),
        ("selected step / steps", f"{history.get('best_step')} / {history.get('steps')}" + ("" if history.get("converged") else " (not converged)")),
        ("best selection metric", _num(history.get("best_metric"), 4)),
        ("training examples / s", _num(history.get("examples_per_second"), 0)),
        ("tuned scorer", json.dumps(report.get("scorer"))),
    ]
    return _page(title, [_table(None, summary), _img("Learning curve", _png(fig))])


def evaluation_page(report: dict[str, Any], title: str) -> str:
    """An evaluation's page: ``metrics`` as :class:`sa2crq.metrics.retrieval.RetrievalAccumulator` gives them."""
    metrics = report["metrics"]
    names = [name for name in ("recall@5", "recall@10", "ndcg@5", "ndcg@10") if name in metrics]
    segments = ["all", *[s for s in SEGMENTS if metrics["segments"].get(s, {}).get("requests")]]
    values = {"all": metrics, **metrics["segments"]}
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([x + i * width for x in range(len(segments))], [values[s][name] or 0 for s in segments], width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(segments))], [f"{s}\n({values[s]['requests']:,})" for s in segments])
    ax.set(ylabel="mean over requests", title="Recall and NDCG by the target's segment (requests)")
    ax.legend(fontsize=8)
    figures = [("Recall and NDCG by segment", _png(fig))]
    shares = [(k, metrics.get(f"{k}_share_at_k")) for k in ("bucket", "dense")]
    if all(share is not None for _, share in shares):
        fig, ax = plt.subplots(figsize=(7, 1.8))
        left = 0.0
        for (label, share), colour in zip([("from a generated bucket", shares[0][1]), ("from the dense path", shares[1][1]),
                                           ("a generated SID's only item", 1 - shares[0][1] - shares[1][1])],
                                          ["tab:purple", "tab:green", "tab:gray"]):  # fmt: skip
            ax.barh([0], [share], left=left, color=colour, label=f"{label} {share:.0%}")
            left += share
        ax.set(xlim=(0, 1), yticks=[], title=f"Where the top-{metrics.get('k')} came from")
        ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))
        figures.append(("Top-K sources", _png(fig)))
    rows = [[s, f"{values[s]['requests']:,}", *(_num(values[s][n], 4) for n in names)] for s in segments]
    summary = [(key, str(report.get(key))) for key in ("retriever_version", "sid_version")]
    summary += [(key, _num(metrics.get(key), 4)) for key in ("hallucination", "constrained_invalid")]
    return _page(title, [_table(None, summary), _table(["segment", "requests", *names], rows), *(_img(a, p) for a, p in figures)])


def quality_page(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], notes: Sequence[str], curves_png: bytes | None) -> str:
    """The quality benchmark's page: its table (``columns``, ``rows``), notes, the learning curves."""
    body = [_table(columns, rows), *(f"<p>{html.escape(note)}</p>" for note in notes)]
    if curves_png is not None:
        body.append(_img("Learning curves", curves_png))
    return _page(title, body)


# -- building blocks ----------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    _pyplot().close(figure)
    return buffer.getvalue()


def _img(alt: str, png: bytes) -> str:
    encoded = base64.b64encode(png).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _table(header: Sequence[str] | None, rows: Sequence[Sequence[Any]]) -> str:
    """A table; without ``header`` a list of name / value rows."""
    head = "" if header is None else "<thead><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr></thead>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; }
figcaption { color: #666; font-size: 0.85em; }
"""


def _page(title: str, body: Sequence[str]) -> str:
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n"
    )
