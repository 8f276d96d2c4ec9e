"""Loads run stores (RUN_DIR/run.sqlite, host/store.py) into typed report data.

Everything the report shows is computed here, from the store's rows (plus the run's
settings.json / summary.json when the store lacks a fact: client budgets of clients
that never ran a job, the dataset actually loaded). Plots, HTML, CSV and Markdown
only format what this module computed, so every number has one source.

Energy rule: a figure carries its source (fuel_gauge, odpm, monsoon: measured;
modelled: a power profile). Totals are per source; measured and modelled are never
added together.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedblocks.host.errors import HostError
from fedblocks.host.store import (
    DB_NAME,
    DeviceJobRow,
    DeviceRow,
    EventRow,
    RoundRow,
    RunRow,
    RunStore,
    StageRow,
)

MEASURED_SOURCES: tuple[str, ...] = ("fuel_gauge", "odpm", "monsoon")
MODELLED_SOURCE = "modelled"
SOURCE_LABELS: dict[str, str] = {
    "fuel_gauge": "measured: fuel gauge",
    "odpm": "measured: ODPM (on-device power monitor)",
    "monsoon": "measured: Monsoon power monitor",
    "modelled": "modelled: power profile",
}
FAILED_STATUSES: tuple[str, ...] = ("oom_killed", "failed", "straggler", "rejected")


def source_label(source: str) -> str:
    return SOURCE_LABELS.get(source, f"unknown source: {source}")


def is_measured(source: str) -> bool:
    return source in MEASURED_SOURCES


# ---------------------------------------------------------------------------- small parsers
def num(value: Any) -> float | None:
    """A finite float, or None (device-reported numbers are untrusted: strings, NaN, bools...)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def num_list(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [f for f in (num(v) for v in value) if f is not None]


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# ---------------------------------------------------------------------------- data classes
@dataclass(frozen=True)
class EnergyFigure:
    source: str  # fuel_gauge | odpm | monsoon | modelled | (anything else: shown as unknown)
    joules: float
    window_s: float | None = None
    sample_hz: float | None = None

    @property
    def label(self) -> str:
        return source_label(self.source)


@dataclass(frozen=True)
class JobReport:
    """One device job (a DeviceJobRow) with what its metrics.json adds."""

    row: DeviceJobRow
    device: str  # serial, or client-N when the job has no serial
    step_latency_s: tuple[float, ...]
    latency_modelled: bool
    memory_modelled: bool
    data_load_s: float | None
    model_load_s: float | None
    train_s: float | None
    measured_energy: EnergyFigure | None
    modelled_energy: EnergyFigure | None
    other_energy: EnergyFigure | None  # a source this report does not know (kept apart)

    @property
    def ok(self) -> bool:
        return self.row.status == "ok"

    @property
    def samples(self) -> int | None:
        return self.row.samples

    def energy_figures(self) -> list[EnergyFigure]:
        return [f for f in (self.measured_energy, self.modelled_energy, self.other_energy) if f is not None]

    def joules_per_sample(self, figure: EnergyFigure | None) -> float | None:
        if figure is None or not self.samples:
            return None
        return figure.joules / self.samples

    @property
    def battery_drain_pct(self) -> float | None:
        if self.row.battery_start is None or self.row.battery_end is None:
            return None
        return self.row.battery_start - self.row.battery_end


@dataclass(frozen=True)
class DeviceReport:
    key: str  # serial (or client-N)
    clients: tuple[int, ...]
    model: str | None
    soc: str | None
    abi: str | None
    ram_mb: float | None
    budget_mb: float | None
    budget_from: str  # devices table | device jobs | settings.json | none
    profile: str | None
    jobs_run: int
    jobs_ok: int
    failures: tuple[tuple[str, str], ...]  # (status, reason), one per failed job
    excluded_from: tuple[str, ...]  # stages the strategy never gave it (budget < prediction)

    @property
    def failure_summary(self) -> str:
        counts: dict[str, int] = defaultdict(int)
        for status, reason in self.failures:
            counts[f"{status}: {reason}" if reason else status] += 1
        return "; ".join(f"{n}x {what}" if n > 1 else what for what, n in counts.items())


@dataclass(frozen=True)
class MemoryCell:
    """One (device, stage): measured peak training footprint vs budget vs the manifest's prediction."""

    device: str
    stage_id: str
    jobs: int
    footprint_mb: float | None  # max measured footprint (peak - baseline RSS) over the jobs
    peak_rss_mb: float | None
    baseline_rss_mb: float | None
    predicted_mb: float | None
    budget_mb: float | None
    oom_killed: int
    excluded: bool  # the strategy never gave this device this stage (budget below the prediction)
    modelled: bool  # no measurement: the simulated testbed compares the prediction with the budget

    @property
    def prediction_error_pct(self) -> float | None:
        if self.footprint_mb is None or not self.predicted_mb:
            return None
        return 100.0 * (self.footprint_mb - self.predicted_mb) / self.predicted_mb


@dataclass(frozen=True)
class RoundTiming:
    """Where one round's wall time went (the slowest job is the round's critical path)."""

    round: int
    wall_s: float | None
    critical_device: str | None
    push_s: float | None
    load_s: float | None  # shard + model load on the device
    train_s: float | None
    pull_s: float | None
    aggregate_s: float | None = None  # host: rounds.aggregate_s
    eval_s: float | None = None  # host: rounds.eval_s

    @property
    def host_s(self) -> float | None:
        """What remains of the round: scheduling, shard and weight files, job start-up and polling,
        recording (and aggregation / evaluation in run stores that did not time them)."""
        if self.wall_s is None:
            return None
        spent = sum(v for v in (self.push_s, self.load_s, self.train_s, self.pull_s, self.aggregate_s, self.eval_s)
                    if v is not None)
        return max(0.0, self.wall_s - spent)


@dataclass(frozen=True)
class EnergyTotal:
    source: str
    joules: float  # every job with a figure of this source, failed ones included (that energy was spent)
    jobs: int  # jobs that contributed a figure of this source
    ok_joules: float  # the successful jobs' share ...
    ok_samples: int  # ... and the training samples they contributed

    @property
    def label(self) -> str:
        return source_label(self.source)

    @property
    def joules_per_sample(self) -> float | None:
        """Joules per training sample of the successful jobs (a failed job has no samples to divide by)."""
        return self.ok_joules / self.ok_samples if self.ok_samples else None


@dataclass(frozen=True)
class PeakMemory:
    footprint_mb: float
    device: str
    round: int
    stage_id: str | None
    budget_mb: float | None
    predicted_mb: float | None


@dataclass(frozen=True)
class Note:
    level: str  # info | warning
    text: str


@dataclass(frozen=True)
class RunSummary:
    status: str
    in_progress: bool
    rounds_recorded: int
    rounds_planned: int | None
    final_accuracy: float | None
    final_accuracy_round: int | None
    best_accuracy: float | None
    wall_s: float | None
    jobs: int
    jobs_ok: int
    jobs_failed: int
    energy_totals: tuple[EnergyTotal, ...]  # one per source, never summed across sources
    peak_memory: PeakMemory | None
    peak_predicted_mb: float | None


@dataclass
class RunReport:
    """Everything the report shows for one run."""

    run_dir: Path
    label: str
    run: RunRow
    config: dict[str, Any]
    model: str | None
    dataset: str | None
    strategy: str | None
    testbed: str | None
    engine: str | None
    num_clients: int | None
    rounds: list[RoundRow]
    stages: list[StageRow]
    jobs: list[JobReport]
    devices: list[DeviceReport]
    events: list[EventRow]
    memory: list[MemoryCell]
    timings: list[RoundTiming]
    summary: RunSummary
    notes: list[Note] = field(default_factory=list)

    @property
    def t0(self) -> float:
        return self.run.created_at

    def stage_spans(self) -> list[tuple[str, int, int]]:
        """(stage id, first round, last round), in order."""
        spans = [(s.stage_id, s.first_round, s.last_round) for s in self.stages
                 if s.first_round is not None and s.last_round is not None]
        if spans:
            return sorted(spans, key=lambda s: s[1])  # type: ignore[arg-type, return-value]
        out: list[tuple[str, int, int]] = []
        for r in self.rounds:
            sid = r.stage_id or "?"
            if out and out[-1][0] == sid:
                out[-1] = (sid, out[-1][1], r.round)
            else:
                out.append((sid, r.round, r.round))
        return out

    def sources(self) -> list[str]:
        """Energy sources present, measured ones first."""
        found = {f.source for j in self.jobs for f in j.energy_figures()}
        return sorted(found, key=lambda s: (not is_measured(s), s != MODELLED_SOURCE, s))


# ---------------------------------------------------------------------------- loading
def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Each RUN_DIR as given, or a comparison directory's runs (`fedblocks run --compare` writes
    RUN_DIR/<strategy>/). HostError for anything else."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if (p / DB_NAME).is_file():
            out.append(p)
            continue
        if not p.exists():
            raise HostError(f"{p}: no such directory; pass a run directory written by `fedblocks run`")
        subs = sorted(d for d in p.iterdir() if d.is_dir() and (d / DB_NAME).is_file()) if p.is_dir() else []
        if not subs:
            raise HostError(f"{p}: not a run directory (no {DB_NAME}); pass a directory written by `fedblocks run`")
        out.extend(subs)
    return out


