"""Shared pieces of the fault cases: quick or long form, and the results table.

``make test`` runs every fault case in its quick form (a few repetitions). ``make
faults`` sets ``ORCHESTRATORD_FAULTS=long`` for the long form and
``ORCHESTRATORD_FAULTS_REPORT`` to a JSON-lines file, where each case appends one row
(``record``); ``python -m tests.support.faults FILE`` prints the rows as the table
docs/reliability.md shows.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

LONG = os.environ.get("ORCHESTRATORD_FAULTS") == "long"


def runs(quick: int, long: int) -> int:
    """How many repetitions (or seconds) this form of the suite gives a case."""
    return long if LONG else quick


@dataclass
class CaseResult:
    """One case's figures. ``None`` where a figure does not apply to the case."""

    case: str
    runs: int
    written: int | None = None  # teammate messages written
    reported: int | None = None  # of those, reported (exactly once each)
    sent: int | None = None  # prompts sent to the orchestrator session
    duplicated: int | None = None  # prompts whose messageID was seen twice, or triggers reported twice
    lost: int | None = None  # messages never reported, prompts recorded but never sent
    worst_recovery: float | None = None  # seconds from the fault's end to the daemon's recovery
    crashes: int = 0  # daemon exits nobody asked for
    notes: str = ""


def record(result: CaseResult) -> None:
    """Append the case's row to the report file, when one is being written."""
    path = os.environ.get("ORCHESTRATORD_FAULTS_REPORT")
    if not path:
        return
    with open(path, "a") as out:
        out.write(json.dumps(asdict(result)) + "\n")


def table(rows: list[CaseResult]) -> str:
    """The rows as a Markdown table (what docs/reliability.md shows)."""
    heads = ["case", "runs", "messages written/reported", "prompts sent/duplicated/lost", "worst recovery",
             "crashes", "notes"]

    def cell(v: object) -> str:
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
    for r in rows:
        msgs = "-" if r.written is None else f"{r.written}/{cell(r.reported)}"
        prompts = "-" if r.sent is None else f"{r.sent}/{cell(r.duplicated)}/{cell(r.lost)}"
        recovery = "-" if r.worst_recovery is None else f"{r.worst_recovery:.1f} s"
        lines.append(f"| {r.case} | {r.runs} | {msgs} | {prompts} | {recovery} | {r.crashes} | {r.notes} |")
    return "\n".join(lines)


def load(path: Path) -> list[CaseResult]:
    names = {f.name for f in fields(CaseResult)}
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            rows.append(CaseResult(**{k: v for k, v in data.items() if k in names}))
    return rows


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.support.faults REPORT.jsonl", file=sys.stderr)
        return 2
    path = Path(argv[0])
    if not path.exists():
        print(f"no fault results in {path}: did any fault case run?", file=sys.stderr)
        return 1
    print(table(load(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
