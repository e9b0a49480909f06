"""What a job wrote where, with row counts: every job ends by printing one of these."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Output:
    name: str
    location: str
    rows: int | None = None  # None for non-tabular outputs (checkpoints, reports)
    unit: str = "rows"


@dataclass
class JobSummary:
    job: str
    version: str | None = None  # the version published, if any
    published: bool = False
    publishes: bool = True  # False for jobs that write outputs but no version (evaluate)
    outputs: list[Output] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, location: str, rows: int | None = None, unit: str = "rows") -> None:
        self.outputs.append(Output(name, location, rows, unit))

    def format(self) -> str:
        state = f"published version {self.version}" if self.published else "published nothing" if self.publishes else "done"
        lines = [f"{self.job}: {state}"]
        width = max((len(o.name) for o in self.outputs), default=0)
        for o in self.outputs:
            rows = f"  ({o.rows:,} {o.unit})" if o.rows is not None else ""
            lines.append(f"  {o.name:<{width}}  {o.location}{rows}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)