def load_runs(paths: Sequence[Path]) -> list[RunReport]:
    runs = [load_run(p) for p in find_run_dirs(paths)]
    _unique_labels(runs)
    return runs


def _unique_labels(runs: list[RunReport]) -> None:
    seen: dict[str, int] = defaultdict(int)
    for r in runs:
        seen[r.label] += 1
    for r in runs:
        if seen[r.label] > 1:
            r.label = f"{r.label} ({r.run_dir.name})"


def _read_json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_run(run_dir: Path) -> RunReport:
    run_dir = Path(run_dir)
    if not (run_dir / DB_NAME).is_file():
        raise HostError(f"{run_dir}: not a run directory (no {DB_NAME}); pass a directory written by `fedblocks run`")
    with RunStore.open(run_dir) as store:
        run = store.run()
        rounds = store.rounds()
        stages = store.stages()
        job_rows = store.device_jobs()
        device_rows = store.devices()
        events = store.events()
    try:
        config = run.config()
    except ValueError:
        config = {}
    settings = _read_json_file(run_dir / "settings.json")  # written by the round loop (RunSettings)
    final = _read_json_file(run_dir / "summary.json")  # written by the round loop when the run ends
    return build_run_report(run_dir, run, config if isinstance(config, dict) else {}, rounds, stages, job_rows,
                            device_rows, events, settings, final)


