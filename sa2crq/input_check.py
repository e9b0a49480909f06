"""``sa2crq validate``: every input check of a run, without the run.

The checks are the run's own (:func:`sa2crq.data.validation.validate_catalog`, which ``sa2crq tokenize``
calls too), run in dry-run mode: every row is quarantined whatever the ceilings say, and every refusal
is collected instead of the first being raised, so one look shows what a run would accept, quarantine
(with a few example rows per reason) and refuse. Nothing is embedded or trained.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from sa2crq.data.embed import EMBEDDING_DIM
from sa2crq.data.validation import (
    EMBEDDING_COLUMN,
    INTERACTION_REJECT_REASONS,
    ITEM_REJECT_REASONS,
    REJECT_KEY_COLUMNS,
    REJECT_REASON_COLUMN,
    InputError,
    ValidatedCatalog,
    check_embedding_mix,
    check_items_schema,
    readable_rows,
    validate_catalog,
    write_catalog_rejects,
)
from sa2crq.storage.reports import dumps_report

SUMMARY_FILE = "validation.json"
EXAMPLES_PER_REASON = 3
_VALUE_WIDTH = 60
_LIST_HEAD = 4
_REASONS = {"items": ITEM_REJECT_REASONS, "interactions": INTERACTION_REJECT_REASONS}
_TEXT = "text"  # stands for the items' text columns, which only the schema names

# What shows why a row broke a rule, beside the columns that identify it (REJECT_KEY_COLUMNS).
_OFFENDING_COLUMNS: dict[str, dict[str, tuple[str, ...]]] = {
    "items": {
        "null_item_id": (_TEXT,),  # the id is the offence; the text says which row it is
        "duplicate_item_id": (_TEXT,),
        "invalid_utf8": (_TEXT,),  # shown as bytes where they do not decode
        "embedding_wrong_dimension": (EMBEDDING_COLUMN,),
        "embedding_non_finite": (EMBEDDING_COLUMN,),
        "embedding_zero_norm": (EMBEDDING_COLUMN,),
        "no_text_or_embedding": (_TEXT, EMBEDDING_COLUMN),
    },
    "interactions": {
        "null_user_id": ("timestamp",),
        "null_item_id": ("timestamp",),
        "null_timestamp": ("timestamp",),
        "invalid_utf8": ("timestamp",),
        "unknown_item_id": ("timestamp",),
        "duplicate_interaction": ("timestamp",),
    },
}


@dataclass(frozen=True)
class InputCheck:
    """The dry run's result: both tables validated, the ceiling applied, and example rejects per reason.

    ``examples``: table -> reject reason -> up to ``EXAMPLES_PER_REASON`` rows of column -> shown value.
    """

    validated: ValidatedCatalog
    max_reject_fraction: float
    examples: dict[str, dict[str, list[dict[str, str]]]]

    @property
    def accepted(self) -> bool:
        """Whether a run would go on with this input (quarantined rows are allowed under the ceiling)."""
        return not self.validated.refusals

    def summary(self) -> dict[str, Any]:
        """JSON-ready; ``input`` has the shape of a run report's ``input`` section."""
        return {
            "accepted": self.accepted,
            "max_reject_fraction": self.max_reject_fraction,
            # The first is the error a run stops with; the rest are what a rerun would meet next.
            "refusals": [str(refusal) for refusal in self.validated.refusals],
            "input": self.validated.counts,
            "examples": self.examples,
        }


def check_input(
    items: pa.Table, interactions: pa.Table, *, max_reject_fraction: float, examples_per_reason: int = EXAMPLES_PER_REASON
) -> InputCheck:
    validated = validate_catalog(items, interactions, max_reject_fraction=max_reject_fraction, stop_at_refusal=False)
    if validated.items is not None:
        try:  # a run meets this last, when it embeds the items it accepted
            check_embedding_mix(validated.items.valid, EMBEDDING_DIM)
        except InputError as refusal:
            validated = replace(validated, refusals=(*validated.refusals, refusal))
    examples = {}
    if validated.items is not None:
        text_columns, _ = check_items_schema(validated.items.valid.schema)
        examples["items"] = _examples("items", validated.items.rejects, examples_per_reason, text_columns)
    if validated.interactions is not None:
        examples["interactions"] = _examples("interactions", validated.interactions.rejects, examples_per_reason, [])
    return InputCheck(validated, max_reject_fraction, examples)


