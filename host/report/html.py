"""One self-contained HTML page: inline CSS, inline SVG figures, no scripts, no network."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from datetime import UTC, datetime

from fedblocks.host.report.model import RunReport
from fedblocks.host.report.plots import Plot
from fedblocks.host.report.tables import Table, Value

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px 32px; color: #222;
       max-width: 1500px; }
h1 { margin-bottom: 4px; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 4px; margin-top: 36px; }
h3 { margin-top: 28px; font-size: 20px; color: #333; } h4 { margin: 16px 0 4px; } .meta { color: #666; font-size: 13px; }
nav { font-size: 13px; margin: 10px 0 18px; } nav a { margin-right: 12px; }
table.data { border-collapse: collapse; font-size: 12.5px; margin: 8px 0 4px; }
table.data th, table.data td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; vertical-align: top; }
table.data th { background: #f3f3f3; } table.data td.text, table.data th.text { text-align: left; }
table.data tr:nth-child(even) td { background: #fafafa; }
td.missing { color: #aaa; } .caption { color: #666; font-size: 12px; margin: 2px 0 14px; max-width: 1100px; }
figure { margin: 12px 0 18px; } figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 12px; max-width: 1100px; }
.notes { list-style: none; padding: 0; } .notes li { padding: 6px 10px; margin: 4px 0; border-radius: 4px; }
.notes li.warning { background: #fff4e5; border-left: 4px solid #f0a020; }
.notes li.info { background: #eef5fc; border-left: 4px solid #5b9bd5; }
.source-measured { color: #1a7f37; font-weight: 600; } .source-modelled { color: #6f42c1; font-weight: 600; }
details > summary { cursor: pointer; color: #0366d6; font-size: 13px; margin: 6px 0; }
.empty { color: #888; font-style: italic; }
"""


def _value_attr(value: Value) -> str:
    if value is None:
        return "null"
    return json.dumps(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)


def render_table(t: Table, collapsed: bool = False) -> str:
    if not t.rows:
        body = f'<p class="empty" id="{t.id}-empty">No rows: nothing of this kind recorded.</p>'
        table = f'<table class="data" id="{html.escape(t.id)}" data-rows="0"></table>'
        return f"<h4>{html.escape(t.title)}</h4>{body}{table}<p class=\"caption\">{html.escape(t.caption)}</p>"
    numeric = [any(isinstance(row[i], int | float) and not isinstance(row[i], bool) for row in t.rows)
               for i in range(len(t.columns))]
    head = "".join(f'<th class="{"num" if numeric[i] else "text"}" data-key="{html.escape(c.key)}">'
                   f"{html.escape(c.title)}</th>" for i, c in enumerate(t.columns))
    rows = []
    for ri, row in enumerate(t.rows):
        cells = []
        for i, v in enumerate(row):
            cls = "missing" if v is None else ("num" if numeric[i] else "text")
            cells.append(f'<td class="{cls}" data-key="{html.escape(t.columns[i].key)}" '
                         f'data-value="{html.escape(_value_attr(v), quote=True)}">{html.escape(t.display(i, v, ri))}</td>')
        rows.append(f"<tr>{''.join(cells)}</tr>")
    table = (f'<table class="data" id="{html.escape(t.id)}" data-rows="{len(t.rows)}"><thead><tr>{head}</tr></thead>'
             f"<tbody>{''.join(rows)}</tbody></table>")
    if collapsed:
        table = f"<details><summary>{len(t.rows)} rows — show</summary>{table}</details>"
    return f"<h4>{html.escape(t.title)}</h4>{table}<p class=\"caption\">{html.escape(t.caption)}</p>"


def render_plot(p: Plot) -> str:
    return (f'<figure id="{html.escape(p.id)}" class="plot">{p.svg}'
            f"<figcaption>{html.escape(p.caption)}</figcaption></figure>")


def _notes(runs: Sequence[RunReport]) -> str:
    items = []
    for r in runs:
        for n in r.notes:
            prefix = f"<b>{html.escape(r.label)}</b>: " if len(runs) > 1 else ""
            items.append(f'<li class="{n.level}">{prefix}{html.escape(n.text)}</li>')
    if not items:
        return '<p class="empty">Nothing missing: every section has its data.</p>'
    return f'<ul class="notes" id="notes-list">{"".join(items)}</ul>'