def _cfg(config: Mapping[str, Any], section: str, key: str, flat_key: str | None = None) -> Any:
    """A config value from either layout: ExperimentConfig.to_dict() (nested) or RunSettings (flat)."""
    sub = config.get(section)
    if isinstance(sub, dict):
        return sub.get(key)
    if flat_key is not None:
        return config.get(flat_key)
    return sub if section == key or key == "name" else None


def build_run_report(run_dir: Path, run: RunRow, config: dict[str, Any], rounds: list[RoundRow],
                     stages: list[StageRow], job_rows: list[DeviceJobRow], device_rows: list[DeviceRow],
                     events: list[EventRow], settings: Mapping[str, Any] | None = None,
                     final_summary: Mapping[str, Any] | None = None) -> RunReport:
    settings = settings or {}
    final_summary = final_summary or {}
    notes: list[Note] = []
    model = _text(_cfg(config, "model", "name")) or _text(settings.get("model"))
    dataset = _text(final_summary.get("dataset")) or _text(_cfg(config, "dataset", "name")) \
        or _text(settings.get("dataset"))
    configured_dataset = _text(_cfg(config, "dataset", "name"))
    if dataset and configured_dataset and dataset != configured_dataset:
        notes.append(Note("warning", f"dataset: the config names {configured_dataset}, but its files were absent "
                                     f"and the fallback {dataset} was loaded (summary.json)"))
    strategy = _text(_cfg(config, "strategy", "name")) or _text(settings.get("strategy"))
    testbed = _text(_cfg(config, "clients", "testbed", "testbed")) or _text(settings.get("testbed"))
    engine = _text(_cfg(config, "clients", "engine", "engine")) or _text(settings.get("engine"))
    num_clients = _cfg(config, "clients", "count", "num_clients") or settings.get("num_clients")
    num_clients = num_clients if isinstance(num_clients, int) and not isinstance(num_clients, bool) else None
    planned = _cfg(config, "training", "rounds", "rounds") or settings.get("rounds")
    planned = planned if isinstance(planned, int) and not isinstance(planned, bool) else None

    jobs = [_job_report(r) for r in job_rows]
    client_serial = {j.row.client: j.device for j in jobs if j.row.client is not None}
    devices = _devices(jobs, device_rows, settings, num_clients, client_serial)
    respects_budgets = _respects_budgets(strategy)
    memory, excluded = _memory(jobs, devices, stages, rounds, respects_budgets, _excluded_by_events(events))
    devices = [_with_exclusions(d, excluded.get(d.key, [])) for d in devices]
    timings = [_round_timing(r, [j for j in jobs if j.row.round == r.round]) for r in rounds]
    summary = _summary(run, rounds, jobs, memory, planned)
    label = " · ".join(x for x in (strategy, run.name) if x) or run_dir.name
    report = RunReport(run_dir=run_dir, label=label, run=run, config=config, model=model, dataset=dataset,
                       strategy=strategy, testbed=testbed, engine=engine, num_clients=num_clients, rounds=rounds,
                       stages=stages, jobs=jobs, devices=devices, events=events, memory=memory, timings=timings,
                       summary=summary, notes=notes)
    report.notes.extend(_notes(report, device_rows, settings))
    return report


