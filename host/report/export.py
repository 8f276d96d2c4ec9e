"""CSV export of every table, and the short Markdown summary for a paper or an issue."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from fedblocks.host.errors import HostError
from fedblocks.host.report.model import RunReport, source_label
from fedblocks.host.report.tables import Table


def write_csv(tables: Sequence[Table], out_dir: Path) -> list[Path]:
    """One CSV per table (`<table id>.csv`, header = column keys, raw values, empty = missing)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HostError(f"--csv {out_dir}: cannot create the directory ({exc.strerror or exc})") from None
    paths = []
    for t in tables:
        path = out_dir / f"{t.id}.csv"
        with path.open("w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow([c.key if t.id != "summary" else (c.key if i == 0 else c.title)
                        for i, c in enumerate(t.columns)])
            for row in t.rows:
                w.writerow(["" if v is None else v for v in row])
        paths.append(path)
    return paths


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(t: Table) -> str:
    head = "| " + " | ".join(_md_cell(c.title) for c in t.columns) + " |"
    rule = "|" + "|".join("---" for _ in t.columns) + "|"
    body = ["| " + " | ".join(_md_cell(t.display(i, v, ri)) for i, v in enumerate(row)) + " |"
            for ri, row in enumerate(t.rows)]
    return "\n".join([head, rule, *body])


def markdown_summary(runs: Sequence[RunReport], summary: Table) -> str:
    lines = ["## fedblocks: " + " vs ".join(r.label for r in runs), "", markdown_table(summary), ""]
    sources = sorted({t.source for r in runs for t in r.summary.energy_totals})
    if sources:
        lines.append("Energy sources: " + "; ".join(source_label(s) for s in sources)
                     + ". Measured and modelled figures are reported separately, never summed.")
        lines.append("")
    notes = [(r, n) for r in runs for n in r.notes if n.level == "warning"]
    if notes:
        lines.append("Notes:")
        lines.extend(f"- {r.label}: {n.text}" if len(runs) > 1 else f"- {n.text}" for r, n in notes)
        lines.append("")
    return "\n".join(lines)