def render_page(runs: Sequence[RunReport], summary: Table, top_plots: Sequence[Plot | None],
                per_run: Sequence[tuple[RunReport, str, dict[str, Table], dict[str, Plot]]],
                version: str) -> str:
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = "fedblocks report — " + " vs ".join(r.label for r in runs)
    nav = ['<a href="#notes">Notes</a>', '<a href="#summary">Summary</a>', '<a href="#accuracy">Accuracy</a>']
    for r, pid, _, _ in per_run:
        anchor = pid.rstrip("-") or "run"
        nav.append(f'<a href="#{anchor}">{html.escape(r.label)}</a>')
    parts = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             f'<p class="meta">Generated {generated} by {html.escape(version)} from: '
             + ", ".join(f"<code>{html.escape(str(r.run_dir))}</code>" for r in runs)
             + '. Energy figures say where they come from: <span class="source-measured">measured</span> '
               '(fuel gauge, ODPM, Monsoon) or <span class="source-modelled">modelled</span> (power profile); '
               "the two are never added together.</p>",
             f"<nav>{''.join(nav)}</nav>",
             f'<section id="notes"><h2>Notes: what is missing or partial</h2>{_notes(runs)}</section>',
             f'<section id="summary"><h2>Summary</h2>{render_table(summary)}']
    compare = next((p for p in top_plots if p is not None and p.id == "fig-compare-energy"), None)
    if compare is not None:
        parts.append(render_plot(compare))
    parts.append("</section>")
    acc = [p for p in top_plots if p is not None and p.id in ("fig-accuracy", "fig-em")]
    parts.append('<section id="accuracy"><h2>Accuracy and effective movement</h2>')
    parts.extend(render_plot(p) for p in acc)
    if not any(p.id == "fig-accuracy" for p in acc):
        parts.append('<p class="empty">No evaluated round yet: no accuracy curve.</p>')
    if not any(p.id == "fig-em" for p in acc):
        parts.append('<p class="empty">No effective movement recorded (the strategy does not compute it, '
                     "or no round finished).</p>")
    parts.append("</section>")
    for r, pid, tables, plots in per_run:
        anchor = pid.rstrip("-") or "run"
        parts.append(f'<section id="{anchor}" class="run"><h2>{html.escape(r.label)}</h2>'
                     f'<p class="meta">{html.escape(str(r.run_dir))} · model {html.escape(str(r.model))} · dataset '
                     f"{html.escape(str(r.dataset))} · testbed {html.escape(str(r.testbed))} · engine "
                     f"{html.escape(str(r.engine))}</p>")
        parts.append('<h3 class="section">Memory</h3>')
        if "memory" in plots:
            parts.append(render_plot(plots["memory"]))
        parts.append(render_table(tables["memory"]))
        parts.append('<h3 class="section">Latency</h3>')
        for key in ("steps", "roundtime"):
            if key in plots:
                parts.append(render_plot(plots[key]))
        parts.append(render_table(tables["latency"]))
        parts.append(render_table(tables["round_time"], collapsed=len(tables["round_time"].rows) > 12))
        parts.append('<h3 class="section">Energy</h3>')
        parts.append(render_table(tables["energy_totals"]))
        for key in ("energy-round", "energy-sample", "battery"):
            if key in plots:
                parts.append(render_plot(plots[key]))
        parts.append(render_table(tables["energy"], collapsed=len(tables["energy"].rows) > 12))
        if "split" in tables:
            parts.append('<h3 class="section">SmartSplit</h3>')
            parts.append(render_table(tables["split"], collapsed=len(tables["split"].rows) > 12))
        parts.append('<h3 class="section">Devices and failures</h3>')
        parts.append(render_table(tables["devices"]))
        parts.append(render_table(tables["failures"], collapsed=len(tables["failures"].rows) > 12))
        parts.append(render_table(tables["rounds"], collapsed=len(tables["rounds"].rows) > 25))
        parts.append(render_table(tables["stages"]))
        parts.append("</section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