def format_input_check(check: InputCheck, sources: dict[str, str]) -> str:
    """The printout: per table rows in = accepted + quarantined, each reason with examples, then the verdict.

    ``sources``: table name -> where it was read from.
    """
    validated = check.validated
    lines: list[str] = []
    for name, table in (("items", validated.items), ("interactions", validated.interactions)):
        if table is None:
            lines.append(f"{name} ({sources[name]}): not checked row by row (refused below)")
            continue
        counts = table.counts
        share = counts["rejected"] / counts["rows_in"]
        lines.append(
            f"{name} ({sources[name]}): rows in {counts['rows_in']} = accepted {counts['rows_out']} "
            f"+ quarantined {counts['rejected']} ({share:.2%}; ceiling {check.max_reject_fraction:.2%})"
        )
        for reason in _REASONS[name]:  # in rule order, as the rejects file reports them
            rows = counts["by_reason"].get(reason, 0)
            if not rows:
                continue
            lines.append(f"  {reason}: {rows} row{'' if rows == 1 else 's'}")
            lines += ["    " + "  ".join(f"{k}={v}" for k, v in row.items()) for row in check.examples[name][reason]]
    lines.append("")
    if check.accepted:
        lines.append(
            f"accepted: a run would go on with {validated.items.counts['rows_out']} items and "
            f"{validated.interactions.counts['rows_out']} interactions"
        )
    else:
        first, *later = validated.refusals
        lines.append(f"refused: a run would stop with\n  error: {first}")
        if later:
            lines.append("and, as the input stands, a rerun would next stop with")
            lines += [f"  error: {refusal}" for refusal in later]
    return "\n".join(lines)


def write_input_check(check: InputCheck, out_dir: str | Path) -> dict[str, str]:
    """The rejects files as a run writes them, and the summary (``validation.json``), under ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = write_catalog_rejects(check.validated, out)
    (out / SUMMARY_FILE).write_text(dumps_report(check.summary()))
    return written | {"summary": str(out / SUMMARY_FILE)}


def _examples(name: str, rejects: pa.Table, per_reason: int, text_columns: list[str]) -> dict[str, list[dict[str, str]]]:
    """The first ``per_reason`` rejects of each reason: their key columns and the offending values, shown short."""
    examples = {}
    for reason in pc.unique(rejects[REJECT_REASON_COLUMN]).to_pylist():
        offending = [
            column
            for wanted in _OFFENDING_COLUMNS[name][reason]
            for column in (text_columns if wanted == _TEXT else [wanted])
            if column in rejects.column_names
        ]
        rows = rejects.filter(pc.equal(rejects[REJECT_REASON_COLUMN], reason)).slice(0, per_reason)
        shown = readable_rows(rows.select([*REJECT_KEY_COLUMNS[name], *offending]))
        examples[reason] = [{column: _show(value) for column, value in row.items()} for row in shown]
    return dict(sorted(examples.items()))


def _show(value: Any) -> str:
    """A value as printed: lists by their first elements and length, long strings cut."""
    if isinstance(value, list):
        head = ", ".join("null" if v is None else f"{v:.4g}" for v in value[:_LIST_HEAD])
        more = ", …" if len(value) > _LIST_HEAD else ""
        return f"[{head}{more}] ({len(value)} values)"
    shown = "null" if value is None else repr(value)
    return shown if len(shown) <= _VALUE_WIDTH else shown[: _VALUE_WIDTH - 1] + "…"
