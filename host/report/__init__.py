"""`fedblocks report`: run stores -> one self-contained HTML page (+ CSV tables, + Markdown summary).

    from fedblocks.host.report import build_report
    result = build_report([Path("runs/a"), Path("runs/b")], Path("report.html"), csv_dir=None, markdown=None)

model.py loads the stores into typed data; tables.py and plots.py turn it into tables
and SVG figures; html.py and export.py write them. docs/report.md says where each number
comes from.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedblocks.host.errors import HostError
from fedblocks.host.report.model import RunReport, load_runs


@dataclass
class ReportResult:
    html: Path
    runs: list[RunReport]
    csv_files: list[Path] = field(default_factory=list)
    markdown: Path | None = None
    tables: list[str] = field(default_factory=list)  # ids of every table in the page
    plots: list[str] = field(default_factory=list)  # ids of every figure in the page


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fedblocks {version('fedblocks')}"
    except PackageNotFoundError:
        return "fedblocks"


def _write_atomic(path: Path, text: str, what: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise HostError(f"{what} {path}: cannot write ({exc.strerror or exc})") from None


def build_report(run_dirs: Sequence[Path], out: Path, csv_dir: Path | None = None,
                 markdown: Path | None = None) -> ReportResult:
    from fedblocks.host.report import export, html, plots, tables

    if not run_dirs:
        raise HostError("give at least one RUN_DIR")
    runs = load_runs([Path(p) for p in run_dirs])
    many = len(runs) > 1
    summary = tables.summary_table(runs)
    top = [plots.accuracy_plot(runs), plots.em_plot(runs), plots.comparison_energy_plot(runs)]
    per_run = []
    all_tables = [summary]
    for i, r in enumerate(runs):
        pid = f"run{i + 1}-" if many else ""
        ts = tables.run_tables(r, i, many)
        ps = {p.id.removeprefix(pid).removeprefix("fig-"): p for p in plots.run_plots(r, pid)}
        per_run.append((r, pid, ts, ps))
        all_tables.extend(ts.values())
    page = html.render_page(runs, summary, top, per_run, _version())
    _write_atomic(Path(out), page, "--out")
    result = ReportResult(html=Path(out), runs=runs, tables=[t.id for t in all_tables],
                          plots=[p.id for p in top if p is not None]
                          + [p.id for _, _, _, ps in per_run for p in ps.values()])
    if csv_dir is not None:
        result.csv_files = export.write_csv(all_tables, Path(csv_dir))
    if markdown is not None:
        _write_atomic(Path(markdown), export.markdown_summary(runs, summary), "--markdown")
        result.markdown = Path(markdown)
    return result


__all__ = ["ReportResult", "build_report"]
