"""Every benchmark target of a ``make bench`` run in one table, printed last.

Each benchmark script calls :func:`report` for each ratio it checks against a
target; ``make bench`` empties the file first and runs this module at the
end. ``python bench/summary.py`` prints what the scripts run since then
reported.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

SUMMARY = Path(__file__).resolve().parent / "out" / "summary.jsonl"


def report(what: str, result: str, target: str, met: bool | None) -> None:
    """Record one target's outcome (``met`` None: not measurable on this machine)."""
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    row = {"bench": Path(sys.argv[0]).name, "what": what, "result": result, "target": target}
    with SUMMARY.open("a") as out:
        out.write(json.dumps({**row, "met": met}) + "\n")


def main() -> None:
    if not SUMMARY.exists():
        raise SystemExit(f"no results: {SUMMARY} does not exist (run `make bench`)")
    rows = [json.loads(line) for line in SUMMARY.read_text().splitlines() if line.strip()]
    table = Table(title="make bench: every target, as measured in this run")
    for column in ("benchmark", "what", "result", "target", "met"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for r in rows:
        met = {True: "yes", False: "NO", None: "n/a"}[r["met"]]
        table.add_row(r["bench"], r["what"], r["result"], r["target"], met)
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    missed = sum(r["met"] is False for r in rows)
    print(f"{len(rows)} targets: {len(rows) - missed} met or n/a, {missed} not met")


if __name__ == "__main__":
    main()