def _respects_budgets(strategy: str | None) -> bool:
    """Whether the strategy gives a stage only to clients whose budget fits its prediction."""
    if strategy is None:
        return False
    from fedblocks.host.strategies import STRATEGIES

    cls = STRATEGIES.get(strategy)
    return bool(getattr(cls, "respects_budgets", False)) if cls is not None else False


def _job_report(row: DeviceJobRow) -> JobReport:
    try:
        metrics = _dict(row.metrics())
    except ValueError:
        metrics = {}
    device = row.serial or (f"client-{row.client}" if row.client is not None else "unknown")
    energy = _dict(metrics.get("energy"))
    measured = modelled = other = None
    if row.energy_j is not None and row.energy_source:
        fig = EnergyFigure(row.energy_source, row.energy_j, num(energy.get("window_s")), num(energy.get("sample_hz")))
        if is_measured(row.energy_source):
            measured = fig
        elif row.energy_source == MODELLED_SOURCE:
            modelled = fig
        else:
            other = fig
    em = _dict(metrics.get("energy_modelled"))
    em_j = num(em.get("joules"))
    if modelled is None and em_j is not None and em.get("source", MODELLED_SOURCE) == MODELLED_SOURCE:
        modelled = EnergyFigure(MODELLED_SOURCE, em_j, num(em.get("window_s")), None)
    mem = _dict(metrics.get("memory"))
    return JobReport(
        row=row, device=device, step_latency_s=tuple(num_list(metrics.get("step_latency_s"))),
        latency_modelled=metrics.get("latency_source") == "modelled",
        memory_modelled=mem.get("peak_source") == "modelled" or (row.footprint_mb is None and row.peak_rss_mb is None),
        data_load_s=num(metrics.get("data_load_s")),
        model_load_s=row.model_load_s if row.model_load_s is not None else num(metrics.get("model_load_s")),
        train_s=row.train_s if row.train_s is not None else num(metrics.get("train_s")),
        measured_energy=measured, modelled_energy=modelled, other_energy=other)


def _client_budget(settings: Mapping[str, Any], client: int) -> float | None:
    budgets = settings.get("budgets_mb")
    if isinstance(budgets, list) and 0 <= client < len(budgets):
        return num(budgets[client])
    return None


