"""`fedblocks report RUN_DIR [RUN_DIR ...] --out report.html [--csv DIR] [--markdown FILE] [--json]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="one self-contained HTML report of one or more runs (+ CSV tables, Markdown summary)",
        description="Build one self-contained HTML page (inline SVG plots, opens offline) from run directories "
                    "written by `fedblocks run`; several runs are compared side by side. See docs/report.md.")
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="run directory (holds run.sqlite), or a `fedblocks run --compare` directory of runs")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write (default report.html)")
    p.add_argument("--csv", type=Path, default=None, metavar="DIR", help="also write every table as DIR/<table>.csv")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE",
                   help="also write a short Markdown summary (for a paper or an issue)")
    p.add_argument("--json", action="store_true", help="print what was written (and the summary) as JSON")
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from fedblocks.host.report import build_report

    result = build_report(args.run_dirs, args.out, csv_dir=args.csv, markdown=args.markdown)
    if args.json:
        print(json.dumps({
            "html": str(result.html), "csv": [str(p) for p in result.csv_files],
            "markdown": None if result.markdown is None else str(result.markdown),
            "tables": result.tables, "plots": result.plots,
            "runs": [{"run_dir": str(r.run_dir), "label": r.label, "status": r.summary.status,
                      "in_progress": r.summary.in_progress, "rounds": r.summary.rounds_recorded,
                      "final_accuracy": r.summary.final_accuracy,
                      "energy_j": {t.source: t.joules for t in r.summary.energy_totals},
                      "notes": [n.text for n in r.notes]} for r in result.runs],
        }, indent=1))
        return 0
    print(f"wrote {result.html} ({len(result.runs)} run(s), {len(result.plots)} figures, {len(result.tables)} tables)")
    for r in result.runs:
        warnings = [n for n in r.notes if n.level == "warning"]
        for n in warnings:
            print(f"  note ({r.label}): {n.text}")
    if result.csv_files:
        print(f"wrote {len(result.csv_files)} CSV file(s) to {result.csv_files[0].parent}")
    if result.markdown is not None:
        print(f"wrote {result.markdown}")
    return 0
