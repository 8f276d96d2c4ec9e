"""Every table of the report, as plain data: the HTML page, the CSV files and the Markdown
summary all render these, so a number is computed once (model.py) and shown the same way."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fedblocks.host.report.model import (
    MODELLED_SOURCE,
    RunReport,
    is_measured,
    source_label,
)

Value = float | int | str | None


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    fmt: str = ""  # format spec for display ("" -> str()); CSV always gets the raw value


@dataclass(frozen=True)
class Table:
    id: str  # HTML id, CSV file stem
    title: str
    columns: tuple[Column, ...]
    rows: list[tuple[Value, ...]]
    caption: str = ""  # where the numbers come from
    row_fmts: tuple[str, ...] = ()  # per-row format specs (the summary: one row per metric)

    def display(self, col: int, value: Value, row: int | None = None) -> str:
        if value is None:
            return "—"
        spec = self.columns[col].fmt
        if self.row_fmts and row is not None and col > 0:
            spec = self.row_fmts[row]
        if spec and isinstance(value, int | float) and not isinstance(value, bool):
            return format(value, spec)
        return str(value)


def _when(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _prefix(run: RunReport, index: int, many: bool) -> str:
    return f"run{index + 1}-" if many else ""


# ---------------------------------------------------------------------------- summary (side by side)
SUMMARY_ROWS: tuple[tuple[str, str, str], ...] = (
    ("run_dir", "run directory", ""),
    ("status", "status", ""),
    ("model", "model", ""),
    ("dataset", "dataset", ""),
    ("strategy", "strategy", ""),
    ("testbed", "testbed", ""),
    ("engine", "engine", ""),
    ("devices", "devices (clients)", ""),
    ("rounds", "rounds recorded / planned", ""),
    ("final_accuracy", "final accuracy (round)", ""),
    ("best_accuracy", "best accuracy", ".4f"),
    ("wall_min", "wall-clock time, min", ".2f"),
    ("jobs", "device jobs: ok / total", ""),
    ("peak_footprint", "peak training footprint, MB (device, budget)", ""),
    ("peak_predicted_mb", "largest predicted footprint, MB", ".1f"),
)


def summary_table(runs: Sequence[RunReport]) -> Table:
    """One column per run: the comparison the report opens with."""
    sources: list[str] = []
    for r in runs:
        for t in r.summary.energy_totals:
            if t.source not in sources:
                sources.append(t.source)
    sources.sort(key=lambda s: (not is_measured(s), s != MODELLED_SOURCE, s))
    columns = (Column("metric", "metric"), *(Column(f"run{i + 1}", r.label) for i, r in enumerate(runs)))
    rows: list[tuple[Value, ...]] = []
    fmts: list[str] = []
    for key, title, fmt in SUMMARY_ROWS:
        rows.append((title, *(_summary_value(r, key) for r in runs)))
        fmts.append(fmt)
    for s in sources:
        rows.append((f"energy total, J — {source_label(s)}",
                     *(_energy_total(r, s, "joules") for r in runs)))
        rows.append((f"energy per training sample, J — {source_label(s)}",
                     *(_energy_total(r, s, "per_sample") for r in runs)))
        fmts += [".2f", ".5f"]
    return Table("summary", "Summary", columns, rows, row_fmts=tuple(fmts),
                 caption="From the run store: runs (status, config), rounds (accuracy, times), device_jobs "
                         "(memory, energy). Energy totals are per source: measured and modelled are never added.")


def _energy_total(r: RunReport, source: str, what: str) -> Value:
    for t in r.summary.energy_totals:
        if t.source == source:
            return _r(t.joules, 4) if what == "joules" else _r(t.joules_per_sample, 6)
    return None


def _summary_value(r: RunReport, key: str) -> Value:
    s = r.summary
    if key == "run_dir":
        return str(r.run_dir)
    if key == "status":
        return f"{s.status} (in progress)" if s.in_progress else s.status
    if key in ("model", "dataset", "strategy", "testbed", "engine"):
        return getattr(r, key)
    if key == "devices":
        return f"{len(r.devices)} ({r.num_clients if r.num_clients is not None else '?'})"
    if key == "rounds":
        return f"{s.rounds_recorded} / {s.rounds_planned if s.rounds_planned is not None else '?'}"
    if key == "final_accuracy":
        return None if s.final_accuracy is None else f"{s.final_accuracy:.4f} (round {s.final_accuracy_round})"
    if key == "best_accuracy":
        return s.best_accuracy
    if key == "wall_min":
        return None if s.wall_s is None else _r(s.wall_s / 60.0, 4)
    if key == "jobs":
        return f"{s.jobs_ok} / {s.jobs}"
    if key == "peak_footprint":
        p = s.peak_memory
        if p is None:
            return None
        budget = "no budget" if p.budget_mb is None else f"budget {p.budget_mb:.1f}"
        return f"{p.footprint_mb:.1f} ({p.device}, {budget})"
    if key == "peak_predicted_mb":
        return _r(s.peak_predicted_mb, 3)
    raise KeyError(key)


# ---------------------------------------------------------------------------- per-run tables
def rounds_table(r: RunReport, prefix: str) -> Table:
    rows = [(x.round, x.stage_id, _when(x.started_at),
             _r(x.ended_at - x.started_at, 3) if x.started_at is not None and x.ended_at is not None else None,
             x.selected, x.completed, x.failed, x.accuracy, x.loss, x.em, x.notes) for x in r.rounds]
    return Table(f"{prefix}rounds", "Rounds", (
        Column("round", "round"), Column("stage", "stage"), Column("started", "started"),
        Column("duration_s", "duration, s", ".2f"), Column("selected", "selected"),
        Column("completed", "aggregated"), Column("failed", "failed"), Column("accuracy", "test accuracy", ".4f"),
        Column("loss", "test loss", ".4f"), Column("em", "effective movement", ".4g"), Column("notes", "notes")),
        rows, caption="rounds table: host clock (unix time), accuracy evaluated on the host test set")


def stages_table(r: RunReport, prefix: str) -> Table:
    rows = [(s.stage_id, s.kind, s.block, s.first_round, s.last_round, s.frozen_at_round) for s in r.stages]
    return Table(f"{prefix}stages", "Stages", (
        Column("stage", "stage"), Column("kind", "kind"), Column("block", "block"),
        Column("first_round", "first round"), Column("last_round", "last round"),
        Column("frozen_at_round", "frozen at round")), rows, caption="stages table")


def memory_table(r: RunReport, prefix: str) -> Table:
    rows: list[tuple[Value, ...]] = []
    for c in r.memory:
        if c.excluded:
            state = "excluded by strategy (budget < predicted)"
        elif c.oom_killed:
            state = f"{c.oom_killed} oom_killed" + (" (modelled: prediction over budget)" if c.modelled else "")
        elif c.modelled:
            state = "not measured (prediction vs budget only)"
        else:
            state = "ok"
        rows.append((c.device, c.stage_id, c.jobs, _r(c.footprint_mb, 3), _r(c.peak_rss_mb, 3),
                     _r(c.baseline_rss_mb, 3), _r(c.predicted_mb, 3), _r(c.budget_mb, 3),
                     _r(c.prediction_error_pct, 2), state))
    return Table(f"{prefix}memory", "Memory: measured peak training footprint vs budget vs prediction", (
        Column("device", "device"), Column("stage", "stage"), Column("jobs", "jobs"),
        Column("footprint_mb", "measured footprint, MB (max)", ".1f"), Column("peak_rss_mb", "peak RSS, MB", ".1f"),
        Column("baseline_rss_mb", "baseline RSS, MB", ".1f"), Column("predicted_mb", "predicted, MB", ".1f"),
        Column("budget_mb", "budget, MB", ".1f"), Column("error_pct", "measured vs predicted, %", "+.1f"),
        Column("state", "state")), rows,
        caption="device_jobs: footprint_mb = peak - baseline RSS of the training process (measured on the device, "
                "max over the device's jobs of that stage); predicted_footprint_mb from the manifest; budget_mb")


def latency_table(r: RunReport, prefix: str) -> Table:
    rows: list[tuple[Value, ...]] = []
    for d in r.devices:
        js = [j for j in r.jobs if j.device == d.key]
        if not js:
            continue
        steps = [s for j in js for s in j.step_latency_s]
        q = statistics.quantiles(steps, n=10) if len(steps) >= 2 else None
        med = [j.row.step_time_median_s for j in js if j.row.step_time_median_s is not None]
        rows.append((d.key, len(js), len(steps), _r(statistics.median(steps), 6) if steps else None,
                     _r(q[0], 6) if q else None, _r(q[-1], 6) if q else None,
                     _r(statistics.median(med), 6) if med else None,
                     _r(_mean([j.row.push_s for j in js]), 4), _r(_mean([j.model_load_s for j in js]), 4),
                     _r(_mean([j.train_s for j in js]), 4), _r(_mean([j.row.pull_s for j in js]), 4),
                     "modelled" if any(j.latency_modelled for j in js) else "measured"))
    return Table(f"{prefix}latency", "Latency per device", (
        Column("device", "device"), Column("jobs", "jobs"), Column("steps", "steps"),
        Column("step_median_s", "step median, s", ".4f"), Column("step_p10_s", "step p10, s", ".4f"),
        Column("step_p90_s", "step p90, s", ".4f"), Column("job_median_s", "median of job medians, s", ".4f"),
        Column("push_s", "push, s (mean)", ".2f"), Column("model_load_s", "model load, s (mean)", ".2f"),
        Column("train_s", "train, s (mean)", ".2f"), Column("pull_s", "pull, s (mean)", ".2f"),
        Column("source", "source")), rows,
        caption="step times: metrics.json step_latency_s of every job (device monotonic clock); job medians "
                "exclude the warm-up step; push/pull: host-side transfer times (device_jobs)")


def round_time_table(r: RunReport, prefix: str) -> Table:
    rows = [(t.round, _r(t.wall_s, 4), t.critical_device, _r(t.push_s, 4), _r(t.load_s, 4), _r(t.train_s, 4),
             _r(t.pull_s, 4), _r(t.aggregate_s, 4), _r(t.eval_s, 4), _r(t.host_s, 4)) for t in r.timings]
    return Table(f"{prefix}round_time", "Round-time breakdown (critical path: the slowest job)", (
        Column("round", "round"), Column("wall_s", "round wall time, s", ".2f"),
        Column("critical_device", "slowest device"), Column("push_s", "push, s", ".2f"),
        Column("load_s", "load, s", ".2f"), Column("train_s", "train, s", ".2f"), Column("pull_s", "pull, s", ".2f"),
        Column("aggregate_s", "host: aggregate, s", ".3f"), Column("eval_s", "host: evaluate, s", ".2f"),
        Column("host_s", "host: other, s", ".2f")), rows,
        caption="round wall time from rounds.started_at/ended_at (host clock); the slowest job's phases from "
                "device_jobs and metrics.json (push/pull: host clock, load/train: device clock); aggregate and "
                "evaluate from rounds.aggregate_s / eval_s; 'other' is the remainder (scheduling, job start-up, "
                "polling, recording)")


def energy_table(r: RunReport, prefix: str) -> Table:
    rows: list[tuple[Value, ...]] = []
    for j in r.jobs:
        figs = j.energy_figures() or [None]
        for f in figs:
            rows.append((j.row.round, j.device, j.row.stage_id, j.row.status, j.samples,
                         None if f is None else f.source, None if f is None else ("measured" if is_measured(f.source)
                                                                                 else "modelled" if f.source == MODELLED_SOURCE else "unknown"),
                         None if f is None else _r(f.joules, 6), _r(j.joules_per_sample(f), 8),
                         None if f is None else f.sample_hz, None if f is None else _r(f.window_s, 4),
                         j.row.battery_start, j.row.battery_end, _r(j.battery_drain_pct, 4),
                         j.row.temp_start, j.row.temp_end))
    return Table(f"{prefix}energy", "Energy per job (one row per source)", (
        Column("round", "round"), Column("device", "device"), Column("stage", "stage"), Column("status", "status"),
        Column("samples", "samples"), Column("source", "source"), Column("kind", "measured / modelled"),
        Column("joules", "energy, J", ".3f"), Column("joules_per_sample", "J / sample", ".5f"),
        Column("sample_hz", "sampling, Hz", ".1f"), Column("window_s", "window, s", ".2f"),
        Column("battery_start", "battery start, %", ".1f"), Column("battery_end", "battery end, %", ".1f"),
        Column("battery_drain", "battery drain, %-points", ".2f"), Column("temp_start", "temp start, °C", ".1f"),
        Column("temp_end", "temp end, °C", ".1f")), rows,
        caption="device_jobs.energy_j / energy_source (the job's primary figure) and metrics.json energy_modelled "
                "(the power-profile figure every job also reports); a job with both has two rows")


def energy_totals_table(r: RunReport, prefix: str) -> Table:
    rows = [(t.source, t.label, t.jobs, _r(t.joules, 6), t.ok_samples, _r(t.ok_joules, 6),
             _r(t.joules_per_sample, 8)) for t in r.summary.energy_totals]
    return Table(f"{prefix}energy_totals", "Energy totals per source (never summed across sources)", (
        Column("source", "source"), Column("label", "measured / modelled"), Column("jobs", "jobs"),
        Column("joules", "total, J (all jobs)", ".3f"), Column("ok_samples", "samples (successful jobs)"),
        Column("ok_joules", "J of successful jobs", ".3f"), Column("joules_per_sample", "J / sample", ".5f")), rows,
        caption="sums of the per-job figures of one source; the total includes failed jobs (their energy was spent), "
                "J / sample = successful jobs' joules / their training samples. Window energy, not idle-corrected.")


def devices_table(r: RunReport, prefix: str) -> Table:
    rows = [(d.key, ",".join(map(str, d.clients)) or None, d.model, d.soc, d.abi, _r(d.ram_mb, 1), _r(d.budget_mb, 3),
             d.budget_from, d.profile, d.jobs_run, d.jobs_ok, d.jobs_run - d.jobs_ok, d.failure_summary or None,
             ", ".join(d.excluded_from) or None) for d in r.devices]
    return Table(f"{prefix}devices", "Devices", (
        Column("device", "serial"), Column("clients", "client(s)"), Column("model", "model"), Column("soc", "SoC"),
        Column("abi", "ABI"), Column("ram_mb", "RAM, MB", ".0f"), Column("budget_mb", "budget, MB", ".1f"),
        Column("budget_from", "budget from"), Column("profile", "profile"), Column("jobs", "jobs run"),
        Column("ok", "ok"), Column("failed", "failed"), Column("failure_reasons", "failures and reasons"),
        Column("excluded_from", "excluded from stages")), rows,
        caption="devices table (model, SoC, RAM) + device_jobs (jobs, failures); budgets of clients that never ran "
                "a job from the run's settings.json")


def failures_table(r: RunReport, prefix: str) -> Table:
    rows = [(j.row.round, j.device, j.row.client, j.row.stage_id, j.row.job_id, j.row.status, j.row.reason)
            for j in r.jobs if not j.ok]
    return Table(f"{prefix}failures", "Failed device jobs", (
        Column("round", "round"), Column("device", "device"), Column("client", "client"), Column("stage", "stage"),
        Column("job_id", "job"), Column("status", "status"), Column("reason", "reason")), rows,
        caption="device_jobs with status oom_killed, failed, straggler or rejected (excluded from aggregation)")


def split_table(r: RunReport, prefix: str) -> Table | None:
    """SmartSplit jobs: the cut each device trained to and what crossed the wire (None for other runs)."""
    jobs = [j for j in r.jobs if j.row.cut is not None or (j.row.stage_id or "").startswith("split_front-")]
    if not jobs:
        return None
    rows: list[tuple[Value, ...]] = []
    for j in jobs:
        try:
            metrics = j.row.metrics() or {}
        except ValueError:
            metrics = {}
        split = metrics.get("split") if isinstance(metrics.get("split"), dict) else {}
        server = metrics.get("server") if isinstance(metrics.get("server"), dict) else {}
        recompute = split.get("recompute") if isinstance(split.get("recompute"), dict) else {}
        phase = split.get("phase_s") if isinstance(split.get("phase_s"), dict) else {}
        steps = split.get("steps") if isinstance(split.get("steps"), int) else None
        cut = j.row.cut or (j.row.stage_id or "").removeprefix("split_front-")
        mb = 1024 * 1024
        per_step = (j.row.bytes_up or 0) + (j.row.bytes_down or 0)
        units = recompute.get("final_units") if isinstance(recompute.get("final_units"), list) else []
        rows.append((j.row.round, j.device, j.row.client, cut, j.row.status,
                     None if j.row.bytes_up is None else _r(j.row.bytes_up / mb, 4),
                     None if j.row.bytes_down is None else _r(j.row.bytes_down / mb, 4), steps,
                     _r(per_step / steps / mb, 4) if steps else None,
                     _r(phase.get("wait_s") / steps, 5) if steps and isinstance(phase.get("wait_s"), (int, float))
                     else None, _r(server.get("server_step_s_mean"), 5) if isinstance(
                         server.get("server_step_s_mean"), (int, float)) else None,
                     ", ".join(units) or None, "modelled" if recompute.get("modelled") else
                     ("measured" if split else None)))
    return Table(f"{prefix}split", "SmartSplit: cut per device and bytes transferred", (
        Column("round", "round"), Column("device", "device"), Column("client", "client"), Column("cut", "cut"),
        Column("status", "status"), Column("up_mb", "sent, MB", ".2f"), Column("down_mb", "received, MB", ".2f"),
        Column("steps", "steps"), Column("mb_per_step", "MB / step (both ways)", ".2f"),
        Column("wait_s", "wait per step, s", ".4f"), Column("server_step_s", "server step, s", ".4f"),
        Column("recompute", "recomputed units"), Column("source", "memory decisions")), rows,
        caption="device_jobs.cut / bytes_up / bytes_down (counted by the phone at its socket, framing included); "
                "wait = from the activation sent to the gradient received (network + server); server step and "
                "recomputed units from metrics.json (server: the edge server's session)")


def run_tables(r: RunReport, index: int, many: bool) -> dict[str, Table]:
    p = _prefix(r, index, many)
    tables = [rounds_table(r, p), stages_table(r, p), memory_table(r, p), latency_table(r, p),
              round_time_table(r, p), energy_totals_table(r, p), energy_table(r, p), devices_table(r, p),
              failures_table(r, p)]
    split = split_table(r, p)
    if split is not None:
        tables.append(split)
    return {t.id.removeprefix(p): t for t in tables}


def _mean(values: Sequence[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


__all__ = ["Column", "Table", "run_tables", "summary_table"]