def _devices(jobs: list[JobReport], device_rows: list[DeviceRow], settings: Mapping[str, Any],
             num_clients: int | None, client_serial: dict[int, str]) -> list[DeviceReport]:
    by_key: dict[str, list[JobReport]] = defaultdict(list)
    for j in jobs:
        by_key[j.device].append(j)
    rows = {d.serial: d for d in device_rows}
    keys: list[str] = list(dict.fromkeys([*rows, *by_key]))
    for c in range(num_clients or 0):
        if c not in client_serial:
            keys.append(f"client-{c}")  # never ran a job: known only from the config
    profiles = settings.get("profiles") if isinstance(settings.get("profiles"), list) else []
    out = []
    for key in keys:
        js = by_key.get(key, [])
        row = rows.get(key)
        clients = tuple(sorted({j.row.client for j in js if j.row.client is not None}))
        if not clients and key.startswith("client-") and key[7:].isdigit():
            clients = (int(key[7:]),)
        budget, budget_from = None, "none"
        if row is not None and row.budget_mb is not None:
            budget, budget_from = row.budget_mb, "devices table"
        elif any(j.row.budget_mb is not None for j in js):
            budget, budget_from = next(j.row.budget_mb for j in js if j.row.budget_mb is not None), "device jobs"
        elif clients and _client_budget(settings, clients[0]) is not None:
            budget, budget_from = _client_budget(settings, clients[0]), "settings.json"
        profile = row.profile if row is not None else None
        if profile is None and clients and profiles:
            p = profiles[clients[0] % len(profiles)]
            profile = p if isinstance(p, str) else None
        out.append(DeviceReport(
            key=key, clients=clients, model=row.model if row else None, soc=row.soc if row else None,
            abi=row.abi if row else None, ram_mb=row.ram_mb if row else None, budget_mb=budget,
            budget_from=budget_from, profile=profile, jobs_run=len(js), jobs_ok=sum(1 for j in js if j.ok),
            failures=tuple((j.row.status, j.row.reason or "") for j in js if not j.ok), excluded_from=()))
    return out


def _with_exclusions(d: DeviceReport, stages: list[str]) -> DeviceReport:
    if not stages:
        return d
    from dataclasses import replace

    return replace(d, excluded_from=tuple(stages))


def _max(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _excluded_by_events(events: list[EventRow]) -> dict[str, set[str]]:
    """stage -> device keys the round loop recorded as excluded (`clients_excluded` events)."""
    out: dict[str, set[str]] = defaultdict(set)
    for data in (e.data() for e in events if e.kind == "clients_excluded"):
        if isinstance(data, dict) and isinstance(data.get("stage"), str):
            out[data["stage"]].update(str(s) for s in data.get("serials") or [] if isinstance(s, str))
    return out


def _memory(jobs: list[JobReport], devices: list[DeviceReport], stages: list[StageRow], rounds: list[RoundRow],
            respects_budgets: bool, recorded: Mapping[str, set[str]] | None = None
            ) -> tuple[list[MemoryCell], dict[str, list[str]]]:
    stage_ids = list(dict.fromkeys([*(s.stage_id for s in stages), *(r.stage_id for r in rounds if r.stage_id),
                                    *(j.row.stage_id for j in jobs if j.row.stage_id)]))
    predicted = {sid: _max(j.row.predicted_footprint_mb for j in jobs if j.row.stage_id == sid) for sid in stage_ids}
    cells: list[MemoryCell] = []
    excluded: dict[str, list[str]] = defaultdict(list)
    for d in devices:
        for sid in stage_ids:
            js = [j for j in jobs if j.device == d.key and j.row.stage_id == sid]
            pred = predicted[sid]
            # A budget-respecting strategy never gives a stage to a device whose budget is below the
            # stage's predicted footprint (strategies/base.py eligible()); once phones measured more than
            # predicted it plans with that, and the loop records whom that excluded (clients_excluded),
            # possibly after the device ran the stage.
            was_excluded = (respects_budgets and d.budget_mb is not None and pred is not None
                            and pred > d.budget_mb) or d.key in (recorded or {}).get(sid, set())
            if was_excluded:
                excluded[d.key].append(sid)
            if not js:
                if was_excluded:
                    cells.append(MemoryCell(d.key, sid, 0, None, None, None, pred, d.budget_mb, 0, True, False))
                continue
            cells.append(MemoryCell(
                device=d.key, stage_id=sid, jobs=len(js), footprint_mb=_max(j.row.footprint_mb for j in js),
                peak_rss_mb=_max(j.row.peak_rss_mb for j in js), baseline_rss_mb=_max(j.row.baseline_rss_mb for j in js),
                predicted_mb=_max(j.row.predicted_footprint_mb for j in js) or pred,
                budget_mb=_max(j.row.budget_mb for j in js) or d.budget_mb,
                oom_killed=sum(1 for j in js if j.row.status == "oom_killed"), excluded=was_excluded,
                modelled=all(j.memory_modelled for j in js)))
    return cells, excluded


def _round_timing(r: RoundRow, jobs: list[JobReport]) -> RoundTiming:
    wall = r.ended_at - r.started_at if r.started_at is not None and r.ended_at is not None else None

    def total(j: JobReport) -> float:
        return sum(v or 0.0 for v in (j.row.push_s, j.data_load_s, j.model_load_s, j.train_s, j.row.pull_s))

    if not jobs:
        return RoundTiming(r.round, wall, None, None, None, None, None, r.aggregate_s, r.eval_s)
    crit = max(jobs, key=total)
    load = None if crit.data_load_s is None and crit.model_load_s is None else \
        (crit.data_load_s or 0.0) + (crit.model_load_s or 0.0)
    return RoundTiming(r.round, wall, crit.device, crit.row.push_s, load, crit.train_s, crit.row.pull_s,
                       r.aggregate_s, r.eval_s)


def energy_totals(jobs: Iterable[JobReport]) -> tuple[EnergyTotal, ...]:
    """Total joules per source over all jobs (failed jobs included: that energy was spent)."""
    joules: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    ok_joules: dict[str, float] = defaultdict(float)
    ok_samples: dict[str, int] = defaultdict(int)
    for j in jobs:
        for f in j.energy_figures():
            joules[f.source] += f.joules
            count[f.source] += 1
            if j.ok and j.samples:
                ok_joules[f.source] += f.joules
                ok_samples[f.source] += j.samples
    order = sorted(joules, key=lambda s: (not is_measured(s), s != MODELLED_SOURCE, s))
    return tuple(EnergyTotal(s, joules[s], count[s], ok_joules[s], ok_samples[s]) for s in order)


def _summary(run: RunRow, rounds: list[RoundRow], jobs: list[JobReport], memory: list[MemoryCell],
             planned: int | None) -> RunSummary:
    evaluated = [r for r in rounds if r.accuracy is not None]
    last = evaluated[-1] if evaluated else None
    peak: PeakMemory | None = None
    for j in jobs:
        fp = j.row.footprint_mb
        if fp is not None and (peak is None or fp > peak.footprint_mb):
            peak = PeakMemory(fp, j.device, j.row.round, j.row.stage_id, j.row.budget_mb, j.row.predicted_footprint_mb)
    # the later of finished_at and the last round's end (they come from one host clock)
    ends = [r.ended_at for r in rounds if r.ended_at is not None] + \
        ([run.finished_at] if run.finished_at is not None else [])
    end = max(ends) if ends else None
    in_progress = run.finished_at is None or run.status in ("created", "running")
    return RunSummary(
        status=run.status, in_progress=in_progress, rounds_recorded=len(rounds), rounds_planned=planned,
        final_accuracy=last.accuracy if last else None, final_accuracy_round=last.round if last else None,
        best_accuracy=max((r.accuracy for r in evaluated if r.accuracy is not None), default=None),
        wall_s=None if end is None else end - run.created_at, jobs=len(jobs), jobs_ok=sum(1 for j in jobs if j.ok),
        jobs_failed=sum(1 for j in jobs if not j.ok), energy_totals=energy_totals(jobs), peak_memory=peak,
        peak_predicted_mb=_max(c.predicted_mb for c in memory if not c.excluded))


def _notes(r: RunReport, device_rows: list[DeviceRow], settings: Mapping[str, Any]) -> list[Note]:
    s = r.summary
    notes: list[Note] = []
    if s.in_progress:
        planned = f" of {s.rounds_planned}" if s.rounds_planned else ""
        notes.append(Note("warning", f"run still in progress (status {s.status}, no finished_at): {s.rounds_recorded}"
                                     f"{planned} round(s) recorded so far; every figure covers the recorded rounds "
                                     "only, and the final accuracy is the latest evaluated one"))
    elif s.status != "finished":
        notes.append(Note("warning", f"run ended with status {s.status} after {s.rounds_recorded} round(s)"))
    elif s.rounds_planned and s.rounds_recorded < s.rounds_planned:
        notes.append(Note("info", f"{s.rounds_recorded} of {s.rounds_planned} planned rounds ran (the strategy "
                                  "ended the run early)"))
    unfinished = [x.round for x in r.rounds if x.ended_at is None]
    if unfinished:
        notes.append(Note("warning", f"round(s) {', '.join(map(str, unfinished))} have no end time yet (partial)"))
    if not r.rounds:
        notes.append(Note("warning", "no rounds recorded yet: accuracy, latency and energy sections are empty"))
    elif s.final_accuracy is None:
        notes.append(Note("warning", "no round was evaluated yet: no accuracy figures"))
    if s.jobs_failed:
        by_status: dict[str, int] = defaultdict(int)
        for j in r.jobs:
            if not j.ok:
                by_status[j.row.status] += 1
        devs = sorted({j.device for j in r.jobs if not j.ok})
        notes.append(Note("warning", f"{s.jobs_failed} of {s.jobs} device job(s) did not return a usable result ("
                                     + ", ".join(f"{n} {k}" for k, n in sorted(by_status.items()))
                                     + f") on {', '.join(devs)}; their results were excluded from aggregation — "
                                       "reasons in the Devices and Failures tables"))
    sources = r.sources()
    if r.jobs and not sources:
        notes.append(Note("warning", "no energy figures recorded for any job"))
    elif sources and not any(is_measured(x) for x in sources):
        notes.append(Note("warning", "no MEASURED energy in this run: every energy figure is MODELLED from a power "
                                     "profile (CPU time x active power + wall time x idle power), not measured"))
    if r.testbed == "virtual" and any(is_measured(x) for x in sources):
        notes.append(Note("warning", "virtual phones: their fuel gauge / thermal files are the virtual phone's "
                                     "model (CPU use x profile power, testbed/virtual/sysfs.py), read through the real "
                                     "meter code: the pipeline is real, the joules are not a physical measurement"))
    unknown = [x for x in sources if not is_measured(x) and x != MODELLED_SOURCE]
    if unknown:
        notes.append(Note("warning", f"energy source(s) {', '.join(unknown)} are unknown to this report: shown apart, "
                                     "never added to other sources"))
    if r.jobs and all(j.memory_modelled for j in r.jobs):
        notes.append(Note("info", "memory was not measured (no peak RSS recorded): the Memory section compares the "
                                  "manifest's predicted footprint with each budget only"))
    if r.jobs and any(j.latency_modelled for j in r.jobs):
        notes.append(Note("info", "step times of simulated clients are MODELLED (host wall time / the profile's "
                                  "cpu_speed), not measured on a phone"))
    if r.jobs and all(j.row.push_s is None and j.row.pull_s is None for j in r.jobs):
        notes.append(Note("info", "push / pull times were not recorded: the round-time breakdown counts transfers in "
                                  "the host remainder"))
    if not device_rows:
        src = "settings.json" if settings.get("budgets_mb") else "the device jobs"
        notes.append(Note("info", f"the run store holds no device descriptions (model, SoC, RAM): devices are listed "
                                  f"from {src}"))
    if any(d.excluded_from for d in r.devices):
        ex = [f"{d.key} ({', '.join(d.excluded_from)})" for d in r.devices if d.excluded_from]
        notes.append(Note("info", f"excluded by the strategy (budget below the stage's predicted footprint): "
                                  f"{'; '.join(ex)}"))
    return notes


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
